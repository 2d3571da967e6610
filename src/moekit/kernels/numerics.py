"""How the kernels compute: the dot's precision, operand and output rounding, and the buffers they fill.

Every GEMM accumulates in fp32 (``mma`` one step, ``dot_loop`` / ``dot_loop_pair`` a whole reduction: a main loop
over K, whose weight tiles may be NF4 codes dequantized as they load (``kernels.nf4``), or a LoRA term's loop over
R) and rounds once to the output dtype (``to_dtype``), to nearest even as the GPU's cast does, also under the
interpreter (whose casts truncate and whose dot mishandles bf16 operands).
fp32 operands use the exact (ieee) dot, never tf32, so results match the reference to ~1e-5.

``new_output`` / ``new_output_like`` allocate the buffers a kernel must fully write; with
``OPTIONS.poison_outputs`` (tests) they start as NaN, so an element no program wrote shows up as NaN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..options import OPTIONS
from .nf4 import nf4_tile


def interpreting() -> bool:
    """Whether the kernels run under triton's interpreter (``TRITON_INTERPRET=1``: the CPU test runs)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled under ``OPTIONS.poison_outputs`` (floating dtypes)."""
    if OPTIONS.poison_outputs and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (same strides when ``t`` is dense), or NaN-filled under ``OPTIONS.poison_outputs``."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if OPTIONS.poison_outputs and t.dtype.is_floating_point else out


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr of ``mma``: fp32 operands use the exact (ieee) dot so results match the
    reference to ~1e-5, never tf32. The interpreter's dot mishandles bf16 operands (it multiplies their raw
    uint16 storage), so there bf16 tiles are upcast to fp32 first ("upcast"; values unchanged, exact products)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"  # ignored by tl.dot for 16-bit operands


# The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even); under it, round first.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 tile -> ``dtype``, rounding to nearest even everywhere (a plain cast on the GPU)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def as_operand(x, dtype: tl.constexpr):
    """A tile in the GEMM operand dtype ``dtype``, rounded to nearest when it was loaded in another (the LoRA A
    factor is read straight from its parameter, fp32 under PEFT: the same values a copy in ``dtype`` would hold)."""
    if x.dtype != dtype:
        x = to_dtype(x.to(tl.float32), dtype)
    return x


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see ``dot_precision``); ``b`` is taken in ``a``'s dtype (``as_operand``)."""
    b = as_operand(b, a.dtype)
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def dot_loop(acc, a_ptrs, b_ptrs, a_rows_mask, b_cols_mask, offs_k, K, stride_ak, stride_bk,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, nf4=None, W_NF4: tl.constexpr = 0):  # fmt: skip
    """acc + A @ B over a reduction of length K in steps of BLOCK_K (``offs_k`` = arange(BLOCK_K)): A tiles
    [BLOCK_M, BLOCK_K] at ``a_ptrs`` (rows masked by ``a_rows_mask``, or unmasked when it is None), B tiles
    [BLOCK_K, BLOCK_N] at ``b_ptrs`` (columns masked by ``b_cols_mask``); both step along K by their stride.
    A GEMM's main loop over K, or a LoRA term's loop over the rank R.

    ``W_NF4`` (a ``kernels.nf4`` mode; 0: dense B): B is an NF4 weight read by ``nf4_tile``, ``nf4`` its expert's
    (codes, scales, byte table, column stride), ``b_ptrs`` the int32 in-expert offset of the tile's first element
    and ``b_cols_mask`` the number of the tile's columns in range."""
    acc, _ = dot_loop_pair(
        acc, acc, a_ptrs, b_ptrs, b_ptrs, a_rows_mask, b_cols_mask, b_cols_mask, offs_k, K, stride_ak, stride_bk,
        PRECISION, BLOCK_K, False, nf4, W_NF4,
    )  # fmt: skip
    return acc


@triton.jit
def _load_b(b_ptrs, k_mask, k_left, b_cols_mask, stride_bk, nf4, BK: tl.constexpr, BN: tl.constexpr,
            W_NF4: tl.constexpr):  # fmt: skip
    """One B tile [BK, BN] of a main loop: a plain masked load, or an NF4 weight's tile (``nf4_tile``; then
    ``b_ptrs`` is its first element's offset and ``b_cols_mask`` its columns in range, ``k_left`` its rows)."""
    if W_NF4:
        bt = nf4_tile(nf4[0], nf4[1], nf4[2], b_ptrs, k_left, b_cols_mask, stride_bk, nf4[3], BK, BN, W_NF4)
    else:
        bt = tl.load(b_ptrs, mask=k_mask[:, None] & b_cols_mask[None, :], other=0.0)
    return bt


@triton.jit
def dot_loop_pair(acc, acc2, a_ptrs, b_ptrs, b2_ptrs, a_rows_mask, b_cols_mask, b2_cols_mask, offs_k, K, stride_ak,
                  stride_bk, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, PAIR: tl.constexpr,
                  nf4=None, W_NF4: tl.constexpr = 0):  # fmt: skip
    """``dot_loop`` into acc, and with PAIR also acc2 + A @ B2 from the same A tiles (B2 tiles at ``b2_ptrs``,
    columns masked by ``b2_cols_mask``, the same strides and, with ``W_NF4``, the same codes as B): the gate and
    up halves of a gated layout."""
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        if a_rows_mask is None:
            at = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        else:
            at = tl.load(a_ptrs, mask=a_rows_mask[:, None] & k_mask[None, :], other=0.0)
        bt = _load_b(b_ptrs, k_mask, K - k * BLOCK_K, b_cols_mask, stride_bk, nf4, BLOCK_K, acc.shape[1], W_NF4)
        acc = mma(at, bt, acc, PRECISION)
        if PAIR:
            b2t = _load_b(b2_ptrs, k_mask, K - k * BLOCK_K, b2_cols_mask, stride_bk, nf4, BLOCK_K, acc2.shape[1],
                          W_NF4)  # fmt: skip
            acc2 = mma(at, b2t, acc2, PRECISION)
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, acc2
