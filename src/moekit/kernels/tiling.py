"""The tile map: which rows and columns each program of a grouped kernel owns.

The plan sorts rows by expert: expert e owns rows [start_e, start_e + count_e) with start_e = sum(count[:e]). A
grouped GEMM rounds every expert's count up to the row tile BLOCK_M, so expert e owns ceil(count_e / BLOCK_M) row
tiles and no tile straddles two experts. Program ``pid_m`` finds its (expert, row start) inside the kernel from
``plan.tokens_per_expert`` (one vector load of E counts, a cumsum and three reductions): no host sync, no tile-map
tensor, and it stays right whatever BLOCK_M the autotuner picks. The grid is the upper bound
ceil(n / BLOCK_M) + min(E, n) row tiles (every expert wastes at most one partial tile); programs past the real
number of tiles return at once.

In-kernel (``@triton.jit``): ``expert_tile``, ``swizzle``, ``gemm_program`` (both for a row x column tile grid),
``tile_rows`` (a tile's rows and masks), ``source_rows`` / ``load_rows`` (operand rows, gathered through an
index or not). On the host: the integer helpers that size grids and tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .numerics import interpreting


@triton.jit
def expert_tile(counts_ptr, E, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(number of real row tiles, expert, first row, end row of the expert) of row tile ``pid_m``."""
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive
    total = tl.sum(tiles, 0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    before = offs_e < expert
    tile_base = tl.sum(tl.where(before, tiles, 0), 0)
    row_base = tl.sum(tl.where(before, cnt, 0), 0)
    count = tl.sum(tl.where(offs_e == expert, cnt, 0), 0)
    row_start = row_base + (pid_m - tile_base) * BLOCK_M
    return total, expert, row_start, row_base + count


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each column sweep (L2 reuse of weights and rows)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def gemm_program(
    counts_ptr, n_rows, E, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """This program's place in a grouped GEMM's grid of row tiles x column tiles (in ``swizzle`` order):
    (spare: past the real row tiles, so nothing to do; column tile; expert; first row; end row of the expert)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(n_rows, BLOCK_M) + tl.minimum(E, n_rows)
    pid_m, pid_n = swizzle(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    total, expert, row_start, row_end = expert_tile(counts_ptr, E, pid_m, BLOCK_M, BLOCK_E)
    return pid_m >= total, pid_n, expert, row_start, row_end


@triton.jit
def tile_rows(row_start, row_end, BLOCK_M: tl.constexpr):
    """(the tile's plan rows, their mask, the rows as int64 clamped into the expert's block: loads through them
    stay in bounds without a row mask; only the stores need it)."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows64 = tl.where(m_mask, offs_m, row_start).to(tl.int64)
    return offs_m, m_mask, rows64


@triton.jit
def source_rows(index_ptr, rows, GATHER: tl.constexpr):
    """The operand rows (int64) of plan rows ``rows``: ``index[rows]`` when GATHER (token rows), else ``rows``."""
    if GATHER:
        src = tl.load(index_ptr + rows).to(tl.int64)
    else:
        src = rows
    return src


@triton.jit
def load_rows(ptr, index_ptr, rows, cols, stride_m, stride_c, rows_mask, cols_mask, GATHER: tl.constexpr):
    """The tile ptr[source row, col] [len(rows), len(cols)] of plan rows ``rows`` (``source_rows``), 0 where
    ``rows_mask`` or ``cols_mask`` is off."""
    src = source_rows(index_ptr, rows, GATHER)
    return tl.load(
        ptr + src[:, None] * stride_m + cols[None, :] * stride_c,
        mask=rows_mask[:, None] & cols_mask[None, :],
        other=0.0,
    )


# Host-side integer helpers. triton.cdiv / next_power_of_2 are constexpr functions in newer triton (~2 µs a call
# through their wrapper); the launch path calls these a few dozen times per step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def num_row_tiles(n: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a plan with n routed rows (see the module docstring)."""
    return cdiv(n, block_m) + min(num_experts, n)


def block_e(num_experts: int) -> int:
    return max(next_power_of_2(num_experts), 16)


def rows_bucket(n: int, num_experts: int) -> int:
    """Autotune key: rows per expert rounded to a power of two (capped), so tuning does not rerun every step."""
    return min(next_power_of_2(max(n // max(num_experts, 1), 1)), 4096)


def rank_block(rank: int, cap: int = 64) -> int:
    """Tile width over a LoRA rank R: the next power of two, at least 16 (tl.dot's minimum), at most ``cap``
    (larger ranks take several steps or tiles)."""
    return max(16, min(next_power_of_2(max(rank, 1)), cap))


def one_rank_step(rank: int) -> bool:
    """Whether a LoRA rank fits one step of ``rank_block``: then the fused-LoRA GEMMs load the u / L tiles before
    the main loop and multiply them after it (``LORA_PRELOAD``), so their latency hides under the main loop
    instead of adding to every tile's tail; larger ranks take a loop over R after the main loop."""
    return 0 < rank <= rank_block(rank)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (8 under the interpreter / on the CPU)."""
    if device.type != "cuda" or interpreting():
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
