"""The Triton engine on NF4 expert weights (``moekit.quant.NF4Tensor``): the kernels dequantize each weight tile as
they load it, and no dense copy of an expert weight ever exists.

For the three layouts of ``experts_factory`` (nemotron_h: non-gated relu²; qwen3_moe: gated, concatenated; gpt_oss:
interleaved, transposed, biases), fp32 and bf16, with and without LoRA on both projections, the module's weights
are quantized (``quantize_module``) and the Triton engine's output, dX, routing-weight, bias and LoRA-factor
gradients are compared (max|a-b| / max|b|) with the reference engine on the same quantized module and on a dense
module holding the dequantized weights: fp32 within 1e-5; bf16 within 2e-2 and no worse than that reference
against fp64 (as tests/test_triton_lora.py), and, under the interpreter, bit for bit equal to the Triton engine
on the dequantized weights in the bf16 LoRA cases (the same kernels: the in-kernel dequantization gives exactly
the dense operand). Every buffer the kernels must fill is NaN-poisoned (``OPTIONS.poison_outputs``); in every
Triton run on NF4 the dequantizing functions and grouped_mm raise. An odd intermediate size reaches the
per-element code path of ``kernels.nf4`` (no byte pairs along either tile axis).

Runs under TRITON_INTERPRET=1 on the CPU (conftest sets it) or natively on a GPU. Small shapes, and under the
interpreter the engine runs 32-wide tiles (16 in the other files) to keep the file short: with H = 64 and I = 33
or 40 every main loop still takes two K steps and most tile grids end in a partial tile.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from experts_factory import call_engine, make_experts, supported
from triton_compare import assert_matches

triton = pytest.importorskip("triton")
import triton.language as tl

import moekit.engines.triton as engine
from moekit.backend import triton_available
from moekit.engines.reference import experts_reference
from moekit.engines.triton import experts_triton
from moekit.kernels import nf4 as nf4_kernels
from moekit.kernels import tuning
from moekit.kernels.nf4 import nf4_expert, nf4_tile
from moekit.kernels.numerics import interpreting
from moekit.layout import experts_layout, projections
from moekit.options import OPTIONS
from moekit.plan import build_plan
from moekit.quant import NF4Tensor
from moekit.quant import tensor as nf4_tensor
from moekit.quant.experts import quantize_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_available(DEVICE), reason="no GPU and TRITON_INTERPRET is not set"),
]

FAMILIES = ("nemotron_h", "qwen3_moe", "gpt_oss")
NAMES = ("out", "x", "routing_weights", "up_bias", "down_bias", "up_A", "up_B", "down_A", "down_B")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)


@pytest.fixture
def wide_tiles(monkeypatch):
    """Under the interpreter, every kernel family's one config with 32-wide tiles (block sizes set at launch stay)."""
    for space in tuning._SPACES.values():
        bm, bn, bk, warps, stages = space["interpret"][0]
        wide = [(32 if bm else 0, 32 if bn else 0, 32 if bk else 0, warps, stages)]
        monkeypatch.setitem(space, "interpret", wide)
    for kernel in tuning.Autotuned.registry:
        monkeypatch.setattr(kernel, "chosen", {})


def make_case(family, dtype=torch.float32, lora=True, T=16, H=64, I=40, E=4, K=2, seed=0, sentinel_fraction=0.0,
              one_expert=None, empty_expert=None, double_quant=False):  # fmt: skip
    """A quantized experts module's layout, weights (NF4 and their dequantized dense copies), biases, LoRA factors
    on both projections (or none), routing and an upstream gradient; ``double_quant``: the scales in 8 bits."""
    module = make_experts(family, hidden=H, intermediate=I, num_experts=E, dtype=dtype, seed=seed).to(DEVICE)
    with torch.no_grad():  # pre-activations of std ~2: few gpt-oss clamps (at 7) lie within bf16's rounding of h
        module.down_proj.mul_(2 / I**0.5)
        next(p for n, p in module.named_parameters() if n.endswith("up_proj")).mul_(2 / H**0.5)
    quantize_module(module, double_quant=double_quant)
    layout = experts_layout(module)
    up, down = projections(module)
    assert isinstance(up.weight, NF4Tensor) and isinstance(down.weight, NF4Tensor)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if empty_expert is not None:
        logits[:, empty_expert] = float("-inf")  # no token picks it
    weights, index = torch.topk(logits.softmax(-1), K, dim=-1)
    if one_expert is not None:
        index = torch.full_like(index, one_expert)[:, :1]
        weights = weights[:, :1]
    if sentinel_fraction:
        drop = torch.rand(index.shape, generator=g) < sentinel_fraction
        index = torch.where(drop, torch.full_like(index, E), index)
        weights = torch.where(drop, 0.0, weights)  # a sentinel slot carries routing weight 0

    def factors(d_in, d_out, rank=8):  # with the scale 2 of ``run``, the LoRA term as large as the base term
        return torch.randn(E, rank, d_in, generator=g) / d_in**0.5, torch.randn(E, d_out, rank, generator=g) / rank**0.5

    width = up.in_out(layout.transposed).shape[2]
    to = lambda t: None if t is None else t.detach().to(device=DEVICE, dtype=dtype)
    return {
        "layout": layout,
        "plan": build_plan(index.to(DEVICE), E),
        "nf4": (up.weight, down.weight),
        "dense": (up.weight.dequantize(), down.weight.dequantize()),
        "tensors": [to(x), to(weights), to(up.bias), to(down.bias)],
        "lora": [tuple(map(to, factors(H, width))), tuple(map(to, factors(I, H)))] if lora else [None, None],
        "grad_out": to(torch.randn(T, H, generator=g)),
    }


@contextlib.contextmanager
def nothing_dense(monkeypatch):
    """No NF4 weight is dequantized and no GEMM goes to grouped_mm (which cannot read NF4 codes)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton engine dequantized an NF4 weight or sent it to grouped_mm")

    with monkeypatch.context() as patch:
        for owner, name in ((NF4Tensor, "dequantize"), (NF4Tensor, "dequantize_experts"),
                            (nf4_tensor, "dequantize_nf4"), (engine, "grouped_matmul"),
                            (engine, "grouped_outer")):  # fmt: skip
            patch.setattr(owner, name, refuse)
        yield


def run(fn, case, weights="nf4", dtype=None):
    """Output and the gradients of x, the routing weights, the biases and the LoRA factors (None where absent);
    ``weights``: "nf4" or "dense" (dequantized); ``dtype``: every input cast to it (the fp64 truth)."""
    cast = (lambda t: t.detach().clone()) if dtype is None else (lambda t: t.detach().to(dtype))
    x, rw, up_b, down_b = (None if t is None else cast(t).requires_grad_(True) for t in case["tensors"])
    factors = [None if f is None else tuple(cast(t).requires_grad_(True) for t in f) for f in case["lora"]]
    up_lora, down_lora = (None if f is None else (*f, 2.0) for f in factors)  # scale 2
    up_w, down_w = case[weights] if dtype is None else (cast(w) for w in case[weights])
    out = call_engine(fn, case["layout"], case["plan"], x, rw, up_w, up_b, down_w, down_b, up_lora, down_lora)
    out.backward(cast(case["grad_out"]))
    leaves = [x, rw, up_b, down_b, *(t for f in factors for t in (f or (None, None)))]
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def assert_close(monkeypatch, case, dtype, exact=False):
    """Triton on NF4 against the reference on NF4 and on the dequantized dense weights (in bf16 also both against
    fp64); with ``exact``, under the interpreter, bit for bit equal to Triton on the dequantized weights."""
    assert supported(case["layout"], case["tensors"][0], *case["lora"])  # no silent fallback to the reference
    with nothing_dense(monkeypatch):
        ours = run(experts_triton, case)
    refs = [run(experts_reference, case, weights) for weights in ("nf4", "dense")]
    for ref in refs:
        assert_matches(ours, ref, None, NAMES, TOL[dtype], None)
    if dtype != torch.float32:  # no worse than the reference, both against fp64
        assert_matches(ours, refs[0], run(experts_reference, case, "dense", torch.float64), NAMES, 2e-3, 2.0)
    if exact:
        with monkeypatch.context() as patch:  # every dense GEMM on the same Triton kernels
            patch.setattr(OPTIONS, "plain_gemm", "triton")
            patch.setattr(OPTIONS, "lora_gemm", "fused")
            dense = run(experts_triton, case, "dense")
        assert_matches(ours, dense, None, NAMES, 0.0 if interpreting() else TOL[dtype], None)
    return ours


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference(monkeypatch, wide_tiles, family, dtype, lora):
    exact = lora and dtype != torch.float32  # LoRA cases: every kernel, base terms included
    ours = assert_close(monkeypatch, make_case(family, dtype, lora, seed=3), dtype, exact)
    assert all(g is not None and g.abs().max() > 0 for g in ours[5:]) if lora else all(g is None for g in ours[5:])


@pytest.mark.parametrize("family", ["nemotron_h", "gpt_oss"])
def test_double_quantized_scales(monkeypatch, wide_tiles, family):
    """Scales held in 8 bits: the kernels read their fp32 dequantization, so the engine gives the same bits as on
    NF4 weights holding those fp32 scales, and matches the reference as above."""
    case = make_case(family, torch.bfloat16, seed=7, double_quant=True)
    assert all(w.double_quantized for w in case["nf4"])
    ours = assert_close(monkeypatch, case, torch.bfloat16)
    plain = {**case, "nf4": tuple(NF4Tensor(w.packed, w.absmax, w.shape, w.dtype, w.stride()) for w in case["nf4"])}
    assert_matches(ours, run(experts_triton, plain), None, NAMES, 0.0, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_sizes_sentinels_and_an_empty_expert(monkeypatch, wide_tiles, family):
    """I = 33 (nemotron_h's and qwen3_moe's down weight has stored rows of odd length: its tiles read the codes one
    element at a time), T off the tile, sentinel ids with routing weight 0, an expert without rows (its factor
    gradients exact zeros)."""
    case = make_case(family, T=19, I=33, E=5, K=2, seed=4, sentinel_fraction=0.25, empty_expert=2)
    ours = assert_close(monkeypatch, case, torch.float32)
    empty = case["plan"].tokens_per_expert.cpu() == 0
    assert empty[2] and all(float(g[empty].abs().sum()) == 0.0 for g in ours[5:])


@pytest.mark.parametrize("T", [0, 1])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_zero_and_one_token(monkeypatch, wide_tiles, family, T):
    ours = assert_close(monkeypatch, make_case(family, T=T, E=4, seed=5), torch.float32)
    assert ours[0].shape == (T, 64)


def test_all_tokens_on_one_expert(monkeypatch, wide_tiles):
    assert_close(monkeypatch, make_case("gpt_oss", torch.bfloat16, T=40, one_expert=3, seed=6), torch.bfloat16)


def test_no_tensor_of_the_dense_weight_size(monkeypatch, wide_tiles):
    """Every tensor made during the Triton engine's forward and backward (interpreter copies included) is smaller
    than either weight in bf16: no weight is dequantized whole (``nothing_dense`` catches one expert at a time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    case = make_case("qwen3_moe", torch.bfloat16, T=16, I=48, E=4, seed=7)
    dense_bytes = min(w.numel() for w in case["dense"]) * 2  # bf16
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not isinstance(t, NF4Tensor):
                    sizes.append(t.numel() * t.element_size())
            return out

    with nothing_dense(monkeypatch), Sizes():
        run(experts_triton, case)
    assert sizes and max(sizes) < dense_bytes  # the packed codes of the larger weight are the largest


@triton.jit
def _tiles(codes, scales, table, out, rows, cols, stride_we, stride_r, stride_c,
           MODE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """out [E, the tile grid's padded rows, cols] = the experts of an NF4 view, through ``nf4_tile`` in [BR, BC]
    tiles (grid: row tiles, column tiles, experts)."""
    row, col, expert = tl.program_id(0) * BR, tl.program_id(1) * BC, tl.program_id(2)
    codes_e, scales_e = nf4_expert(codes, scales, expert, stride_we)
    tile = nf4_tile(codes_e, scales_e, table, row * stride_r + col * stride_c, rows - row, cols - col, stride_r,
                    stride_c, BR, BC, MODE)  # fmt: skip
    offs_r, offs_c = row + tl.arange(0, BR), col + tl.arange(0, BC)
    padded_rows, padded_cols = tl.num_programs(0) * BR, tl.num_programs(1) * BC
    plane = out + expert.to(tl.int64) * padded_rows * padded_cols
    tl.store(plane + offs_r[:, None] * padded_cols + offs_c[None, :], tile)  # the whole tile, edges too


@pytest.mark.parametrize("tile", [(16, 16), (32, 64), (64, 128)], ids=str)
@pytest.mark.parametrize("strides", ["stored", "transposed"])
@pytest.mark.parametrize("shape", [(2, 48, 64), (3, 64, 33), (2, 33, 64), (1, 21, 64 * 3), (2, 40, 96)], ids=str)
def test_nf4_tile_reads_every_view(shape, strides, tile):
    """``nf4_tile`` over an expert's whole [a, b] view in tiles off the edges: the dequantized weight's values, and
    finite values past the edges (0 one element at a time), in each mode ``nf4_mode`` picks (byte pairs along
    columns or along rows where the stored rows are whole blocks of 64, else one element at a time) and forced to
    the per-element mode; tiles narrower and wider than a block."""
    weight = NF4Tensor.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(DEVICE))
    view = weight if strides == "stored" else weight.transpose(1, 2)
    dense = view.dequantize()
    pairs = nf4_kernels.COLUMN_PAIRS if strides == "stored" else nf4_kernels.ROW_PAIRS
    rows, cols = view.shape[1:]
    picked = nf4_kernels.nf4_mode(view, cols)
    assert picked == (pairs if shape[2] % 64 == 0 else nf4_kernels.ELEMENTS)
    codes, scales, table, _ = nf4_kernels.weight_operands(view, cols)
    br, bc = tile
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc), view.shape[0])
    for mode in {picked, nf4_kernels.ELEMENTS}:
        out = torch.full((view.shape[0], grid[0] * br, grid[1] * bc), float("nan"), device=DEVICE)
        _tiles[grid](codes, scales, table, out, rows, cols, *view.stride(), MODE=mode, BR=br, BC=bc)
        assert torch.equal(out[:, :rows, :cols], dense), mode
        assert bool(out.isfinite().all()), mode  # the zero-padded A tile cancels them
        if mode == nf4_kernels.ELEMENTS:
            assert not out[:, rows:].any() and not out[:, :, cols:].any(), mode


def test_tuning_keys_tell_nf4_from_dense():
    """A quantized and a dense call of the same shape never share a tuned config: NF4 weights tune over their own
    spaces (row tiles of 256 among them), and the read mode is in every key."""
    import importlib

    up_proj, grouped_gemm = (importlib.import_module(f"moekit.kernels.{name}") for name in ("up_proj", "grouped_gemm"))
    for (_, nf4), kernel in up_proj._KERNELS.items():
        assert "W_NF4" in kernel.key and kernel.family.endswith("_nf4") == nf4
    assert grouped_gemm._KERNEL.family == "gemm" and grouped_gemm._KERNEL_NF4.family == "gemm_nf4"
    assert "W_NF4" in grouped_gemm._KERNEL_NF4.key
    assert any(config[0] == 256 for config in tuning._SPACES["gemm_nf4"]["hopper"])
