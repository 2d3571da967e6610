"""Fused LoRA on the experts in the Triton engine, against the reference engine (the oracle).

LoRA factors per projection: A [E, R, in], B [E, out, R] with the scaling folded into B (several adapters
concatenated along R), a pair both engines take; and, as the backend passes them, PEFT's own fp32 parameters
viewed per expert with a scale (``LoraFactors``, the PEFT-layout and PEFT-model tests). Forward output and every gradient (x, routing
weights, A and B of both projections, base weights and biases when trainable) are compared; every buffer the
kernels must fill is NaN-poisoned (``OPTIONS.poison_outputs``), so an unwritten element shows up as NaN.

Runs natively on a GPU or under TRITON_INTERPRET=1 on the CPU (conftest sets it); shapes are tiny. bf16 under the
interpreter: ``tl.dot`` tiles are upcast to fp32 and fp32 -> bf16 casts round by hand (see
``moekit.kernels.tiling``), so bf16 results are those of the GPU up to summation order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from experts_factory import call_engine, supported
from triton_compare import assert_matches

triton = pytest.importorskip("triton")

from moekit import kernels
from moekit.activations import ELEMENTWISE, Activation
from moekit.backend import triton_available
from moekit.engines.reference import experts_reference
from moekit.engines.triton import experts_triton
from moekit.layout import ExpertsLayout
from moekit.options import OPTIONS
from moekit.plan import build_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_available(DEVICE), reason="no GPU and TRITON_INTERPRET is not set"),
]

NAMES = ("out", "x", "routing_weights", "up_weight", "up_bias", "down_weight", "down_bias",
         "up_A", "up_B", "down_A", "down_B")  # fmt: skip
FROZEN_BASE = (True, True, False, False, False, False, True, True, True, True)
ALL = (True,) * 10

LAYOUTS = {
    # name: (activation, transposed, bias)
    "relu2": (Activation("plain", ELEMENTWISE["relu2"]), False, False),  # NemotronH: non-gated
    "silu_glu": (Activation("glu", ELEMENTWISE["silu"], True), False, False),  # Qwen3: gate/up concatenated
    # gpt-oss: clamped gate, interleaved, transposed weights, biases (low limit: both clamp branches are hit)
    "gpt_oss": (Activation("clamped_glu", None, False, alpha=1.702, limit=0.7), True, True),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)


def make_case(layout="silu_glu", ranks=(8,), T=13, H=24, I=20, E=4, K=2, dtype=torch.float32, seed=0,
              sentinel_fraction=0.0, projections=("up", "down"), limit=None):  # fmt: skip
    """Random inputs with LoRA factors (one pair per adapter rank, concatenated along R) on ``projections``."""
    act, transposed, bias = LAYOUTS[layout]
    if limit is not None:
        act = Activation(act.kind, act.act, act.concatenated, alpha=act.alpha, limit=limit)
    g = torch.Generator().manual_seed(seed)
    W = 2 * I if act.gated else I
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    rw, idx = torch.topk(logits.softmax(-1), K, dim=-1)
    if sentinel_fraction:
        drop = torch.rand(idx.shape, generator=g) < sentinel_fraction
        idx = torch.where(drop, torch.full_like(idx, E), idx)
    up = torch.randn(E, H, W, generator=g) if transposed else torch.randn(E, W, H, generator=g)
    down = torch.randn(E, I, H, generator=g) if transposed else torch.randn(E, H, I, generator=g)
    up, down = up / H**0.5, down / I**0.5
    up_b = torch.randn(E, W, generator=g) * 0.5 if bias else None
    down_b = torch.randn(E, H, generator=g) * 0.5 if bias else None

    def lora(d_in, d_out):
        # the low-rank term is as large as the base term, so a wrong factor cannot hide under the tolerance
        pairs = [(torch.randn(E, r, d_in, generator=g) / d_in**0.5, torch.randn(E, d_out, r, generator=g) / r**0.5)
                 for r in ranks]  # fmt: skip
        return torch.cat([a for a, _ in pairs], 1), torch.cat([b for _, b in pairs], 2)

    up_lora = lora(H, W) if "up" in projections else (None, None)
    down_lora = lora(I, H) if "down" in projections else (None, None)
    grad_out = torch.randn(T, H, generator=g)
    to = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)
    return {
        "layout": ExpertsLayout(act, transposed),
        "plan": build_plan(idx.to(DEVICE), E),
        "tensors": [to(x), to(rw), to(up), to(up_b), to(down), to(down_b), *map(to, up_lora), *map(to, down_lora)],
        "grad_out": to(grad_out),
    }


def run(fn, case, requires_grad=FROZEN_BASE, dtype=None):
    """Output and the gradient of every input (None where none is asked for or the input is absent)."""
    leaves = []
    for t, req in zip(case["tensors"], requires_grad):
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().clone()
        if dtype is not None:
            t = t.to(dtype)
        leaves.append(t.requires_grad_(req))
    x, rw, up, up_b, down, down_b, up_a, up_bl, down_a, down_bl = leaves
    up_lora = (up_a, up_bl) if up_a is not None else None
    down_lora = (down_a, down_bl) if down_a is not None else None
    out = call_engine(
        fn, case["layout"], case["plan"], x, rw, up, up_b, down, down_b, up_lora=up_lora, down_lora=down_lora
    )
    if out.requires_grad:
        out.backward(case["grad_out"].to(out.dtype))
    return [out.detach()] + [None if t is None or not t.requires_grad else t.grad for t in leaves]


def assert_close(case, tol, requires_grad=FROZEN_BASE, truth_factor=None):
    """Triton vs the reference in the same dtype (max|a-b| / max|b| <= tol); with ``truth_factor``, both against
    an fp64 reference instead: the Triton error must be <= truth_factor x the reference's + tol."""
    pairs = [None if t[0] is None else tuple(t) for t in (case["tensors"][6:8], case["tensors"][8:10])]
    assert supported(case["layout"], case["tensors"][0], *pairs)  # no silent fallback to the reference
    ours = run(experts_triton, case, requires_grad)
    ref = run(experts_reference, case, requires_grad)
    truth = run(experts_reference, case, requires_grad, torch.float64) if truth_factor else None
    assert_matches(ours, ref, truth, NAMES, tol, truth_factor)
    return ours


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_frozen_base(layout, rank):
    ours = assert_close(make_case(layout, ranks=(rank,), seed=rank), 1e-5)
    assert all(g is None for g in ours[3:7])  # no gradient for the frozen base
    assert all(g is not None and g.abs().max() > 0 for g in ours[7:])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_trainable_base_plus_lora(layout):
    ours = assert_close(make_case(layout, ranks=(8,), seed=5, sentinel_fraction=0.2), 1e-5, requires_grad=ALL)
    assert all(g is not None for i, g in enumerate(ours[1:], 1) if case_has(layout, NAMES[i]))


def case_has(layout, name):
    return LAYOUTS[layout][2] or not name.endswith("bias")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16(layout):
    case = make_case(
        layout, ranks=(16,), T=24, dtype=torch.bfloat16, seed=7, limit=7.0 if layout == "gpt_oss" else None
    )
    assert_close(case, 2e-2)  # against the bf16 reference
    assert_close(case, 2e-3, truth_factor=2.0)  # no worse than the bf16 reference against fp64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["split", "fused", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_gemm_modes(monkeypatch, layout, mode, dtype):
    """``OPTIONS.lora_gemm``: "split" runs the big GEMMs' base product on grouped_mm and adds the LoRA term
    in place (forward down-projection, dX, and with a trainable base dA's GEMM); "fused" keeps both in one
    Triton kernel; "auto" splits from a reduction size (here lowered to 25, so only the dX GEMM of gated layouts,
    K = 2I = 48, splits). All match the reference, frozen base and trainable base."""
    import moekit.engines.triton as engine

    adds = []
    real = kernels.lora_add

    def spy(*args):
        adds.append(True)
        return real(*args)

    monkeypatch.setattr(kernels, "lora_add", spy)
    monkeypatch.setattr(OPTIONS, "lora_gemm", mode)
    monkeypatch.setattr(engine, "SPLIT_LORA_MIN_K", 25)
    fp32 = dtype == torch.float32
    # I = 24: bf16 rows of 48 bytes, which grouped_mm takes (16-byte multiples)
    case = make_case(layout, ranks=(8,), T=19, I=24, dtype=dtype, seed=12, sentinel_fraction=0.2, limit=7.0)
    for requires_grad, split_adds in ((FROZEN_BASE, 2), (ALL, 3)):
        adds.clear()
        if fp32:
            assert_close(case, 1e-5, requires_grad=requires_grad)
        else:  # no worse than the bf16 reference, both against fp64
            assert_close(case, 2e-3, requires_grad=requires_grad, truth_factor=2.0)
        auto_adds = 1 if LAYOUTS[layout][0].gated else 0  # dX only (K = 48; forward down and dA: K = 24)
        assert sum(adds) == {"split": split_adds, "fused": 0, "auto": auto_adds}[mode]


def test_bf16_trainable_base():
    case = make_case("silu_glu", ranks=(16,), T=24, dtype=torch.bfloat16, seed=9)
    assert_close(case, 2e-2, requires_grad=ALL)


def test_several_adapters_concatenated():
    """Three adapters of ranks 8, 16 and 64 (R = 88: two steps of the in-kernel rank loop, several rank tiles)."""
    assert_close(make_case("gpt_oss", ranks=(8, 16, 64), seed=3), 1e-5, requires_grad=ALL)


@pytest.mark.parametrize("projection", ["up", "down"])
def test_lora_on_one_projection(projection):
    ours = assert_close(make_case("relu2", ranks=(4,), seed=11, projections=(projection,)), 1e-5)
    present = [ours[7] is not None, ours[9] is not None]
    assert present == [projection == "up", projection == "down"]


def test_frozen_base_launches_no_base_weight_gradient(monkeypatch):
    """A frozen base gets no weight-gradient kernel: the only weight-gradient launches are the LoRA factors'
    (and, with trainable biases, the bias-only pass that runs no GEMM)."""
    calls = []
    real = kernels.weight_grad

    def spy(*args, **kwargs):
        calls.append((kwargs.get("compute_w", True), kwargs.get("lowrank", False), kwargs.get("bias_dtype")))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "weight_grad", spy)
    case = make_case("gpt_oss", ranks=(8,), seed=2)
    assert_close(case, 1e-5)
    assert sorted(calls) == [(True, True, None)] * 4  # dA, dB of both projections, nothing else
    calls.clear()
    # biases trainable, weights frozen: bias sums without a GEMM
    assert_close(case, 1e-5, requires_grad=(True, True, False, True, False, True, True, True, True, True))
    assert all(lowrank or not compute_w for compute_w, lowrank, _ in calls) and len(calls) == 6
    calls.clear()
    # only the up projection's A trains: one launch
    assert_close(case, 1e-5, requires_grad=(False, False, False, False, False, False, True, False, False, False))
    assert calls == [(True, True, None)]


@pytest.mark.parametrize("requires_grad", [FROZEN_BASE, (True,) * 10], ids=["frozen_base", "trainable_base"])
def test_dx_comes_before_the_up_projection_gradients(monkeypatch, requires_grad):
    """Memory plan: dX's per-row partials [S, H] are combined and freed before the up projection's weight and
    factor gradients are allocated, so the backward never holds them together."""
    events = []
    real_combine, real_weight_grad = kernels.combine, kernels.weight_grad

    def combine(*args, **kwargs):
        events.append("combine")
        return real_combine(*args, **kwargs)

    def weight_grad(left, right, *args, **kwargs):
        out = real_weight_grad(left, right, *args, **kwargs)
        events.append(f"weight_grad {tuple(out[0].shape) if out[0] is not None else None}")
        return out

    monkeypatch.setattr(kernels, "combine", combine)
    monkeypatch.setattr(kernels, "weight_grad", weight_grad)
    monkeypatch.setattr(OPTIONS, "plain_gemm", "triton")  # every weight gradient through weight_grad
    case = make_case("silu_glu", ranks=(8,), seed=4)
    assert_close(case, 1e-5, requires_grad=requires_grad)
    E, H, I, R = 4, 24, 20, 8
    up_shapes = {f"weight_grad {s}" for s in [(E, 2 * I, R), (E, R, H), (E, 2 * I, H)]}
    backward = events[events.index("combine") + 1 :]  # after the forward's combine
    dx = backward.index("combine")
    assert not up_shapes & set(backward[:dx]), backward
    assert up_shapes & set(backward[dx:]) == (
        up_shapes if requires_grad[2] else up_shapes - {f"weight_grad {(E, 2 * I, H)}"}
    )


def test_backward_drops_each_lora_operand_after_its_last_use(monkeypatch):
    """Memory plan: the LoRA operand copies (s·B, and in the forward A in x's dtype) are not kept from the
    forward; the backward reads A as it is (PEFT's fp32 parameter: the kernels round its tiles) and drops each
    s·B copy after its last use, so when dX is computed all are gone (s·B_up after v_up)."""
    import weakref

    import moekit.engines.triton as engine

    made = []  # weak references to the s·B operands, in the order the engine makes them
    real_factors, real_combine = engine._kernel_factors, kernels.combine

    def kernel_factors(lora, dtype, copy_a):
        factor_a = lora.a
        operand_a, operand_b = real_factors(lora, dtype, copy_a)
        # A: a copy in x's dtype for the forward's low-rank GEMMs, read as it is (no copy) in the backward
        assert operand_a.dtype == dtype if copy_a else operand_a is factor_a
        assert operand_b.dtype == dtype and operand_b.is_contiguous()
        made.append(weakref.ref(operand_b))
        return operand_a, operand_b

    alive = []

    def combine(*args, **kwargs):
        alive.append([ref() is not None for ref in made])
        return real_combine(*args, **kwargs)

    monkeypatch.setattr(engine, "_kernel_factors", kernel_factors)
    monkeypatch.setattr(kernels, "combine", combine)
    case = make_case("silu_glu", ranks=(8,), seed=5, dtype=torch.bfloat16)
    case["tensors"][6:] = [t.float() for t in case["tensors"][6:]]  # PEFT's fp32 factors: s·B is a copy
    run(experts_triton, case)
    # made: forward up, forward down, backward down, backward up; the second combine is the backward's dX
    assert len(made) == 4 and len(alive) == 2
    assert alive[1] == [False, False, False, False]


def test_sentinels_and_experts_without_tokens():
    """Expert-parallel sentinel ids are skipped; experts that get no rows get exact-zero factor gradients."""
    case = make_case("silu_glu", ranks=(8,), T=3, E=16, K=2, seed=4, sentinel_fraction=0.3)
    ours = assert_close(case, 1e-5, requires_grad=ALL)
    empty = case["plan"].tokens_per_expert.cpu() == 0
    assert empty.any()
    for grad in ours[7:]:
        assert float(grad[empty].abs().sum()) == 0.0
        assert float(grad[~empty].abs().sum()) > 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_never_reads_the_plan_on_the_host(monkeypatch, layout):
    """The Triton engine's forward and backward (trainable base, LoRA, sentinels) never ask the plan for its
    routed-row count or per-expert counts on the host: on a GPU either would be a sync per call."""
    from moekit.plan import DispatchPlan

    def host_read(self):
        raise AssertionError("the Triton engine read a plan count on the host (a device sync on a GPU)")

    case = make_case(layout, ranks=(8,), T=9, E=5, K=2, seed=6, sentinel_fraction=0.3)
    monkeypatch.setattr(DispatchPlan, "num_routed", property(host_read))
    monkeypatch.setattr(DispatchPlan, "tokens_per_expert_list", property(host_read))
    out, *grads = run(experts_triton, case, requires_grad=ALL)
    assert not torch.isnan(out).any() and all(g is None or not torch.isnan(g).any() for g in grads)


def test_all_sentinels_and_zero_tokens():
    ours = assert_close(make_case("relu2", ranks=(8,), T=5, sentinel_fraction=1.0), 1e-5, requires_grad=ALL)
    assert float(ours[0].abs().sum()) == 0.0 and all(float(g.abs().sum()) == 0.0 for g in ours[7:])
    ours = assert_close(make_case("gpt_oss", ranks=(8,), T=0), 1e-5, requires_grad=ALL)
    assert ours[0].shape == (0, 24)


def test_backward_modes(monkeypatch):
    """Every GEMM on the Triton kernels or the plain ones on grouped_mm, the big LoRA GEMMs split onto grouped_mm
    or fused."""
    for plain, lora_gemm in (("triton", "fused"), ("torch", "split"), ("torch", "fused")):
        monkeypatch.setattr(OPTIONS, "plain_gemm", plain)
        monkeypatch.setattr(OPTIONS, "lora_gemm", lora_gemm)
        assert_close(make_case("gpt_oss", ranks=(16,), T=17, E=3, seed=8, sentinel_fraction=0.2), 1e-5, ALL)


def test_deterministic():
    case = make_case("silu_glu", ranks=(8,), T=16, E=3, K=3)
    first, second = run(experts_triton, case, ALL), run(experts_triton, case, ALL)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("lora_gemm", ["fused", "split"])
@pytest.mark.parametrize("transposed_layout", [False, True])
def test_factors_in_peft_layout_fp32_with_a_scale(transposed_layout, lora_gemm, monkeypatch):
    """bf16 inputs with LoRA factors as PEFT keeps them: fp32 parameters lora_A [R*E, in] and lora_B [out, R*E]
    (B's experts at stride 1), viewed without a copy, and a scale. The engine scales B inside its own Function
    and the kernels round A's fp32 tiles as they load them (every GEMM that reads A: the low-rank ones, the fused
    LoRA terms and, split, the in-place add), so autograd records no op per factor (only the views) and the fp32
    gradients land in the parameters' layout; every result matches the reference, which folds the scale in
    autograd ops."""
    from moekit.lora import LoraFactors

    monkeypatch.setattr(OPTIONS, "lora_gemm", lora_gemm)

    layout = "gpt_oss" if transposed_layout else "silu_glu"
    case = make_case(layout, ranks=(8,), T=21, dtype=torch.bfloat16, seed=12, limit=7.0 if transposed_layout else None)
    E, R, scale = 4, 8, 0.375
    g = torch.Generator().manual_seed(13)

    def peft_params(factor_a, factor_b):  # [E, R, in], [E, out, R] -> PEFT's fp32 [R*E, in], [out, R*E]
        weight_a = factor_a.float().reshape(E * R, -1)
        weight_b = factor_b.float().permute(1, 2, 0).reshape(factor_b.shape[1], R * E)
        return weight_a + 0.1 * torch.randn(weight_a.shape, generator=g).to(DEVICE), weight_b

    params = [peft_params(*case["tensors"][6:8]), peft_params(*case["tensors"][8:10])]

    def run_engine(fn, dtype=None):
        """Output, then the gradients of x and of the four parameters; ``dtype`` casts every input (fp64 truth)."""
        cast = (lambda t: t.detach().clone()) if dtype is None else (lambda t: t.detach().to(dtype))
        leaves = [cast(p).requires_grad_(True) for pair in params for p in pair]
        x, rw, up, up_b, down, down_b = (None if t is None else cast(t) for t in case["tensors"][:6])
        x.requires_grad_(True)
        factors = [LoraFactors(a.view(E, R, -1), b.view(b.shape[0], R, E).permute(2, 0, 1), scale)
                   for a, b in (leaves[:2], leaves[2:])]  # fmt: skip
        out = call_engine(fn, case["layout"], case["plan"], x, rw, up, up_b, down, down_b, *factors)
        out.backward(cast(case["grad_out"]))
        return [out, x.grad] + [p.grad for p in leaves]

    assert supported(case["layout"], case["tensors"][0], *[LoraFactors(a.view(E, R, -1), b, scale) for a, b in
                                                          ((params[0][0], case["tensors"][7]),
                                                           (params[1][0], case["tensors"][9]))])  # fmt: skip
    ours, ref = run_engine(experts_triton), run_engine(experts_reference)
    names = ("out", "x", "up_A", "up_B", "down_A", "down_B")
    assert [t.dtype for t in ours] == [torch.bfloat16] * 2 + [torch.float32] * 4  # fp32 gradients for fp32 factors
    assert all(t.abs().max() > 0 for t in ours)
    # no worse than the bf16 reference, both against fp64
    assert_matches(ours, ref, run_engine(experts_reference, torch.float64), names, 2e-3, 2.0)

    # autograd between the engine and the parameters: views only (no cast, no scale, no copy per step)
    node_names = set()
    stack = [ours[0].grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ == "AccumulateGrad":
            continue
        node_names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert node_names <= {"ExpertsTritonFunctionBackward", "ViewBackward0", "PermuteBackward0"}, node_names


def _peft_block(dtype):
    """A PEFT model (LoRA r=4 on both expert weights of a tiny nemotron_h experts module) on moekit, and inputs
    (x [9, 24], top-k index, routing weights)."""
    from experts_factory import Block, make_experts, make_inputs
    from peft import LoraConfig, get_peft_model

    import moekit

    experts = make_experts("nemotron_h", hidden=24, intermediate=16, num_experts=4, dtype=dtype).to(DEVICE)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                        target_parameters=["experts.up_proj", "experts.down_proj"])  # fmt: skip
    torch.manual_seed(0)  # PEFT draws the factors (init_lora_weights=False) from the global generator
    model = moekit.enable(get_peft_model(Block(experts), config).to(DEVICE))
    return model, [t.to(DEVICE) for t in make_inputs(9, 24, 4, 2, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_model_through_the_triton_engine(monkeypatch, dtype):
    """``moekit.enable`` on a PEFT model: the backend hands PEFT's factors to the Triton engine (selection forced,
    since the CPU normally runs the reference) and the result matches the reference path; ΔW is never built.
    In bf16 PEFT keeps its factors in fp32: the engine takes them as they are."""
    from peft.tuners.lora.layer import ParamWrapper

    import moekit.backend
    import moekit.engines.triton

    model, (x, index, weights) = _peft_block(dtype)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    monkeypatch.setattr(ParamWrapper, "get_delta_weight", lambda *a, **k: pytest.fail("ΔW requested"))
    launched = []
    real = moekit.engines.triton.ExpertsTritonFunction.apply
    monkeypatch.setattr(moekit.engines.triton.ExpertsTritonFunction, "apply",
                        lambda *a: launched.append(a[7] is not None and a[11] is not None) or real(*a))  # fmt: skip

    def step(engine, model=model, cast=lambda t: t):
        monkeypatch.setattr(moekit.backend, "select_engine", lambda *a, **k: engine)
        model.zero_grad(set_to_none=True)
        xr, wr = cast(x).clone().requires_grad_(True), cast(weights).clone().requires_grad_(True)
        out = model(xr, index, wr)
        out.backward(torch.ones_like(out))
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return [out.detach(), xr.grad, wr.grad, *grads.values()], list(grads)

    (ours, names), (ref, ref_names) = step("triton"), step("reference")
    assert launched == [True]
    assert names == ref_names and len(names) == 4  # lora_A / lora_B of both projections
    names = ["out", "x", "routing_weights", *names]
    if dtype == torch.float32:
        assert_matches(ours, ref, None, names, 1e-5, None)
    else:  # no worse than the bf16 reference, both against the same model in fp64
        truth, _ = step("reference", copy.deepcopy(model).double(), lambda t: t.double())
        assert_matches(ours, ref, truth, names, 2e-3, 2.0)


def test_backward_keeps_no_copy_of_the_lora_factors(monkeypatch):
    """The kernels' LoRA operands (A in x's dtype, s·B dense) are made again in the backward, not saved from the
    forward: summed over a model's layers they would hold E·R·(in + out) per projection per layer (GBs at r=64).
    What the forward saves of the factors is PEFT's parameters themselves (views, no memory of their own)."""
    import moekit.backend

    model, (x, index, weights) = _peft_block(torch.bfloat16)  # PEFT's factors stay fp32: the operands are copies
    monkeypatch.setattr(moekit.backend, "select_engine", lambda *a, **k: "triton")
    factors = [p for n, p in model.named_parameters() if "lora_" in n]
    num_experts = 4
    factor_shapes = set()
    for p in factors:  # lora_A [r*E, in] -> A [E, r, in]; lora_B [out, r*E] -> B [E, out, r]
        rows, cols = p.shape
        factor_shapes |= {(num_experts, rows // num_experts, cols), (num_experts, rows, cols // num_experts)}
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x.clone().requires_grad_(True), index, weights.clone().requires_grad_(True))
    copies = [
        tuple(t.shape) for t in saved
        if tuple(t.shape) in factor_shapes and t.untyped_storage().data_ptr() not in parameter_storages
    ]  # fmt: skip
    assert not copies, f"the forward saved LoRA operand copies of shapes {copies}"
    assert any(tuple(t.shape) in factor_shapes for t in saved)  # the parameter views are what it saves
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in factors)


@pytest.mark.parametrize("direction", ["grad_to_peft", "bf16_operand", "fp16_operand"])
@pytest.mark.parametrize("shape", [(37, 70, 3), (5, 1, 16), (3, 9, 1), (1, 130, 2)])
def test_scaled_copy_between_peft_and_dense_layouts(direction, shape):
    """``scaled_copy`` moves B between PEFT's layout ([out, R*E] viewed [E, out, R], strides (1, R*E, E)) and a
    dense one, scaled and cast once: each element equals torch's fp32 product rounded to the destination dtype.
    Sizes cross the tiles unevenly; destinations are NaN-filled, so an element left unwritten fails."""
    from moekit.kernels.relayout import _merged_strides, scaled_copy

    E, out, R = shape
    g = torch.Generator().manual_seed(sum(shape))
    peft = torch.randn(out, R * E, generator=g).to(DEVICE).view(out, R, E).permute(2, 0, 1)
    dense = torch.randn(E, out, R, generator=g).to(DEVICE)
    assert _merged_strides(peft) is not None and _merged_strides(dense) is not None
    if direction == "grad_to_peft":  # a factor gradient: fp32 dense -> fp32 in PEFT's strides
        src, dst, alpha = dense, torch.full_like(peft, float("nan")), 1.0
    else:  # the kernels' operand: fp32 in PEFT's strides -> s·B in the model's 16-bit dtype, dense
        operand_dtype = torch.bfloat16 if direction == "bf16_operand" else torch.float16
        src, dst, alpha = peft, torch.full(peft.shape, float("nan"), dtype=operand_dtype, device=DEVICE), 0.375
    assert scaled_copy(src, dst, alpha) is dst
    assert torch.equal(dst, (src * alpha).to(dst.dtype))


def test_scaled_copy_falls_back_for_layouts_that_do_not_merge():
    from moekit.kernels.relayout import _merged_strides, scaled_copy

    src = torch.randn(4, 6, 5, device=DEVICE)[:, :, :3]  # (out, R) do not merge: stride(1) = 5 != 3 * 1
    assert _merged_strides(src) is None
    dst = torch.empty(4, 6, 3, device=DEVICE)
    assert torch.equal(scaled_copy(src, dst, 2.0), src * 2.0)
    with pytest.raises(ValueError, match="shape"):
        scaled_copy(src, torch.empty(4, 6, 4, device=DEVICE))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_through_the_triton_engine(monkeypatch, use_reentrant):
    """torch.utils.checkpoint around a PEFT model on the Triton engine. The recompute builds a fresh graph, so the
    backward's early release of the pre-activation is safe under it, and every result equals the plain run's
    bit for bit (the kernels are deterministic)."""
    import moekit.backend
    import moekit.engines.triton

    model, (x, index, weights) = _peft_block(torch.float32)
    monkeypatch.setattr(moekit.backend, "select_engine", lambda *a, **k: "triton")
    launches = []
    real = moekit.engines.triton.ExpertsTritonFunction.apply
    monkeypatch.setattr(moekit.engines.triton.ExpertsTritonFunction, "apply", lambda *a: launches.append(1) or real(*a))

    def step(checkpointed: bool):
        model.zero_grad(set_to_none=True)
        xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(model, xr, index, wr, use_reentrant=use_reentrant)
        else:
            out = model(xr, index, wr)
        out.backward(torch.ones_like(out))
        return [out.detach(), xr.grad, wr.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    plain, checkpointed = step(False), step(True)
    assert len(launches) == 3  # the plain forward; the checkpointed forward and its recompute in the backward
    assert len(plain) == 7 and all(t is not None for t in plain)  # out, x, weights, 4 LoRA factors
    for ours, want in zip(checkpointed, plain):
        assert torch.equal(ours, want)
