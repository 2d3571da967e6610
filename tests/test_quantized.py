"""NF4 expert weights (QLoRA): the parameter, ``moekit.quantize_experts``, and models on it against eager.

(a) ``NF4Tensor`` holds bitsandbytes' codes and scales, looks like the dense weight to everything around it
    (shape, strides, dtype, ``.to()``, ``state_dict`` / ``load_state_dict``, deepcopy, one expert by index) and
    refuses anything else with an error naming the op, and a gradient; double-quantized (scales in 8 bits) too.
(b) ``quantize_experts`` quantizes every experts module in place and nothing else.
(c) Models: a tiny model with NF4 experts on moekit equals the same model whose experts hold bitsandbytes'
    dequantized weights on transformers' eager experts: logits and every LoRA gradient, fp32 rel <= 1e-5, for
    nemotron_h (plain and latent), qwen3_moe, gpt_oss, mixtral and deepseek_v3 (double-quantized scales too, on
    two of them); per experts module in bf16 (routing fixed): the output rel <= 1e-2, the input and routing-weight
    gradients no further from fp64 than eager's own bf16 (or within 1e-2). The reference engine dequantizes one
    expert at a time.
(d) PEFT on top: a quantized base asked to train is a clear error; LoRA trains with gradient checkpointing; the
    adapter saved is a plain PEFT adapter that loads and merges on the original dense model; the QLoRA model
    generates (KV cache: one token a sequence a call) as eager does on the dequantized weights.
"""

from __future__ import annotations

import copy
import io

import experts_factory as ef
import pytest
import tiny_models as tm
import torch

import moekit
from moekit.enable import experts_modules
from moekit.options import OPTIONS
from moekit.quant import NF4Tensor, quantize_experts, to_bitsandbytes
from moekit.quant.experts import expert_weight_names, quantize_module
from moekit.quant.nf4 import dequantize_absmax, dequantize_nf4, double_quantize, quantize_nf4
from moekit.quant.tensor import held_bytes

bnb = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODEL_TYPES = ("nemotron_h", "nemotron_h_latent", "qwen3_moe", "gpt_oss", "mixtral", "deepseek_v3")


@pytest.fixture(autouse=True, scope="module")
def _cpu_reference_setup():
    with tm.torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(OPTIONS, "backend", "")
        yield


def _bnb_dequantized(weight: torch.Tensor) -> torch.Tensor:
    packed, state = bnb.quantize_4bit(weight.detach(), blocksize=64, quant_type="nf4")
    return bnb.dequantize_4bit(packed, state).reshape(weight.shape)


def _eager_on_dequantized(model: torch.nn.Module, quantized: torch.nn.Module | None = None) -> torch.nn.Module:
    """A copy of ``model`` (dense) whose expert weights hold bitsandbytes' dequantized NF4 values: of its own
    quantization, or (``quantized``: a quantized copy of ``model``, PEFT-wrapped or not) of the NF4 states that
    copy exports (``to_bitsandbytes``, double-quantized scales as held)."""
    twin = copy.deepcopy(model)
    theirs = experts_modules(quantized) if quantized is not None else [None] * len(experts_modules(twin))
    with torch.no_grad():
        for module, source in zip(experts_modules(twin), theirs, strict=True):
            for name in expert_weight_names(module):
                if source is None:
                    values = _bnb_dequantized(getattr(module, name))
                else:
                    held = getattr(source, name)
                    nf4 = held.nf4_weight()
                    values = bnb.dequantize_4bit(*to_bitsandbytes(nf4, nf4.double_quant is not None))
                    values = values.reshape(nf4.shape)
                    values = values.transpose(1, 2) if held.is_transposed_view else values
                getattr(module, name).copy_(values)
    return twin


# ---------------------------------------------------------------------------------------------------------------
# (a) the parameter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codes_are_bitsandbytes(dtype):
    weight = torch.randn(5, 48, 32).to(dtype)
    quantized = NF4Tensor.quantize(weight)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert quantized.packed.shape == (5, 48 * 32 // 2) and quantized.absmax.shape == (5, 48 * 32 // 64)
    assert torch.equal(quantized.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(quantized.absmax.reshape(-1), state.absmax)
    assert torch.equal(quantized.dequantize(), bnb.dequantize_4bit(packed, state).reshape(weight.shape))
    assert quantized.shape == weight.shape and quantized.dtype == dtype and quantized.stride() == weight.stride()


def test_chunked_quantization_equals_one_pass(monkeypatch):
    weight = torch.randn(7, 32, 64)
    whole = NF4Tensor.quantize(weight)
    monkeypatch.setattr("moekit.quant.tensor.QUANTIZE_CHUNK", 2 * 32 * 64)  # two experts at a time
    chunked = NF4Tensor.quantize(weight)
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.absmax, chunked.absmax)


def test_views_and_experts():
    weight = torch.randn(4, 24, 16)
    quantized = NF4Tensor.quantize(weight)
    dense = quantized.dequantize()
    view = quantized.transpose(1, 2)
    assert view.shape == (4, 16, 24) and view.stride() == (384, 1, 16) and view.is_transposed_view
    assert view.stored_shape == weight.shape
    assert torch.equal(view.dequantize(), dense.transpose(1, 2))
    assert torch.equal(view.dequantize_experts(1, 3), dense[1:3].transpose(1, 2))
    assert torch.equal(quantized[2], dense[2]) and torch.equal(quantized[-1], dense[3])
    assert torch.equal(view[1], dense[1].t())
    assert view.transpose(-1, -2).stride() == quantized.stride()


def test_module_behaviour():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(NF4Tensor.quantize(torch.randn(3, 16, 8)), requires_grad=False)
    assert isinstance(module.weight, torch.nn.Parameter) and not module.weight.requires_grad
    codes = module.weight.packed.clone()
    module.to(torch.bfloat16)  # the compute dtype changes, the codes stay
    assert isinstance(module.weight, NF4Tensor) and module.weight.dtype == torch.bfloat16
    assert torch.equal(module.weight.packed, codes)
    twin = copy.deepcopy(module)
    assert twin.weight.packed.data_ptr() != module.weight.packed.data_ptr()
    assert torch.equal(twin.weight.dequantize(), module.weight.dequantize())

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)["weight"]  # torch.load's default, weights_only=True
    assert isinstance(saved, NF4Tensor) and torch.equal(saved.packed, codes)

    dense = torch.randn(3, 16, 8)  # a dense checkpoint quantizes on load
    module.load_state_dict({"weight": dense})
    assert torch.equal(module.weight.packed, quantize_nf4(dense).packed.view(3, -1))
    module.load_state_dict({"weight": saved})
    assert torch.equal(module.weight.packed, codes)
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict({"weight": torch.randn(3, 8, 16)})
    with pytest.raises(ValueError, match="shape"):
        module.weight.copy_(torch.randn(3, 8, 16))


def test_refusals():
    quantized = NF4Tensor.quantize(torch.randn(2, 16, 8))
    with pytest.raises(RuntimeError, match="frozen"):
        quantized.requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"aten\.add\.Tensor.*moekit"):
        quantized + 1
    with pytest.raises(NotImplementedError, match=r"aten\.add_\.Tensor would change .* in place.*merge"):
        quantized.data += 1  # what PEFT's merge does
    with pytest.raises(NotImplementedError, match=r"aten\.mm|aten\.matmul|aten\.bmm"):
        torch.bmm(torch.randn(2, 4, 16), quantized)
    with pytest.raises(ValueError, match="multiple of the NF4 block size"):
        NF4Tensor.quantize(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="3-D"):
        NF4Tensor.quantize(torch.randn(64, 64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        NF4Tensor.quantize(torch.full((2, 8, 8), float("nan")))


def test_double_quantized_weights():
    """Scales held in 8 bits over the whole weight as stored (``nf4.double_quantize``): the same codes, fewer bytes,
    ``absmax`` and every dequantization from the 8-bit scales; views, one expert, ``.to()``, deepcopy, state_dict and
    copies between the two kinds keep their values; a range of experts that would split a block of 256 scales (here
    any: each expert holds 60) is refused with a reason (tests/test_nf4_fsdp.py shards whole blocks)."""
    weight = torch.randn(6, 40, 96, dtype=torch.bfloat16)
    plain, double = NF4Tensor.quantize(weight), NF4Tensor.quantize(weight, double_quant=True)
    assert double.double_quantized and not plain.double_quantized and "double_quant=True" in repr(double)
    assert torch.equal(double.packed, plain.packed)
    blocks = 6 * 40 * 96 // 64
    assert held_bytes(plain) == 6 * 40 * 96 // 2 + 4 * blocks
    assert held_bytes(double) == 6 * 40 * 96 // 2 + blocks + 4 * -(-blocks // 256) + 4
    held = double_quantize(plain.absmax)
    assert torch.equal(double.absmax.reshape(-1), dequantize_absmax(held))
    assert torch.equal(double.block_scales(2, 5), double.absmax[2:5])
    dense = double.dequantize()
    want = dequantize_nf4(plain.nf4_weight()._replace(absmax=dequantize_absmax(held)))
    assert torch.equal(dense, want) and not torch.equal(dense, plain.dequantize())
    assert tm.rel_err(dense.float(), plain.dequantize().float()) <= 1e-2
    assert torch.equal(double[3], dense[3]) and torch.equal(double.transpose(1, 2)[1], dense[1].t())
    assert torch.equal(double.nf4_weight().double_quant.codes, held.codes)
    moved = double.to(torch.float32)
    assert moved.double_quantized and moved.dtype == torch.float32
    assert torch.equal(moved.dequantize(torch.bfloat16), dense)
    assert torch.equal(copy.deepcopy(double).dequantize(), dense)

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(double, requires_grad=False)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)["weight"]
    assert saved.double_quantized and torch.equal(saved.dequantize(), dense)
    target = NF4Tensor.quantize(torch.randn(6, 40, 96), torch.bfloat16, double_quant=True)
    for source in (saved, plain, weight):  # double-quantized, plain NF4 and dense sources give the same weight
        target.copy_(torch.randn(6, 40, 96))
        target.copy_(source)
        assert torch.equal(target.dequantize(), dense)
    fp32_scales = NF4Tensor.quantize(torch.randn(6, 40, 96), torch.bfloat16)
    fp32_scales.copy_(double)  # the 8-bit scales, dequantized
    assert torch.equal(fp32_scales.dequantize(), dense)
    for refused in (lambda: double.split(3), lambda: double[1:3], lambda: double[5:]):
        with pytest.raises(
            NotImplementedError, match=r"double-quantized NF4 .*multiple of 64 experts.*double_quant=False"
        ):
            refused()
    assert torch.equal(double[:6].dequantize(), dense) and double.view(-1).absmax_codes is double.absmax_codes


# ---------------------------------------------------------------------------------------------------------------
# (b) quantize_experts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["nemotron_h", "gpt_oss"])
def test_quantize_experts_touches_only_expert_weights(model_type):
    model = tm.build(model_type)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert quantize_experts(model) is model
    quantized = set()
    for module in experts_modules(model):
        assert module.config._experts_implementation == moekit.BACKEND_NAME
        for name in expert_weight_names(module):
            assert isinstance(getattr(module, name), NF4Tensor)
    for name, param in model.named_parameters():
        if isinstance(param, NF4Tensor):
            quantized.add(name)
            assert torch.equal(param.packed.reshape(-1), quantize_nf4(before[name]).packed)
        else:
            assert torch.equal(param, before[name]), name  # biases, router, attention, embeddings
    assert quantized and all(name.split(".")[-1] in ("gate_up_proj", "up_proj", "down_proj") for name in quantized)
    assert len(quantized) == 2 * len(experts_modules(model))
    codes = {name: p.packed.clone() for name, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    quantize_experts(model)  # idempotent: already quantized weights are left alone
    assert all(torch.equal(p.packed, codes[name]) for name, p in model.named_parameters() if name in codes)


def test_quantize_experts_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_experts(tm.build("qwen3_moe"), "int3")
    with pytest.raises(ValueError, match="no experts module"):
        quantize_experts(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="double_quant must be True or False, got 'yes'"):
        quantize_experts(tm.build("qwen3_moe"), double_quant="yes")


# ---------------------------------------------------------------------------------------------------------------
# (c) models against eager on bitsandbytes' dequantized weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, double_quant", [*((m, False) for m in MODEL_TYPES), ("nemotron_h_latent", True), ("gpt_oss", True)]
)
def test_model_lora_equals_eager_on_dequantized(model_type, double_quant, monkeypatch):
    """Double-quantized: the eager twin holds bitsandbytes' dequantization of the state moekit exports (its own
    8-bit scales), so both sides compute on the same weights."""
    dense = tm.build(model_type)
    quantized = tm.add_lora(quantize_experts(copy.deepcopy(dense), double_quant=double_quant))
    eager = tm.add_lora(_eager_on_dequantized(dense, quantized if double_quant else None))
    widest = []  # experts dequantized at once by the engine: never more than one
    original = NF4Tensor.dequantize_experts

    def spy(self, first, last, dtype=None):
        widest.append(last - first)
        return original(self, first, last, dtype)

    monkeypatch.setattr(NF4Tensor, "dequantize_experts", spy)
    input_ids = tm.sample_batch()
    with tm.RoutingRecorder(quantized) as ours, tm.RoutingRecorder(eager) as theirs:
        logits, grads = tm.forward_backward(quantized, input_ids, loss="sumsq")
        want_logits, want_grads = tm.forward_backward(eager, input_ids, loss="sumsq")
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours.calls, theirs.calls, strict=True))
    assert tm.rel_err(logits, want_logits) <= 1e-5
    assert set(grads) == set(want_grads) and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert grad is not None and tm.rel_err(grad, want_grads[name]) <= 1e-5, name
    assert widest and max(widest) == 1


@pytest.mark.parametrize("family", ef.FAMILIES)
def test_experts_bf16_equal_eager_on_dequantized(family):
    module = ef.make_experts(family, hidden=64, intermediate=32, num_experts=6, dtype=torch.bfloat16)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name in expert_weight_names(twin):
            getattr(twin, name).copy_(_bnb_dequantized(getattr(twin, name)))
    quantize_module(module)
    inputs = ef.make_inputs(40, 64, 6, 2, dtype=torch.bfloat16)
    out, grads = ef.run_experts(module, moekit.BACKEND_NAME, *inputs)
    want_out, want_grads = ef.run_experts(twin, "eager", *inputs)
    # the same weights and inputs in fp64: the truth both bf16 computations round away from
    truth_out, truth = ef.run_experts(copy.deepcopy(twin).double(), "eager", *(t.double() if t.is_floating_point() else t
                                                                                for t in inputs))  # fmt: skip
    assert tm.rel_err(out, want_out) <= 1e-2 and tm.rel_err(out.double(), truth_out) <= 1e-2
    for name in ("x", "routing_weights"):
        # no further from the truth than eager's own bf16 (gpt-oss: bf16 moves pre-activations across its clamp,
        # 8 % of dX in both; torch 2.14's eager lands 15 % away)
        ours, eager = tm.rel_err(grads[name].double(), truth[name]), tm.rel_err(want_grads[name].double(), truth[name])
        assert ours <= max(1e-2, 1.1 * eager), (name, ours, eager)


# ---------------------------------------------------------------------------------------------------------------
# (d) PEFT on the quantized base
# ---------------------------------------------------------------------------------------------------------------


def test_quantized_base_cannot_train():
    model = quantize_experts(tm.build("qwen3_moe"))
    module = experts_modules(model)[0]
    module.gate_up_proj.requires_grad = True
    with pytest.raises(RuntimeError, match="frozen base"):
        model(tm.sample_batch())
    with pytest.raises(RuntimeError, match="frozen base"):
        model.requires_grad_(True)


def test_lora_trains_with_gradient_checkpointing():
    model = quantize_experts(tm.build("nemotron_h"))
    peft_model = tm.add_lora(model)
    peft_model.train()
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(not isinstance(p, NF4Tensor) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    input_ids = tm.sample_batch(batch=4, seq=16)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = peft_model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_saved_adapter_applies_to_the_dense_model(tmp_path):
    from peft import PeftModel

    dense = tm.build("qwen3_moe")
    quantized = tm.add_lora(quantize_experts(copy.deepcopy(dense)))
    quantized.save_pretrained(tmp_path)
    state = {k: v for k, v in PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path).state_dict().items()
             if "lora_" in k}  # fmt: skip
    ours = {k: v for k, v in quantized.state_dict().items() if "lora_" in k}
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k]) for k in ours)

    reloaded = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path)  # eager experts, plain PEFT
    input_ids = tm.sample_batch()
    with torch.no_grad():
        unmerged = reloaded(input_ids).logits
        merged = reloaded.merge_and_unload()(input_ids).logits
        # the adapter on the dequantized base equals the quantized model's output
        on_dequantized = PeftModel.from_pretrained(_eager_on_dequantized(dense), tmp_path)(input_ids).logits
        on_quantized = quantized(input_ids).logits
    assert tm.rel_err(merged, unmerged) <= 1e-5
    assert tm.rel_err(on_quantized, on_dequantized) <= 1e-5


def _counting(run, tokens_seen: list[int]):
    """``run`` (an engine's) that records the tokens of each call."""

    def counted(call, plan, *args, **kwargs):
        tokens_seen.append(plan.num_tokens)
        return run(call, plan, *args, **kwargs)

    return counted


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h", "gpt_oss"])
def test_qlora_model_generates_as_eager_on_dequantized(model_type, monkeypatch):
    """``generate`` with the KV cache: after the prompt every experts call sees one token a sequence. Greedy
    tokens equal, and every step's scores within fp32 rounding of eager on bitsandbytes' dequantized weights with
    the same adapter; the NF4 side ran on moekit's engine (one expert dequantized at a time) at every step."""
    tokens_seen = []
    original = NF4Tensor.dequantize_experts

    def spy(self, first, last, dtype=None):
        assert last - first == 1
        return original(self, first, last, dtype)

    monkeypatch.setattr(NF4Tensor, "dequantize_experts", spy)
    monkeypatch.setattr(moekit.engines.reference, "run", _counting(moekit.engines.reference.run, tokens_seen))
    dense = tm.build(model_type)
    quantized = tm.add_lora(quantize_experts(copy.deepcopy(dense)))
    eager = tm.add_lora(_eager_on_dequantized(dense))
    prompt = tm.sample_batch(batch=2, seq=6)
    settings = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        ours = quantized.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **settings)
        want = eager.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **settings)
    assert ours.sequences.shape == (2, 11) and torch.equal(ours.sequences, want.sequences)
    assert len(ours.scores) == 5
    if dense.config.use_cache:  # each call after the prompt's sees the two sequences' new tokens only
        assert tokens_seen.count(2) == 4 * len(experts_modules(quantized)), tokens_seen
    else:  # the tiny nemotron_h config (transformers' hybrid cache fails there): the whole sequences so far
        assert sorted(set(tokens_seen)) == [12, 14, 16, 18, 20], tokens_seen
    for step, (score, want_score) in enumerate(zip(ours.scores, want.scores, strict=True)):
        assert torch.isfinite(score).all() and tm.rel_err(score, want_score) <= 1e-5, step


def test_merge_and_save_on_a_quantized_model(tmp_path):
    """PEFT's merge into NF4 experts is refused with the way to do it (dequantize first, or merge on the dense
    model), and leaves the model as it was; after ``model.dequantize()`` the merge equals the unmerged model and
    saves as a dense model. (Saving the quantized model: test_quant_loading.)"""
    base = quantize_experts(tm.build("qwen3_moe"), double_quant=True)
    assert base.is_quantized and base.config.quantization_config.experts_double_quant
    peft_model = tm.add_lora(base)
    input_ids = tm.sample_batch()
    with torch.no_grad():
        before = peft_model(input_ids).logits
        with pytest.raises(NotImplementedError, match="merge on a dense model"):
            peft_model.merge_adapter()
        assert torch.equal(peft_model(input_ids).logits, before)

        dense = peft_model.get_base_model().dequantize()
        assert not dense.is_quantized and not any(isinstance(p, NF4Tensor) for p in dense.parameters())
        merged = peft_model.merge_and_unload()
        assert tm.rel_err(merged(input_ids).logits, before) <= 1e-5
    merged.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in (tmp_path / "dense" / "config.json").read_text()
