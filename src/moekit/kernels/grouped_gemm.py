"""The grouped GEMM over plan-sorted (or gathered) rows, with a fused LoRA term, bias and routing weight.

    out[r] = (A[r] @ B[e] (+ u[r] @ L[e]) (+ bias[e])) * (routing_weight[sorted_rows[r]] if SCALE)
                                                                         r in expert e's block

Its uses: the forward down-projection (A = a [n, I], B = W_down viewed [E, I, H], with bias and routing weight:
out is the weighted expert output, which the combine kernel sums over K); dX (A = dL/dh [n, W], B = W_up viewed
[E, W, H], no bias, no weight); dA's GEMM (A = dOut rows gathered through token_of_row inside the loads, B = W_down
viewed [E, H, I], see act_grad.py). Operands are read through strides, so stored [E, out, in] and transposed
[E, in, out] weights both work without copies. Accumulation in fp32, one rounding to the output dtype. An NF4
weight (``W_NF4``) is read as codes and scales, each tile dequantized in the main loop's loads (``kernels.nf4``);
on Hopper, bf16 / fp16 rows and byte pairs along a tile axis, by the gluon kernels of ``kernels.nf4_hopper`` instead
(the same contract; they overlap each tile's dequantization with the previous tile's MMA).

LoRA (``lora=(u, L)``): after the main loop the rank's reduction adds u[r] @ L[e] (u [n, R] plan rows, L viewed
[E, R, N]) into the same accumulator, before bias and routing weight; with one rank step its tiles are loaded
before the main loop. Forward: u = a @ A_down[e]ᵀ, L = B_downᵀ; dX: u = dh @ B_up[e], L = A_up; dA:
u = dOut[tok] @ B_down[e], L = A_down.

Low-rank mode (``lowrank=True``): the same kernel computes those u = rows @ F[e] [n, R] (F = A[e]ᵀ or B[e],
the rank is N): its own small autotuning space, BLOCK_N set from R at launch instead of a 128-wide tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import nf4_hopper
from .nf4 import nf4_expert, weight_operands
from .numerics import as_operand, dot_loop, dot_precision, mma, new_output, to_dtype
from .tiling import (
    block_e,
    cdiv,
    gemm_program,
    num_row_tiles,
    one_rank_step,
    rank_block,
    rows_bucket,
    source_rows,
    tile_rows,
)
from .tuning import Autotuned


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, gather_ptr, w_ptr, ws_ptr, code_ptr, b_ptr, rw_ptr, rows_ptr, out_ptr, counts_ptr, u_ptr, l_ptr,
    n_rows, E, N, K, M_BUCKET, R,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_om,
    stride_um, stride_ur, stride_le, stride_lr, stride_ln,
    GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA_PRELOAD: tl.constexpr, W_NF4: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    spare, pid_n, expert, row_start, row_end = gemm_program(
        counts_ptr, n_rows, E, N, BLOCK_M, BLOCK_N, BLOCK_E, GROUP_M
    )
    if spare:
        return
    _, m_mask, rows64 = tile_rows(row_start, row_end, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_rows = source_rows(gather_ptr, rows64, GATHER)  # A rows are token rows a[gather[r]] when GATHER
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_nf4, w_cols = None, n_mask
    if W_NF4:  # NF4 codes (w_ptr) and scales (ws_ptr) of the expert; the tile by its first element's offset in it
        w_codes, w_scales = nf4_expert(w_ptr, ws_ptr, expert, stride_we)
        w_nf4 = (w_codes, w_scales, code_ptr, stride_wn)
        w_ptrs, w_cols = pid_n * BLOCK_N * stride_wn, N - pid_n * BLOCK_N
    else:
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if HAS_LORA:  # u plan rows [n, R], L [R, N] through strides
        offs_r = tl.arange(0, BLOCK_R)
        u_ptrs = u_ptr + rows64[:, None] * stride_um + offs_r[None, :] * stride_ur
        l_ptrs = l_ptr + expert.to(tl.int64) * stride_le + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln
        if LORA_PRELOAD:  # one rank step: its loads are issued now and land while the main loop runs
            ut = tl.load(u_ptrs, mask=(offs_r < R)[None, :], other=0.0)
            lt = tl.load(l_ptrs, mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
            lt = as_operand(lt, ut.dtype)  # held through the main loop: in the operand dtype, not A's own
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dot_loop(acc, a_ptrs, w_ptrs, None, w_cols, offs_k, K, stride_ak, stride_wk, PRECISION, BLOCK_K, w_nf4, W_NF4)

    if HAS_LORA:  # + u @ L[e] into the same accumulator, before bias and routing weight
        if LORA_PRELOAD:
            acc = mma(ut, lt, acc, PRECISION)
        else:
            acc = dot_loop(acc, u_ptrs, l_ptrs, None, n_mask, offs_r, R, stride_ur, stride_lr, PRECISION, BLOCK_R)

    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SCALE:
        slot = tl.load(rows_ptr + rows64)
        acc *= tl.load(rw_ptr + slot).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, to_dtype(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_KEY = ["N", "K", "M_BUCKET", "GATHER", "HAS_BIAS", "SCALE", "HAS_LORA", "R", "LORA_PRELOAD", "W_NF4"]
_KERNEL = Autotuned(_grouped_gemm_kernel, "gemm", key=_KEY)
_KERNEL_NF4 = Autotuned(_grouped_gemm_kernel, "gemm_nf4", key=_KEY)
_LOWRANK = Autotuned(_grouped_gemm_kernel, "lowrank", key=_KEY)


def grouped_gemm(
    rows, weight_in_out, counts, n, bias=None, routing_weights=None, sorted_rows=None, gather=None, lora=None,
    lowrank=False,
):  # fmt: skip
    """rows [n, K] (plan-sorted; or any rows taken through ``gather`` [n]) @ weight[e] [K, N] (+ u @ L[e] with
    ``lora=(u [n, R], L [E, R, N])``) (+ bias[e]) (* routing weight per row) -> [n, N].
    ``weight_in_out`` may be an NF4 view (``moekit.quant.NF4Tensor``): its tiles are dequantized in the loads.
    ``lowrank``: N is a LoRA rank (small): BLOCK_N fitted to it."""
    num_experts, k_dim, n_dim = weight_in_out.shape
    out = new_output(n, n_dim, dtype=rows.dtype, device=rows.device)
    if n == 0:
        return out
    has_bias, scale, has_lora = bias is not None, routing_weights is not None, lora is not None
    b = bias if has_bias else out
    rw = routing_weights if scale else out
    idx = sorted_rows if scale else counts
    u, lw = lora if has_lora else (out, out)
    rank = u.shape[1] if has_lora else 0
    w, ws, code, w_nf4 = weight_operands(weight_in_out, n_dim)
    if nf4_hopper.runs(rows, weight_in_out, w_nf4, lowrank):
        return nf4_hopper.grouped_gemm_nf4(rows, weight_in_out, counts, n, out, w_nf4, code, gather, bias,
                                           routing_weights, sorted_rows, lora)  # fmt: skip
    if lowrank:
        kernel, extra = _LOWRANK, {"BLOCK_N": rank_block(n_dim, 128)}
    else:
        kernel, extra = _KERNEL_NF4 if w_nf4 else _KERNEL, {}

    def grid(meta):
        return (num_row_tiles(n, num_experts, meta["BLOCK_M"]) * cdiv(n_dim, meta["BLOCK_N"]),)

    kernel.get(rows.dtype)[grid](
        rows, gather if gather is not None else counts, w, ws, code, b, rw, idx, out, counts, u, lw,
        n, num_experts, n_dim, k_dim, rows_bucket(n, num_experts), rank,
        rows.stride(0), rows.stride(1), *weight_in_out.stride(),
        b.stride(0) if has_bias else 0, b.stride(1) if has_bias else 0, out.stride(0),
        *(u.stride() if has_lora else (0, 0)), *(lw.stride() if has_lora else (0, 0, 0)),
        GATHER=gather is not None, HAS_BIAS=has_bias, SCALE=scale, HAS_LORA=has_lora, BLOCK_R=rank_block(rank),
        LORA_PRELOAD=one_rank_step(rank), W_NF4=w_nf4,
        PRECISION=dot_precision(rows.dtype), BLOCK_E=block_e(num_experts), GROUP_M=8, **extra,
    )  # fmt: skip
    return out
