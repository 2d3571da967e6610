"""Loading a dense checkpoint straight into NF4 experts: ``from_pretrained(..., quantization_config=MoekitQuantConfig())``.

(a) For qwen3_moe, nemotron_h, mixtral (per-expert checkpoints, merged by transformers' converters) and gpt_oss
    (fused checkpoint): each expert weight is quantized once, as it loads, into the codes and scales
    ``NF4Tensor.quantize`` gives the checkpoint's weight; everything else equals the checkpoint; the logits equal
    those of the same checkpoint loaded plainly then ``moekit.quantize_experts`` (bf16 rel <= 1e-2, fp32 <= 1e-5);
    the experts run on moekit, the model is quantized as transformers means it and its quantized base is frozen.
(b) ``linear="nf4"``: the nn.Linear layers become bitsandbytes ``Linear4bit`` with bitsandbytes' own codes (lm_head
    and routers stay dense) and the model runs on the CPU; without bitsandbytes, a clear error.
(c) PEFT LoRA on the experts trains a step on the loaded model; the adapter it saves is a plain PEFT adapter of the
    dense model; ``dequantize`` gives the dense model back.
(e) The NF4 model saves (``save_pretrained``) as held and loads back as it was, with bitsandbytes linears too;
    a model bitsandbytes loaded before its experts were quantized refuses; a checkpoint that does not fit fails.
(d) The config: registered with transformers, serializable, bad values refused with clear errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import tiny_models as tm
import torch
from transformers import AutoModelForCausalLM

import moekit
from moekit.enable import experts_modules
from moekit.options import OPTIONS
from moekit.quant import MoekitQuantConfig, NF4Tensor, quantize_experts
from moekit.quant import hf as moekit_hf
from moekit.quant.experts import expert_weight_names

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MODEL_TYPES = ("qwen3_moe", "nemotron_h", "gpt_oss", "mixtral")


@pytest.fixture(autouse=True, scope="module")
def _cpu_reference_setup():
    with tm.torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(OPTIONS, "backend", "")
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(model_type, dtype) -> the directory of a tiny random model saved by ``save_pretrained`` (cached)."""
    saved = {}

    def get(model_type: str, dtype: torch.dtype = torch.bfloat16):
        if (model_type, dtype) not in saved:
            path = tmp_path_factory.mktemp(f"{model_type}-{str(dtype).removeprefix('torch.')}")
            tm.build(model_type, dtype=dtype).save_pretrained(path)
            saved[model_type, dtype] = path
        return saved[model_type, dtype]

    return get


def _load(path, dtype=torch.bfloat16, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kwargs)


def _expert_weights(model) -> dict[str, torch.Tensor]:
    names = set(moekit_hf._expert_weight_names(model))
    return {name: p for name, p in model.named_parameters() if name in names}


# ---------------------------------------------------------------------------------------------------------------
# (a) experts quantized on load
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loads_into_nf4_experts(model_type, checkpoint, monkeypatch):
    path = checkpoint(model_type)
    quantized_on_load = []
    original = NF4Tensor.quantize.__func__

    def spy(cls, weight, dtype=None, device=None, double_quant=False):
        quantized_on_load.append(tuple(weight.shape))
        return original(cls, weight, dtype, device, double_quant)

    monkeypatch.setattr(NF4Tensor, "quantize", classmethod(spy))
    model = _load(path, quantization_config=MoekitQuantConfig(), device_map="cpu")
    plain = _load(path)

    experts = _expert_weights(model)
    assert len(experts) == 2 * len(experts_modules(model)) == len(quantized_on_load)  # each once, while loading
    plain_params = dict(plain.named_parameters())
    assert [name for name, _ in model.named_parameters()] == list(plain_params)
    for name, param in model.named_parameters():
        want = plain_params[name]
        if name in experts:
            assert isinstance(param, NF4Tensor) and isinstance(param, torch.nn.Parameter) and not param.requires_grad
            assert param.dtype == torch.bfloat16 and param.shape == want.shape and param.device.type == "cpu"
            reference = NF4Tensor.quantize(want.detach())
            assert torch.equal(param.packed, reference.packed) and torch.equal(param.absmax, reference.absmax), name
        else:
            assert not isinstance(param, NF4Tensor)
            assert param.dtype == want.dtype and torch.equal(param, want), name
    plain_buffers = dict(plain.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, plain_buffers[name]), name

    # what transformers and PEFT look at
    assert model.is_quantized and model.quantization_method == "moekit"
    assert isinstance(model.hf_quantizer, moekit_hf.MoekitHfQuantizer) and model.hf_quantizer.is_trainable
    assert isinstance(model.config.quantization_config, MoekitQuantConfig)
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert all(m.config._experts_implementation == moekit.BACKEND_NAME for m in experts_modules(model))
    # the model's converters that build expert weights merged them in host memory
    builders = [c for c in getattr(model, "_weight_conversions", []) if moekit_hf._targets(c, list(experts))]
    assert all(c.force_cpu for c in builders)
    assert builders or model_type == "gpt_oss"  # gpt-oss checkpoints hold fused expert weights already

    quantize_experts(plain)
    input_ids = tm.sample_batch()
    with torch.no_grad():
        logits, want = model(input_ids).logits, plain(input_ids).logits
    assert torch.isfinite(logits).all() and tm.rel_err(logits, want) <= 1e-2


def test_double_quantized_experts_on_load(checkpoint):
    """``experts_double_quant=True``: each expert weight quantized as it loads with its scales in 8 bits, the same
    weight ``quantize_experts(..., double_quant=True)`` makes of the dense model, and the device-map size per
    element says so."""
    path = checkpoint("qwen3_moe")
    config = MoekitQuantConfig(experts_double_quant=True)
    model = _load(path, quantization_config=config, device_map="cpu")
    plain = quantize_experts(_load(path), double_quant=True)
    want = _expert_weights(plain)
    for name, param in _expert_weights(model).items():
        assert isinstance(param, NF4Tensor) and param.double_quantized, name
        assert torch.equal(param.packed, want[name].packed) and torch.equal(param.absmax, want[name].absmax), name
    some = next(iter(_expert_weights(model)))
    assert model.hf_quantizer.param_element_size(model, some, None) == 0.5 + (1 + 4 / 256) / 64
    assert MoekitQuantConfig.from_dict(config.to_dict()).experts_double_quant
    input_ids = tm.sample_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, plain(input_ids).logits)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_fp32_checkpoint(model_type, checkpoint):
    path = checkpoint(model_type, torch.float32)
    model = _load(path, torch.float32, quantization_config=MoekitQuantConfig())  # no device_map: the CPU
    plain = quantize_experts(_load(path, torch.float32))
    for name, param in _expert_weights(model).items():
        want = plain.get_parameter(name)
        assert param.dtype == torch.float32 and torch.equal(param.packed, want.packed), name
    input_ids = tm.sample_batch()
    with torch.no_grad():
        assert tm.rel_err(model(input_ids).logits, plain(input_ids).logits) <= 1e-5


def test_compute_dtype_and_device_map(checkpoint):
    model = _load(checkpoint("qwen3_moe"), quantization_config=MoekitQuantConfig(compute_dtype="float32"))
    assert all(p.dtype == torch.float32 for p in _expert_weights(model).values())  # codes of the bf16 weights
    quantizer = moekit_hf.MoekitHfQuantizer(MoekitQuantConfig())
    quantizer.validate_environment(device_map={"": "cpu", "model.layers.1": "cuda:1", "lm_head": 0})
    assert quantizer.target_device("model.layers.1.mlp.experts.down_proj") == torch.device("cuda:1")
    assert quantizer.target_device("model.layers.10.mlp.experts.down_proj") == torch.device("cpu")
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"": "cpu", "model.layers.1": "disk"})


# ---------------------------------------------------------------------------------------------------------------
# (b) linear="nf4": bitsandbytes Linear4bit in the same load
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_linear_nf4(model_type, checkpoint):
    bnb = pytest.importorskip("bitsandbytes")
    path = checkpoint(model_type)
    model = _load(path, quantization_config=MoekitQuantConfig(linear="nf4"), device_map="cpu")
    plain = _load(path)
    converted = 0
    for name, module in plain.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        got = model.get_submodule(name)
        if name == "lm_head":
            assert type(got) is torch.nn.Linear and torch.equal(got.weight, module.weight)
            continue
        assert isinstance(got, bnb.nn.Linear4bit), name
        weight = got.weight
        packed, state = bnb.functional.quantize_4bit(
            module.weight.detach(), blocksize=weight.blocksize, quant_type="nf4"
        )
        assert torch.equal(weight.data.reshape(-1), packed.reshape(-1)), name  # bitsandbytes' own codes
        with torch.no_grad():  # the reference: the dense model on bitsandbytes' dequantized weights
            module.weight.copy_(bnb.functional.dequantize_4bit(packed, state).reshape(module.weight.shape))
        converted += 1
    assert converted >= 4
    assert all(isinstance(p, NF4Tensor) for p in _expert_weights(model).values())
    assert model.is_loaded_in_4bit and model.is_quantized

    quantize_experts(plain)
    input_ids = tm.sample_batch()
    with torch.no_grad():
        logits, want = model(input_ids).logits, plain(input_ids).logits
    assert torch.isfinite(logits).all() and tm.rel_err(logits, want) <= 1e-2


def test_routers_stay_dense_with_linear_nf4():
    model = tm.build("qwen2_moe")  # its shared-expert gate is an nn.Linear beside the experts
    assert moekit_hf._router_linears(model) == [
        f"model.layers.{i}.mlp.shared_expert_gate" for i in range(model.config.num_hidden_layers)
    ]


def test_linear_nf4_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        MoekitQuantConfig(linear="nf4")


# ---------------------------------------------------------------------------------------------------------------
# (c) PEFT, saving, dequantize
# ---------------------------------------------------------------------------------------------------------------


def test_lora_trains_and_saves_a_plain_adapter(checkpoint, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    path = checkpoint("qwen3_moe")
    model = _load(path, quantization_config=MoekitQuantConfig(), device_map="cpu")
    codes = {name: p.packed.clone() for name, p in _expert_weights(model).items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=tm.lora_target_parameters(model))  # fmt: skip
    peft_model = moekit.enable(get_peft_model(model, config))
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and not isinstance(p, NF4Tensor) for name, p in trainable.items())
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    peft_model.train()
    input_ids = tm.sample_batch(batch=2, seq=16)
    loss = peft_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [name for name, p in trainable.items() if not torch.equal(p, before[name])]
    assert any("experts" in name and "lora_B" in name for name in moved)  # the experts' adapters learn
    after = {name.removeprefix("base_model.model.").replace("base_layer.", ""): p.packed
             for name, p in peft_model.named_parameters() if isinstance(p, NF4Tensor)}  # fmt: skip
    assert set(after) == set(codes) and all(torch.equal(after[name], codes[name]) for name in codes)

    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # no base weights, no NF4 codes
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    dense = PeftModel.from_pretrained(_load(path), adapter)  # plain PEFT on the dense checkpoint, eager experts
    ours = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in dense.state_dict().items() if "lora_" in k}
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_qlora_on_linear_nf4_and_nf4_experts(checkpoint, device):
    """The whole QLoRA model: bitsandbytes 4-bit linears and NF4 experts from one load, PEFT LoRA on both (on CUDA
    the experts run on the Triton kernels): the logits equal the dense model on both dequantized weights, and two
    training steps move every adapter, the bases frozen. In fp32: in bf16 a router's near-tie flips between two
    correct engines (a 1e-3 difference upstream moves a token to another expert)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    path = checkpoint("qwen3_moe", torch.float32)
    config = MoekitQuantConfig(linear="nf4", compute_dtype=torch.float32)
    model = _load(path, dtype=torch.float32, quantization_config=config, device_map=device)
    reference = _load(path, dtype=torch.float32, device_map=device)  # the dense model on the quantized one's weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                dense = reference.get_submodule(name).weight
                dense.copy_(
                    bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).view_as(dense)
                )
        for name, weight in _expert_weights(model).items():
            reference.get_parameter(name).copy_(weight.dequantize())
    input_ids = tm.sample_batch(batch=2, seq=16).to(device)
    with torch.no_grad():
        assert tm.rel_err(model(input_ids).logits, reference(input_ids).logits) <= 1e-5

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=tm.lora_target_parameters(model))  # fmt: skip
    peft_model = moekit.enable(get_peft_model(model, lora))
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} >= {"q_proj", "o_proj", "experts"}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    peft_model.train()
    for _ in range(2):  # B starts at zero: its first step moves B, the second A too
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad()
    still = [name for name, p in trainable.items() if torch.equal(p, before[name])]
    assert not still, still


def _parts(model) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: an NF4 weight's inner tensors (name.part) and every other parameter."""
    parts = {}
    for name, param in model.named_parameters():
        if isinstance(param, NF4Tensor):
            parts.update((f"{name}.{part}", t) for part, t in param.serialized().items())
        else:
            parts[name] = param
    return parts


@pytest.mark.parametrize("model_type, double_quant", [(m, False) for m in MODEL_TYPES] + [("qwen3_moe", True)])
def test_quantized_model_saves_and_loads_back(model_type, double_quant, checkpoint, tmp_path, monkeypatch):
    """``save_pretrained`` writes the NF4 experts as held (no dense expert weight in the files, which the model's
    own conversions leave alone), and ``from_pretrained`` of that checkpoint gives the same model: the same codes and
    scales, parameters and logits (fp32, to the bit); saved again, the same files."""
    from safetensors.torch import load_file

    options = {"experts_double_quant": double_quant}
    model = _load(
        checkpoint(model_type, torch.float32), torch.float32, quantization_config=MoekitQuantConfig(**options)
    )
    model.save_pretrained(tmp_path / "nf4", max_shard_size="100KB")  # several files
    files = sorted((tmp_path / "nf4").glob("*.safetensors"))
    saved = {k: v for f in files for k, v in load_file(f).items()}
    expert_names = list(_expert_weights(model))
    assert len(files) > 1 and not any(key.endswith(name.rpartition(".")[2]) for key in saved for name in expert_names)
    assert sum("nf4_" in key for key in saved) == len(expert_names) * (4 if double_quant else 2)
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "moekit" and config["experts_double_quant"] == double_quant

    with monkeypatch.context() as patch:  # the codes and scales load as saved: nothing is quantized again
        patch.setattr(NF4Tensor, "quantize", None)
        again = _load(tmp_path / "nf4", torch.float32)
    assert again.is_quantized and isinstance(again.hf_quantizer, moekit_hf.MoekitHfQuantizer)
    ours, theirs = _parts(model), _parts(again)
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    assert all(m.config._experts_implementation == moekit.BACKEND_NAME for m in experts_modules(again))
    input_ids = tm.sample_batch()
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, model(input_ids).logits)

    again.save_pretrained(tmp_path / "again")
    resaved = load_file(tmp_path / "again" / "model.safetensors")
    assert set(resaved) == set(saved) and all(torch.equal(resaved[k], saved[k]) for k in saved)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_saved_model_loads_onto_its_device(device, checkpoint, tmp_path):
    """With a device map, the saved NF4 parts load straight onto it (on CUDA the experts then run on the Triton
    kernels); the same codes and scales, and the same logits as the model that was saved."""
    model = _load(checkpoint("qwen3_moe"), quantization_config=MoekitQuantConfig(), device_map=device)
    model.save_pretrained(tmp_path)
    again = _load(tmp_path, device_map=device)
    ours, theirs = _parts(model), _parts(again)
    assert list(ours) == list(theirs)
    assert all(t.device.type == device and torch.equal(t, ours[name]) for name, t in theirs.items())
    input_ids = tm.sample_batch().to(device)
    with torch.no_grad():
        logits, want = again(input_ids).logits, model(input_ids).logits
    # the same weights: on the CPU the same bits; bf16 kernels may sum in another order from run to run
    assert torch.equal(logits, want) if device == "cpu" else tm.rel_err(logits, want) <= 1e-3


def test_saved_bf16_model_keeps_its_scales(checkpoint, tmp_path):
    """A bf16 model's NF4 scales stay fp32 through saving and loading (the loader casts float tensors to the model
    dtype unless they are a quantizer's), and the NF4 weights stand for the dtype loaded in; a model quantized by
    ``quantize_experts`` saves the same way; the reloaded model trains LoRA."""
    plain = _load(checkpoint("nemotron_h"))
    quantize_experts(plain)
    plain.save_pretrained(tmp_path)
    again = _load(tmp_path)
    for name, param in _expert_weights(again).items():
        assert isinstance(param, NF4Tensor) and param.dtype == torch.bfloat16 and param.absmax.dtype == torch.float32
        assert torch.equal(param.absmax, plain.get_parameter(name).absmax), name
    as_fp32 = _load(tmp_path, torch.float32)
    assert all(p.dtype == torch.float32 for p in _expert_weights(as_fp32).values())
    dense = plain.dequantize()  # in config.dtype, which saving left a name ("bfloat16")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for p in _expert_weights(dense).values())

    peft_model = tm.add_lora(again)
    input_ids = tm.sample_batch()
    peft_model(input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("model_type, dtype", [("qwen3_moe", torch.float32), ("nemotron_h", torch.bfloat16)])
def test_whole_qlora_model_saves_and_loads_back(model_type, dtype, checkpoint, tmp_path):
    """linear="nf4": the bitsandbytes linears save as bitsandbytes saves them and the NF4 experts as held, double-
    quantized scales included; loaded back, every tensor of the state dict (bitsandbytes' quant states too) and the
    logits are the same to the bit. (bitsandbytes' CPU 4-bit GEMM runs NemotronH's projections in bf16 only.)"""
    pytest.importorskip("bitsandbytes")
    config = MoekitQuantConfig(linear="nf4", linear_double_quant=True, experts_double_quant=True)
    model = _load(checkpoint(model_type, dtype), dtype, quantization_config=config)
    model.save_pretrained(tmp_path)
    again = _load(tmp_path, dtype)
    assert again.is_loaded_in_4bit and isinstance(again.hf_quantizer, moekit_hf.MoekitHfQuantizer)
    ours, theirs = model.state_dict(), again.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        got = theirs[name]
        if isinstance(tensor, NF4Tensor):
            assert all(torch.equal(a, b) for a, b in zip(tensor._inner_tensors(), got._inner_tensors())), name
        else:
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    input_ids = tm.sample_batch()
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, model(input_ids).logits)
    again.save_pretrained(tmp_path / "again")  # and saved again: the same files
    assert _saved(tmp_path / "again").keys() == _saved(tmp_path).keys()
    assert all(torch.equal(a, b) for a, b in zip(_saved(tmp_path / "again").values(), _saved(tmp_path).values()))


def _saved(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(sorted((k, v) for f in path.glob("*.safetensors") for k, v in load_file(f).items()))


def test_save_refusals_and_bad_checkpoints(checkpoint, tmp_path):
    """bitsandbytes' own 4-bit load and then ``quantize_experts``: not saved, saying why (``dequantize`` gives it back
    dense); a checkpoint whose NF4 parts do not fit the model fails to load."""
    from safetensors.torch import load_file, save_file

    if moekit_hf._bitsandbytes_installed():
        from transformers import BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = quantize_experts(_load(checkpoint("qwen3_moe"), quantization_config=bnb_config))
        assert model.quantization_method == "moekit" and model.config.quantization_config.linear == "nf4"
        with pytest.warns(UserWarning, match="BitsAndBytesConfig"), pytest.raises(ValueError, match="not serial"):
            model.save_pretrained(tmp_path / "bnb")
        dense = model.dequantize()
        assert not any(isinstance(p, NF4Tensor) or type(p) is not torch.nn.Parameter for p in dense.parameters())

    model = _load(checkpoint("qwen3_moe"), quantization_config=MoekitQuantConfig())
    model.save_pretrained(tmp_path / "nf4")
    state = load_file(tmp_path / "nf4" / "model.safetensors")
    key = next(k for k in state if k.endswith("nf4_down_proj.packed"))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, tmp_path / "nf4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="conversion"):
        _load(tmp_path / "nf4")


def test_dequantize(checkpoint):
    model = _load(checkpoint("gpt_oss"), quantization_config=MoekitQuantConfig())
    expected = {name: p.dequantize() for name, p in _expert_weights(model).items()}
    model = model.dequantize()
    assert not model.is_quantized and not hasattr(model, "hf_quantizer")
    for name, param in _expert_weights(model).items():
        assert not isinstance(param, NF4Tensor) and torch.equal(param, expected[name])
    with torch.no_grad():
        assert torch.isfinite(model(tm.sample_batch()).logits).all()


# ---------------------------------------------------------------------------------------------------------------
# (d) the config
# ---------------------------------------------------------------------------------------------------------------


def test_config_is_registered_and_serializable(checkpoint, tmp_path):
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    config = MoekitQuantConfig(linear="nf4", compute_dtype=torch.bfloat16, linear_skip_modules=["o_proj"])
    as_dict = json.loads(json.dumps(config.to_dict()))
    assert as_dict["compute_dtype"] == "bfloat16" and as_dict["quant_method"] == "moekit"
    again = AutoQuantizationConfig.from_dict(as_dict)
    assert isinstance(again, MoekitQuantConfig) and again.to_dict() == config.to_dict()
    assert isinstance(AutoHfQuantizer.from_config(config), moekit_hf.MoekitHfQuantizer)

    # a checkpoint whose config.json names moekit (moekit never writes quantized weights) is quantized as it loads
    path = checkpoint("mixtral")
    model = _load(path, quantization_config=MoekitQuantConfig())
    copied = tmp_path / "named"
    shutil.copytree(path, copied)
    model.config.save_pretrained(copied)
    assert json.loads((copied / "config.json").read_text())["quantization_config"]["quant_method"] == "moekit"
    again = _load(copied)
    assert again.is_quantized and all(isinstance(p, NF4Tensor) for p in _expert_weights(again).values())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"experts": "int3"}, ValueError, r"experts must be one of \('nf4',\), got 'int3'"),
        ({"linear": "int8"}, ValueError, "linear must be one of"),
        ({"compute_dtype": torch.int8}, ValueError, "compute_dtype must be a floating-point"),
        ({"compute_dtype": "float17"}, ValueError, "compute_dtype must be a floating-point"),
        ({"linear_skip_modules": ["o_proj"]}, ValueError, "only with linear='nf4'"),
        ({"linear": "nf4", "linear_skip_modules": "o_proj"}, ValueError, "list of module names"),
        ({"quant_method": "bitsandbytes"}, ValueError, "quant_method must be 'moekit'"),
        ({"bits": 4}, TypeError, r"unknown option\(s\) \['bits'\]"),
        ({"experts_double_quant": 1}, TypeError, "experts_double_quant must be True or False, got 1"),
    ],
    ids=["experts", "linear", "dtype", "dtype-name", "skip-without-linear", "skip-str", "method", "unknown", "double"],
)
def test_bad_config_values(kwargs, error, match):
    if kwargs.get("linear") == "nf4":
        pytest.importorskip("bitsandbytes")
    with pytest.raises(error, match=match):
        MoekitQuantConfig(**kwargs)


def test_model_without_experts_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no experts module"):
        _load(tmp_path, quantization_config=MoekitQuantConfig())


def test_import_does_not_import_bitsandbytes():
    code = (
        "import sys, moekit\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['moekit'] is moekit.quant.MoekitQuantConfig\n"
        "assert AUTO_QUANTIZER_MAPPING['moekit'].__name__ == 'MoekitHfQuantizer'\n"
        "moekit.quant.MoekitQuantConfig()\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_expert_weight_names_cover_every_module(checkpoint):
    model = _load(checkpoint("nemotron_h"), quantization_config=MoekitQuantConfig())
    for module in experts_modules(model):
        assert expert_weight_names(module) == ("up_proj", "down_proj")  # non-gated relu² experts
        assert all(isinstance(getattr(module, n), NF4Tensor) for n in expert_weight_names(module))
