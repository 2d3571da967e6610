"""In-place LoRA add: the second half of a split LoRA GEMM (the engine's base product on grouped_mm, then this).

    out[r] += u[r] @ L[e]        r in expert e's block; out [n, N] (a base product grouped_mm made), u [n, R]
                                 plan rows, L viewed [E, R, N]: fp32 sum of the two, one rounding

Forward down-projection: u = a @ A_down[e]ᵀ, L = (s B_down[e])ᵀ; dX: u = dh @ B_up[e], L = A_up[e] (read in its
own dtype, rounded per tile); dA's GEMM from the dOut row copy: u = dOut[tok] @ B_down[e], L = A_down[e].

The pass is memory-bound: one read and one write of out. Each program owns one row tile of one expert (the tile
map of ``tiling``) and sweeps all N columns in a pipelined loop, so the tile map and (with one rank step) u's tile
are loaded once per row tile rather than once per output tile: on an H200 this measured about 1.35x the
bandwidth of the same add as a grouped-GEMM tile per program at Nemotron's and Qwen3's shapes. Sentinel rows
(past the routed ones) are never touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import dot_precision, mma, to_dtype
from .tiling import block_e, expert_tile, num_row_tiles, one_rank_step, rank_block, rows_bucket, tile_rows
from .tuning import Autotuned


@triton.jit
def _lora_add_kernel(
    out_ptr, u_ptr, l_ptr, counts_ptr, E, N, R, M_BUCKET,
    stride_om, stride_um, stride_ur, stride_le, stride_lr, stride_ln,
    ONE_STEP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    total, expert, row_start, row_end = expert_tile(counts_ptr, E, pid_m, BLOCK_M, BLOCK_E)
    if pid_m >= total:
        return
    _, m_mask, rows64 = tile_rows(row_start, row_end, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    u_rows = u_ptr + rows64[:, None] * stride_um
    l_base = l_ptr + expert.to(tl.int64) * stride_le
    out_rows = out_ptr + rows64[:, None] * stride_om
    if ONE_STEP:  # R <= BLOCK_R: u's tile once for the whole sweep, and no inner loop (the sweep is what the
        # compiler pipelines: the next column tile's loads are in flight while this one is added and stored)
        ut = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=(offs_r < R)[None, :], other=0.0)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.load(out_rows + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
        l_ptrs = l_base + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln
        if ONE_STEP:
            lt = tl.load(l_ptrs, mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
            acc = mma(ut, lt, acc, PRECISION)
        else:
            for r_start in range(0, R, BLOCK_R):
                r_mask = offs_r < R - r_start
                ut = tl.load(u_rows + (r_start + offs_r)[None, :] * stride_ur, mask=r_mask[None, :], other=0.0)
                lt = tl.load(l_ptrs + r_start * stride_lr, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(ut, lt, acc, PRECISION)
        tl.store(
            out_rows + offs_n[None, :], to_dtype(acc, out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :]
        )


_KERNEL = Autotuned(_lora_add_kernel, "lora_add", key=["N", "R", "M_BUCKET"], restore=(("out_ptr", "out_ptr"),))


def lora_add(out: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """out [n, N] += u [n, R] @ factor[e] [R, N] for plan rows [0, n) in place (``factor`` viewed [E, R, N], any
    strides and float dtype); returns ``out``."""
    num_experts, rank, n_dim = factor.shape
    if out.shape != (n, n_dim) or out.dtype != u.dtype or out.stride(1) != 1:
        raise ValueError(
            f"lora_add: out must be [{n}, {n_dim}] {u.dtype} with unit column stride, "
            f"got {list(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if u.shape != (n, rank):
        raise ValueError(f"lora_add: u must be [{n}, {rank}] (rows, the factor's rank), got {list(u.shape)}")
    if n == 0 or rank == 0:
        return out
    block_r = rank_block(rank)

    def grid(meta):
        return (num_row_tiles(n, num_experts, meta["BLOCK_M"]),)

    _KERNEL.get(u.dtype)[grid](
        out, u, factor, counts, num_experts, n_dim, rank, rows_bucket(n, num_experts),
        out.stride(0), *u.stride(), *factor.stride(),
        ONE_STEP=one_rank_step(rank), PRECISION=dot_precision(u.dtype), BLOCK_E=block_e(num_experts), BLOCK_R=block_r,
    )  # fmt: skip
    return out
