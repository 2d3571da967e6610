"""NaN and Inf reach exactly what they reach in transformers' eager experts, on both engines, forward and backward.

A diverging run must stay visibly diverged, and a non-finite value must not spread where eager keeps it out
(other tokens, other experts, sentinel slots) — on NF4 expert weights too (QLoRA: eager on their dequantized
values; NaN and Inf in the activations, routing weights and LoRA factors, since NF4 weights are finite). Compared with eager: the NaN / +Inf / -Inf / finite pattern of the
layer output and of every gradient (dX, routing weights, expert weights and biases, LoRA factors), and the finite
values (max|a - b| / max|b| <= 1e-5 in fp32).

The oracle ``eager`` is transformers' eager experts loop (one_hot mask, per-expert product, ``ACT2FN`` activation
or gpt-oss's own ``_apply_gate``, routing weight, ``index_add_``) for every layout of moekit's activation table,
with PEFT's W + ΔW for LoRA; ``test_oracle_is_transformers_eager`` holds it to the real modules, and the
``test_backend_*`` tests compare real modules (and PEFT) through moekit's backend.

Inf: moekit evaluates some products in another, algebraically equal order than eager — the routing-weight
gradient as <dOut·W_downᵀ, a> instead of <dOut, a·W_downᵀ> (no y is kept), LoRA as (x Aᵀ) Bᵀ instead of
x (W + B A)ᵀ (no ΔW is formed) — and a sum of +Inf and -Inf depends on that order. So for an Inf token the
routing-weight gradient is held to eager's finiteness only (eager: NaN, moekit: NaN or ±Inf), and with LoRA only
the output's finiteness (its gradients can differ even in finiteness: an h that eager has at -Inf, which relu
kills, is NaN in moekit). NaN is exact everywhere.
"""

from __future__ import annotations

import types
import zlib

import pytest
import torch
import torch.nn.functional as F
from experts_factory import SENTINELS_SKIP, Block, call_engine, eager_takes_sentinels, make_experts
from tiny_models import torch_threads
from transformers.activations import ACT2FN
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from moekit.activations import ELEMENTWISE, Activation
from moekit.backend import triton_available
from moekit.engines.reference import experts_reference
from moekit.engines.triton import experts_triton
from moekit.layout import ExpertsLayout
from moekit.options import OPTIONS
from moekit.plan import build_plan
from moekit.quant import NF4Tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
TOL = 1e-5
TENSORS = ("x", "routing_weights", "up", "up_bias", "down", "down_bias")
LORA = ("up_a", "up_b", "down_a", "down_b")
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="no GPU and TRITON_INTERPRET is not set")
try:
    import triton
    import triton.language as tl

    from moekit.kernels.activation import act_backward, act_fn, gated_backward, gated_forward
except ImportError:  # the reference-engine tests run without triton
    triton = None


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    # NaN-poisoned kernel outputs (tests/test_triton_engine.py) would read as propagated NaN here; one torch
    # thread: these shapes are tiny (see tiny_models.torch_threads)
    if triton is not None:
        monkeypatch.setattr(OPTIONS, "poison_outputs", False)
    with torch_threads(1):
        yield


# moekit table name -> transformers ACT2FN name
HF_ACT = {"relu2": "relu2", "relu": "relu", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
CLAMPED = Activation("clamped_glu", None, False, alpha=1.702, limit=0.7)  # low limit: both clamp branches hit

# name -> (activation, transposed, bias): every entry plain, gated concatenated and gated interleaved
# (interleaved as gpt-oss stores it: transposed, with biases), and gpt-oss's clamped gate
LAYOUTS = {"clamped_glu": (CLAMPED, True, True)}
for _name in HF_ACT:
    LAYOUTS[_name] = (Activation("plain", ELEMENTWISE[_name]), False, False)
    LAYOUTS[f"{_name}_glu"] = (Activation("glu", ELEMENTWISE[_name], True), False, False)
    LAYOUTS[f"{_name}_glu_interleaved"] = (Activation("glu", ELEMENTWISE[_name], False), True, True)


def _module_activation(act: Activation):
    """h -> a as transformers computes it (ACT2FN, gpt-oss's _apply_gate)."""
    if act.kind == "clamped_glu":
        return lambda h: GptOssExperts._apply_gate(types.SimpleNamespace(alpha=act.alpha, limit=act.limit), h)
    fn = ACT2FN[HF_ACT[act.act.name]]
    if act.kind == "plain":
        return fn

    def glu(h):
        gate, up = act.split(h)
        return fn(gate) * up

    return glu


def eager(layout, index, x, rw, up, up_bias, down, down_bias, up_lora=None, down_lora=None):
    """transformers' eager experts forward for any layout; LoRA (A [E, R, in], B [E, out, R]) as PEFT's W + ΔW."""
    num_experts, transposed = up.shape[0], layout.transposed

    def merged(weight, lora):
        if lora is None:
            return weight
        delta = lora[1] @ lora[0]  # [E, out, in]
        return weight + (delta.transpose(1, 2) if transposed else delta)

    up, down = merged(up, up_lora), merged(down, down_lora)
    act = _module_activation(layout.activation)
    out = torch.zeros_like(x)
    mask = F.one_hot(index, num_classes=num_experts + 1).permute(2, 1, 0)
    for expert in range(num_experts):  # the sentinel id num_experts is skipped
        slot, token = torch.where(mask[expert])
        if token.numel() == 0:
            continue
        h = x[token] @ (up[expert] if transposed else up[expert].t())
        if up_bias is not None:
            h = h + up_bias[expert]
        y = act(h) @ (down[expert] if transposed else down[expert].t())
        if down_bias is not None:
            y = y + down_bias[expert]
        out.index_add_(0, token, (y * rw[token, slot, None]).to(out.dtype))
    return out


def _seed(*names) -> int:
    return zlib.crc32("/".join(names).encode())


def make_case(name, T=7, H=16, I=8, E=4, K=2, lora=False, seed=0, dtype=torch.float32):
    act, transposed, bias = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    W = 2 * I if act.gated else I
    x = torch.randn(T, H, generator=g)
    rw, index = torch.topk(torch.randn(T, E, generator=g).softmax(-1), K, dim=-1)
    up = torch.randn(E, H, W, generator=g) if transposed else torch.randn(E, W, H, generator=g)
    down = torch.randn(E, I, H, generator=g) if transposed else torch.randn(E, H, I, generator=g)
    tensors = {
        "x": x, "routing_weights": rw, "up": up * 2 / H**0.5, "down": down / I**0.5,
        "up_bias": torch.randn(E, W, generator=g) * 0.5 if bias else None,
        "down_bias": torch.randn(E, H, generator=g) * 0.5 if bias else None,
    }  # fmt: skip
    if lora:  # rank 3, non-zero B: the adapter changes the output
        for key, shape in zip(LORA, ((E, 3, H), (E, W, 3), (E, 3, I), (E, H, 3))):
            tensors[key] = torch.randn(shape, generator=g) * 0.3
    return {
        "layout": ExpertsLayout(act, transposed), "index": index, "tensors": tensors, "dtype": dtype,
        "grad_out": torch.randn(T, H, generator=g),
    }  # fmt: skip


def _first_slot(case, token=2):
    """(expert, slot 0) of ``token``: the expert one NaN is put into."""
    return int(case["index"][token, 0])


def _nan_token(case):
    case["tensors"]["x"][1, 3] = NAN


def _inf_token(case):
    case["tensors"]["x"][1, 3] = INF


def _neg_inf_token(case):
    case["tensors"]["x"][5, 0] = -INF


def _nan_up_weight(case):
    case["tensors"]["up"][_first_slot(case)].view(-1)[5] = NAN


def _nan_down_weight(case):
    case["tensors"]["down"][_first_slot(case)].view(-1)[9] = NAN


def _nan_routing_weight(case):
    case["tensors"]["routing_weights"][2, 1] = NAN


def _sentinels_next_to_nan(case):
    """Plan row 0 (token 0, the first row of expert 0) is NaN; token 2 has a sentinel slot, with a NaN weight
    (eager never reads it), token 4 only sentinels. Sentinel slots must stay exactly 0, not 0 · NaN."""
    num_experts = case["tensors"]["up"].shape[0]
    index, rw = case["index"], case["tensors"]["routing_weights"]
    index[0] = torch.tensor([0, 1])
    index[2, 1] = num_experts
    rw[2, 1] = NAN
    index[4] = num_experts
    case["tensors"]["x"][0, 3] = NAN


def _nan_lora_factor(case):
    case["tensors"]["up_a"][_first_slot(case)].view(-1)[4] = NAN


SCENARIOS = {
    "finite": lambda case: None,
    "nan_token": _nan_token,
    "inf_token": _inf_token,
    "neg_inf_token": _neg_inf_token,
    "nan_up_weight": _nan_up_weight,
    "nan_down_weight": _nan_down_weight,
    "nan_routing_weight": _nan_routing_weight,
    "sentinels_next_to_nan": _sentinels_next_to_nan,
}
LORA_SCENARIOS = {**SCENARIOS, "nan_lora_factor": _nan_lora_factor}


def _loose(scenario: str, lora: bool) -> set[str] | None:
    """Gradients held to eager's finiteness only (None: the output's finiteness only); see the module docstring."""
    if "inf" not in scenario:
        return set()
    return None if lora else {"routing_weights"}


def run(fn, case):
    """Output and every gradient, by the engine ``fn`` or by ``eager``. A case on NF4 weights (``on_nf4``) gives
    the engines its expert weights as frozen NF4Tensors and eager their dense values (no weight gradients)."""
    frozen = ("up", "down") if case.get("nf4") else ()
    leaves = {
        key: None if t is None else t.detach().to(DEVICE, case["dtype"], copy=True).requires_grad_(key not in frozen)
        for key, t in case["tensors"].items()
    }
    index = case["index"].to(DEVICE)
    base = [leaves[key] for key in TENSORS]
    if frozen and fn is not eager:
        for key in frozen:
            base[TENSORS.index(key)] = NF4Tensor.quantize(case["tensors"][key], case["dtype"], DEVICE)
    lora = {}
    if "up_a" in leaves:
        lora = {"up_lora": (leaves["up_a"], leaves["up_b"]), "down_lora": (leaves["down_a"], leaves["down_b"])}
    if fn is eager:
        out = eager(case["layout"], index, *base, **lora)
    else:
        out = call_engine(fn, case["layout"], build_plan(index, base[2].shape[0]), *base, **lora)
    out.backward(case["grad_out"].to(DEVICE, out.dtype))
    results = {"out": out.detach()}
    results.update({key: t.grad for key, t in leaves.items() if t is not None and key not in frozen})
    return results


def on_nf4(case):
    """``case`` on NF4 expert weights (QLoRA: frozen, quantized as moekit.quantize_experts does): its weights
    replaced by their NF4 values, which ``run`` quantizes again for the engines (the same codes and scales: every
    value is a codebook entry times its block's absmax, the block's largest magnitude)."""
    for key in ("up", "down"):
        case["tensors"][key] = NF4Tensor.quantize(case["tensors"][key]).dequantize()
    return {**case, "nf4": True}


def _classes(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return t.isnan().to(torch.int8) + 2 * t.isposinf().to(torch.int8) + 3 * t.isneginf().to(torch.int8)


def assert_nonfinite_like(ours: dict, theirs: dict, tol=TOL, loose: set[str] | None = frozenset(), what=""):
    """Same NaN / ±Inf / finite pattern as eager everywhere (only finiteness for ``loose`` gradients; only the
    output's finiteness when ``loose`` is None), and the finite values within ``tol`` of eager's."""
    assert ours.keys() == theirs.keys()
    keys, loose = (["out"], {"out"}) if loose is None else (list(theirs), loose)
    for key in keys:
        o, t = ours[key], theirs[key]
        assert o.shape == t.shape and o.dtype == t.dtype, f"{what} {key}: {o.shape}/{o.dtype} vs {t.shape}/{t.dtype}"
        if key in loose:
            differ = torch.isfinite(o) != torch.isfinite(t)
        else:
            differ = _classes(o) != _classes(t)
        if differ.any():
            first = tuple(differ.nonzero()[0].tolist())
            raise AssertionError(
                f"{what} {key}: non-finite pattern differs from eager at {int(differ.sum())} of {o.numel()} "
                f"elements (first {first}: moekit {o[first].item()}, eager {t[first].item()}); NaN moekit "
                f"{int(o.isnan().sum())} / eager {int(t.isnan().sum())}, Inf {int(o.isinf().sum())} / "
                f"{int(t.isinf().sum())}"
            )
        finite = torch.isfinite(t) & torch.isfinite(o)
        if finite.any():
            o_f, t_f = o[finite].double(), t[finite].double()
            err = ((o_f - t_f).abs().max() / t_f.abs().max().clamp_min(1e-12)).item()
            assert err <= tol, f"{what} {key}: finite values rel. err {err:.3g} > {tol}"


def check(fn, name, scenarios, lora=False, dtype=torch.float32, tol=TOL, nf4=False):
    """Every scenario on layout ``name``: engine ``fn`` against eager, in fp32 on the same inputs (fp32 eager
    for a 16-bit dtype, whose finite values are then held to ``tol``); ``nf4``: on NF4 expert weights."""
    for scenario, apply in scenarios.items():
        case = make_case(name, lora=lora, seed=_seed(name, scenario), dtype=dtype)
        case = on_nf4(case) if nf4 else case
        apply(case)
        theirs = run(eager, {**case, "dtype": torch.float32})
        ours = {key: t.float() for key, t in run(fn, case).items()}
        assert_nonfinite_like(ours, theirs, tol, _loose(scenario, lora), f"[{name}, {scenario}]")


# ---- the reference engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reference_like_eager(name):
    check(experts_reference, name, SCENARIOS)


@pytest.mark.parametrize("name", ["relu2", "silu_glu", "gelu_tanh_glu_interleaved", "clamped_glu"])
def test_reference_lora_like_eager(name):
    check(experts_reference, name, LORA_SCENARIOS, lora=True)


def test_reference_bf16_keeps_nan():
    check(experts_reference, "relu2", {"nan_token": _nan_token}, dtype=torch.bfloat16, tol=3e-2)


# NF4 expert weights are finite (quantizing a non-finite weight is refused): what remains are the activations,
# routing weights, sentinels and the LoRA factors trained on top
NF4_SCENARIOS = {
    key: LORA_SCENARIOS[key]
    for key in ("finite", "nan_token", "inf_token", "neg_inf_token", "nan_routing_weight", "sentinels_next_to_nan",
                "nan_lora_factor")
}  # fmt: skip
NF4_LAYOUTS = ("relu2", "silu_glu", "clamped_glu")


@pytest.mark.parametrize("name", NF4_LAYOUTS)
@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "qlora"])
def test_reference_nf4_like_eager(name, lora):
    scenarios = NF4_SCENARIOS if lora else {k: v for k, v in NF4_SCENARIOS.items() if k != "nan_lora_factor"}
    check(experts_reference, name, scenarios, lora=lora, nf4=True)


def test_issue_repro_sentinel_does_not_read_a_nan_row():
    """Issue 16's case: Qwen3MoeExperts (H=16, I=8, E=4), x[0, 0] = NaN, token 2 has a sentinel slot.
    Eager: NaN rows [T, F, F] in the output and dX; moekit gave [T, F, T] (its sentinel read row 0 times 0)."""
    module = make_experts("qwen3_moe", hidden=16, intermediate=8, num_experts=4).to(DEVICE)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0] = NAN
    index = torch.tensor([[0, 1], [2, 3], [2, 4]], device=DEVICE)
    weights = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]], device=DEVICE)
    rows = {"eager": ([True, False, False], [True, False, False])}  # eager's rows (run below where it can)
    for implementation in ("eager", "moekit") if eager_takes_sentinels() else ("moekit",):
        module.config._experts_implementation = implementation
        x_ = x.to(DEVICE).requires_grad_(True)
        out = module(x_, index, weights)
        out.sum().backward()
        rows[implementation] = (out.isnan().any(1).tolist(), x_.grad.isnan().any(1).tolist())
    assert rows["eager"] == ([True, False, False], [True, False, False])
    assert rows["moekit"] == rows["eager"]


# ---- the Triton engine (interpreter on the CPU, native on a GPU) -------------------------------------------


# Layouts the Triton engine runs every scenario on (non-gated, gated concatenated, gated interleaved with
# transposed weights and biases, the clamped gate); the others get one NaN token (their activation rules are
# checked element by element in test_triton_activation_rules_like_autograd).
CORE = ("relu2", "silu_glu", "relu_glu_interleaved", "clamped_glu")


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.triton
@needs_triton
def test_triton_like_eager(name):
    check(experts_triton, name, SCENARIOS if name in CORE else {"nan_token": _nan_token})


_MODE_SCENARIOS = {key: SCENARIOS[key] for key in ("nan_token", "nan_down_weight", "sentinels_next_to_nan")}


@pytest.mark.parametrize("name", ["relu2", "relu_glu_interleaved", "clamped_glu"])
@pytest.mark.triton
@needs_triton
def test_triton_backward_modes_like_eager(monkeypatch, name):
    """The other backward path (default: grouped_mm where it runs): every GEMM on the Triton kernels."""
    monkeypatch.setattr(OPTIONS, "plain_gemm", "triton")
    check(experts_triton, name, _MODE_SCENARIOS)


_LORA_SCENARIOS = {
    key: LORA_SCENARIOS[key]
    for key in ("nan_token", "inf_token", "nan_routing_weight", "sentinels_next_to_nan", "nan_lora_factor")
}


@pytest.mark.parametrize(
    "name, lora_gemm", [("relu2", "fused"), ("clamped_glu", "fused"), ("gelu_tanh_glu_interleaved", "split")]
)
@pytest.mark.triton
@needs_triton
def test_triton_lora_like_eager(monkeypatch, name, lora_gemm):
    """LoRA fused into the GEMMs, or split (base product on grouped_mm where it runs, LoRA added in place)."""
    monkeypatch.setattr(OPTIONS, "lora_gemm", lora_gemm)
    check(experts_triton, name, _LORA_SCENARIOS, lora=True)


@pytest.mark.parametrize("name", NF4_LAYOUTS)
@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "qlora"])
@pytest.mark.triton
@needs_triton
def test_triton_nf4_like_eager(name, lora):
    """The NF4 kernels (dequantizing in the operand loads), LoRA fused."""
    scenarios = NF4_SCENARIOS if lora else {k: v for k, v in NF4_SCENARIOS.items() if k != "nan_lora_factor"}
    check(experts_triton, name, scenarios, lora=lora, nf4=True)


@pytest.mark.triton
@needs_triton
def test_triton_bf16_keeps_nan():
    check(experts_triton, "relu2", {"nan_token": _nan_token}, dtype=torch.bfloat16, tol=3e-2)
    check(experts_triton, "clamped_glu", {"nan_token": _nan_token}, dtype=torch.bfloat16, tol=3e-2)


@pytest.mark.triton
@needs_triton
def test_triton_masked_rows_keep_an_inf_routing_weight_out():
    """Weight-gradient chunks clamp their rows past the expert's end to its first row: those rows must load
    weight 0, or an Inf routing weight of that row turns its expert's dB_down (LoRA) and db_down from ±Inf into
    NaN (0 · Inf). Held to the reference engine, which evaluates the same products."""
    case = make_case("clamped_glu", T=9, lora=True, seed=3)
    case["tensors"]["routing_weights"][0, 0] = INF  # token 0: the first row of its expert
    ours, ref = run(experts_triton, case), run(experts_reference, case)
    assert ref["down_b"].isinf().any() and ref["down_bias"].isinf().any()
    assert_nonfinite_like(ours, ref)


# ---- the activation table against torch's autograd, element by element ------------------------------------

_SPECIALS = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.5, -3.0, 6.9, 7.1, -7.1, 1e30, -1e30]
# dL/da: NaN and moderate finite values. An infinite (or huge) one meets a (near-)zero derivative factor, or
# overflows in one of eager's intermediate products that the closed forms do not form (gpt-oss's gate: g (up + 1)
# times a gate of -1e30, times sigmoid' = 0), so Inf and NaN there depend on the order of the products.
_GRADS = [NAN, 0.0, -0.0, 1.0, -1.0, 0.5, -3.0, 100.0]
_RULE_LAYOUTS = [n for n in LAYOUTS if not n.endswith("interleaved")]  # with I = 1 the two gated layouts agree


def _rules_case(name, device="cpu"):
    """(activation with gpt-oss's limit, h [n, 1 or 2] on every special combination, dL/da [n, 1], eager's a, dh)
    on ``device``: eager's own special values differ by device and torch version, so the kernels are held to eager
    on the device they run on; the erf gelu leaves +Inf out (torch 2.13's CPU gelu is NaN or Inf there by the
    element's position in the tensor)."""
    act = LAYOUTS[name][0]
    if act.kind == "clamped_glu":
        act = Activation("clamped_glu", None, True, alpha=1.702, limit=7.0)
    specials = _SPECIALS
    if name in ("gelu", "gelu_glu"):  # torch's CPU erf gelu at +Inf: NaN on its vectorized path, Inf on its scalar
        specials = [v for v in _SPECIALS if v != INF]  # one (which one an element takes depends on its position)
    values = torch.tensor(specials, device=device)
    combos = torch.cartesian_prod(values, values, torch.tensor(_GRADS, device=device))  # (gate or h, up, dL/da)
    h = combos[:, :2] if act.gated else combos[:, :1]
    grad_a = combos[:, 2:].contiguous()
    h_ = h.clone().requires_grad_(True)
    a = _module_activation(act)(h_) if act.kind != "clamped_glu" else _clamped_concatenated(act, h_)
    (dh,) = torch.autograd.grad(a, h_, grad_a)
    return act, h.contiguous(), grad_a, a.detach(), dh


def _clamped_concatenated(act, h):
    """gpt-oss's _apply_gate on the concatenated layout (the same code, gate/up taken as halves)."""
    gate, up = act.split(h)
    gate = gate.clamp(min=None, max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


@pytest.mark.parametrize("name", _RULE_LAYOUTS)
def test_activation_rules_like_autograd(name):
    """``Activation.forward/backward`` (the reference engine's closed forms) against autograd through the module's
    own function, on every combination of special values (NaN, ±Inf, ±0, around the clamp limit, huge)."""
    act, h, grad_a, a, dh = _rules_case(name)
    ours = {"a": act.forward(h), "dh": act.backward(h, grad_a)}
    assert_nonfinite_like(ours, {"a": a, "dh": dh}, tol=1e-6, what=name)


if triton is not None:

    @triton.jit
    def _rules_kernel(h_ptr, g_ptr, a_ptr, dh_ptr, n, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
        """The kernels' activation helpers on rows of h [n, 1 or 2] (gate, up) and dL/da [n]."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if GATED:
            gate = tl.load(h_ptr + 2 * offs, mask=mask, other=0.0)
            up = tl.load(h_ptr + 2 * offs + 1, mask=mask, other=0.0)
            a = gated_forward(gate, up, alpha, limit, ACT)
            a_again, d_gate, d_up = gated_backward(gate, up, g, alpha, limit, ACT)
            tl.store(a_ptr + 2 * offs, a, mask=mask)
            tl.store(a_ptr + 2 * offs + 1, a_again, mask=mask)
            tl.store(dh_ptr + 2 * offs, d_gate, mask=mask)
            tl.store(dh_ptr + 2 * offs + 1, d_up, mask=mask)
        else:
            x = tl.load(h_ptr + offs, mask=mask, other=0.0)
            tl.store(a_ptr + offs, act_fn(x, ACT), mask=mask)
            tl.store(dh_ptr + offs, act_backward(x, g, ACT), mask=mask)


@pytest.mark.parametrize("name", _RULE_LAYOUTS)
@pytest.mark.triton
@needs_triton
def test_triton_activation_rules_like_autograd(name):
    """The kernels' activation helpers (``moekit.kernels.activation``: forward, and backward as the dA kernels
    call it) against autograd, on the same combinations: NaN kept through max/min and the clamps, relu's and
    the clamps' derivatives 0 (not 0 · NaN) where the input is dead or out of bounds."""
    act, h, grad_a, a, dh = _rules_case(name, DEVICE)
    a, dh = a.cpu(), dh.cpu()
    n = h.shape[0]
    a_out = torch.empty(n, 2 if act.gated else 1, device=DEVICE)
    dh_out = torch.empty_like(h)
    block = 256
    _rules_kernel[((n + block - 1) // block,)](
        h, grad_a, a_out, dh_out, n, act.alpha, act.limit,
        ACT=act.kernel_id, GATED=act.gated, BLOCK=block,
    )  # fmt: skip
    ours = {"a": a_out[:, :1].cpu(), "dh": dh_out.cpu()}
    assert_nonfinite_like(ours, {"a": a, "dh": dh}, tol=1e-5, what=name)
    if act.gated:  # gated_backward's own a
        assert_nonfinite_like({"a": a_out[:, 1:].cpu()}, {"a": a}, tol=1e-5, what=name)


# ---- real transformers modules (and PEFT) through moekit's backend -----------------------------------------


def _backend_case(family, scenario, generator):
    experts = make_experts(family, hidden=16, intermediate=8, num_experts=4, seed=_seed(family, scenario))
    T, E = 7, 4
    x = torch.randn(T, 16, generator=generator)
    rw, index = torch.topk(torch.randn(T, E, generator=generator).softmax(-1), 2, dim=-1)
    if scenario == "nan_token":
        x[1, 3] = NAN
    elif scenario == "nan_routing_weight":
        rw[2, 1] = NAN
    elif scenario == "nan_expert_weight":
        with torch.no_grad():
            up = experts.gate_up_proj if experts.has_gate else experts.up_proj
            up[int(index[2, 0])].view(-1)[5] = NAN
    elif scenario == "sentinels_next_to_nan":
        index[0] = torch.tensor([0, 1])
        index[2, 1] = E
        index[4] = E
        x[0, 3] = NAN
    return experts, x, index, rw


def _backend_run(model, experts, implementation, x, index, rw):
    experts.config._experts_implementation = implementation
    model.zero_grad(set_to_none=True)
    x_ = x.to(DEVICE).requires_grad_(True)
    rw_ = rw.to(DEVICE).requires_grad_(True)
    out = model(x_, index.to(DEVICE), rw_)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE))
    results = {"out": out.detach(), "x": x_.grad, "routing_weights": rw_.grad}
    results.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return results


_BACKEND_CASES = [
    (family, scenario)
    for family in ("nemotron_h", "qwen3_moe", "gpt_oss")
    for scenario in ("nan_token", "nan_routing_weight", "nan_expert_weight", "sentinels_next_to_nan")
    # eager gpt-oss (one_hot over E classes) and NemotronH (no skip) cannot take sentinel ids
    if not (scenario == "sentinels_next_to_nan" and family != "qwen3_moe")
]


@pytest.mark.parametrize("lora", [False, True], ids=["base", "peft_lora"])
@pytest.mark.parametrize("family, scenario", _BACKEND_CASES)
def test_backend_like_eager(family, scenario, lora):
    """Real experts modules (and PEFT target_parameters LoRA on both expert weights, its factor gradients
    included) through moekit's backend against transformers' eager; on a GPU the backend runs the Triton engine."""
    if scenario == "sentinels_next_to_nan" and not eager_takes_sentinels():
        pytest.skip(SENTINELS_SKIP)
    experts, x, index, rw = _backend_case(family, scenario, torch.Generator().manual_seed(_seed(family, scenario)))
    model = Block(experts)
    if lora:
        from peft import LoraConfig, get_peft_model

        up = "experts.gate_up_proj" if experts.has_gate else "experts.up_proj"
        config = LoraConfig(
            r=2, lora_alpha=4, target_modules=[], target_parameters=[up, "experts.down_proj"],
            init_lora_weights=False,
        )  # fmt: skip
        model = get_peft_model(model, config)
    model.to(DEVICE)
    theirs = _backend_run(model, experts, "eager", x, index, rw)
    ours = _backend_run(model, experts, "moekit", x, index, rw)
    assert_nonfinite_like(ours, theirs, what=f"[{family}, {scenario}, {'lora' if lora else 'base'}]")


@pytest.mark.parametrize("family", ["nemotron_h", "qwen3_moe", "gpt_oss"])
def test_oracle_is_transformers_eager(family):
    """``eager`` above is transformers' own eager forward: same output and gradients, NaN pattern included."""
    from moekit.layout import experts_layout, projections

    experts, x, index, rw = _backend_case(family, "nan_token", torch.Generator().manual_seed(1))
    experts.to(DEVICE)
    theirs = _backend_run(experts, experts, "eager", x, index, rw)
    up, down = projections(experts)
    params = [None if p is None else p.detach().cpu() for p in (up.weight, up.bias, down.weight, down.bias)]
    case = {
        "layout": experts_layout(experts), "index": index, "dtype": torch.float32,
        "tensors": {"x": x, "routing_weights": rw, **dict(zip(TENSORS[2:], params))},
        "grad_out": torch.randn(x.shape, generator=torch.Generator().manual_seed(5)),
    }  # fmt: skip
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    names = {"up": up, "up_bias": f"{up}_bias", "down": "down_proj", "down_bias": "down_proj_bias"}
    ours = {names.get(key, key): value for key, value in run(eager, case).items()}
    assert_nonfinite_like(ours, theirs, tol=1e-6, what=family)
