"""Deterministic K-way combine: out[t] = sum over slots k (in slot order, fp32) of w[t, k] · (rows[inv[t*K + k]] + b[e]).

``inv`` is the plan's inverse permutation: the sorted position of every (token, slot) row; -1 marks an
expert-parallel sentinel slot (id == E), which contributes nothing (its row, bias and weight loads are masked,
so no NaN or Inf elsewhere reaches it). Each output element is written once by one
program: a gather-sum, no scatter-add, no atomics. Used for the forward output and for dX (rows = per-row input
gradients, no weight, no bias). In the forward the rows are either already weighted (the Triton down-projection
applies w and b_down in its epilogue) or plain expert outputs y = a @ W_down[e] from torch's grouped_mm, in which
case the combine applies the routing weight and the bias of each slot's expert e in fp32, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastKernel
from .numerics import interpreting, new_output, to_dtype
from .tiling import cdiv, next_power_of_2


@triton.jit
def _combine_kernel(
    rows_ptr, inv_ptr, w_ptr, b_ptr, expert_ptr, out_ptr, T, K, H, stride_rm, stride_be, stride_bh, stride_ot,
    WEIGHTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < T
    h_mask = offs_h < H
    t64 = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in range(K):
        pos = tl.load(inv_ptr + t64 * K + k, mask=t_mask, other=-1).to(tl.int64)
        valid = pos >= 0
        pos = tl.where(valid, pos, 0)
        mask = valid[:, None] & h_mask[None, :]
        v = tl.load(rows_ptr + pos[:, None] * stride_rm + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            expert = tl.load(expert_ptr + pos, mask=valid, other=0).to(tl.int64)
            b_ptrs = b_ptr + expert[:, None] * stride_be + offs_h[None, :] * stride_bh
            v += tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            v *= tl.load(w_ptr + t64 * K + k, mask=valid, other=0.0).to(tl.float32)[:, None]
        acc += v
    out_ptrs = out_ptr + t64[:, None] * stride_ot + offs_h[None, :]
    tl.store(out_ptrs, to_dtype(acc, out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


_COMBINE = FastKernel(_combine_kernel)


def combine(
    rows: torch.Tensor, inv: torch.Tensor, num_tokens: int, top_k: int, out_dtype: torch.dtype,
    slot_weights: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    expert_of_row: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """rows [S, H] plan-sorted -> [T, H] in ``out_dtype`` (fp32 sum over the K slots in slot order).

    ``slot_weights`` [T, K] (any float dtype): each slot's row is multiplied by its routing weight. ``bias``
    [E, H] with ``expert_of_row`` [S] (the plan's): bias[expert of the row] is added to each row before weighting.
    """
    hidden = rows.shape[1]
    out = new_output(num_tokens, hidden, device=rows.device, dtype=out_dtype)
    if num_tokens == 0 or hidden == 0:
        return out
    if top_k == 0:
        return out.zero_()
    if bias is not None and expert_of_row is None:
        raise ValueError("combine: a bias needs expert_of_row, the expert id of each plan row [S]")
    weighted, has_bias = slot_weights is not None, bias is not None
    w = slot_weights.reshape(-1) if weighted else inv  # [T*K] in slot order
    b = bias if has_bias else rows
    if interpreting():
        block_t, block_h, warps = 16, 32, 4
    else:
        block_t, block_h, warps = 4, min(1024, next_power_of_2(hidden)), 4
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    _COMBINE[grid](
        rows, inv, w, b, expert_of_row if has_bias else inv, out, num_tokens, top_k, hidden, rows.stride(0),
        *(b.stride() if has_bias else (0, 0)), out.stride(0),
        WEIGHTED=weighted, HAS_BIAS=has_bias, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return out
