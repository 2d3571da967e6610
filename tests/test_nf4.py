"""NF4 storage (``moekit.quant.nf4``) against bitsandbytes' own quantize_4bit / dequantize_4bit (block size 64,
"nf4"): the same packed codes, the same absmax and the same dequantized bits, on random weights of every float
dtype, experts shapes, odd sizes (a short last block, an odd element count), scales from 1e-2 to 1e2, all-zero
blocks and values exactly on the codebook's midpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moekit.quant import NF4Weight, dequantize_experts, dequantize_nf4, from_bitsandbytes, quantize_nf4, to_bitsandbytes
from moekit.quant.nf4 import NF4_VALUES, absmax_code, dequantize_absmax, double_quantize

bnb = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = ((8, 48, 64), (4, 96, 40), (3, 7, 11), (1000,), (5, 64), (2, 3, 5))


def _theirs(weight: torch.Tensor):
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return packed, state, bnb.dequantize_4bit(packed, state).reshape(weight.shape)


def _assert_same(ours: NF4Weight, weight: torch.Tensor):
    packed, state, dense = _theirs(weight)
    assert torch.equal(ours.packed, packed.reshape(-1)), "packed codes"
    assert torch.equal(ours.absmax, state.absmax), "absmax"
    mine = dequantize_nf4(ours)
    assert mine.dtype == weight.dtype and mine.shape == weight.shape
    assert torch.equal(mine, dense), "dequantized values"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_bits_as_bitsandbytes(dtype, shape):
    for seed, scale in enumerate((1e-2, 1.0, 1e2)):
        weight = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
        _assert_same(quantize_nf4(weight), weight)


def test_zero_blocks_and_midpoints():
    """An all-zero block (absmax 0), a short all-zero last block, and values exactly between two NF4 values."""
    code = torch.tensor(NF4_VALUES)
    midpoints = (code[:-1] + code[1:]) / 2
    row = torch.cat((midpoints, -midpoints, torch.tensor([1.0, -1.0]), torch.zeros(64 - 32)))  # 64 values
    weight = torch.stack((row, torch.zeros(64), row * 3.0)).reshape(-1)
    weight = torch.cat((weight, torch.zeros(7)))  # a short last block of zeros
    ours = quantize_nf4(weight)
    _assert_same(ours, weight)
    assert float(ours.absmax[1]) == 0.0 and torch.equal(dequantize_nf4(ours)[64:128], torch.zeros(64))


def test_experts_in_chunks_equal_the_whole_weight():
    weight = torch.randn(6, 40, 32, dtype=torch.bfloat16)  # 1280 elements an expert: 20 blocks
    ours = quantize_nf4(weight)
    whole = dequantize_nf4(ours)
    for first, last in ((0, 6), (0, 1), (2, 5), (5, 6), (3, 3)):
        chunk = dequantize_experts(ours, first, last)
        assert chunk.shape == (last - first, 40, 32) and torch.equal(chunk, whole[first:last])
    assert dequantize_experts(ours, 1, 3, torch.float32).dtype == torch.float32
    with pytest.raises(IndexError, match=r"experts \[4, 7\) out of range for 6 experts"):
        dequantize_experts(ours, 4, 7)
    with pytest.raises(ValueError, match="not a multiple of the NF4 block size 64"):
        dequantize_experts(quantize_nf4(torch.randn(3, 5, 7)), 0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conversion_to_and_from_bitsandbytes(dtype):
    weight = torch.randn(4, 48, 32).to(dtype)
    ours = quantize_nf4(weight)
    packed, state = to_bitsandbytes(ours)
    assert packed.shape == (weight.numel() // 2, 1)
    assert torch.equal(bnb.dequantize_4bit(packed, state), dequantize_nf4(ours))
    their_packed, their_state, dense = _theirs(weight)
    back = from_bitsandbytes(their_packed, their_state)
    assert torch.equal(back.packed, ours.packed) and torch.equal(back.absmax, ours.absmax)
    assert back.shape == weight.shape and back.dtype == dtype and torch.equal(dequantize_nf4(back), dense)


def test_double_quantized_absmax_from_bitsandbytes():
    """bitsandbytes' double quantization stores absmax in 8 bits; reading it back gives its dequantized weight."""
    weight = torch.randn(8, 64, 64, dtype=torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.nested
    ours = from_bitsandbytes(packed, state)
    assert torch.equal(dequantize_nf4(ours), bnb.dequantize_4bit(packed, state))


def test_double_quantized_absmax_to_bitsandbytes():
    """Written double-quantized, the state holds the same 8-bit absmax codes, block scales and offset as
    bitsandbytes' own compress_statistics=True, and dequantizes to the same weight."""
    weight = torch.randn(8, 64, 96, dtype=torch.bfloat16)
    packed, state = to_bitsandbytes(quantize_nf4(weight), double_quant=True)
    their_packed, their_state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.nested and torch.equal(packed, their_packed)
    assert torch.equal(state.absmax, their_state.absmax) and torch.equal(state.offset, their_state.offset)
    assert torch.equal(state.state2.absmax, their_state.state2.absmax)
    assert state.state2.blocksize == their_state.state2.blocksize == 256
    assert torch.equal(bnb.dequantize_4bit(packed, state), bnb.dequantize_4bit(their_packed, their_state))
    assert not torch.equal(bnb.dequantize_4bit(packed, state), dequantize_nf4(quantize_nf4(weight)))  # 8-bit scales


@pytest.mark.parametrize("n_blocks", [3 * 256, 1001, 7, 40_000], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_double_quantization_is_bitsandbytes(dtype, n_blocks):
    """moekit's own double quantization of the absmax (whole blocks of 256, a short last block, fewer than one):
    bitsandbytes' 8-bit map, offset and block scales bit for bit; each absmax's code the nearest value, which
    bitsandbytes' CPU kernel also picks but for a few (<= 0.5 %) that it rounds to a value at most one step of the
    map away; exported with those codes, bitsandbytes dequantizes the weight to moekit's bits."""
    assert torch.equal(absmax_code(), bnb.create_dynamic_map(signed=True))
    g = torch.Generator().manual_seed(n_blocks)
    weight = (torch.randn(n_blocks * 64, generator=g) * torch.rand(n_blocks * 64, generator=g) * 3).to(dtype)
    ours = quantize_nf4(weight)
    held = double_quantize(ours.absmax)
    _, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(held.offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(held.scales, state.state2.absmax)
    code = absmax_code()
    normed = (ours.absmax - held.offset) / held.scales[torch.arange(n_blocks) // 256]
    mine, theirs = code[held.codes.long()], code[state.absmax.long()]
    assert ((normed - mine).abs() <= (normed - theirs).abs()).all()  # the nearest
    differ = held.codes != state.absmax
    assert differ.float().mean() <= 5e-3 and ((mine - theirs)[differ].abs() <= 0.015).all()
    assert torch.equal(dequantize_absmax(held, 2, n_blocks - 3), dequantize_absmax(held)[2:-3])
    held_weight = NF4Weight(ours.packed, dequantize_absmax(held), ours.shape, ours.dtype, held)
    dense = dequantize_nf4(held_weight)
    assert torch.equal(bnb.dequantize_4bit(*to_bitsandbytes(held_weight, double_quant=True)), dense)
    assert _rel(dense, dequantize_nf4(ours)) <= 1e-2  # 8-bit scales: close to the fp32 ones


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_other_formats_are_refused():
    packed, state = bnb.quantize_4bit(torch.randn(64, 64), blocksize=128, quant_type="nf4")
    with pytest.raises(ValueError, match="block size 64; got quant_type='nf4', blocksize=128"):
        from_bitsandbytes(packed, state)
    packed, state = bnb.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        from_bitsandbytes(packed, state)


@pytest.mark.parametrize(
    "weight, error",
    [
        (torch.tensor([1.0, float("nan")]), "NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), "NaN or Inf"),
        (torch.ones(4, dtype=torch.int32), "floating-point"),
        (torch.empty(0), "empty"),
    ],
    ids=["nan", "inf", "int", "empty"],
)
def test_bad_weights_are_refused(weight, error):
    with pytest.raises((ValueError, TypeError), match=error):
        quantize_nf4(weight)


def test_runs_without_bitsandbytes():
    """moekit's NF4 needs no bitsandbytes at run time (only the conversion functions import it)."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch\n"
        "from moekit.quant import quantize_nf4, dequantize_nf4\n"
        "w = torch.randn(4, 64)\n"
        "assert (dequantize_nf4(quantize_nf4(w)) - w).abs().max() < 0.5\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
