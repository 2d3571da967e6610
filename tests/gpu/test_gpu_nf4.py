"""The Hopper NF4 grouped GEMMs (``moekit.kernels.nf4_hopper``, gluon: GPU only; the register-operand kernel for
byte pairs along K at 256-row tiles, the shared-memory-operand kernel elsewhere) against the Triton kernel of
``grouped_gemm`` and a float64 product on the dequantized weight, through ``grouped_gemm`` itself.

Every case routes fresh random rows to its experts (one expert empty, one holding most rows, sentinel rows past the
routed ones), with both byte-pair axes (the forward's read of a stored [E, out, in] weight, pairs along K; the
input gradient's transposed read, pairs along N), each plan of row tiles (128; 256-row heads with 128-row tails;
256), N off the column tile, the gathered rows, bias and routing-weight epilogue of the forward down-projection and
of dA's GEMM, and LoRA terms of one and of two rank chunks with the factor in fp32 or the rows' dtype. Outputs
start as NaN (``poison_outputs``): a routed row left unwritten, or a row past the routed ones written, shows. Each
case asserts that the gluon kernel ran.
"""

from __future__ import annotations

import pytest
import torch

from moekit.kernels import grouped_gemm, nf4_hopper
from moekit.options import OPTIONS
from moekit.plan import build_plan
from moekit.quant import NF4Tensor

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)


@pytest.fixture
def launches(monkeypatch):
    """The gluon kernel's launches, counted."""
    count = []
    launch = nf4_hopper.grouped_gemm_nf4
    monkeypatch.setattr(nf4_hopper, "grouped_gemm_nf4", lambda *a, **k: count.append(1) or launch(*a, **k))
    return count


def make(tokens, top_k, experts, k_dim, n_dim, pairs_along_k, dtype, seed, sentinels=0.0):
    """(rows [S, K] plan-sorted, NF4 weight viewed [E, K, N], its dequantized fp64 copy, plan)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    stored = (experts, n_dim, k_dim) if pairs_along_k else (experts, k_dim, n_dim)
    weight = NF4Tensor.quantize(torch.randn(stored, device="cuda", generator=g) / k_dim**0.5, dtype=dtype)
    view = weight.transpose(1, 2) if pairs_along_k else weight
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    logits[:, 1] = -float("inf")  # expert 1 empty
    logits[: tokens // 2, 0] += 10.0  # expert 0 takes most of the first half
    index = logits.topk(top_k, dim=-1).indices
    index = torch.where(torch.rand(index.shape, device="cuda", generator=g) < sentinels, experts, index)
    plan = build_plan(index, experts)
    rows = torch.randn(plan.num_rows, k_dim, device="cuda", generator=g).to(dtype)
    return rows, view, view.dequantize(torch.float64), plan


def truth(rows, dense, plan, gather=None, bias=None, weights=None, lora=None):
    """The float64 product per routed row (rows past the routed ones: NaN, never compared)."""
    src = rows.double() if gather is None else rows.double()[gather]
    out = torch.full((plan.num_rows, dense.shape[2]), float("nan"), dtype=torch.float64, device=rows.device)
    for expert, start, end in plan.expert_blocks():
        value = src[start:end] @ dense[expert]
        if lora is not None:
            value += lora[0][start:end].double() @ lora[1][expert].to(lora[0].dtype).double()
        if bias is not None:
            value += bias[expert].double()
        if weights is not None:
            value *= weights[plan.sorted_rows[start:end]].double()[:, None]
        out[start:end] = value
    return out


def check(ours, expected, plan, dtype, reference=None):
    routed = plan.num_routed
    assert torch.isnan(ours[routed:]).all(), "a row past the routed ones was written"
    if not routed:
        return
    scale = expected[:routed].abs().max().clamp_min(1e-30)
    err = ((ours[:routed].double() - expected[:routed]).abs().max() / scale).item()
    assert err <= TOL[dtype], f"max rel err {err:.2e}"
    if reference is not None:
        ref_err = ((reference[:routed].double() - expected[:routed]).abs().max() / scale).item()
        assert err <= 1.5 * ref_err + 2e-3, f"gluon {err:.2e} against the Triton kernel's {ref_err:.2e}"


def triton_kernel(monkeypatch, *args, **kwargs):
    """The same call on the Triton kernel of ``grouped_gemm``."""
    with monkeypatch.context() as patch:
        patch.setattr(nf4_hopper, "runs", lambda *a: False)
        return grouped_gemm(*args, **kwargs)


CASES = [  # tokens, top_k, experts, K, N
    (1200, 2, 8, 256, 384),  # 256-row heads, 128-row tails
    (3000, 3, 8, 128, 256),  # 256-row tiles over all rows (experts average over 1024 rows)
    (300, 4, 16, 192, 200),  # row tiles of 128, N off the column tile
    (64, 6, 32, 128, 2880),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pairs_along_k", [True, False], ids=["pairs-along-K", "pairs-along-N"])
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_plain_product(monkeypatch, launches, shape, pairs_along_k, dtype):
    tokens, top_k, experts, k_dim, n_dim = shape
    if not pairs_along_k and n_dim % 16:
        n_dim += -n_dim % 64  # byte pairs along N need rows of whole blocks (else nf4_mode reads elements)
    rows, view, dense, plan = make(tokens, top_k, experts, k_dim, n_dim, pairs_along_k, dtype, seed=sum(shape))
    counts, n = plan.tokens_per_expert, plan.num_rows
    ours = grouped_gemm(rows, view, counts, n)
    assert launches, "the gluon kernel did not run"
    check(ours, truth(rows, dense, plan), plan, dtype, triton_kernel(monkeypatch, rows, view, counts, n))


@pytest.mark.parametrize("rank,factor_dtype", [(16, torch.bfloat16), (16, torch.float32), (80, torch.float32)])
@pytest.mark.parametrize("pairs_along_k", [True, False], ids=["pairs-along-K", "pairs-along-N"])
def test_epilogues_gather_and_lora(monkeypatch, launches, pairs_along_k, rank, factor_dtype):
    """The forward down-projection's bias and routing weight, dA's gathered rows, LoRA of one and two rank chunks,
    sentinel rows."""
    dtype = torch.bfloat16
    tokens, top_k, experts, k_dim, n_dim = 700, 3, 8, 320, 256  # 256-row heads, 128-row tails
    rows, view, dense, plan = make(tokens, top_k, experts, k_dim, n_dim, pairs_along_k, dtype, seed=rank,
                                   sentinels=0.1)  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(rank + 1)
    token_rows = torch.randn(tokens, k_dim, device="cuda", generator=g).to(dtype)
    bias = torch.randn(experts, n_dim, device="cuda", generator=g).to(dtype)
    weights = torch.rand(plan.num_rows, device="cuda", generator=g)
    u = torch.randn(plan.num_rows, rank, device="cuda", generator=g).to(dtype)
    factor = (torch.randn(experts, rank, n_dim, device="cuda", generator=g) / rank**0.5).to(factor_dtype)
    counts, n = plan.tokens_per_expert, plan.num_rows
    forward = {"bias": bias, "routing_weights": weights, "sorted_rows": plan.sorted_rows, "lora": (u, factor)}
    ours = grouped_gemm(rows, view, counts, n, **forward)
    expected = truth(rows, dense, plan, bias=bias, weights=weights, lora=(u, factor))
    check(ours, expected, plan, dtype, triton_kernel(monkeypatch, rows, view, counts, n, **forward))
    gathered = {"gather": plan.token_of_row, "lora": (u, factor)}
    ours = grouped_gemm(token_rows, view, counts, n, **gathered)
    expected = truth(token_rows, dense, plan, gather=plan.token_of_row, lora=(u, factor))
    check(ours, expected, plan, dtype, triton_kernel(monkeypatch, token_rows, view, counts, n, **gathered))
    assert len(launches) == 2


@pytest.mark.parametrize("pairs_along_k", [True, False], ids=["pairs-along-K", "pairs-along-N"])
def test_head_and_tail_row_tiles(launches, pairs_along_k):
    """Experts of 256 rows and more on average: 256-row tiles, and an expert's last 1 .. 128 rows in a 128-row tile
    of a second launch; counts on each side of those edges, an empty expert and one of a single row."""
    counts = [384, 0, 256, 385, 129, 1, 640, 300, 128, 513]
    experts, k_dim, n_dim = len(counts), 192, 320
    g = torch.Generator(device="cuda").manual_seed(11)
    index = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts)).to("cuda")
    plan = build_plan(index[torch.randperm(index.numel(), device="cuda", generator=g)][:, None], experts)
    assert nf4_hopper.row_launches(plan.num_rows, experts) == [(256, nf4_hopper.HEAD), (128, nf4_hopper.TAIL)]
    stored = (experts, n_dim, k_dim) if pairs_along_k else (experts, k_dim, n_dim)
    weight = NF4Tensor.quantize(torch.randn(stored, device="cuda", generator=g) / k_dim**0.5, dtype=torch.bfloat16)
    view = weight.transpose(1, 2) if pairs_along_k else weight
    rows = torch.randn(plan.num_rows, k_dim, device="cuda", generator=g).to(torch.bfloat16)
    chosen = []
    uses = nf4_hopper._uses_register_weight
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nf4_hopper, "_uses_register_weight", lambda *a: chosen.append(uses(*a)) or chosen[-1])
        ours = grouped_gemm(rows, view, plan.tokens_per_expert, plan.num_rows)
    assert launches
    assert chosen == ([True, False] if pairs_along_k else [False, False]), "the heads of pairs along K: registers"
    check(ours, truth(rows, view.dequantize(torch.float64), plan), plan, torch.bfloat16)


@pytest.mark.parametrize("tokens", [0, 1])
def test_zero_and_one_row_all_on_one_expert(launches, tokens):
    rows, view, dense, plan = make(max(tokens, 1), 1, 4, 128, 256, True, torch.bfloat16, seed=3)
    if tokens == 0:
        plan = build_plan(torch.empty(0, 1, dtype=torch.int64, device="cuda"), 4)
        rows = rows[:0]
    ours = grouped_gemm(rows, view, plan.tokens_per_expert, plan.num_rows)
    assert ours.shape == (tokens, 256)
    check(ours, truth(rows, dense, plan), plan, torch.bfloat16)


@pytest.mark.parametrize("pairs_along_k", [True, False], ids=["pairs-along-K", "pairs-along-N"])
def test_nan_and_inf_stay_in_their_rows(launches, pairs_along_k):
    rows, view, _, plan = make(1024, 2, 4, 192, 256, pairs_along_k, torch.bfloat16, seed=5)  # 256-row heads
    rows[7, 3], rows[100, 0] = float("nan"), float("inf")
    ours = grouped_gemm(rows, view, plan.tokens_per_expert, plan.num_rows)
    assert launches
    bad = torch.zeros(plan.num_rows, dtype=torch.bool, device="cuda")
    bad[[7, 100]] = True
    assert not torch.isfinite(ours[bad]).any(), "a non-finite input row came out finite"
    assert torch.isfinite(ours[~bad]).all(), "a non-finite value reached another row"
