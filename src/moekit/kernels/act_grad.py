"""Backward through the down-projection and the activation, fused (the "dA" kernel).

For every plan row r of expert e, with tok = token_of_row[r] and w = routing_weight[sorted_rows[r]]:

    ga[r]      = dOut[tok] @ W_down[e]ᵀ    (in the [I, H] sense: dOut rows are gathered inside the kernel)
    aw[r]      = w * act(h[r])             recomputed from the cached pre-activation, stored for dW_down
    part[r, j] = sum over this program's columns of ga[r] * a[r]   (the routing-weight gradient <dOut, y>
                 without y; the host sums the column blocks and adds <dOut[tok], b_down[e]>)
    dh[r]      = act'(h[r]) applied to w * ga[r]                   (gate and up columns for gated layouts)

With LoRA on the down projection, ga also carries (dOut[tok] @ B_down[e]) @ A_down[e]: the caller passes
v = dOut[tok] @ B_down[e] [n, R] (low-rank ``grouped_gemm``) and a short loop over R after the main loop adds
v @ A_down[e] into the accumulator, so dh and the routing-weight partials <ga, a> include the LoRA part of y.

No atomics: every output element is written by exactly one program; the per-row reduction over I is split in
column blocks written to ``part`` and summed afterwards (deterministic).

Two ways to run it (``MOEKIT_TRITON_DA``): "fused" does all of the above in the GEMM's epilogue; "split" runs
the GEMM alone (``grouped_gemm`` with the dOut rows gathered, writing ga rounded to the input dtype [n, I],
as the reference does) and then ``_act_backward_kernel``, a memory-bound pass over rows that writes aw, dh and
the complete per-row partial (one column), so the GEMM can use the large tiles the heavy epilogue's register
use rules out. "auto" (default) picks per layout (see ``act_grad_mode``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .activation import act_backward, act_fn, gated_backward
from .launch import FastKernel
from .tiling import (
    Autotuned,
    as_operand,
    block_e,
    cdiv,
    dot_precision,
    expert_tile,
    interpreting,
    lora_preload,
    min_block_n,
    mma,
    new_output,
    num_row_tiles,
    rank_block,
    rows_bucket,
    swizzle,
    to_dtype,
)


@triton.jit
def _act_grad_kernel(
    go_ptr, tok_ptr, rows_ptr, rw_ptr, w_ptr, h_ptr, a_ptr, dh_ptr, part_ptr, counts_ptr, v_ptr, la_ptr,
    n_rows, E, N, K, M_BUCKET, R,
    stride_gm, stride_gk, stride_we, stride_wk, stride_wn, stride_hm, stride_am, stride_dm, stride_pm,
    stride_vm, stride_vr, stride_lae, stride_lar, stride_lan,
    up_off, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_STRIDE: tl.constexpr,
    STORE_A: tl.constexpr, STORE_DH: tl.constexpr, STORE_PART: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, LORA_PRELOAD: tl.constexpr,
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
    if HAS_LORA:  # v plan rows [n, R], A_down [R, I] through strides
        offs_r = tl.arange(0, BLOCK_R)
        v_ptrs = v_ptr + rows64[:, None] * stride_vm + offs_r[None, :] * stride_vr
        la_ptrs = (la_ptr + expert.to(tl.int64) * stride_lae + offs_r[:, None] * stride_lar
                   + offs_n[None, :] * stride_lan)  # fmt: skip
        if LORA_PRELOAD:  # one rank step: its loads are issued now and land while the main loop runs
            vt = tl.load(v_ptrs, mask=(offs_r < R)[None, :], other=0.0)
            lt = tl.load(la_ptrs, mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
            lt = as_operand(lt, vt.dtype)  # held through the main loop: in the operand dtype, not A's own
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        gt = tl.load(g_ptrs, mask=k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(gt, wt, acc, PRECISION)
        g_ptrs += BLOCK_K * stride_gk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LORA:  # + v @ A_down[e] into the same accumulator, before the activation backward
        if LORA_PRELOAD:
            acc = mma(vt, lt, acc, PRECISION)
        else:
            for r in range(tl.cdiv(R, BLOCK_R)):
                r_mask = offs_r < R - r * BLOCK_R
                vt = tl.load(v_ptrs, mask=r_mask[None, :], other=0.0)
                lt = tl.load(la_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(vt, lt, acc, PRECISION)
                v_ptrs += BLOCK_R * stride_vr
                la_ptrs += BLOCK_R * stride_lar

    dtype = h_ptr.dtype.element_ty
    mask = m_mask[:, None] & n_mask[None, :]
    slot = tl.load(rows_ptr + rows64)
    weight = tl.load(rw_ptr + slot).to(tl.float32)
    g = acc * weight[:, None]
    col = offs_n * COL_STRIDE
    # Epilogue addresses: one 64-bit base per tile plus 32-bit offsets (fewer registers than 64-bit pointer tiles).
    local = tl.arange(0, BLOCK_M)
    start64 = row_start.to(tl.int64)
    h_tile = h_ptr + start64 * stride_hm
    dh_tile = dh_ptr + start64 * stride_dm
    h_off = local[:, None] * stride_hm + col[None, :]
    dh_off = local[:, None] * stride_dm + col[None, :]
    if GATED:
        gate = tl.load(h_tile + h_off, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_tile + (h_off + up_off), mask=mask, other=0.0).to(tl.float32)
        a, d_gate, d_up = gated_backward(gate, up, g, alpha, limit, ACT)
        if STORE_DH:
            tl.store(dh_tile + dh_off, to_dtype(d_gate, dtype), mask=mask)
            tl.store(dh_tile + (dh_off + up_off), to_dtype(d_up, dtype), mask=mask)
    else:
        hv = tl.load(h_tile + h_off, mask=mask, other=0.0).to(tl.float32)
        a = act_fn(hv, ACT)
        if STORE_DH:
            tl.store(dh_tile + dh_off, to_dtype(act_backward(hv, g, ACT), dtype), mask=mask)
    a_low = to_dtype(a, dtype)
    if STORE_A:  # a scaled by the routing weight: dW_down = sum_r dOut[tok_r]^T (w_r a_r), no scaling in its loop
        a_tile = a_ptr + start64 * stride_am
        tl.store(a_tile + local[:, None] * stride_am + offs_n[None, :], to_dtype(a * weight[:, None], dtype), mask=mask)
    if STORE_PART:
        per_row = tl.sum(tl.where(mask, acc * a_low.to(tl.float32), 0.0), 1)
        tl.store(part_ptr + rows64 * stride_pm + pid_n, per_row, mask=m_mask)


_PLAIN = Autotuned(
    _act_grad_kernel,
    "actgrad",
    key=["N", "K", "M_BUCKET", "STORE_A", "STORE_DH", "STORE_PART", "HAS_LORA", "R", "LORA_PRELOAD"],
    # in place, dh is written over h; the partials are zeros the launch fills column tile by column tile (their
    # number depends on BLOCK_N), so a tuning run with a narrower tile would leave columns the real launch skips
    restore=(("h_ptr", "dh_ptr"), ("part_ptr", "part_ptr")),
)


def act_grad_backward(
    grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h, counts, n, activation,
    store_a=True, store_dh=True, store_part=True, lora=None, in_place=False,
):  # fmt: skip
    """(w * a [n, I], dL/dh [n, W], row partials [n, blocks] fp32) — see the module docstring.

    ``weight_out_in`` is W_down viewed [E, H, I]; ``routing_weights`` is flat [T*K]; ``lora``: (v [n, R],
    A_down [E, R, I]) for LoRA on the down projection. ``in_place``: dh is written over h (each program reads
    its h tile before it writes the same elements of dh), so the caller's h is consumed and no [n, W] buffer is
    allocated.
    """
    num_experts, k_dim, inner = weight_out_in.shape
    width = h.shape[1]
    gated = activation.gated
    a = new_output(n if store_a else 0, inner, dtype=h.dtype, device=h.device)
    dh = h if in_place and store_dh else new_output(n if store_dh else 0, width, dtype=h.dtype, device=h.device)
    blocks = cdiv(inner, min_block_n("actgrad"))
    part = h.new_zeros(n if store_part else 0, blocks, dtype=torch.float32)
    if n == 0:
        return a, dh, part
    if gated and not activation.concatenated:
        col_stride, up_off = 2, 1
    else:
        col_stride, up_off = 1, inner

    def grid(meta):
        return (num_row_tiles(n, num_experts, meta["BLOCK_M"]) * cdiv(inner, meta["BLOCK_N"]),)

    has_lora = lora is not None
    v, la = lora if has_lora else (h, h)
    rank = v.shape[1] if has_lora else 0
    _PLAIN.get(h.dtype)[grid](
        grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h,
        a if store_a else h, dh if store_dh else counts, part if store_part else counts, counts, v, la,
        n, num_experts, inner, k_dim, rows_bucket(n, num_experts), rank,
        grad_out.stride(0), grad_out.stride(1), *weight_out_in.stride(), h.stride(0),
        a.stride(0) if store_a else 0, dh.stride(0) if store_dh else 0, part.stride(0) if store_part else 0,
        *(v.stride() if has_lora else (0, 0)), *(la.stride() if has_lora else (0, 0, 0)),
        up_off, float(activation.alpha), float(activation.limit),
        ACT=activation.kernel_id, GATED=gated, COL_STRIDE=col_stride,
        STORE_A=store_a, STORE_DH=store_dh, STORE_PART=store_part, HAS_LORA=has_lora, BLOCK_R=rank_block(rank),
        LORA_PRELOAD=lora_preload(rank),
        PRECISION=dot_precision(h.dtype), BLOCK_E=block_e(num_experts), GROUP_M=8,
    )  # fmt: skip
    return a, dh, part


@triton.jit
def _act_backward_kernel(
    ga_ptr, h_ptr, rows_ptr, rw_ptr, a_ptr, dh_ptr, part_ptr,
    n_rows, N, stride_gm, stride_hm, stride_am, stride_dm,
    up_off, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_STRIDE: tl.constexpr,
    STORE_A: tl.constexpr, STORE_DH: tl.constexpr, STORE_PART: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Elementwise half of the split dA: BLOCK_R rows per program, a loop over the I columns."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < n_rows
    r64 = tl.where(r_mask, offs_r, 0).to(tl.int64)
    weight = tl.load(rw_ptr + tl.load(rows_ptr + r64)).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    part = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (offs_c < N)[None, :]
        ga = tl.load(ga_ptr + r64[:, None] * stride_gm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = ga * weight[:, None]
        col = offs_c * COL_STRIDE
        h_rows = h_ptr + r64[:, None] * stride_hm
        dh_rows = dh_ptr + r64[:, None] * stride_dm
        if GATED:
            gate = tl.load(h_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_rows + (col + up_off)[None, :], mask=mask, other=0.0).to(tl.float32)
            a, d_gate, d_up = gated_backward(gate, up, g, alpha, limit, ACT)
            if STORE_DH:
                tl.store(dh_rows + col[None, :], to_dtype(d_gate, dtype), mask=mask)
                tl.store(dh_rows + (col + up_off)[None, :], to_dtype(d_up, dtype), mask=mask)
        else:
            hv = tl.load(h_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
            a = act_fn(hv, ACT)
            if STORE_DH:
                tl.store(dh_rows + col[None, :], to_dtype(act_backward(hv, g, ACT), dtype), mask=mask)
        if STORE_A:
            tl.store(
                a_ptr + r64[:, None] * stride_am + offs_c[None, :], to_dtype(a * weight[:, None], dtype), mask=mask
            )
        if STORE_PART:
            part += tl.sum(tl.where(mask, ga * to_dtype(a, dtype).to(tl.float32), 0.0), 1)
    if STORE_PART:
        tl.store(part_ptr + r64, part, mask=r_mask)


_ACT_BACKWARD = FastKernel(_act_backward_kernel)


def act_grad_mode(activation) -> str:
    """ "fused" or "split" for this layout: ``MOEKIT_TRITON_DA`` when set to one of them, else the default."""
    mode = os.environ.get("MOEKIT_TRITON_DA", "auto")
    if mode in ("fused", "split"):
        return mode
    return _AUTO_MODE["gated" if activation.gated else "plain"]


# measured on an H200 (see scripts/gpu_check.py): which dA variant is faster per layout
_AUTO_MODE = {"gated": "split", "plain": "split"}


def act_grad_backward_split(
    grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h, counts, n, activation,
    store_a=True, store_dh=True, store_part=True, lora=None, in_place=False, ga=None,
):  # fmt: skip
    """Same contract as ``act_grad_backward`` (partials have one column): GEMM, then the elementwise pass.

    ``ga``: dOut[tok] @ W_down[e]ᵀ [n, I] already computed by the caller (then ``lora`` must be None).
    ``in_place``: the pass writes dh over h and w * a over ga (each element is read before it is overwritten,
    by the same program), so it allocates no [n, W] or [n, I] buffer; h is consumed.
    """
    from .down_proj import grouped_gemm

    inner = weight_out_in.shape[2]
    width = h.shape[1]
    gated = activation.gated
    if n and ga is None:
        ga = grouped_gemm(grad_out, weight_out_in, counts, n, gather=token_of_row, lora=lora)  # [n, I], rounded
    elif ga is not None and lora is not None:
        raise ValueError("act_grad_backward_split: pass either ga or lora, not both (ga must include the LoRA term)")
    a = ga if in_place and store_a and n else new_output(n if store_a else 0, inner, dtype=h.dtype, device=h.device)
    dh = h if in_place and store_dh else new_output(n if store_dh else 0, width, dtype=h.dtype, device=h.device)
    part = new_output(n if store_part else 0, 1, dtype=torch.float32, device=h.device)
    if n == 0:
        return a, dh, part
    col_stride, up_off = (2, 1) if gated and not activation.concatenated else (1, inner)
    block_r, block_c, warps = (16, 16, 4) if interpreting() else (16, 256, 4)
    _ACT_BACKWARD[(cdiv(n, block_r),)](
        ga, h, sorted_rows, routing_weights, a if store_a else h, dh if store_dh else h, part if store_part else ga,
        n, inner, ga.stride(0), h.stride(0), a.stride(0) if store_a else 0, dh.stride(0) if store_dh else 0,
        up_off, float(activation.alpha), float(activation.limit),
        ACT=activation.kernel_id, GATED=gated, COL_STRIDE=col_stride,
        STORE_A=store_a, STORE_DH=store_dh, STORE_PART=store_part,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return a, dh, part
