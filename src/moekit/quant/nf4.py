"""NF4 storage for expert weights, with bitsandbytes' numerics and no bitsandbytes at run time.

A weight is quantized over its flattened storage (row-major, as ``tensor.reshape(-1)`` reads it) in blocks of 64
consecutive elements:

    absmax[b] = max |w| over block b                       fp32, one per block (the last block may be shorter)
    code[i]   = the NF4 value nearest to w[i] / absmax[b]   4 bits: the index into ``NF4_CODE`` (sorted)
    packed[j] = code[2j] << 4 | code[2j + 1]                 uint8, two codes a byte, the first in the high nibble
    w'[i]     = NF4_CODE[code[i]] * absmax[b]               dequantized in fp32, then rounded to the weight's dtype

which is what ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`` and
``dequantize_4bit`` compute (tests/test_nf4.py holds the two to the same bits). ``to_bitsandbytes`` and
``from_bitsandbytes`` convert between this and bitsandbytes' (packed [n/2, 1], QuantState) pair.

Double quantization (bitsandbytes' ``compress_statistics=True``, the QLoRA paper's) holds the absmax in 8 bits,
4.13 bits an element in all instead of 4.5:

    offset    = the mean of absmax                            fp32, one for the weight
    scale2[c] = max |absmax - offset| over block c of 256     fp32
    acode[b]  = the value of ``absmax_code`` nearest to (absmax[b] - offset) / scale2[b // 256]     uint8
    absmax'   = absmax_code[acode[b]] * scale2[b // 256] + offset     fp32, a product then a sum

(``double_quantize``, ``dequantize_absmax``); w' is then computed from absmax' as above. The nearest value is
bitsandbytes' reference rule (its torch implementation); its CPU kernel picks another value for a few absmax
(<= 0.5 %, within 0.015 of the nearest: tests/test_nf4.py bounds them), so moekit's codes are bitsandbytes' format
and dequantize in bitsandbytes to moekit's bits, but are not always the codes bitsandbytes' CPU would write.

For an experts weight [E, out, in] whose out·in is a multiple of 64, expert e's elements are whole blocks
``e·out·in/64 ...``: ``dequantize_experts`` dequantizes a range of experts alone, so the reference engine never
holds more than a bounded chunk of experts in the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor

BLOCKSIZE = 64

# The 16 NF4 values (quantiles of a standard normal, normalized to [-1, 1], with an exact 0), as bitsandbytes uses them.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The NF4 codebook, fp32 [16], sorted."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


# bitsandbytes' blockwise 8-bit quantization of the absmax: blocks of 256 over its signed dynamic map
ABSMAX_BLOCKSIZE = 256


def absmax_code(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), fp32 [256], sorted: for each
    exponent 10^-6 .. 10^0 the midpoints of an even split of [0.1, 1], both signs, and 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


_ABSMAX_CODE = absmax_code()  # built once (under torch.compile the dequantization reads it as a constant)


class DoubleQuant(NamedTuple):
    """A weight's absmax in 8 bits (see the module docstring): ``codes`` uint8 [n_blocks] into ``absmax_code``,
    ``scales`` fp32 [ceil(n_blocks / 256)], ``offset`` fp32 [1]."""

    codes: Tensor
    scales: Tensor
    offset: Tensor


def _normalized_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' blockwise normalization of fp32 ``flat`` [n]: (values / their block's absmax, clamped to [-1, 1]
    [n]; absmax [ceil(n / blocksize)]). Whole blocks multiply by the reciprocal (an all-zero block by 1/1e-38: its
    values stay 0); a shorter last block stores its absmax clamped and divides."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat((absmax, tail_max[None]))
        scaled = torch.cat((scaled, (flat[full:] / tail_max).clamp(-1.0, 1.0)))
    return scaled, absmax


def _nearest(values: Tensor, code: Tensor) -> Tensor:
    """uint8 index of the value of the sorted ``code`` nearest to each of ``values`` (a tie goes to the lower one)."""
    return torch.bucketize(values, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def double_quantize(absmax: Tensor) -> DoubleQuant:
    """fp32 absmax (any shape, read flat) -> ``DoubleQuant`` on its device."""
    absmax = absmax.reshape(-1).float()
    offset = absmax.mean().reshape(1)
    normed, scales = _normalized_blocks(absmax - offset, ABSMAX_BLOCKSIZE)
    return DoubleQuant(_nearest(normed, _ABSMAX_CODE.to(absmax.device)), scales, offset)


def dequantize_absmax(absmax: DoubleQuant, start: int = 0, stop: int | None = None) -> Tensor:
    """absmax'[start:stop] (fp32 [stop - start]) of a double-quantized absmax, read flat: the blocks of 256 that hold
    the range, each scaled in place (its one fp32 result is the only temporary the size of the range)."""
    codes = absmax.codes.reshape(-1)
    stop = codes.numel() if stop is None else stop
    first, last = start // ABSMAX_BLOCKSIZE, -(-stop // ABSMAX_BLOCKSIZE)
    held = codes[first * ABSMAX_BLOCKSIZE : last * ABSMAX_BLOCKSIZE]
    values = _ABSMAX_CODE.to(codes.device)[held.int()]
    short = (last - first) * ABSMAX_BLOCKSIZE - held.numel()  # the last block of all may be shorter
    if short:
        values = torch.nn.functional.pad(values, (0, short))
    blocks = values.view(last - first, ABSMAX_BLOCKSIZE).mul_(absmax.scales[first:last, None]).add_(absmax.offset)
    offset = first * ABSMAX_BLOCKSIZE
    return blocks.view(-1)[start - offset : stop - offset]


class NF4Weight(NamedTuple):
    """One weight in NF4: ``packed`` uint8 [ceil(n / 2)], ``absmax`` fp32 [ceil(n / 64)], and the dense weight's
    ``shape`` and ``dtype`` (what dequantization returns). ``double_quant``: the absmax as held, when the weight
    holds it double-quantized (``absmax`` is then its dequantization, ``dequantize_absmax``)."""

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    double_quant: DoubleQuant | None = None

    @property
    def numel(self) -> int:
        return self.shape.numel()


def _check_weight(weight: Tensor) -> None:
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point weights; got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("NF4 cannot quantize an empty weight")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight to quantize holds NaN or Inf; NF4 has no code for them")


def quantize_nf4(weight: Tensor) -> NF4Weight:
    """``weight`` (any shape, floating point, finite) -> ``NF4Weight`` on the weight's device."""
    _check_weight(weight)
    scaled, absmax = _normalized_blocks(weight.detach().reshape(-1).float(), BLOCKSIZE)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble codes a 0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = _nearest(scaled, nf4_code(weight.device))
    packed = (index[0::2] << 4) | index[1::2]
    return NF4Weight(packed, absmax, weight.shape, weight.dtype)


def _unpack(packed: Tensor) -> Tensor:
    """uint8 [m] -> code indices int64 [2m], high nibble first."""
    pairs = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1)
    return pairs.reshape(-1).long()


def _dequantize_range(weight: NF4Weight, start: int, stop: int) -> Tensor:
    """Elements [start, stop) of the flattened weight, fp32; ``start`` even and a multiple of the block size."""
    codes = _unpack(weight.packed[start // 2 : -(-stop // 2)])[: stop - start]
    values = nf4_code(weight.packed.device)[codes]
    block = torch.arange(start, stop, device=values.device) // BLOCKSIZE
    return values * weight.absmax[block]


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """The whole dense weight, in ``dtype`` (default: the weight's own)."""
    dense = _dequantize_range(weight, 0, weight.numel)
    return dense.view(weight.shape).to(dtype or weight.dtype)


def dequantize_experts(weight: NF4Weight, first: int, last: int, dtype: torch.dtype | None = None) -> Tensor:
    """Experts [first, last) of an experts weight [E, ...], dense in ``dtype``: [last - first, ...]. Needs each
    expert's size to be a multiple of the block size (true of every model's expert widths)."""
    per_expert = weight.shape[1:].numel()
    if per_expert % BLOCKSIZE:
        raise ValueError(
            f"an expert of shape {tuple(weight.shape[1:])} holds {per_expert} elements, not a multiple of the NF4 "
            f"block size {BLOCKSIZE}: dequantize_nf4 the whole weight instead"
        )
    if not 0 <= first <= last <= weight.shape[0]:
        raise IndexError(f"experts [{first}, {last}) out of range for {weight.shape[0]} experts")
    dense = _dequantize_range(weight, first * per_expert, last * per_expert)
    return dense.view(last - first, *weight.shape[1:]).to(dtype or weight.dtype)


def to_bitsandbytes(weight: NF4Weight, double_quant: bool = False):
    """(packed uint8 [n/2, 1], ``bitsandbytes.functional.QuantState``): what ``quantize_4bit(w, blocksize=64,
    quant_type="nf4", compress_statistics=double_quant)`` returns for the same weight (imports bitsandbytes).
    ``double_quant``: the absmax double-quantized (8-bit blocks of 256 around their mean): as the weight holds it,
    or else as bitsandbytes' ``quantize_blockwise`` computes it."""
    from bitsandbytes.functional import QuantState, quantize_blockwise

    code = nf4_code(weight.packed.device)
    nested = {}
    absmax = weight.absmax
    if double_quant and weight.double_quant is not None:  # the absmax as held
        held = weight.double_quant
        absmax = held.codes.reshape(-1)
        state2 = QuantState(absmax=held.scales, code=_ABSMAX_CODE.to(absmax.device), blocksize=ABSMAX_BLOCKSIZE,
                            dtype=torch.float32)  # fmt: skip
        nested = {"offset": held.offset.reshape(()), "state2": state2}
    elif double_quant:
        offset = absmax.mean()
        absmax, state2 = quantize_blockwise(absmax - offset, blocksize=ABSMAX_BLOCKSIZE)
        nested = {"offset": offset, "state2": state2}
    state = QuantState(
        absmax=absmax, shape=weight.shape, code=code, blocksize=BLOCKSIZE, quant_type="nf4", dtype=weight.dtype,
        **nested,
    )  # fmt: skip
    return weight.packed.unsqueeze(1), state


def from_bitsandbytes(packed: Tensor, state) -> NF4Weight:
    """An ``NF4Weight`` from bitsandbytes' NF4 pair (block size 64; double-quantized absmax is dequantized)."""
    if state.quant_type != "nf4" or state.blocksize != BLOCKSIZE:
        raise ValueError(
            f"moekit reads NF4 with block size {BLOCKSIZE}; got quant_type={state.quant_type!r}, "
            f"blocksize={state.blocksize}"
        )
    absmax = state.absmax
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    return NF4Weight(packed.reshape(-1).view(torch.uint8), absmax.float(), torch.Size(state.shape), state.dtype)
