"""A Hopper NF4 GEMM in gluon whose warpgroup MMA runs while the next weight tile is dequantized (GPU only).

out[M, N] = x[M, K] @ W[N, K]^T with W in NF4 (bitsandbytes' packing: elements 2j and 2j + 1 of a row in byte j,
the first in the high nibble; one fp32 scale per 64 elements). ``tl.dot`` cannot express this overlap: triton makes
a warpgroup MMA whose B tile was stored from registers finish before the loop goes on (BENCHMARKS.md, "NF4
experts"). Here the B tile is double-buffered in shared memory and the loop is written out by hand:

    wait for tile k's x and code bytes (cp.async, S stages ahead)
    dequantize tile k's codes into B buffer k % 2        <- MMA k - 1 runs meanwhile on the tensor cores
    wait for MMA k - 1 (every warpgroup's); start the copies of tile k + S - 1 into the stage it freed
    start MMA k on x stage k % S and B buffer k % 2

A prototype for ``tools/nf4_operand_bench.py`` (its ``pipelined (gluon)`` rows), which times it and checks its
values on a GPU. Gluon does not run under the interpreter: on the CPU a test only compiles it for sm_90
(tests/test_cli_tools.py). moekit's engine does not use it.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from moekit.kernels.nf4 import _WORD_LOOKUP_PTX

# names that newer triton changed (3.6's first): cp.async into shared memory, and a barrier of the whole CTA
_copy_to_shared = getattr(async_copy, "async_load", async_copy.async_copy_global_to_shared)
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _copy_tile(x_smem, code_smem, x_ptrs, x_rows_in, code_ptrs, t, num_k, STAGES: gl.constexpr, BK: gl.constexpr):
    """Start the copies of tile t's x and code bytes into stage t % STAGES, as one commit group (empty past K)."""
    _copy_to_shared(x_smem.index(t % STAGES), x_ptrs + t * BK, mask=x_rows_in & (t < num_k))
    _copy_to_shared(code_smem.index(t % STAGES), code_ptrs + t * (BK // 2), mask=t < num_k)
    async_copy.commit_group()


@gluon.jit
def _dequantize_tile(code_smem, w_smem, scale, table_ptr, k, STAGES: gl.constexpr, BN: gl.constexpr,
                     BK: gl.constexpr, code_layout: gl.constexpr, w_layout: gl.constexpr):  # fmt: skip
    """Wait for tile k's copies, dequantize its [BN, BK / 2] code bytes with its [BN] scales into B buffer k % 2 as
    bf16 [BN, BK]."""
    async_copy.wait_group(STAGES - 2)  # this thread's copies of tile k are done
    _cta_barrier()  # and every thread's
    byte = code_smem.index(k % STAGES).load(code_layout)
    table = table_ptr + gl.zeros([BN, BK // 2], gl.int32, layout=code_layout)
    high, low = gl.inline_asm_elementwise(_WORD_LOOKUP_PTX, "=f,=f,=f,=f,=f,=f,=f,=f,r,l,l,l,l", [byte, table],
                                          dtype=(gl.float32, gl.float32), is_pure=True, pack=4)  # fmt: skip
    scale = scale[:, None]
    w = gl.reshape(gl.join(high * scale, low * scale), [BN, BK])  # element 2j + 1 beside 2j
    w_smem.index(k % 2).store(gl.convert_layout(w.to(gl.bfloat16), w_layout))
    fence_async_shared()  # the stores, before the MMA reads them through the async proxy
    _cta_barrier()


@gluon.jit
def nf4_gemm_pipelined(x_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, M, N, K,
                       BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    BK: gl.constexpr = 64  # one block of 64 elements of every weight row per step
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    code_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    w_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    # [num_warps, 1] warps over the rows, instruction tile 16 x BN x 16 (bf16)
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])  # fmt: skip
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK],
                                       gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))  # fmt: skip
    code_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BN, BK // 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BN, BK],
                                       gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16))  # fmt: skip

    rows_x = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, x_layout))
    x_ptrs = x_ptr + rows_x[:, None] * K + gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))[None, :]
    x_rows_in = (rows_x < M)[:, None]
    rows_w = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, code_layout))
    code_ptrs = (
        codes_ptr + rows_w[:, None] * (K // 2) + gl.arange(0, BK // 2, layout=gl.SliceLayout(0, code_layout))[None, :]
    )
    scale_ptrs = scales_ptr + rows_w * (K // 64)
    num_k = K // BK

    for t in gl.static_range(STAGES - 1):
        _copy_tile(x_smem, code_smem, x_ptrs, x_rows_in, code_ptrs, t, num_k, STAGES, BK)
    # step 0 peeled, so that no path reaches an MMA wait through the accumulator's zeros (ptxas would serialize)
    scale = gl.load(scale_ptrs)  # tile 0's; each later tile's loads a step ahead, off the dequantization's path
    _dequantize_tile(code_smem, w_smem, scale, table_ptr, 0, STAGES, BN, BK, code_layout, w_layout)
    scale = gl.load(scale_ptrs + 1, mask=num_k > 1)
    _copy_tile(x_smem, code_smem, x_ptrs, x_rows_in, code_ptrs, STAGES - 1, num_k, STAGES, BK)
    acc = warpgroup_mma_init(gl.zeros((BM, BN), gl.float32, layout=mma_layout))
    acc = warpgroup_mma(x_smem.index(0), w_smem.index(0).permute((1, 0)), acc, use_acc=False, is_async=True)
    for k in range(1, num_k):
        # tile k dequantizes while MMA k - 1 runs
        _dequantize_tile(code_smem, w_smem, scale, table_ptr, k, STAGES, BN, BK, code_layout, w_layout)
        scale = gl.load(scale_ptrs + k + 1, mask=k + 1 < num_k)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))  # this warpgroup's MMA k - 1 is done
        _cta_barrier()  # and every warpgroup's: its x stage and B buffer k - 1 may be overwritten
        _copy_tile(x_smem, code_smem, x_ptrs, x_rows_in, code_ptrs, k + STAGES - 1, num_k, STAGES, BK)
        acc = warpgroup_mma(x_smem.index(k % STAGES), w_smem.index(k % 2).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    out = gl.convert_layout(acc.to(gl.bfloat16), out_layout)
    rows_o = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
    cols_o = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
    gl.store(out_ptr + rows_o[:, None] * N + cols_o[None, :], out, mask=(rows_o < M)[:, None])


def launch(x, packed, scales, table, out, bm=128, bn=128, stages=3, num_warps=8):
    """out = x @ dequantize(packed, scales)^T; N a multiple of ``bn``, K of 64."""
    m, k = x.shape
    n = packed.shape[0]
    grid = (triton.cdiv(m, bm), n // bn)
    nf4_gemm_pipelined[grid](x, packed, scales, table, out, m, n, k, bm, bn, stages, num_warps=num_warps)
