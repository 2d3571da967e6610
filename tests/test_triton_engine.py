"""The Triton engine against the reference engine (the oracle), forward and every gradient.

Runs natively on a GPU, or under TRITON_INTERPRET=1 on the CPU (conftest sets it): shapes are tiny so the whole
file stays within a few minutes on two cores. Inputs are fresh random tensors (never zeros); every buffer the
kernels must fill is allocated NaN-poisoned (``moekit.options.OPTIONS.poison_outputs``) so an unwritten element
shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch
from experts_factory import call_engine
from triton_compare import assert_matches

triton = pytest.importorskip("triton")

import moekit.options
from moekit import kernels
from moekit.activations import ELEMENTWISE, Activation
from moekit.backend import triton_available
from moekit.engines.reference import experts_reference
from moekit.engines.triton import ExpertsTritonFunction, Saved, experts_triton
from moekit.grouped import grouped_matmul, grouped_outer, grouped_outer_runs
from moekit.kernels import tuning
from moekit.layout import ExpertsLayout
from moekit.options import OPTIONS
from moekit.plan import build_plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_available(DEVICE), reason="no GPU and TRITON_INTERPRET is not set"),
]

NAMES = ("out", "x", "routing_weights", "up_weight", "up_bias", "down_weight", "down_bias")


def _act(name: str, kind: str = "plain", concatenated: bool = True) -> Activation:
    return Activation(kind, ELEMENTWISE[name], concatenated)


CLAMPED = Activation("clamped_glu", None, False, alpha=1.702, limit=0.7)  # low limit: both clamp branches hit


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)


def _routing(num_tokens, num_experts, top_k, generator, sentinel_fraction=0.0, one_expert=None):
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    if one_expert is not None:
        index = torch.full_like(index, one_expert)
    if sentinel_fraction:
        drop = torch.rand(index.shape, generator=generator) < sentinel_fraction
        index = torch.where(drop, torch.full_like(index, num_experts), index)
    return weights, index


def make_case(T=13, H=24, I=20, E=4, K=2, act=None, transposed=False, bias=False, dtype=torch.float32, seed=0,
              sentinel_fraction=0.0, one_expert=None, routing_dtype=None):  # fmt: skip
    act = act or _act("relu2")
    g = torch.Generator().manual_seed(seed)
    W = 2 * I if act.gated else I
    x = torch.randn(T, H, generator=g)
    rw, idx = _routing(T, E, K, g, sentinel_fraction, one_expert)
    up = torch.randn(E, H, W, generator=g) if transposed else torch.randn(E, W, H, generator=g)
    down = torch.randn(E, I, H, generator=g) if transposed else torch.randn(E, H, I, generator=g)
    up, down = up / H**0.5, down / I**0.5
    up_b = torch.randn(E, W, generator=g) * 0.5 if bias else None
    down_b = torch.randn(E, H, generator=g) * 0.5 if bias else None
    grad_out = torch.randn(T, H, generator=g)
    to = lambda t, dt=dtype: None if t is None else t.to(device=DEVICE, dtype=dt)
    return {
        "layout": ExpertsLayout(act, transposed),
        "plan": build_plan(idx.to(DEVICE), E),
        "tensors": [to(x), to(rw, routing_dtype or dtype), to(up), to(up_b), to(down), to(down_b)],
        "grad_out": to(grad_out),
    }


def run(fn, case, dtype=None, requires_grad=(True,) * 6):
    """Output and gradients of every input (None where no grad), inputs optionally upcast to ``dtype``."""
    leaves = []
    for t, req in zip(case["tensors"], requires_grad):
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().clone()
        if dtype is not None:
            t = t.to(dtype)
        leaves.append(t.requires_grad_(req))
    out = call_engine(fn, case["layout"], case["plan"], *leaves)
    grad_out = case["grad_out"] if dtype is None else case["grad_out"].to(dtype)
    if out.requires_grad:
        out.backward(grad_out)
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def assert_close(case, tol, requires_grad=(True,) * 6, truth_factor=None):
    """Triton vs reference in the same dtype (max|a-b|/max|b| <= tol). With ``truth_factor``, instead both are
    compared with an fp64 reference and the Triton error must be <= truth_factor x the reference's + tol."""
    ours = run(experts_triton, case, requires_grad=requires_grad)
    ref = run(experts_reference, case, requires_grad=requires_grad)
    truth = run(experts_reference, case, torch.float64, requires_grad) if truth_factor else None
    assert_matches(ours, ref, truth, NAMES, tol, truth_factor)
    return ours


ACTIVATIONS = {
    "relu2": (_act("relu2"), False, False),
    "relu": (_act("relu"), False, False),
    "silu": (_act("silu"), False, True),
    "gelu": (_act("gelu"), False, False),
    "gelu_tanh": (_act("gelu_tanh"), True, False),
    "silu_glu_concat": (_act("silu", "glu", True), False, True),
    "silu_glu_interleaved": (_act("silu", "glu", False), True, False),
    "gelu_glu_concat": (_act("gelu_tanh", "glu", True), False, False),
    "clamped_glu": (CLAMPED, True, True),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_fp32_every_activation(name):
    act, transposed, bias = ACTIVATIONS[name]
    assert_close(make_case(act=act, transposed=transposed, bias=bias, seed=hash(name) % 1000), 1e-5)


@pytest.mark.parametrize("plain", ["torch", "triton"])
@pytest.mark.parametrize("name", ["relu2", "silu_glu_concat", "silu_glu_interleaved", "clamped_glu"])
def test_bf16(monkeypatch, name, plain):
    """bf16 with the down-projection on grouped_mm (routing weight and bias in the combine, where grouped_mm runs)
    and on the Triton kernel (both in its epilogue). I = 24: bf16 rows of a are 48 bytes, aligned for grouped_mm."""
    import moekit.engines.triton as engine

    monkeypatch.setattr(OPTIONS, "plain_gemm", plain)
    matmuls = []
    monkeypatch.setattr(engine, "grouped_matmul", lambda *args: matmuls.append(1) or grouped_matmul(*args))
    act, transposed, bias = ACTIVATIONS[name]
    if name == "clamped_glu":  # gpt-oss's limit: a low one makes bf16 gradients flip at the clamp edge
        act = Activation("clamped_glu", None, False, alpha=1.702, limit=7.0)
    case = make_case(T=24, I=24, act=act, transposed=transposed, bias=bias, dtype=torch.bfloat16, seed=7)
    assert_close(case, 2e-2)  # against the bf16 reference
    assert_close(case, 2e-3, truth_factor=2.0)  # no worse than the reference against fp64
    probe = torch.ones(8, 8, device=DEVICE, dtype=torch.bfloat16)
    assert bool(matmuls) == (plain == "torch" and grouped_outer_runs(probe, probe))


@pytest.mark.parametrize("plain", ["triton", "torch"])
@pytest.mark.parametrize("name", ["relu2", "silu_glu_interleaved", "clamped_glu"])
def test_backward_modes(monkeypatch, plain, name):
    """Every way of running the backward matches the reference: every GEMM on the Triton kernels, or, where it
    runs, the plain GEMMs (the forward's down-projection, dA's GEMM from the dOut row copy, both weight gradients,
    dX) on torch's grouped_mm (``OPTIONS.plain_gemm``; then the combine applies the routing weights and the down
    bias)."""
    import moekit.engines.triton as engine

    monkeypatch.setattr(OPTIONS, "plain_gemm", plain)
    calls = []
    monkeypatch.setattr(engine, "grouped_outer", lambda *args: calls.append("outer") or grouped_outer(*args))
    monkeypatch.setattr(engine, "grouped_matmul", lambda *args: calls.append("matmul") or grouped_matmul(*args))
    act, transposed, bias = ACTIVATIONS[name]
    assert_close(make_case(T=17, E=3, K=2, act=act, transposed=transposed, bias=bias, sentinel_fraction=0.2), 1e-5)
    # where grouped_mm runs (CPU builds of torch >= 2.10 have it), the forward's down-projection, both weight
    # gradients, dX and dA's GEMM went through it
    probe = torch.ones(8, 8, device=DEVICE)
    torch_runs = plain == "torch" and grouped_outer_runs(probe, probe)
    assert sorted(calls) == (["matmul"] * 3 + ["outer", "outer"] if torch_runs else [])


def test_fp16_routing_weights_fp32():
    case = make_case(T=24, act=_act("silu", "glu"), bias=True, dtype=torch.float16, routing_dtype=torch.float32)
    assert_close(case, 5e-3)


def test_autotune_env_picks_one_config(monkeypatch):
    """MOEKIT_TRITON_AUTOTUNE (``OPTIONS.pinned_config``): 0 keeps the default config, config:N the N-th (clamped), anything else all of them."""
    monkeypatch.setattr(tuning, "_generation", lambda: "hopper")

    def meta(value):
        monkeypatch.setattr(OPTIONS, "pinned_config", moekit.options._autotune(value))
        return [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in tuning.configs("gemm")]

    space = [(bm, bn, w, s) for bm, bn, _, w, s in tuning._SPACES["gemm"]["hopper"]]
    assert meta("1") == space
    assert meta("0") == space[:1]
    assert meta("config:1") == space[1:2]
    assert meta("config:99") == space[-1:]


def test_tuned_launches_reuse_the_chosen_config(monkeypatch):
    """Once a key has its config, launches go straight to the compiled kernel with it (no second choice)."""
    case = make_case(T=11, act=_act("silu", "glu"), bias=True)
    first = assert_close(case, 1e-5)
    used = [k for k in tuning.Autotuned.registry if k.chosen]
    assert used, "no kernel recorded a chosen config"
    monkeypatch.setattr(tuning.Autotuned, "_choose", lambda *a: pytest.fail("a config was chosen again"))
    second = assert_close(case, 1e-5)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


def test_zero_tokens():
    case = make_case(T=0, act=_act("silu", "glu"), bias=True)
    ours = assert_close(case, 1e-5)
    assert ours[0].shape == (0, 24)
    assert float(ours[3].abs().sum()) == 0.0  # weight grads exist and are zero


def test_one_token():
    assert_close(make_case(T=1, K=2, act=_act("gelu")), 1e-5)


def test_all_tokens_on_one_expert():
    assert_close(make_case(T=21, E=5, K=1, one_expert=3, act=_act("silu", "glu", False), bias=True), 1e-5)


def test_experts_without_tokens():
    # 3 tokens x 2 slots over 16 experts: most experts get nothing (their weight grads must be exact zeros)
    case = make_case(T=3, E=16, K=2, act=_act("relu2"), bias=True)
    ours = assert_close(case, 1e-5)
    empty = case["plan"].tokens_per_expert.cpu() == 0
    assert empty.any() and float(ours[3][empty].abs().sum()) == 0.0 and float(ours[4][empty].abs().sum()) == 0.0


def test_top_k_equals_num_experts():
    assert_close(make_case(T=7, E=4, K=4, act=_act("silu", "glu")), 1e-5)


def test_odd_sizes():
    assert_close(make_case(T=19, H=37, I=23, E=3, K=2, act=_act("gelu_tanh", "glu"), transposed=True, bias=True), 1e-5)


def test_sentinel_ids():
    assert_close(make_case(T=17, E=6, K=3, sentinel_fraction=0.4, act=CLAMPED, transposed=True, bias=True), 1e-5)


def test_all_sentinels():
    case = make_case(T=5, E=4, K=2, sentinel_fraction=1.0, act=_act("relu2"), bias=True)
    ours = assert_close(case, 1e-5)
    assert float(ours[0].abs().sum()) == 0.0


def test_many_experts_long_top_k():
    # E up to 512 and K up to 22: the in-kernel tile map spans all experts
    assert_close(make_case(T=3, H=16, I=16, E=512, K=22, act=_act("relu2")), 1e-5)


def test_weight_grad_expert_groups(monkeypatch):
    """The weight-gradient kernel splits experts into groups (one flat loop each); more groups than needed
    (empty trailing groups) and a single group both give exact per-expert sums, zeros for empty experts."""
    import importlib

    wg = importlib.import_module("moekit.kernels.weight_grad")
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([5, 0, 9, 0, 0, 20, 6, 0, 3, 1])
    n, P, Q = int(counts.sum()), 20, 24
    left, right = torch.randn(n, P, generator=g), torch.randn(n, Q, generator=g)
    ends = counts.cumsum(0)
    for sms in (1000, 1):
        monkeypatch.setattr(wg, "num_sms", lambda device, sms=sms: sms)
        dw, db = wg.weight_grad(left.to(DEVICE), right.to(DEVICE), counts.to(DEVICE), n, 10, (P, Q), torch.float32,
                                False, bias_dtype=torch.float32)  # fmt: skip
        for e in range(10):
            rows = slice(int(ends[e] - counts[e]), int(ends[e]))
            torch.testing.assert_close(dw[e].cpu(), left[rows].t() @ right[rows], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(db[e].cpu(), left[rows].sum(0), rtol=1e-5, atol=1e-5)


def test_frozen_weights(monkeypatch):
    calls = []
    real = kernels.weight_grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("compute_w", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "weight_grad", spy)
    case = make_case(act=_act("silu", "glu"), bias=True)
    # weights frozen, biases trainable: bias grads only, no weight-gradient GEMM
    ours = assert_close(case, 1e-5, requires_grad=(True, True, False, True, False, True))
    assert ours[3] is None and ours[5] is None and calls == [False, False]
    calls.clear()
    # everything expert-side frozen: only x and the routing weights
    ours = assert_close(case, 1e-5, requires_grad=(True, True, False, False, False, False))
    assert calls == [] and all(g is None for g in ours[3:])


def test_only_routing_weights_need_grad():
    assert_close(make_case(act=_act("relu")), 1e-5, requires_grad=(False, True, False, False, False, False))


def test_non_contiguous_inputs():
    case = make_case(T=11, H=24, act=_act("silu", "glu"))
    x = case["tensors"][0]
    wide = torch.randn(x.shape[0], 2 * x.shape[1], device=DEVICE, dtype=x.dtype)
    wide[:, ::2] = x
    case["tensors"][0] = wide[:, ::2]  # stride (48, 2)
    case["grad_out"] = case["grad_out"].t().contiguous().t()  # column-major
    assert_close(case, 1e-5)


def test_deterministic():
    case = make_case(T=16, E=3, K=3, act=_act("silu", "glu"), bias=True)
    first, second = run(experts_triton, case), run(experts_triton, case)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_custom_activation_is_refused_not_run_elsewhere():
    """experts_triton never falls back silently: the backend sends custom activations to the reference engine."""
    act = Activation("plain", None, custom=lambda h: torch.tanh(h))
    assert act.kernel_id == -1
    case = make_case(act=act)
    with pytest.raises(RuntimeError, match="not in moekit's activation table"):
        run(experts_triton, case)


def test_forward_saves_no_row_sized_output():
    """Forward caches x, routing weights, parameters, h and the inverse permutation: nothing [n, H]-sized."""
    case = make_case(T=12, H=40, I=8, E=3, K=2, act=_act("relu2"))
    leaves = [t.detach().clone().requires_grad_(True) for t in case["tensors"] if t is not None]
    out = ExpertsTritonFunction.apply(
        case["layout"], case["plan"], (1.0, 1.0), leaves[0], leaves[1], leaves[2], None, None, None, leaves[3], None,
        None, None,
    )  # fmt: skip
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    n, hidden = case["plan"].num_rows, 40
    assert not any(t.dim() == 2 and tuple(t.shape) == (n, hidden) for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted, bias", [(False, False), (True, False), (True, True)])
def test_combine_matches_torch(weighted, bias, dtype):
    """The combine kernel against a torch loop over slots: rows (+ bias of the row's expert) (* the slot's routing
    weight) summed in fp32, sentinel slots skipped, every output written (poisoned buffers), sizes off the tile."""
    g = torch.Generator().manual_seed(3)
    num_tokens, top_k, hidden, num_experts = 37, 3, 45, 5
    weights, index = _routing(num_tokens, num_experts, top_k, g, sentinel_fraction=0.25)
    plan = build_plan(index.to(DEVICE), num_experts)
    rows = torch.randn(plan.num_rows, hidden, generator=g).to(DEVICE, dtype)
    rows[plan.num_routed :] = float("nan")  # sentinel rows hold garbage that must never be read
    slot_weights = weights.to(DEVICE, dtype) if weighted else None
    expert_bias = torch.randn(num_experts, 2 * hidden, generator=g).to(DEVICE, dtype)[:, ::2] if bias else None
    ours = kernels.combine(
        rows, plan.row_of_slot.reshape(-1), num_tokens, top_k, dtype,
        slot_weights=slot_weights, bias=expert_bias, expert_of_row=plan.expert_of_row,
    )  # fmt: skip
    expected = torch.zeros(num_tokens, hidden, dtype=torch.float64, device=DEVICE)
    for slot in range(top_k):
        row = plan.row_of_slot[:, slot]
        routed = row >= 0
        term = rows[row.clamp(min=0)].double()
        if bias:
            term = term + expert_bias[plan.expert_of_row[row.clamp(min=0)].clamp(max=num_experts - 1)].double()
        if weighted:
            term = term * slot_weights[:, slot, None].double()
        expected += torch.where(routed[:, None], term, 0.0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(ours).all()
    assert (ours.double() - expected).abs().max() <= tol * expected.abs().max()
    if bias:
        with pytest.raises(ValueError, match="expert_of_row"):
            kernels.combine(rows, plan.row_of_slot.reshape(-1), num_tokens, top_k, dtype, bias=expert_bias)


@pytest.mark.parametrize("rank", [5, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 29])
def test_lora_add_adds_in_place(num_tokens, dtype, rank):
    """``lora_add(out, u, L, ...)`` adds u[r] @ L[e] to out in place (split LoRA mode): every routed row, the
    sentinel rows left as they were; experts without rows, N off the tile, a rank under one step (5, not a tile
    multiple) and over several (80: two 64-wide steps); L in fp32 beside bf16 rows (PEFT's A)."""
    g = torch.Generator().manual_seed(9)
    num_experts, top_k, width = 6, 2, 37
    _, index = _routing(num_tokens, num_experts, top_k, g, sentinel_fraction=0.2)
    index[:, 0] = index[:, 0].clamp(max=2)  # experts 3..5 get few or no rows
    plan = build_plan(index.to(DEVICE), num_experts)
    n = plan.num_rows
    u = torch.randn(n, rank, generator=g).to(DEVICE, dtype)
    factor = torch.randn(num_experts, width, rank, generator=g).to(DEVICE).transpose(1, 2)  # [E, R, N] fp32, strided
    base = torch.randn(n, width, generator=g).to(DEVICE, dtype)
    out = base.clone()
    result = kernels.lora_add(out, u, factor, plan.tokens_per_expert, n)
    assert result.data_ptr() == out.data_ptr()
    expert = plan.expert_of_row.clamp(max=num_experts - 1)
    routed = plan.expert_of_row < num_experts
    expected = base.double() + torch.einsum("nr,nrw->nw", u.double(), factor.to(dtype)[expert].double())
    expected = torch.where(routed[:, None], expected, base.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.equal(out[~routed], base[~routed])
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    assert torch.allclose(out.double(), expected, rtol=0, atol=tol * max(1.0, scale))
    with pytest.raises(ValueError, match="out must be"):
        kernels.lora_add(base.repeat(1, 2)[:, ::2], u, factor, plan.tokens_per_expert, n)
    with pytest.raises(ValueError, match="u must be"):
        kernels.lora_add(out, u[:, :1], factor, plan.tokens_per_expert, n)


@pytest.mark.parametrize("num_experts", [1, 5, 128, 600])
def test_chunk_table_kernel_matches_torch(num_experts):
    """The one-launch chunk table equals the torch-op specification (empty experts, all-empty, both row steps)."""
    import importlib

    wg = importlib.import_module("moekit.kernels.weight_grad")
    g = torch.Generator().manual_seed(num_experts)
    for trial in range(3):
        counts = torch.randint(0, 50, (num_experts,), generator=g)
        counts[torch.rand(num_experts, generator=g) < 0.3] = 0
        if trial == 2:
            counts.zero_()
        n = int(counts.sum())
        for block_k in (16, 64):
            ours = wg.chunk_table(counts.to(DEVICE), n, block_k)
            spec = wg.chunk_table_torch(counts.to(DEVICE), n, block_k)
            for a, b in zip(ours, spec):
                assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["relu2", "silu_glu_concat", "silu_glu_interleaved"])
def test_act_grad_in_place_and_given_ga_match(name):
    """dA written over its inputs (dh over h, w * a over ga) gives bit-identical results to fresh buffers
    (poisoned, so every element must be written), and ga computed by the caller (grouped_mm on the plan-ordered
    dOut rows) matches the gathered Triton GEMM."""
    from moekit.kernels.act_grad import act_grad_backward

    act = ACTIVATIONS[name][0]
    case = make_case(T=19, H=24, I=20, E=3, K=2, act=act, sentinel_fraction=0.2, seed=5)
    x, rw, up, _, down, _ = case["tensors"]
    plan, layout = case["plan"], case["layout"]
    tok, counts, n = plan.token_of_row, plan.tokens_per_expert, plan.num_rows
    h, _ = kernels.up_proj(x, tok, up.transpose(1, 2), None, counts, n, act)
    args = (case["grad_out"], tok, plan.sorted_rows, rw.reshape(-1), down, None, counts, n, layout.activation)
    with_h = lambda h_in: args[:5] + (h_in,) + args[6:]
    routed = plan.num_routed
    fresh = act_grad_backward(*with_h(h.clone()))
    consumed = h.clone()
    reused = act_grad_backward(*with_h(consumed), in_place=True)
    assert reused[1].data_ptr() == consumed.data_ptr()
    for got, want in zip(reused, fresh):
        assert torch.isfinite(want[:routed]).all()
        assert torch.equal(got[:routed], want[:routed])
    rows = case["grad_out"].index_select(0, tok)
    ga = grouped_matmul(rows, down, plan)
    given = act_grad_backward(*with_h(h.clone()), ga=ga.clone())
    for got, want in zip(given, fresh):
        assert (got[:routed].float() - want[:routed].float()).abs().max() <= 1e-5 * want[:routed].abs().max()


def test_backward_reuses_the_pre_activation_for_dh(monkeypatch):
    """The dA kernel writes dL/dh over the cached pre-activation h [S, W] (in place), so the backward's peak (dh
    beside dxs [S, H]) holds no second [S, W] buffer: dX's GEMM reads dh from h's storage. A second backward over
    the same graph (retain_graph=True) raises a clear error instead of reading the overwritten h."""
    import moekit.engines.triton as engine

    case = make_case(T=12, E=3, act=_act("silu", "glu", True))
    leaves = [t.detach().clone().requires_grad_(True) for t in case["tensors"] if t is not None]
    out = call_engine(
        experts_triton, case["layout"], case["plan"], leaves[0], leaves[1], leaves[2], None, leaves[3], None
    )
    h_storage = out.grad_fn.saved_tensors[Saved._fields.index("pre_activation")].untyped_storage().data_ptr()
    dx_gemm_rows = []
    original = engine.grouped_matmul

    def spy(rows, weight, plan):
        dx_gemm_rows.append(rows.untyped_storage().data_ptr())
        return original(rows, weight, plan)

    monkeypatch.setattr(engine, "grouped_matmul", spy)
    out.backward(case["grad_out"], retain_graph=True)
    assert dx_gemm_rows[-1] == h_storage  # dX = dh @ W_up[e]ᵀ, the backward's last GEMM
    assert leaves[0].grad is not None and torch.isfinite(leaves[0].grad).all()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        out.backward(case["grad_out"])


@pytest.mark.parametrize("engine", [experts_triton, experts_reference], ids=["triton", "reference"])
def test_checkpointing_keeps_no_pre_activation(engine):
    """Every tensor the forward keeps goes through save_for_backward, h [S, W] and the dispatch plan's index
    tensors included, so saved-tensor hooks see them and a layer under non-reentrant activation checkpointing keeps
    none of them between forward and backward (h was held on the autograd context once: 48 MiB a Qwen3-30B-A3B layer
    at 2048 tokens, for every layer; the plan, 0.5 MiB); the checkpointed backward then gives the plain one's
    gradients. The plan is built inside the layer, as transformers' experts call builds it."""
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    case = make_case(T=12, E=3, act=_act("silu", "glu", True))
    top_k_index = case["plan"].row_of_slot  # any [T, K] ids in range: rebuild the plan's routing from it
    top_k_index = case["plan"].expert_of_row[top_k_index.clamp(min=0)].masked_fill(top_k_index < 0, 3)
    plans = []

    def layer(x, rw, up_w, down_w):
        plan = build_plan(top_k_index, 3)
        plans.append(weakref.ref(plan))
        return call_engine(engine, case["layout"], plan, x, rw, up_w, None, down_w, None)

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in case["tensors"] if t is not None]

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        plain_in = leaves()
        plain = layer(*plain_in)
    if engine is experts_triton:
        width = plain.grad_fn.saved_tensors[Saved._fields.index("pre_activation")].shape[1]
        assert (case["plan"].num_rows, width) in packed
    assert (case["plan"].num_rows,) in packed  # the plan's sorted rows
    checked_in = leaves()
    checked = checkpoint(layer, *checked_in, use_reentrant=False)
    gc.collect()
    assert plans[1]() is None  # the checkpointed forward's plan is gone: nothing on the graph holds it
    assert not any(isinstance(v, torch.Tensor) for v in vars(checked.grad_fn).values())
    plain.backward(case["grad_out"])
    checked.backward(case["grad_out"])
    assert torch.equal(checked.detach(), plain.detach())
    for got, want in zip(checked_in, plain_in, strict=True):
        assert torch.equal(got.grad, want.grad)


def test_sentinel_heavy_rank_computes_only_its_routed_rows(monkeypatch):
    """An expert-parallel rank whose tokens mostly go to other ranks (90 % sentinel ids): the up-projection and the
    down-projection GEMM write only the routed rows, so every sentinel row of their (NaN-poisoned) outputs stays
    unwritten, and the routed rows match the reference GEMM."""
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)
    act = _act("relu2")
    case = make_case(T=40, H=24, I=20, E=4, K=2, act=act, sentinel_fraction=0.9, seed=11)
    x, _, up, _, down, _ = case["tensors"]
    plan = case["plan"]
    tok, counts, n, routed = plan.token_of_row, plan.tokens_per_expert, plan.num_rows, plan.num_routed
    assert 0 < routed < n // 4
    h, a = kernels.up_proj(x, tok, up.transpose(1, 2), None, counts, n, act)
    out = kernels.grouped_gemm(a, down.transpose(1, 2), counts, n)
    for buffer in (h, a, out):
        assert torch.isnan(buffer[routed:]).all() and torch.isfinite(buffer[:routed]).all()
    want = grouped_matmul(x.index_select(0, tok), up.transpose(1, 2), plan)
    assert (h[:routed] - want[:routed]).abs().max() <= 1e-5 * want[:routed].abs().max()
