"""Scaled copies of a LoRA B factor between PEFT's layout and a dense one: dst = alpha · src, rounded once.

PEFT keeps ``lora_B.weight`` as [out, R*E], expert e's B in columns e::E, so B viewed [E, out, R] has strides
(1, R*E, E): no dimension is dense. Its (out, R) pair still merges into one dimension J = out*R (stride E), so
the copy to or from a dense [E, out, R] buffer is a 2D transpose of [E, J]. An elementwise copy reads or writes
one element per 32-byte sector on one side of it; this kernel moves [BLOCK_E, BLOCK_J] tiles, and triton gives
the load and the store each their own coalesced layout (the transpose goes through shared memory).
Writing dB into PEFT's strides from the weight-gradient kernel itself measured 3.6x slower than into a dense
buffer (an H100, Nemotron-3-Nano's down-projection), so the kernels work on dense copies made here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastKernel
from .numerics import to_dtype
from .tiling import cdiv


@triton.jit
def _relayout_kernel(
    src_ptr, dst_ptr, E, J, alpha, stride_se, stride_sj, stride_de, stride_dj,
    BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (offs_e < E)[:, None] & (offs_j < J)[None, :]
    e64, j64 = offs_e.to(tl.int64)[:, None], offs_j.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + e64 * stride_se + j64 * stride_sj, mask=mask, other=0.0)
    tile = tile.to(tl.float32) * alpha
    tl.store(dst_ptr + e64 * stride_de + j64 * stride_dj, to_dtype(tile, dst_ptr.dtype.element_ty), mask=mask)


_RELAYOUT = FastKernel(_relayout_kernel)


def _merged_strides(t: torch.Tensor) -> tuple[int, int] | None:
    """(stride of E, stride of J) of a [E, out, R] tensor whose (out, R) dimensions merge into one, else None."""
    if t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) != t.shape[2] * t.stride(2):
        return None
    return t.stride(0), t.stride(2) if t.shape[2] > 1 else t.stride(1)


def scaled_copy(src: torch.Tensor, dst: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """dst = alpha · src for two [E, out, R] tensors of any float dtypes; returns dst. One Triton launch when
    both merge (out, R) (PEFT's B layout and dense ones do), else torch.mul."""
    if src.shape != dst.shape:
        raise ValueError(f"scaled_copy: src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
    src_strides, dst_strides = _merged_strides(src), _merged_strides(dst)
    if src_strides is None or dst_strides is None:
        return torch.mul(src, alpha, out=dst)
    num_experts, width = src.shape[0], src.shape[1] * src.shape[2]
    if num_experts == 0 or width == 0:
        return dst
    block_e = 32 if num_experts >= 32 else 16
    block_j = 128
    _RELAYOUT[(cdiv(num_experts, block_e), cdiv(width, block_j))](
        src, dst, num_experts, width, float(alpha), *src_strides, *dst_strides,
        BLOCK_E=block_e, BLOCK_J=block_j, num_warps=4,
    )  # fmt: skip
    return dst
