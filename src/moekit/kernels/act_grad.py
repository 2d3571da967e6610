"""Backward through the down-projection and the activation (the "dA" step): a GEMM, then a pass over rows.

For every plan row r of expert e, with tok = token_of_row[r] and w = routing_weight[sorted_rows[r]]:

    ga[r]   = dOut[tok] @ W_down[e]ᵀ       (``grouped_gemm`` with the dOut rows gathered in its loads, or the
                                            caller's product from a dOut row copy; rounded to the input dtype,
                                            as the reference does)
    aw[r]   = w * act(h[r])                recomputed from the cached pre-activation, stored for dW_down
    part[r] = <ga[r], a[r]>                the routing-weight gradient <dOut, y> without y (the host adds
                                           <dOut[tok], b_down[e]>)
    dh[r]   = act'(h[r]) applied to w * ga[r]   (gate and up columns for gated layouts)

With LoRA on the down projection, ga also carries (dOut[tok] @ B_down[e]) @ A_down[e] (the GEMM's ``lora=``), so
dh and the routing-weight gradient include the LoRA part of y. The pass is memory-bound and writes each output
element from exactly one program (no atomics, deterministic). The activation backward fused into the GEMM's
epilogue was measured slower at every benchmark shape (its register use rules out the large GEMM tiles) and was
removed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import act_backward, act_fn, gated_backward
from .grouped_gemm import grouped_gemm
from .launch import FastKernel
from .numerics import interpreting, new_output, to_dtype
from .tiling import cdiv


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


def act_grad_backward(
    grad_out, token_of_row, sorted_rows, routing_weights, weight_out_in, h, counts, n, activation,
    store_a=True, store_dh=True, store_part=True, lora=None, in_place=False, ga=None,
):  # fmt: skip
    """(w * a [n, I] or empty, dh [n, W] or empty, part [n, 1] fp32 or empty), each only when its store_* asks.

    ``lora``: (v [n, R], A_down [E, R, I]) for the GEMM's LoRA term.

    ``ga``: dOut[tok] @ W_down[e]ᵀ [n, I] already computed by the caller (then ``lora`` must be None).
    ``in_place``: the pass writes dh over h and w * a over ga (each element is read before it is overwritten,
    by the same program), so it allocates no [n, W] or [n, I] buffer; h is consumed.
    """
    inner = weight_out_in.shape[2]
    width = h.shape[1]
    gated = activation.gated
    if n and ga is None:
        ga = grouped_gemm(grad_out, weight_out_in, counts, n, gather=token_of_row, lora=lora)  # [n, I], rounded
    elif ga is not None and lora is not None:
        raise ValueError("act_grad_backward: pass either ga or lora, not both (ga must include the LoRA term)")
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
