"""The tile map and the autotuning space shared by every grouped kernel.

Tile map. The plan sorts rows by expert: expert e owns rows [start_e, start_e + count_e) with
start_e = sum(count[:e]). A grouped GEMM rounds every expert's count up to the row tile BLOCK_M, so expert e owns
ceil(count_e / BLOCK_M) row tiles and no tile straddles two experts. Program ``pid_m`` finds its (expert, row start)
inside the kernel from ``plan.tokens_per_expert`` (one vector load of E counts, a cumsum and three reductions):
no host sync, no tile-map tensor, and it stays right whatever BLOCK_M the autotuner picks. The grid is the upper
bound ceil(n / BLOCK_M) + min(E, n) row tiles (every expert wastes at most one partial tile); programs past the
real number of tiles return at once.

Autotuning. A handful of configs per GPU generation (Hopper: sm_90; Ampere and later otherwise), keyed on the
static problem sizes plus a power-of-two bucket of rows per expert, so tuning runs once per layer shape and costs
seconds. Under ``TRITON_INTERPRET=1`` a single small config is used (no benchmarking).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


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
def expert_rows(counts_ptr, E, expert, BLOCK_E: tl.constexpr):
    """(first row, end row) of ``expert``'s block."""
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    row_base = tl.sum(tl.where(offs_e < expert, cnt, 0), 0)
    count = tl.sum(tl.where(offs_e == expert, cnt, 0), 0)
    return row_base, row_base + count


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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_row_tiles(n: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a plan with n routed rows (see the module docstring)."""
    return triton.cdiv(n, block_m) + min(num_experts, n)


def block_e(num_experts: int) -> int:
    return max(triton.next_power_of_2(num_experts), 16)


def rows_bucket(n: int, num_experts: int) -> int:
    """Autotune key: rows per expert rounded to a power of two (capped), so tuning does not rerun every step."""
    return min(triton.next_power_of_2(max(n // max(num_experts, 1), 1)), 4096)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use the exact (ieee) dot so results match the reference to ~1e-5, never tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config({names[0]: bm, names[1]: bn, names[2]: bk}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _generation() -> str:
    if interpreting() or not torch.cuda.is_available():
        return "interpret"
    major, _ = torch.cuda.get_device_capability()
    return "hopper" if major >= 9 else "ampere"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel family and generation.
_SPACES = {
    "gemm": {
        "hopper": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
        "ampere": [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # two accumulators (gate and up) of BLOCK_N columns each
    "gated": {
        "hopper": [(128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
        "ampere": [(128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 3)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # weight gradients: BLOCK_M x BLOCK_N output tile, BLOCK_K rows per step
    "wgrad": {
        "hopper": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)],
        "ampere": [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
}


def configs(family: str) -> list[triton.Config]:
    return [_cfg(*c) for c in _SPACES[family][_generation()]]


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


class Autotuned:
    """A jit kernel wrapped, on first launch, in triton's autotuner over the small space of ``family``.

    Built lazily so importing moekit neither touches CUDA nor reads the environment too early. Launch as
    ``kernel[grid](...)`` with ``grid`` a function of the chosen config's meta-parameters.
    """

    def __init__(self, jit_fn, family: str, key: list[str]):
        self.jit_fn, self.family, self.key = jit_fn, family, key

    @functools.cached_property
    def tuned(self):
        return triton.autotune(configs=configs(self.family), key=self.key, do_bench=_bench)(self.jit_fn)

    def __getitem__(self, grid):
        return self.tuned[grid]
