"""Up-projection: gather token rows + grouped GEMM + bias + fused activation epilogue.

    h[r] = x[token_of_row[r]] @ W_up[e]  (+ b_up[e])       r in expert e's block, h [n, W], W = 2I (gated) or I
    a[r] = act(h[r])                                        a [n, I]

With LoRA (``HAS_LORA``) the caller passes the low-rank intermediate u = x[tok] @ A_up[e]ᵀ [n, R] (plan rows,
computed by the low-rank ``grouped_gemm``); after the main loop over H the reduction over R adds
u[r] @ B_up[e]ᵀ into the same fp32 accumulators (gate and up columns alike), before bias and activation (with
one rank step, concatenated or plain layouts, its tiles are loaded before the main loop; else a loop over R):

    h[r] = x[tok] @ W_up[e] + u[r] @ B_up[e]ᵀ (+ b_up[e])      no ΔW, no copy of W

The token rows are gathered inside the kernel's operand loads (no [n, H] copy of x). Each program owns a
BLOCK_M x BLOCK_N tile of ``a``; for gated layouts it holds the gate and the matching up columns of W_up
(concatenated: j and I + j, two accumulators; interleaved: 2j and 2j + 1, one accumulator over the dense
2·BLOCK_N columns, split in registers after the main loop), so the activation is applied in registers.
``h`` is stored (rounded to the input dtype) for backward and ``a`` is computed from the rounded h, as the
reference does. An NF4 W_up (``W_NF4``) is read as codes and scales, each tile dequantized in the main loop's
loads (``kernels.nf4``); where the Hopper NF4 GEMM runs (``kernels.nf4_hopper.runs``) h is its plain product over
all W columns (``grouped_gemm`` with the rows gathered, bias and LoRA) and a comes from h in a pass of its own
(``kernels.act_forward``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import nf4_hopper
from .act_forward import act_forward, gate_up_columns
from .activation import act_fn, gated_forward
from .grouped_gemm import grouped_gemm
from .nf4 import nf4_expert, weight_operands
from .numerics import dot_loop_pair, dot_precision, mma, new_output, to_dtype
from .tiling import block_e, cdiv, gemm_program, num_row_tiles, one_rank_step, rank_block, rows_bucket, tile_rows
from .tuning import Autotuned


@triton.jit
def _up_proj_kernel(
    x_ptr, tok_ptr, w_ptr, ws_ptr, code_ptr, b_ptr, h_ptr, a_ptr, counts_ptr, u_ptr, lb_ptr,
    n_rows, E, N, K, M_BUCKET, R,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_hm, stride_am,
    stride_um, stride_ur, stride_lbe, stride_lbr, stride_lbn,
    up_off, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, LORA_PRELOAD: tl.constexpr, W_NF4: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    spare, pid_n, expert, row_start, row_end = gemm_program(
        counts_ptr, n_rows, E, N, BLOCK_M, BLOCK_N, BLOCK_E, GROUP_M
    )
    if spare:
        return
    offs_m, m_mask, _ = tile_rows(row_start, row_end, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    PAIR: tl.constexpr = GATED and COL_STRIDE == 1  # a second accumulator: the up columns of W_up

    tok = tl.load(tok_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Columns of W_up the "g" accumulator runs over: the gate (or only) columns offs_n, or, interleaved, the
    # contiguous 2·BLOCK_N columns holding gate and up of offs_n (one dense tile; split in registers after the
    # loop: strided loads would cost the main loop its vectorised copies)
    col_w = pid_n * BLOCK_N * COL_STRIDE + tl.arange(0, BLOCK_N * COL_STRIDE)
    w_mask = col_w < N * COL_STRIDE
    w_nf4, wg_cols, wu_cols = None, w_mask, n_mask
    if W_NF4:  # NF4 codes (w_ptr) and scales (ws_ptr) of the expert; a tile by its first element's offset in it
        w_codes, w_scales = nf4_expert(w_ptr, ws_ptr, expert, stride_we)
        w_nf4 = (w_codes, w_scales, code_ptr, stride_wn)
        wg_ptrs = pid_n * BLOCK_N * COL_STRIDE * stride_wn
        wg_cols, wu_cols = (N - pid_n * BLOCK_N) * COL_STRIDE, N - pid_n * BLOCK_N
    else:
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        wg_ptrs = w_base + offs_k[:, None] * stride_wk + col_w[None, :].to(tl.int64) * stride_wn
    wu_ptrs = wg_ptrs + up_off * stride_wn  # concatenated gated layout only

    if HAS_LORA:  # B_up read as [R, W] through strides, same columns as W_up
        offs_r = tl.arange(0, BLOCK_R)
        u_ptrs = u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur
        lg_ptrs = (lb_ptr + expert.to(tl.int64) * stride_lbe + offs_r[:, None] * stride_lbr
                   + col_w[None, :].to(tl.int64) * stride_lbn)  # fmt: skip
        lu_ptrs = lg_ptrs + up_off * stride_lbn
        if LORA_PRELOAD:  # one rank step: its loads are issued now and land while the main loop runs
            r_mask = offs_r < R
            ut = tl.load(u_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            bg = tl.load(lg_ptrs, mask=r_mask[:, None] & w_mask[None, :], other=0.0)
            if PAIR:
                bu = tl.load(lu_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N * COL_STRIDE), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g, acc_u = dot_loop_pair(
        acc_g, acc_u, x_ptrs, wg_ptrs, wu_ptrs, None, wg_cols, wu_cols, offs_k, K, stride_xk, stride_wk,
        PRECISION, BLOCK_K, PAIR, w_nf4, W_NF4,
    )  # fmt: skip

    if HAS_LORA:  # + u @ B_up[e]ᵀ into the same accumulators, before bias and activation
        if LORA_PRELOAD:
            acc_g = mma(ut, bg, acc_g, PRECISION)
            if PAIR:
                acc_u = mma(ut, bu, acc_u, PRECISION)
        else:
            acc_g, acc_u = dot_loop_pair(
                acc_g, acc_u, u_ptrs, lg_ptrs, lu_ptrs, m_mask, w_mask, n_mask, offs_r, R, stride_ur, stride_lbr,
                PRECISION, BLOCK_R, PAIR,
            )  # fmt: skip

    if COL_STRIDE == 2:  # interleaved: columns 2j (gate) and 2j + 1 (up) of the wide tile
        acc_g, acc_u = tl.split(tl.reshape(acc_g, (BLOCK_M, BLOCK_N, 2)))
    col_g = offs_n * COL_STRIDE  # gate column (or the only column, non-gated) of h, b_up
    dtype = h_ptr.dtype.element_ty
    if HAS_BIAS:
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + col_g * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + (col_g + up_off) * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    rows64 = offs_m.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_hm
    hg = to_dtype(acc_g, dtype)
    tl.store(h_rows + col_g[None, :], hg, mask=out_mask)
    if GATED:
        hu = to_dtype(acc_u, dtype)
        tl.store(h_rows + (col_g + up_off)[None, :], hu, mask=out_mask)
        a = gated_forward(hg.to(tl.float32), hu.to(tl.float32), alpha, limit, ACT)
    else:
        a = act_fn(hg.to(tl.float32), ACT)
    tl.store(a_ptr + rows64[:, None] * stride_am + offs_n[None, :], to_dtype(a, dtype), mask=out_mask)


_KEY = ["N", "K", "M_BUCKET", "HAS_LORA", "R", "LORA_PRELOAD", "W_NF4"]
_KERNELS = {  # (gated, NF4 weight) -> the kernel with its tuning space
    (False, False): Autotuned(_up_proj_kernel, "gemm", key=_KEY),
    (True, False): Autotuned(_up_proj_kernel, "gated", key=_KEY),
    (False, True): Autotuned(_up_proj_kernel, "gemm_nf4", key=_KEY),
    (True, True): Autotuned(_up_proj_kernel, "gated_nf4", key=_KEY),
}


def up_proj(x, token_of_row, weight_in_out, bias, counts, n, activation, lora=None):
    """h [n, W], a [n, I] for plan rows [0, n). ``weight_in_out`` is W_up viewed [E, H, W] (any strides; an NF4
    view, ``moekit.quant.NF4Tensor``, is dequantized tile by tile in the loads).
    ``lora``: (u [n, R] plan rows, B_up viewed [E, R, W]) adds u @ B_up[e]ᵀ to h (scaling folded into B)."""
    num_experts, hidden, width = weight_in_out.shape
    gated = activation.gated
    inner = width // 2 if gated else width
    col_stride, up_off = gate_up_columns(activation, inner)
    w, ws, code, w_nf4 = weight_operands(weight_in_out, inner * col_stride, up_off if gated and col_stride == 1 else 0)
    if n and nf4_hopper.runs(x, weight_in_out, w_nf4, lowrank=False):  # all of h on the Hopper NF4 GEMM, then a
        h = grouped_gemm(x, weight_in_out, counts, n, bias=bias, gather=token_of_row, lora=lora)
        return h, act_forward(h, counts, activation)
    h = new_output(n, width, dtype=x.dtype, device=x.device)
    a = new_output(n, inner, dtype=x.dtype, device=x.device)
    if n == 0:
        return h, a
    kernel = _KERNELS[gated, bool(w_nf4)]

    def grid(meta):
        return (num_row_tiles(n, num_experts, meta["BLOCK_M"]) * cdiv(inner, meta["BLOCK_N"]),)

    has_bias, has_lora = bias is not None, lora is not None
    b = bias if has_bias else h
    u, lb = lora if has_lora else (h, h)
    rank = u.shape[1] if has_lora else 0
    # Interleaved layouts never preload the LoRA tiles: beside the wide 2·BLOCK_N accumulator that made some tuned
    # configs fault with an illegal address on an H200 (triton 3.6); the loop after the main loop is correct.
    preload = one_rank_step(rank) and col_stride == 1
    kernel.get(x.dtype)[grid](
        x, token_of_row, w, ws, code, b, h, a, counts, u, lb,
        n, num_experts, inner, hidden, rows_bucket(n, num_experts), rank,
        x.stride(0), x.stride(1), *weight_in_out.stride(),
        b.stride(0) if has_bias else 0, b.stride(1) if has_bias else 0, h.stride(0), a.stride(0),
        *(u.stride() if has_lora else (0, 0)), *(lb.stride() if has_lora else (0, 0, 0)),
        up_off, float(activation.alpha), float(activation.limit),
        ACT=activation.kernel_id, GATED=gated, COL_STRIDE=col_stride, HAS_BIAS=has_bias,
        HAS_LORA=has_lora, BLOCK_R=rank_block(rank), LORA_PRELOAD=preload, W_NF4=w_nf4,
        PRECISION=dot_precision(x.dtype), BLOCK_E=block_e(num_experts), GROUP_M=8,
    )  # fmt: skip
    return h, a
