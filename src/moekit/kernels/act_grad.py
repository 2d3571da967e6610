"""Backward through the down-projection and the activation, fused (the "dA" kernel).

For every plan row r of expert e, with tok = token_of_row[r] and w = routing_weight[sorted_rows[r]]:

    ga[r]      = dOut[tok] @ W_down[e]ᵀ    (in the [I, H] sense: dOut rows are gathered inside the kernel)
    a[r]       = act(h[r])                 recomputed from the cached pre-activation, stored for dW_down
    part[r, j] = sum over this program's columns of ga[r] * a[r]   (the routing-weight gradient <dOut, y>
                 without y; the host sums the column blocks and adds <dOut[tok], b_down[e]>)
    dh[r]      = act'(h[r]) applied to w * ga[r]                   (gate and up columns for gated layouts)

No atomics: every output element is written by exactly one program; the per-row reduction over I is split in
column blocks written to ``part`` and summed afterwards (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activation import act_fn, act_grad, gated_backward
from .tiling import Autotuned, block_e, dot_precision, expert_tile, num_row_tiles, rows_bucket, swizzle


@triton.jit
def _act_grad_kernel(
    go_ptr, tok_ptr, rows_ptr, rw_ptr, w_ptr, h_ptr, a_ptr, dh_ptr, part_ptr, counts_ptr,
    n_rows, E, N, K, M_BUCKET,
    stride_gm, stride_gk, stride_we, stride_wk, stride_wn, stride_hm, stride_am, stride_dm, stride_pm,
    up_off, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_STRIDE: tl.constexpr,
    STORE_A: tl.constexpr, STORE_DH: tl.constexpr, STORE_PART: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(n_rows, BLOCK_M) + tl.minimum(E, n_rows)
    pid_m, pid_n = swizzle(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    total, expert, row_start, row_end = expert_tile(counts_ptr, E, pid_m, BLOCK_M, BLOCK_E)
    if pid_m >= total:
        return

    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows64 = tl.where(m_mask, offs_m, row_start).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    tok = tl.load(tok_ptr + rows64).to(tl.int64)
    g_ptrs = go_ptr + tok[:, None] * stride_gm + offs_k[None, :] * stride_gk
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        gt = tl.load(g_ptrs, mask=k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(gt, wt, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * stride_gk
        w_ptrs += BLOCK_K * stride_wk

    dtype = h_ptr.dtype.element_ty
    mask = m_mask[:, None] & n_mask[None, :]
    slot = tl.load(rows_ptr + rows64)
    weight = tl.load(rw_ptr + slot).to(tl.float32)
    g = acc * weight[:, None]
    col = offs_n * COL_STRIDE
    h_rows = h_ptr + rows64[:, None] * stride_hm
    dh_rows = dh_ptr + rows64[:, None] * stride_dm
    if GATED:
        gate = tl.load(h_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_rows + (col + up_off)[None, :], mask=mask, other=0.0).to(tl.float32)
        a, d_gate, d_up = gated_backward(gate, up, g, alpha, limit, ACT)
        if STORE_DH:
            tl.store(dh_rows + col[None, :], d_gate.to(dtype), mask=mask)
            tl.store(dh_rows + (col + up_off)[None, :], d_up.to(dtype), mask=mask)
    else:
        hv = tl.load(h_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
        a = act_fn(hv, ACT)
        if STORE_DH:
            tl.store(dh_rows + col[None, :], (g * act_grad(hv, ACT)).to(dtype), mask=mask)
    a_low = a.to(dtype)
    if STORE_A:
        tl.store(a_ptr + rows64[:, None] * stride_am + offs_n[None, :], a_low, mask=mask)
    if STORE_PART:
        per_row = tl.sum(tl.where(mask, acc * a_low.to(tl.float32), 0.0), 1)
        tl.store(part_ptr + rows64 * stride_pm + pid_n, per_row, mask=m_mask)


_PLAIN = Autotuned(_act_grad_kernel, "gemm", key=["N", "K", "M_BUCKET", "STORE_A", "STORE_DH", "STORE_PART"])


def min_block_n() -> int:
    from .tiling import configs

    return min(c.kwargs["BLOCK_N"] for c in configs("gemm"))


def act_grad_backward(
    grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h, counts, n, activation,
    store_a=True, store_dh=True, store_part=True,
):  # fmt: skip
    """(a [n, I], dL/dh [n, W], row partials [n, blocks] fp32) — see the module docstring.

    ``weight_out_in`` is W_down viewed [E, H, I]; ``routing_weights`` is flat [T*K].
    """
    num_experts, k_dim, inner = weight_out_in.shape
    width = h.shape[1]
    gated = activation.gated
    a = h.new_empty(n if store_a else 0, inner)
    dh = h.new_empty(n if store_dh else 0, width)
    blocks = triton.cdiv(inner, min_block_n())
    part = h.new_zeros(n if store_part else 0, blocks, dtype=__import__("torch").float32)
    if n == 0:
        return a, dh, part
    if gated and not activation.concatenated:
        col_stride, up_off = 2, 1
    else:
        col_stride, up_off = 1, inner

    def grid(meta):
        return (num_row_tiles(n, num_experts, meta["BLOCK_M"]) * triton.cdiv(inner, meta["BLOCK_N"]),)

    _PLAIN[grid](
        grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h,
        a if store_a else h, dh if store_dh else h, part if store_part else h, counts,
        n, num_experts, inner, k_dim, rows_bucket(n, num_experts),
        grad_out.stride(0), grad_out.stride(1), *weight_out_in.stride(), h.stride(0),
        a.stride(0) if store_a else 0, dh.stride(0) if store_dh else 0, part.stride(0) if store_part else 0,
        up_off, float(activation.alpha), float(activation.limit),
        ACT=activation.kernel_id, GATED=gated, COL_STRIDE=col_stride,
        STORE_A=store_a, STORE_DH=store_dh, STORE_PART=store_part,
        PRECISION=dot_precision(h.dtype), BLOCK_E=block_e(num_experts), GROUP_M=8,
    )  # fmt: skip
    return a, dh, part
