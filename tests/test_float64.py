"""float64 is computed in float64 on the reference engine: every sum and the activation math run in the
"accumulation dtype" (fp32, or the input's own when wider), so moekit matches eager float64 to ~1e-16 and
``torch.autograd.gradcheck`` passes. bf16 / fp16 / fp32 keep their fp32 accumulation exactly as before.
(The Triton engine takes no float64: such calls run on the reference engine.)
"""

from __future__ import annotations

import pytest
import torch
from experts_factory import (
    FAMILIES,
    Block,
    call_engine,
    eager_takes_sentinels,
    make_experts,
    make_inputs,
    rel_err,
    run_experts,
)
from tiny_models import torch_threads

import moekit  # noqa: F401  (registers the "moekit" experts implementation)
from moekit.activations import ELEMENTWISE, Activation, accumulation_dtype
from moekit.engines.reference import combine, experts_reference
from moekit.grouped import segment_sum
from moekit.layout import ExpertsLayout
from moekit.lora import LoraFactors
from moekit.plan import build_plan

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_accumulation_dtype():
    assert accumulation_dtype(F64) == F64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulation_dtype(dtype) == torch.float32
    plan = build_plan(torch.tensor([[0, 1], [1, 2]]), 3)
    for dtype, acc in ((F64, F64), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        rows = torch.randn(4, 5, dtype=dtype)
        assert combine(rows, plan, torch.rand(2, 2)).dtype == acc
        assert segment_sum(rows, plan).dtype == acc


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_matches_eager(family):
    """Output and every gradient within fp64 rounding of eager float64 (fp32 accumulation gave ~1e-7)."""
    module = make_experts(family, dtype=F64)
    inputs = make_inputs(40, 32, 6, 2, dtype=F64)
    out, grads = run_experts(module, "moekit", *inputs)
    out_eager, grads_eager = run_experts(module, "eager", *inputs)
    assert out.dtype == F64 and rel_err(out, out_eager) <= 1e-13
    assert grads.keys() == grads_eager.keys()
    for name in grads_eager:
        assert grads[name].dtype == F64 and rel_err(grads[name], grads_eager[name]) <= 1e-13, name


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_peft_lora_matches_eager(family):
    from peft import LoraConfig, get_peft_model

    experts = make_experts(family, dtype=F64)
    up = "experts.gate_up_proj" if experts.has_gate else "experts.up_proj"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=[up, "experts.down_proj"],
                        init_lora_weights=False)  # fmt: skip
    model = get_peft_model(Block(experts), config).double()
    x, index, weights = make_inputs(30, 32, 6, 2, dtype=F64)
    results = {}
    for implementation in ("eager", "moekit"):
        experts.config._experts_implementation = implementation
        model.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        out = model(x_, index, weights)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=F64))
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[implementation] = (out.detach(), x_.grad, grads)
    (out, grad_x, grads), (out_e, grad_x_e, grads_e) = results["moekit"], results["eager"]
    assert rel_err(out, out_e) <= 1e-13 and rel_err(grad_x, grad_x_e) <= 1e-13
    assert grads.keys() == grads_e.keys() and len(grads) == 4  # lora_A, lora_B of both projections
    for name in grads_e:
        assert rel_err(grads[name], grads_e[name]) <= 1e-13, name


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_through_the_backend(family):
    """gradcheck of moekit's backend on a tiny experts module, in every input and parameter (and, as a control,
    of transformers' eager). Qwen3 also routes some slots to the expert-parallel sentinel."""
    module = make_experts(family, hidden=6, intermediate=4, num_experts=3, dtype=F64, seed=2)
    x, index, weights = make_inputs(5, 6, 3, 2, dtype=F64, seed=4)
    if family == "qwen3_moe":  # eager gpt-oss and NemotronH cannot take sentinel ids
        index[1, 1] = index[3, 0] = 3
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone() for p in module.parameters()]

    def layer(x, weights, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x, index, weights))

    inputs = [t.clone().requires_grad_(True) for t in (x, weights, *params)]
    controls = ("eager",) if family != "qwen3_moe" or eager_takes_sentinels() else ()  # 5.17: no sentinel ids
    for implementation in ("moekit", *controls):
        module.config._experts_implementation = implementation
        assert torch.autograd.gradcheck(layer, inputs), implementation


def _engine_case(act, transposed, bias, lora, seed=0, T=5, H=6, I=4, E=3, K=2):
    g = torch.Generator().manual_seed(seed)
    W = 2 * I if act.gated else I
    rw, index = torch.topk(torch.randn(T, E, generator=g).softmax(-1), K, dim=-1)
    index[2, 1] = E  # a sentinel slot
    shapes = {
        "x": (T, H), "routing_weights": rw,
        "up": (E, H, W) if transposed else (E, W, H), "up_bias": (E, W) if bias else None,
        "down": (E, I, H) if transposed else (E, H, I), "down_bias": (E, H) if bias else None,
    }  # fmt: skip
    if lora:
        shapes.update({"up_a": (E, 2, H), "up_b": (E, W, 2), "down_a": (E, 2, I), "down_b": (E, H, 2)})
    tensors = {
        key: None if shape is None else (shape if isinstance(shape, torch.Tensor) else torch.randn(shape, generator=g))
        for key, shape in shapes.items()
    }
    tensors = {key: None if t is None else t.to(F64).requires_grad_(True) for key, t in tensors.items()}
    return ExpertsLayout(act, transposed), build_plan(index, E), tensors


@pytest.mark.parametrize(
    "act, transposed, bias",
    [
        (Activation("plain", ELEMENTWISE["relu2"]), False, False),
        (Activation("glu", ELEMENTWISE["silu"], True), False, False),
        (Activation("glu", ELEMENTWISE["gelu_tanh"], False), True, True),
        (Activation("clamped_glu", None, False, alpha=1.702, limit=0.7), True, True),  # both clamp branches hit
    ],
    ids=["relu2", "silu_glu", "gelu_tanh_glu_interleaved", "clamped_glu"],
)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_gradcheck_reference_engine(act, transposed, bias, lora):
    """gradcheck of the reference engine itself in every tensor input, LoRA factors (and their scale) included."""
    layout, plan, tensors = _engine_case(act, transposed, bias, lora)
    keys = [key for key, t in tensors.items() if t is not None]

    def layer(*values):
        named = {**dict.fromkeys(tensors), **dict(zip(keys, values))}
        base = [named[k] for k in ("x", "routing_weights", "up", "up_bias", "down", "down_bias")]
        factors = {}
        if lora:
            factors = {
                "up_lora": LoraFactors(named["up_a"], named["up_b"], 1.5),
                "down_lora": LoraFactors(named["down_a"], named["down_b"], 0.5),
            }
        return call_engine(experts_reference, layout, plan, *base, **factors)

    assert torch.autograd.gradcheck(layer, [tensors[k] for k in keys])
