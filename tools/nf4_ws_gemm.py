"""A warp-specialized NF4 grouped GEMM for Hopper (gluon), prototype: does a producer warpgroup that only copies and
dequantizes, beside two warpgroups that only issue MMAs, hide the dequantization that ``kernels.nf4_hopper`` pays?

    PYTHONPATH=src timeout 300 python tools/nf4_ws_gemm.py    (GPU: sm_90; a synchronization bug shows as a hang)

The engine's kernel dequantizes tile k in the same warps that then issue MMA k: without the dequantization its loop
runs 18-30 % faster at 256-row tiles (BENCHMARKS.md, the ablation), and neither a deeper pipeline, an MMA kept in
flight nor two programs an SM recovered it. Here the work is split by ``gl.warp_specialize``:

    producers (4 or 8 warps)  for tile t: wait until stage t % STAGES is free; cp.async its A rows (they arrive on
                              ready_a[s] as they land) and code bytes; then, LAG tiles behind, dequantize tile
                              t - LAG from its landed bytes into B stage (t - LAG) % STAGES and arrive on ready_b
    consumers (8 warps)       for tile k: wait for ready_a[s] and ready_b[s]; start MMA k; once MMA k - 1 is done in
                              both warpgroups, release stage (k - 1) % STAGES (arrive on empty)

The same contract as the engine's kernel for the plain product (no LoRA, bias or routing weight; rows optionally
gathered), the same tile map, dequantization and MMA order over K, so the outputs must be bit-identical to
``nf4_hopper.grouped_gemm_nf4`` at the same row tile: the script checks that, then times both on the grouped GEMMs
of tools/nf4_row_tile_bench.py. A mbarrier's arrive in gluon is made by one thread of its partition, so each
partition meets at its own barrier first; cp.async's arrive-on (no increment) is one per producer thread.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton.testing
from nf4_row_tile_bench import grouped_gemms  # tools/, beside this script
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from moekit.kernels import nf4_hopper
from moekit.kernels.nf4 import COLUMN_PAIRS, code_table
from moekit.kernels.nf4_hopper import (
    _copy_to_shared,
    _cta_barrier,
    _dequantize,
    _expert_tile,
    _mma,
    _operands,
    _tile_scales,
    _tile_shapes,
)
from moekit.kernels.tiling import block_e, cdiv, swizzle

BLOCK_N = 128
STAGES = 4  # A rows, code bytes and B tiles in flight
LAG = 2  # tiles the producer's copies run ahead of its dequantization
# producer warps: (their registers, registers a thread at launch: all warps share 64 K, then setmaxnreg moves the
# producers' spare ones to the consumers: 184 with 4 producer warps, 168 with 8)
PRODUCERS = {4: (136, 168), 8: (88, 128)}


@gluon.jit
def _consumers(a_smem, w_smem, ready_a, ready_b, empty, num_k, out_ptr, row_start, row_end, pid_n, N, stride_om,
               COLUMN_PAIRS: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr):  # fmt: skip
    """The default partition: the MMAs over K, each started as soon as its stage is in, then the masked store (in
    the partition: triton 3.6 cannot return the default partition's tensors)."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    acc = warpgroup_mma_init(gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma_layout))
    mbarrier.wait(ready_a.index(0), 0)
    mbarrier.wait(ready_b.index(0), 0)
    acc = _mma(a_smem.index(0), w_smem.index(0), acc, COLUMN_PAIRS, False)  # step 0 peeled (no use of the zeros)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    for k in range(1, num_k):
        stage = k % STAGES
        phase = (k // STAGES) & 1
        mbarrier.wait(ready_a.index(stage), phase)
        mbarrier.wait(ready_b.index(stage), phase)
        acc = _mma(a_smem.index(stage), w_smem.index(stage), acc, COLUMN_PAIRS, True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # this warpgroup's MMA k - 1 is done
        _cta_barrier()  # and the other's (a barrier of this partition)
        mbarrier.arrive(empty.index((k - 1) % STAGES))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    offs_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    out_ptrs = out_ptr + offs_m.to(gl.int64)[:, None] * stride_om + offs_n[None, :]
    gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < row_end)[:, None] & (offs_n < N)[None, :])


@gluon.jit
def _producer(a_ptr, gather_ptr, codes_ptr, scales_ptr, table_ptr, a_smem, code_smem, w_smem, ready_a, ready_b, empty,
              expert, row_start, row_end, pid_n, N, K, stride_am, stride_we, stride_wk, stride_wn,
              GATHER: gl.constexpr, COLUMN_PAIRS: gl.constexpr, STAGES: gl.constexpr, LAG: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """The worker partition: every tile's copies, and LAG tiles behind them its dequantization."""
    BK: gl.constexpr = 64
    warps: gl.constexpr = gl.num_warps()
    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [warps, 1], [1, 0])
    code_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [warps, 1], [1, 0])
    w_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [warps, 1], [1, 0])
    a_ptrs, _, code_ptrs, code_in, code_step, scale_ptrs = _operands(
        a_ptr, gather_ptr, codes_ptr, scales_ptr, expert, row_start, row_end, pid_n, N, stride_am, stride_we,
        stride_wk, stride_wn, GATHER, COLUMN_PAIRS, BLOCK_M, BLOCK_N, a_layout, code_layout,
    )  # fmt: skip
    num_k = K // BK
    scales = _tile_scales(scale_ptrs, 0, num_k, COLUMN_PAIRS)
    for t in range(num_k + LAG):
        if t < num_k:  # tile t's copies into its stage, once MMA t - STAGES has released it
            stage = t % STAGES
            mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
            _copy_to_shared(a_smem.index(stage), a_ptrs + t * BK)
            _copy_to_shared(code_smem.index(stage), code_ptrs + t * code_step, mask=code_in)
            async_copy.mbarrier_arrive(ready_a.index(stage), increment_count=False)
        async_copy.commit_group()  # one group a step (empty past K), so LAG groups stay in flight
        if t >= LAG:  # tile j = t - LAG: its bytes have landed in every thread, then its B stage
            j = t - LAG
            async_copy.wait_group(LAG)
            _cta_barrier()
            _dequantize(code_smem.index(j % STAGES), w_smem.index(j % STAGES), scales, table_ptr, COLUMN_PAIRS,
                        code_layout, w_layout)  # fmt: skip
            scales = _tile_scales(scale_ptrs, j + 1, num_k, COLUMN_PAIRS)
            fence_async_shared()  # the stores, before the MMA reads them through the async proxy
            _cta_barrier()
            mbarrier.arrive(ready_b.index(j % STAGES))


@gluon.jit
def _ws_nf4_kernel(
    a_ptr, gather_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, counts_ptr,
    n_rows, E, N, K,
    stride_am, stride_we, stride_wk, stride_wn, stride_om,
    GATHER: gl.constexpr, COLUMN_PAIRS: gl.constexpr, BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LAG: gl.constexpr,
    PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BK: gl.constexpr = 64
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    pid = gl.program_id(0)
    pid_m, pid_n = swizzle(pid, gl.cdiv(n_rows, BLOCK_M) + gl.minimum(E, n_rows), gl.cdiv(N, BLOCK_N), GROUP_M)
    total, expert, row_start, row_end = _expert_tile(counts_ptr, E, pid_m, 0, BLOCK_M, BLOCK_E, num_warps)
    if pid_m >= total:
        return

    CODE_SHAPE: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[0]
    W_SHAPE: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[1]
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BK],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BK], dtype))  # fmt: skip
    code_smem = gl.allocate_shared_memory(gl.uint8, [STAGES] + CODE_SHAPE, gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    w_smem = gl.allocate_shared_memory(dtype, [STAGES] + W_SHAPE,
                                       gl.NVMMASharedLayout.get_default_for(W_SHAPE, dtype))  # fmt: skip
    ready_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready_a.index(s), count=32 * PRODUCER_WARPS)  # every producer thread's copies
        mbarrier.init(ready_b.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    gl.warp_specialize(
        [
            (_consumers, (a_smem, w_smem, ready_a, ready_b, empty, K // BK, out_ptr, row_start, row_end, pid_n, N,
                          stride_om, COLUMN_PAIRS, STAGES, BLOCK_M, BLOCK_N)),
            (_producer, (a_ptr, gather_ptr, codes_ptr, scales_ptr, table_ptr, a_smem, code_smem, w_smem, ready_a,
                         ready_b, empty, expert, row_start, row_end, pid_n, N, K, stride_am, stride_we, stride_wk,
                         stride_wn, GATHER, COLUMN_PAIRS, STAGES, LAG, BLOCK_M, BLOCK_N)),
        ],
        [PRODUCER_WARPS],
        [PRODUCER_REGS],
    )  # fmt: skip


def ws_gemm_nf4(rows, weight_in_out, counts, n, out, mode, table, gather=None, row_tile=256, producer_warps=4):
    """out [n, N] = rows (through ``gather``) @ the NF4 weight viewed [E, K, N], every expert's rows in tiles of
    ``row_tile``, ``producer_warps`` (a key of ``PRODUCERS``) copying and dequantizing (``nf4_hopper.runs`` must
    hold)."""
    producer_regs, max_regs = PRODUCERS[producer_warps]
    num_experts, k_dim, n_dim = weight_in_out.shape
    if n == 0:
        return out
    grid = ((cdiv(n, row_tile) + min(num_experts, n)) * cdiv(n_dim, BLOCK_N),)
    _ws_nf4_kernel[grid](
        rows, gather if gather is not None else counts, weight_in_out.packed, weight_in_out.absmax, table, out, counts,
        n, num_experts, n_dim, k_dim,
        rows.stride(0), weight_in_out.stride(0), weight_in_out.stride(1), weight_in_out.stride(2), out.stride(0),
        GATHER=gather is not None, COLUMN_PAIRS=mode == COLUMN_PAIRS, BLOCK_E=block_e(num_experts), GROUP_M=8,
        BLOCK_M=row_tile, BLOCK_N=BLOCK_N, STAGES=STAGES, LAG=LAG, PRODUCER_WARPS=producer_warps,
        PRODUCER_REGS=producer_regs, num_warps=8, maxnreg=max_regs,
    )  # fmt: skip
    return out


CASES = [  # label, tokens, experts, top-k, hidden, intermediate
    ("nemotron 8k", 8192, 128, 6, 2688, 1856),
    ("qwen3 8k", 8192, 128, 8, 2048, 768),
    ("gpt-oss 8k", 8192, 32, 4, 2880, 2880),
    ("mixtral 8k", 8192, 8, 2, 4096, 14336),
]


def main() -> None:
    table = code_table(torch.device("cuda"))
    for label, name, plan, view, mode, rows in grouped_gemms(CASES):
        n, counts = plan.num_rows, plan.tokens_per_expert
        assert nf4_hopper.runs(rows, view, mode, False), "needs an sm_90 GPU and a shape the gluon kernel takes"
        for row_tile, producer_warps in itertools.product((128, 256), PRODUCERS):
            ours = torch.full((n, view.shape[2]), float("nan"), device="cuda", dtype=torch.bfloat16)
            engine = torch.full_like(ours, float("nan"))
            ws = functools.partial(ws_gemm_nf4, rows, view, counts, n, ours, mode, table, row_tile=row_tile,
                                   producer_warps=producer_warps)  # fmt: skip
            base = functools.partial(nf4_hopper.grouped_gemm_nf4, rows, view, counts, n, engine, mode, table,
                                     row_tile=row_tile)  # fmt: skip
            ws()
            base()
            torch.cuda.synchronize()
            same = torch.equal(ours[: plan.num_routed], engine[: plan.num_routed])
            ws_us = triton.testing.do_bench(ws, warmup=10, rep=60) * 1e3
            base_us = triton.testing.do_bench(base, warmup=10, rep=60) * 1e3
            print(f"{label:12s} {name:28s} bm{row_tile}: engine {base_us:8.1f} us  warp-specialized "
                  f"({producer_warps} producer warps) {ws_us:8.1f} us ({ws_us / base_us:.3f})  bit-identical {same}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
