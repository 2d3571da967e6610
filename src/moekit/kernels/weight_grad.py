"""Weight (and bias) gradients: per expert, a reduction over the expert's own rows. No atomics.

    dW[e][p, q] = sum over rows r of expert e of L[r, p] * R[r, q]          (stored layout through strides)
    db[e][p]    = sum over rows r of expert e of s_r * L[r, p]              (fp32 sum; s_r = 1 or the weight)

L and R rows are read through the plan inside the kernel (both operands go straight from memory to shared
memory: no register pass in the main loop):
  down: L[r] = dOut[token_of_row[r]] (gathered), R = w_r * a_r (plan-sorted, written scaled by the dA kernel),
        s_r = w_r = routing_weight[sorted_rows[r]];              dW_down stored [E, H, I] or [E, I, H]
  up:   L[r] = dL/dh[r] (plan-sorted), R[r] = x[token_of_row[r]] (gathered);  dW_up stored [E, W, H] or [E, H, W]

Work split. An expert owns only ~T*K/E rows (a few hundred at the model shapes), far too short a reduction to
hide a GEMM's prologue and epilogue when each program does one (expert, tile). So every expert's rows are cut
into chunks of BLOCK_K rows (a chunk never straddles two experts; ``chunk_table`` lists them, built on the
device without a host sync), and a program owns one (p, q) output tile for a group of consecutive experts: it
runs ONE flat loop over all the chunks of its experts (software-pipelined across expert boundaries), and at the
last chunk of each expert stores that expert's tile and resets the accumulator. Every output element is written
exactly once by one program (experts without rows get explicit zeros), in a fixed order: deterministic. The bias
sum is fused into the programs of the first q tile. With COMPUTE_W off (frozen weight, trainable bias) only
those programs run and no GEMM is done.

LoRA factor gradients use the same kernel with the rank on the Q side (``lowrank=True``: its own autotuning
space, BLOCK_N fitted to R at launch):
  dB_down[e] [H, R] = Σ dOut[tok]ᵀ (w u_down)      dA_down[e] [R, I] = (Σ (w a)ᵀ v_down)ᵀ   (transposed_out)
  (w u_down: the routing weight is applied to the right rows in the loop, ``scale_right``)
  dB_up[e]   [W, R] = Σ dhᵀ u_up                   dA_up[e]   [R, H] = (Σ x[tok]ᵀ v_up)ᵀ    (transposed_out)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FastKernel
from .numerics import dot_precision, mma, new_output, to_dtype
from .tiling import block_e, cdiv, load_rows, num_sms, rank_block, rows_bucket
from .tuning import Autotuned, wgrad_block_k


@triton.jit
def _weight_grad_kernel(
    l_ptr, l_idx_ptr, rows_ptr, rw_ptr, r_ptr, r_idx_ptr, out_ptr, db_ptr,
    counts_ptr, expert_chunk_ptr, chunk_expert_ptr, chunk_row_ptr, chunk_end_ptr,
    E, P, Q, M_BUCKET, alpha,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_oe, stride_op, stride_oq, stride_dbe,
    GATHER_L: tl.constexpr, SCALE_L: tl.constexpr, GATHER_R: tl.constexpr, SCALE_R: tl.constexpr,
    COMPUTE_W: tl.constexpr, COMPUTE_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    group = tl.program_id(1)
    per_group = tl.cdiv(E, tl.num_programs(1))
    e_first = tl.minimum(group * per_group, E)
    e_last = tl.minimum(e_first + per_group, E)
    num_q = tl.cdiv(Q, BLOCK_N) if COMPUTE_W else 1
    pid_p = pid // num_q
    pid_q = pid % num_q

    offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_q = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    offs_k = tl.arange(0, BLOCK_K)
    out_offs = offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :].to(tl.int64) * stride_oq
    out_mask = p_mask[:, None] & q_mask[None, :]
    out_dtype = out_ptr.dtype.element_ty
    db_dtype = db_ptr.dtype.element_ty

    c_first = tl.load(expert_chunk_ptr + e_first)
    c_last = tl.load(expert_chunk_ptr + e_last)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(c_first, c_last):
        expert = tl.load(chunk_expert_ptr + c)
        row_start = tl.load(chunk_row_ptr + c)
        row_end = tl.load(chunk_end_ptr + c)
        rows = row_start + offs_k
        r_mask = rows < row_end
        rows_c = tl.where(r_mask, rows, row_start).to(tl.int64)
        lt = load_rows(l_ptr, l_idx_ptr, rows_c, offs_p, stride_lm, stride_lp, r_mask, p_mask, GATHER_L)  # [K, M]
        if COMPUTE_W:
            rt = load_rows(r_ptr, r_idx_ptr, rows_c, offs_q, stride_rm, stride_rq, r_mask, q_mask, GATHER_R)  # [K, N]
            if SCALE_R:  # right rows times their routing weight, rounded to the operand dtype; rows past the chunk
                # (clamped to its first row) load weight 0, so a NaN/Inf weight of that row does not enter twice
                w_r = tl.load(rw_ptr + tl.load(rows_ptr + rows_c), mask=r_mask, other=0.0).to(tl.float32)
                rt = to_dtype(rt.to(tl.float32) * w_r[:, None], r_ptr.dtype.element_ty)
            acc = mma(tl.trans(lt), rt, acc, PRECISION)
        if COMPUTE_B:  # noqa: SIM102 (constexpr, then a runtime test)
            if pid_q == 0:
                lf = lt.to(tl.float32)
                if SCALE_L:
                    w_l = tl.load(rw_ptr + tl.load(rows_ptr + rows_c), mask=r_mask, other=0.0)  # as w_r above
                    lf = lf * w_l.to(tl.float32)[:, None]
                bsum += tl.sum(lf, 0)
        if row_start + BLOCK_K >= row_end:  # the expert's last chunk: its tile is complete
            e64 = expert.to(tl.int64)
            if COMPUTE_W:
                tl.store(out_ptr + e64 * stride_oe + out_offs, to_dtype(acc * alpha, out_dtype), mask=out_mask)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if COMPUTE_B:  # noqa: SIM102
                if pid_q == 0:
                    tl.store(db_ptr + e64 * stride_dbe + offs_p, to_dtype(bsum, db_dtype), mask=p_mask)
                    bsum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # experts of this group without rows own no chunk: their gradients are exact zeros
    for e in range(e_first, e_last):
        if tl.load(counts_ptr + e) == 0:
            e64 = tl.cast(e, tl.int64)
            if COMPUTE_W:
                tl.store(out_ptr + e64 * stride_oe + out_offs, tl.zeros((BLOCK_M, BLOCK_N), out_dtype), mask=out_mask)
            if COMPUTE_B:  # noqa: SIM102
                if pid_q == 0:
                    tl.store(db_ptr + e64 * stride_dbe + offs_p, tl.zeros((BLOCK_M,), db_dtype), mask=p_mask)


_WG_KEY = ["P", "Q", "M_BUCKET", "GATHER_L", "SCALE_L", "GATHER_R", "SCALE_R", "COMPUTE_W", "COMPUTE_B"]
_KERNEL = Autotuned(_weight_grad_kernel, "wgrad", key=_WG_KEY)
_LOWRANK = Autotuned(_weight_grad_kernel, "wgrad_lr", key=_WG_KEY)


@triton.jit
def _chunk_table_kernel(
    counts_ptr, expert_chunk_ptr, chunk_expert_ptr, chunk_row_ptr, chunk_end_ptr, E, C, block_k,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``chunk_table`` in one launch: every program rebuilds the per-expert chunk counts and their scans from the
    E row counts (one vector load) and fills BLOCK_C chunk entries; program 0 also writes ``expert_chunk``."""
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    cnt = tl.load(counts_ptr + offs_e, mask=e_mask, other=0).to(tl.int32)
    chunks = (cnt + block_k - 1) // block_k
    chunk_end = tl.cumsum(chunks, 0)  # inclusive: first chunk of the next expert
    if pid == 0:
        tl.store(expert_chunk_ptr + offs_e + 1, chunk_end, mask=e_mask)
        tl.store(expert_chunk_ptr + offs_e, tl.zeros((BLOCK_E,), tl.int32), mask=offs_e == 0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    # expert of chunk c: experts whose chunks end at or before c (torch.searchsorted(..., right=True)), clamped
    done = (chunk_end[None, :] <= offs_c[:, None]) & e_mask[None, :]
    expert = tl.minimum(tl.sum(done.to(tl.int32), 1), E - 1)
    before = offs_e[None, :] < expert[:, None]
    first_chunk = tl.sum(tl.where(before, chunks[None, :], 0), 1)
    row_base = tl.sum(tl.where(before, cnt[None, :], 0), 1)
    row_end = row_base + tl.sum(tl.where(offs_e[None, :] == expert[:, None], cnt[None, :], 0), 1)
    c_mask = offs_c < C
    tl.store(chunk_expert_ptr + offs_c, expert, mask=c_mask)
    tl.store(chunk_row_ptr + offs_c, row_base + (offs_c - first_chunk) * block_k, mask=c_mask)
    tl.store(chunk_end_ptr + offs_c, row_end, mask=c_mask)


_CHUNK_TABLE = FastKernel(_chunk_table_kernel)


def chunk_table(counts: torch.Tensor, n: int, block_k: int):
    """Chunks of ``block_k`` rows, expert by expert, built on the device (no host sync, one launch).

    Returns (expert_chunk [E+1] int32: first chunk of each expert, exclusive scan, and the total last;
    chunk_expert, chunk_row, chunk_end [C] int32: the expert, first row and the expert's end row of every chunk),
    with C = n // block_k + E an upper bound on the number of chunks (entries past the total are unused).
    """
    num_experts = counts.numel()
    if num_experts == 0 or num_experts > 4096:
        return chunk_table_torch(counts, n, block_k)
    num_chunks = n // block_k + num_experts
    device = counts.device
    expert_chunk = torch.empty(num_experts + 1, device=device, dtype=torch.int32)
    chunk_expert, chunk_row, chunk_end = (torch.empty(num_chunks, device=device, dtype=torch.int32) for _ in range(3))
    block_c = 16 if num_experts > 512 else 32
    _CHUNK_TABLE[(cdiv(num_chunks, block_c),)](
        counts, expert_chunk, chunk_expert, chunk_row, chunk_end, num_experts, num_chunks, block_k,
        BLOCK_E=block_e(num_experts), BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return expert_chunk, chunk_expert, chunk_row, chunk_end


def chunk_table_torch(counts: torch.Tensor, n: int, block_k: int):
    """``chunk_table`` with torch ops (about a dozen launches): the specification the kernel is tested against."""
    num_experts = counts.numel()
    cnt = counts.to(torch.int32)
    chunks = (cnt + block_k - 1) // block_k
    expert_chunk = torch.zeros(num_experts + 1, device=counts.device, dtype=torch.int32)
    torch.cumsum(chunks, 0, out=expert_chunk[1:])
    row_base = torch.zeros(num_experts + 1, device=counts.device, dtype=torch.int32)
    torch.cumsum(cnt, 0, out=row_base[1:])
    c = torch.arange(n // block_k + num_experts, device=counts.device, dtype=torch.int32)
    chunk_expert = torch.searchsorted(expert_chunk[1:], c, right=True, out_int32=True).clamp_(
        max=max(num_experts - 1, 0)
    )
    chunk_row = row_base[chunk_expert] + (c - expert_chunk[chunk_expert]) * block_k
    chunk_end = row_base[chunk_expert + 1]
    return expert_chunk, chunk_expert, chunk_row, chunk_end


def weight_grad(
    left, right, counts, n, num_experts, out_shape_pq, out_dtype, transposed_out,
    left_index=None, right_index=None, routing_weights=None, sorted_rows=None,
    compute_w=True, bias_dtype=None, chunks=None, lowrank=False, scale_right=False, out=None, alpha=1.0,
):  # fmt: skip
    """Per-expert Lᵀ R over plan rows; returns (dW in the stored layout or None, db [E, P] or None).

    ``left`` [*, P] rows taken through ``left_index`` (gather) when given, else plan-sorted; same for ``right``.
    ``routing_weights`` (flat [T*K]) with ``sorted_rows`` scale the rows of ``left`` in the bias sum only, or,
    with ``scale_right``, the rows of ``right`` in the weight product (each product rounded to right's dtype).
    The weight is returned [E, P, Q], or [E, Q, P] when ``transposed_out`` (written directly, no copy).
    ``chunks``: a ``chunk_table(counts, n, wgrad_block_k(left.dtype))`` to share between calls.
    ``lowrank``: Q is a LoRA rank (small): BLOCK_N fitted to it (weight only, no bias).
    ``out``: the weight's buffer, in that shape and ``out_dtype``, any non-overlapping strides (a LoRA factor's
    gradient in its parameter's layout); ``alpha`` multiplies the weight before its one rounding.
    """
    p_dim, q_dim = out_shape_pq
    compute_b = bias_dtype is not None
    device = left.device
    if compute_w:
        shape = (num_experts, q_dim, p_dim) if transposed_out else (num_experts, p_dim, q_dim)
        if out is not None and (tuple(out.shape) != shape or out.dtype != out_dtype):
            raise ValueError(f"out must be a {out_dtype} tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        dw = out if out is not None else new_output(*shape, device=device, dtype=out_dtype)
        s_e = dw.stride(0)
        s_p, s_q = (dw.stride(2), dw.stride(1)) if transposed_out else (dw.stride(1), dw.stride(2))
    else:
        dw, s_e, s_p, s_q = None, 0, 0, 0
    db = new_output(num_experts, p_dim, device=device, dtype=bias_dtype) if compute_b else None
    if not compute_w and not compute_b:
        return None, None
    if num_experts == 0:
        return dw, db
    if chunks is None:
        chunks = chunk_table(counts, n, wgrad_block_k(left.dtype))
    dummy = dw if dw is not None else db
    scale = routing_weights is not None
    target_programs = 16 * num_sms(device)

    def grid(meta):
        tiles = cdiv(p_dim, meta["BLOCK_M"]) * (cdiv(q_dim, meta["BLOCK_N"]) if compute_w else 1)
        return (tiles, max(1, min(num_experts, target_programs // tiles)))

    kernel, extra = (_LOWRANK, {"BLOCK_N": rank_block(q_dim, 128)}) if lowrank else (_KERNEL, {})
    kernel.get(left.dtype)[grid](
        left, left_index if left_index is not None else counts, sorted_rows if scale else counts,
        routing_weights if scale else dummy, right, right_index if right_index is not None else counts,
        dummy, db if compute_b else dummy, counts, *chunks,
        num_experts, p_dim, q_dim, rows_bucket(n, num_experts), float(alpha),
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), s_e, s_p, s_q,
        db.stride(0) if compute_b else 0,
        GATHER_L=left_index is not None, SCALE_L=scale and compute_b, GATHER_R=right_index is not None,
        SCALE_R=scale and scale_right and compute_w,
        COMPUTE_W=compute_w, COMPUTE_B=compute_b, PRECISION=dot_precision(left.dtype), **extra,
    )  # fmt: skip
    return dw, db
