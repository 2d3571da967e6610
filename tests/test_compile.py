"""torch.compile: moekit's experts call is one opaque custom op (``moekit.ops``), so tiny models compile on their
first call, fp32 and bf16, forward and backward, with ``fullgraph=True`` (no graph break anywhere, so none inside
moekit's experts call), and give eager's results.

Every comparison runs the same code compiled and eagerly on random inputs: outputs and the gradient of every
trainable parameter, fp32 within 1e-5 and bf16 within 1e-2 (relative to the tensor's largest value). Whole models
compile with backend="eager" (fp32 and bf16) and, for one fp32 model, with inductor; inductor in bf16 compiles a
tiny model's MoE block (its own router, moekit's experts), which costs seconds instead of most of a minute of C++
compiling on two cores.

Graph breaks before this change (2-layer Qwen3-MoE, after a warm-up call): 16, all inside moekit's experts call;
transformers' grouped_mm: 0. Now: 0 (``fullgraph=True`` raises on any break).

NF4 expert weights (QLoRA, ``moekit.quantize_experts``) go through the same op, as their codes and scales: a tiny
model with NF4 experts and PEFT LoRA on them compiles with ``fullgraph=True`` and gives eager's logits and LoRA
gradients, and a frozen NF4 experts module eager's output and input gradients. They used to run outside the graph
(``torch.compiler.disable``): graph breaks in every experts layer (13, ``torch._dynamo.explain``, on the same
2-layer Qwen3-MoE with LoRA, first call).
"""

from __future__ import annotations

import os

import experts_factory
import pytest
import tiny_models as tm
import torch
import torch._dynamo.testing
from experts_factory import make_experts, make_inputs, rel_err

import moekit
import moekit.engines.triton
import moekit.grouped
from moekit import ops
from moekit.options import OPTIONS
from moekit.quant import NF4Tensor
from moekit.quant.experts import quantize_module

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MOEKIT_SOURCE = os.path.dirname(moekit.__file__)


@pytest.fixture(autouse=True)
def _enable_first_before_torch_2_13(monkeypatch):
    """Before torch 2.13 a module first called under compile resolves its layout outside the graph (one break per
    call, ``backend.RESOLVES_WHILE_TRACING``): there the models are ``moekit.enable``d before compiling, as the README
    says; ``test_compile_first_resolves_outside_the_graph_before_torch_2_13`` covers that path on any torch."""
    if moekit.backend.RESOLVES_WHILE_TRACING:
        return
    built, build, make, compile_ = [], tm.build, make_experts, torch.compile

    def record(factory):
        return lambda *args, **kwargs: built.append(factory(*args, **kwargs)) or built[-1]

    def enable_then_compile(*args, **kwargs):  # at compile time: after a test's own changes to its modules
        for model in built:
            moekit.enable(model)
        return compile_(*args, **kwargs)

    monkeypatch.setattr(tm, "build", record(build))
    monkeypatch.setitem(globals(), "make_experts", record(make))
    monkeypatch.setattr(torch, "compile", enable_then_compile)


@pytest.fixture(autouse=True)
def _fresh_compiler(monkeypatch):
    """A clean dynamo cache per test (each builds new models), and the default engine choice."""
    monkeypatch.setattr(OPTIONS, "backend", "")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _forward(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits


def _step(model, fn, ids):
    """(logits, {trainable parameter: grad}) of one forward and backward of the causal-LM loss through ``fn``."""
    model.zero_grad(set_to_none=True)
    loss, logits = fn(model, ids)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_matches(compiled, eager, out_tol, grad_tol):
    assert rel_err(compiled[0], eager[0]) <= out_tol, "logits"
    assert compiled[1].keys() == eager[1].keys()
    assert sum(g is not None for g in eager[1].values()) > 0
    for name, grad in eager[1].items():
        if grad is None:
            assert compiled[1][name] is None, name
        else:
            assert rel_err(compiled[1][name], grad) <= grad_tol, name


def _op_calls(graphs, packet) -> int:
    """Calls of a custom op in FX graphs (dynamo's graphs name the packet, AOT's the overload)."""
    return sum(node.target is packet or node.target is packet.default for gm in graphs for node in gm.graph.nodes)


def _nf4_op_calls(graphs) -> int:
    """Calls of ``moekit::experts`` in dynamo's graphs whose two weights arrive as NF4 codes and scales (the dense
    weight slots None)."""
    slots = [ops.TENSOR_INPUTS.index(name) for name in ("up_weight", "down_weight")]
    codes = [ops.TENSOR_INPUTS.index(name) for name in ("up_packed", "up_absmax", "down_packed", "down_absmax")]
    return sum(
        all(node.args[i] is None for i in slots) and all(node.args[i] is not None for i in codes)
        for gm in graphs
        for node in gm.graph.nodes
        if node.target is torch.ops.moekit.experts or node.target is torch.ops.moekit.experts.default
    )


def _moekit_breaks(explanation) -> list[str]:
    """Graph-break reasons raised from moekit's own source."""
    return [
        b.reason for b in explanation.break_reasons if any(f.filename.startswith(MOEKIT_SOURCE) for f in b.user_stack)
    ]


# ------------------------------------------------------------------------------------------------ whole models
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_fullgraph_first_call_matches_eager(model_type, dtype):
    """backend="eager", fullgraph=True, compiled before any eager call (the layout is resolved and grouped_mm probed
    for the first time under the trace: a compile-first fp32 model used to crash in that probe)."""
    moekit.grouped._grouped_mm_works.cache_clear()
    model = tm.build(model_type, dtype=dtype, experts_implementation="moekit")
    ids = tm.sample_batch()
    backend = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = _step(model, torch.compile(_forward, backend=backend, fullgraph=True), ids)
    assert backend.frame_count == 1  # one graph: no break anywhere
    assert _op_calls(backend.graphs, torch.ops.moekit.experts) == len(moekit.experts_modules(model))
    _assert_matches(compiled, _step(model, _forward, ids), TOL[dtype], TOL[dtype])


@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton engine natively, on a GPU")
@pytest.mark.parametrize("training", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_fullgraph_triton_engine_on_gpu(monkeypatch, model_type, dtype, training):
    """The same whole-model check on the GPU, every experts call on the Triton engine (MOEKIT_BACKEND=triton): full
    fine-tuning, LoRA on both expert projections, and QLoRA (NF4 experts, their codes and scales the op's inputs),
    compiled before any eager call with fullgraph=True."""
    monkeypatch.setattr(OPTIONS, "backend", "triton")
    calls = []
    original = moekit.engines.triton.run
    monkeypatch.setattr(moekit.engines.triton, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tm.build(model_type, dtype=dtype, experts_implementation="moekit")
    if training == "qlora":
        model = moekit.quantize_experts(model, "nf4")
    model = (model if training == "full" else tm.add_lora(model)).cuda()
    ids = tm.sample_batch().cuda()
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = _step(model, torch.compile(_forward, backend=backend, fullgraph=True), ids)
    assert backend.frame_count == 1
    if training == "qlora":
        assert _nf4_op_calls(backend.graphs) == len(moekit.experts_modules(model))
    assert len(calls) == 2 * len(moekit.experts_modules(model))  # forward, and the backward's recompute
    _assert_matches(compiled, _step(model, _forward, ids), TOL[dtype], TOL[dtype])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_grouped_mm_baseline_compiles_fullgraph(model_type):
    """transformers' own grouped_mm compiles with fullgraph on the same tiny models (the baseline moekit matches)."""
    model = tm.build(model_type, experts_implementation="grouped_mm")
    backend = torch._dynamo.testing.CompileCounter()
    torch.compile(_forward, backend=backend, fullgraph=True)(model, tm.sample_batch())
    assert backend.frame_count == 1


@pytest.mark.slow
def test_inductor_model_matches_eager():
    """Inductor (C++ on the CPU, about 45 s of compiling on two cores: one layer), fullgraph, forward and backward."""
    model = tm.build("qwen3_moe", experts_implementation="moekit", num_hidden_layers=1)
    ids = tm.sample_batch()
    backend = torch._dynamo.testing.InductorAndRecordGraphs()
    compiled = _step(model, torch.compile(_forward, backend=backend, fullgraph=True), ids)
    assert _op_calls(backend.graphs, torch.ops.moekit.experts) == 1
    _assert_matches(compiled, _step(model, _forward, ids), TOL[torch.float32], TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_inductor_moe_block_matches_eager(model_type, dtype):
    """Inductor on a tiny model's MoE block (the model's own router, moekit's experts), fullgraph, forward and
    backward: the op's inputs come from inductor's kernels (bf16 included), its outputs feed them."""
    model = tm.build(model_type, dtype=dtype, experts_implementation="moekit")
    block = moekit.experts_modules(model)[0]
    block = next(m for m in model.modules() if any(c is block for c in m.children()))  # the experts' parent
    x = torch.randn(2, 12, tm.HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)

    def step(fn):
        leaf = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        out = fn(leaf)
        out = out[0] if isinstance(out, tuple) else out
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        return out.detach(), dict(grads, x=leaf.grad)

    backend = torch._dynamo.testing.InductorAndRecordGraphs()
    compiled = step(torch.compile(block, backend=backend, fullgraph=True))
    assert _op_calls(backend.graphs, torch.ops.moekit.experts) == 1
    _assert_matches(compiled, step(block), TOL[dtype], TOL[dtype])


@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_lora_compiles_with_exact_factor_gradients(model_type):
    """PEFT LoRA (target_parameters) on the experts: no graph break from moekit (PEFT's own wrapper code traces too,
    today), the LoRA factors reach the op, and their gradients equal eager's."""
    model = moekit.enable(tm.add_lora(tm.build(model_type)))
    ids = tm.sample_batch()
    explanation = torch._dynamo.explain(_forward)(model, ids)
    assert _moekit_breaks(explanation) == []
    torch._dynamo.reset()
    backend = torch._dynamo.testing.AotEagerAndRecordGraphs()
    compiled = _step(model, torch.compile(_forward, backend=backend), ids)
    num_experts_modules = len(moekit.experts_modules(model))
    assert _op_calls(backend.fw_graphs, torch.ops.moekit.experts) == num_experts_modules
    assert _op_calls(backend.bw_graphs, torch.ops.moekit.experts_backward) == num_experts_modules
    eager = _step(model, _forward, ids)
    lora_grads = [name for name in eager[1] if "lora_" in name]
    assert len(lora_grads) == 4 * num_experts_modules and all(eager[1][n].abs().max() > 0 for n in lora_grads)
    _assert_matches(compiled, eager, TOL[torch.float32], TOL[torch.float32])


@pytest.mark.parametrize(
    ("model_type", "dtype"),
    [("qwen3_moe", torch.float32), ("nemotron_h", torch.float32), ("nemotron_h", torch.bfloat16)],
    ids=["qwen3_moe-fp32", "nemotron_h-fp32", "nemotron_h-bf16"],
)
def test_nf4_lora_fullgraph_matches_eager(model_type, dtype):
    """QLoRA: NF4 expert weights (``moekit.quantize_experts``) with PEFT LoRA on them, backend="eager",
    fullgraph=True: one graph (they used to run outside it, one break per experts layer), every experts call the op
    with its weights as codes and scales, and logits and every LoRA gradient equal to eager's."""
    model = tm.add_lora(moekit.quantize_experts(tm.build(model_type, dtype=dtype), "nf4"))
    ids = tm.sample_batch()
    backend = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = _step(model, torch.compile(_forward, backend=backend, fullgraph=True), ids)
    assert backend.frame_count == 1  # one graph: no break anywhere
    assert _nf4_op_calls(backend.graphs) == len(moekit.experts_modules(model))
    eager = _step(model, _forward, ids)
    assert eager[1] and all("lora_" in name for name in eager[1])  # the frozen NF4 base trains nothing itself
    _assert_matches(compiled, eager, TOL[dtype], TOL[dtype])


def test_double_quantized_nf4_lora_fullgraph_matches_eager():
    """The same with the experts' scales in 8 bits (``quantize_experts(..., double_quant=True)``): their fp32
    dequantization is traced into the graph before the op, which takes it as the scales."""
    model = tm.add_lora(moekit.quantize_experts(tm.build("nemotron_h"), "nf4", double_quant=True))
    ids = tm.sample_batch()
    backend = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = _step(model, torch.compile(_forward, backend=backend, fullgraph=True), ids)
    assert backend.frame_count == 1
    assert _nf4_op_calls(backend.graphs) == len(moekit.experts_modules(model))
    _assert_matches(compiled, _step(model, _forward, ids), TOL[torch.float32], TOL[torch.float32])


def test_lora_wrappers_argument_survives_device_hooks(monkeypatch):
    """The PEFT wrappers reach the experts as a keyword argument (dynamo cannot trace the context variable this used
    to be). Hooks that move a call's arguments to its device (accelerate's, under device_map) must pass it through
    untouched: they recurse into tuples and would call .to() on the wrapper modules themselves."""
    from accelerate.utils import send_to_device
    from peft.tuners.lora.layer import ParamWrapper

    model = moekit.enable(tm.add_lora(tm.build("nemotron_h")))
    ids = tm.sample_batch()
    eager = _step(model, _forward, ids)
    for module in moekit.experts_modules(model):
        module.register_forward_pre_hook(
            lambda m, args, kwargs: (send_to_device(args, "cpu"), send_to_device(kwargs, "cpu")), with_kwargs=True
        )

    def refuse(*args, **kwargs):
        raise AssertionError("a device hook moved a LoRA wrapper module")

    monkeypatch.setattr(ParamWrapper, "to", refuse)
    _assert_matches(_step(model, _forward, ids), eager, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ one experts module
def _experts_call(module):
    def call(x, index, weights):
        return module(x, index, weights)

    return call


def _module_step(module, fn, inputs, seed=5):
    x, index, weights = inputs
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = fn(x, index, weights)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out.float() * upstream).sum().backward()
    grads = {"x": x.grad, "routing_weights": weights.grad}
    grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})  # not NF4's
    return out.detach(), grads


def _assert_module_matches(compiled, eager, tol):
    assert compiled[0].dtype == eager[0].dtype
    assert rel_err(compiled[0], eager[0]) <= tol, "out"
    assert compiled[1].keys() == eager[1].keys()
    for name, grad in eager[1].items():
        assert compiled[1][name].dtype == grad.dtype, name
        assert rel_err(compiled[1][name], grad) <= tol, name


def _moekit_experts(family, **kwargs):
    module = make_experts(family, **kwargs)
    module.config._experts_implementation = "moekit"
    return module


def test_one_graph_per_layout():
    """Once the layouts are resolved (moekit.enable, or an eager call), one compiled function serves every experts
    module of a layout without recompiling (the layout reaches the graph as guarded values, not the module's
    identity), and a module of another layout recompiles instead of reusing a wrong graph."""
    from transformers.activations import ACT2FN

    model = tm.build("qwen3_moe", experts_implementation="moekit", num_hidden_layers=3)
    model.model.layers[2].mlp.experts.act_fn = ACT2FN["gelu"]  # layers 0 and 1 keep SiLU
    moekit.enable(model)
    backend = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda block, x: block(x), backend=backend, fullgraph=True)
    x = torch.randn(2, 12, tm.HIDDEN, generator=torch.Generator().manual_seed(2))
    frames = []
    for layer in model.model.layers:
        compiled, eager = fn(layer.mlp, x), layer.mlp(x)
        assert rel_err(compiled, eager) <= 1e-6
        frames.append(backend.frame_count)
    assert frames == [1, 1, 2]


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_opcheck(quantized):
    """torch.library.opcheck on both ops (schema, fake implementations against the real ones, autograd registration,
    AOT dispatch with dynamic shapes): gpt-oss layout (biases, transposed, clamped gate) with LoRA on the up
    projection, its factors strided as PEFT's views are; dense weights, or NF4 ones as codes, scales and metadata
    (the up weight a transposed view of its codes)."""
    from moekit.backend import experts_layout

    module = make_experts("gpt_oss")
    up_weight, down_weight = module.gate_up_proj.detach(), module.down_proj.detach()
    nf4 = (None, [], [])
    if quantized:
        up_weight = NF4Tensor.quantize(up_weight.transpose(1, 2).contiguous()).transpose(1, 2)
        down_weight = NF4Tensor.quantize(down_weight)
        nf4 = (torch.float32, ops.weight_args(up_weight)[3], ops.weight_args(down_weight)[3])
    (up_dense, *up_codes, _), (down_dense, *down_codes, _) = ops.weight_args(up_weight), ops.weight_args(down_weight)
    x, index, weights = make_inputs(12, 32, 6, 2)
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(6, 2, 32, generator=generator)  # [E, R, in]
    lora_b = torch.randn(48, 2, 6, generator=generator).permute(2, 0, 1)  # [E, out, R] with PEFT's strides
    tensors = [x, index, weights, up_dense, module.gate_up_proj_bias, down_dense,
               module.down_proj_bias, lora_a, lora_b, None, None, *up_codes, *down_codes]  # fmt: skip
    scalars = (0.5, 1.0, *ops.layout_args(experts_layout(module)), *nf4)
    leaves = [
        t.detach().clone().requires_grad_(i in ops.DIFFERENTIABLE and t.is_floating_point()) if t is not None else None
        for i, t in enumerate(tensors)
    ]
    torch.library.opcheck(torch.ops.moekit.experts.default, (*leaves, *scalars))
    needs = [t is not None for i, t in enumerate(tensors) if i in ops.DIFFERENTIABLE]
    grad_out = torch.randn(12, 32, generator=generator)
    detached = [t.detach() if t is not None else None for t in tensors]  # the backward op has no autograd itself
    torch.library.opcheck(torch.ops.moekit.experts_backward.default, (grad_out, *detached, *scalars, needs))


def test_nf4_weight_round_trips_through_op_args():
    """``ops.weight_args`` / ``ops.nf4_weight``: an NF4 weight (contiguous, or a transposed view) rebuilt inside the
    op is the identical NF4Tensor, over the same codes and scales; a dense weight passes as itself."""
    weight = NF4Tensor.quantize(torch.randn(4, 24, 16), torch.bfloat16)
    for view in (weight, weight.transpose(1, 2)):
        dense, packed, absmax, meta = ops.weight_args(view)
        rebuilt = ops.nf4_weight(packed, absmax, meta, view.dtype)
        assert dense is None and packed is view.packed and absmax is view.absmax
        assert (rebuilt.shape, rebuilt.stride(), rebuilt.dtype) == (view.shape, view.stride(), view.dtype)
        assert rebuilt.is_transposed_view == view.is_transposed_view
        assert torch.equal(rebuilt.dequantize(), view.dequantize())
    plain = torch.randn(4, 24, 16)
    assert ops.weight_args(plain) == (plain, None, None, [])


@pytest.mark.parametrize(
    ("family", "dtype"),
    [("qwen3_moe", torch.float32), ("nemotron_h", torch.float32), ("gpt_oss", torch.float32),
     ("qwen3_moe", torch.bfloat16)],
    ids=["qwen3_moe-fp32", "nemotron_h-fp32", "gpt_oss-fp32", "qwen3_moe-bf16"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # AotEagerAndRecordGraphs' own
def test_nf4_frozen_experts_fullgraph_matches_eager(family, dtype):
    """A frozen NF4 experts module, no LoRA, compiled with fullgraph (aot_eager: the fake implementations and the
    backward op in AOT's graphs): the output and the gradients of the hidden states, the routing weights and the
    dense biases (gpt-oss) equal eager's; the NF4 weights get none."""
    module = _moekit_experts(family, dtype=dtype)
    quantize_module(module)
    backend = torch._dynamo.testing.AotEagerAndRecordGraphs()
    fn = torch.compile(_experts_call(module), backend=backend, fullgraph=True)
    inputs = make_inputs(12, 32, 6, 2, dtype=dtype)
    compiled = _module_step(module, fn, inputs)
    assert len(backend.graphs) == 1 and _nf4_op_calls(backend.graphs) == 1
    assert _op_calls(backend.bw_graphs, torch.ops.moekit.experts_backward) == 1
    assert all(p.grad is None for p in module.parameters() if isinstance(p, NF4Tensor))
    _assert_module_matches(compiled, _module_step(module, module, inputs), TOL[dtype])


def test_nf4_base_asked_to_train_raises_under_compile(monkeypatch):
    """An NF4 weight set to require a gradient is refused under compile as eagerly, before any op or engine runs."""
    module = _moekit_experts("qwen3_moe")
    quantize_module(module)
    module.gate_up_proj.requires_grad = True
    ran = []
    monkeypatch.setattr(moekit.backend, "run_engine", lambda *args: ran.append(args))  # the op's engine call too
    with pytest.raises(RuntimeError, match="frozen base"):
        torch.compile(_experts_call(module), backend="eager")(*make_inputs(12, 32, 6, 2))
    assert ran == []


def test_bad_expert_id_raises_under_compile():
    """The range check runs inside the op: on the CPU a bad id is a ValueError at once, compiled or not, first call
    or later; a second token count recompiles and still matches eager (shapes symbolic in the fake implementation)."""
    module = _moekit_experts("qwen3_moe")
    fn = torch.compile(_experts_call(module), backend="aot_eager", fullgraph=True)
    x, index, weights = make_inputs(12, 32, 6, 2)
    with pytest.raises(ValueError, match="top_k_index holds expert id 9, outside \\[0, 6\\]"):
        fn(x, torch.full_like(index, 9), weights)  # compile-first with a bad id
    _assert_module_matches(
        _module_step(module, fn, (x, index, weights)), _module_step(module, module, (x, index, weights)), 1e-5
    )
    with pytest.raises(ValueError, match="top_k_index holds expert id -1"):
        fn(x, index.masked_fill(index == index[3, 1], -1), weights)
    other = make_inputs(21, 32, 6, 2, seed=4)
    _assert_module_matches(_module_step(module, fn, other), _module_step(module, module, other), 1e-5)


@pytest.mark.parametrize("family", ["nemotron_h", "gpt_oss"])
def test_autocast_under_compile(family):
    """bf16 hidden states, fp32 weights, CPU autocast: compiled like eager (bf16 out, the GEMMs in fp32)."""
    module = _moekit_experts(family)
    fn = torch.compile(_experts_call(module), backend="aot_eager", fullgraph=True)
    inputs = make_inputs(12, 32, 6, 2, dtype=torch.bfloat16, weights_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled, eager = _module_step(module, fn, inputs), _module_step(module, module, inputs)
    assert compiled[0].dtype == torch.bfloat16
    _assert_module_matches(compiled, eager, 1e-2)


def test_custom_activation_runs_outside_the_graph():
    """A custom activation (a Python callable) cannot be an op argument: under compile its experts call runs eagerly
    outside the graph (a graph break), compile-first in fp32 included (no grouped_mm probe under the trace), and
    gives eager's results."""
    moekit.grouped._grouped_mm_works.cache_clear()
    module = _moekit_experts("qwen3_moe")
    module.act_fn = torch.nn.Softplus()
    module.__dict__.pop("_moekit_layout", None)
    backend = torch._dynamo.testing.EagerAndRecordGraphs()
    fn = torch.compile(_experts_call(module), backend=backend)
    inputs = make_inputs(12, 32, 6, 2)
    _assert_module_matches(_module_step(module, fn, inputs), _module_step(module, module, inputs), 1e-5)
    assert _op_calls(backend.graphs, torch.ops.moekit.experts) == 0


@pytest.mark.triton
@pytest.mark.skipif(
    torch.cuda.is_available() or not moekit.backend.triton_available("cpu"),
    reason="the Triton interpreter on the CPU (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("family", ["nemotron_h", "gpt_oss"])
def test_forced_triton_engine_under_compile(monkeypatch, family):
    """MOEKIT_BACKEND=triton: the op runs the Triton engine (interpreted), forward and backward recompute."""
    monkeypatch.setattr(OPTIONS, "backend", "triton")
    calls = []
    original = moekit.engines.triton.run
    monkeypatch.setattr(moekit.engines.triton, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    module = _moekit_experts(family, hidden=16, intermediate=8, num_experts=4)
    fn = torch.compile(_experts_call(module), backend="aot_eager", fullgraph=True)
    inputs = make_inputs(7, 16, 4, 2)
    compiled = _module_step(module, fn, inputs)
    assert len(calls) == 2  # the op's forward and its backward's recompute
    _assert_module_matches(compiled, _module_step(module, module, inputs), 1e-5)


def test_compile_first_resolves_outside_the_graph_before_torch_2_13(monkeypatch):
    """Where dynamo cannot bake a module's layout into the graph (torch < 2.13), the first compiled call resolves it
    in a ``torch.compiler.disable``d call (a graph break there; torch 2.13 runs it without one) and gives eager's
    results."""
    monkeypatch.setattr(moekit.backend, "RESOLVES_WHILE_TRACING", False)
    module = experts_factory.make_experts("qwen3_moe")  # not through the fixture's enable-first builders
    module.config._experts_implementation = "moekit"
    x, index, weights = make_inputs(24, 32, 6, 2, seed=4)
    assert "_moekit_layout" not in module.__dict__
    compiled = torch.compile(_experts_call(module), backend="aot_eager")(x, index, weights)
    assert "_moekit_layout" in module.__dict__
    assert rel_err(compiled, module(x, index, weights)) <= TOL[torch.float32]
