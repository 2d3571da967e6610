"""The NF4 grouped GEMMs on Hopper, in gluon: each warpgroup MMA runs while the next weight tile is dequantized.

    out[r] = (A[r] @ W[e] (+ u[r] @ L[e]) (+ bias[e])) * (routing_weight[sorted_rows[r]] if SCALE)

``grouped_gemm``'s contract (same arguments, same tile map, same epilogue) for an NF4 weight whose byte pairs run
along one tile axis (``nf4.ROW_PAIRS``: along K, the stored [E, out, in] weight read as [E, in, out];
``nf4.COLUMN_PAIRS``: along N, the transposed read) with bf16 / fp16 rows. ``tl.dot`` on a tile dequantized in
registers makes every MMA wait for its tile's stores (BENCHMARKS.md, "NF4 experts"); here the loop is written out:

    wait for tile k's A rows and code bytes (cp.async, STAGES - 1 tiles ahead)
    dequantize tile k into B buffer k % 2 (codebook shuffle, block scale, round)  <- MMA k - 1 runs meanwhile
    wait for MMA k - 1 in every warpgroup; start the copies of tile k + STAGES - 1 into the stage it freed
    start MMA k on A stage k % STAGES and B buffer k % 2 (pairs along N: before those copies)

Steps of BLOCK_K = 64 (K a multiple of 64, so every block of 64 scales one step of a column or one row of 64
columns). LoRA: after the main loop each rank chunk of u [BLOCK_M, BLOCK_R] and L [BLOCK_R, BLOCK_N] is rounded
to the rows' dtype in shared memory and one more MMA adds it into the accumulator.

Byte pairs along K at 256-row tiles take a second kernel (``_register_nf4_kernel``, described above it), which
computes the transposed tile with the dequantized weight as the MMA's register operand: no B tile in shared memory
at all. Gluon has no interpreter: the CPU suite compiles both kernels for sm_90 (tests/test_nf4_hopper.py), the
GPU suite checks them against the Triton kernel of ``grouped_gemm`` and the reference (tests/gpu/test_gpu_nf4.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from .launch import FastKernel
from .nf4 import _CODE_ENTRY_PTX, _ENTRY_LOOKUP_PTX, COLUMN_PAIRS, ROW_PAIRS, nf4_expert
from .numerics import interpreting
from .tiling import block_e, cdiv, num_row_tiles, rank_block, swizzle

# names newer triton changed (3.6's second): cp.async into shared memory, and a barrier of the whole CTA
_copy_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

BLOCK_K = 64  # one block of 64 scales per step
BLOCK_N = 128
STAGES = 3
NUM_WARPS = 8


# Which rows of each expert's block a launch tiles (``ROWS``): all of them, in tiles of its BLOCK_M; or the rows in
# 256-row tiles (HEAD) but the last ones where they would fill at most half of one, which a second launch takes in
# one 128-row tile (TAIL): an expert of 384 rows is then 256 + 128 rows of MMA instead of 512.
ALL_ROWS, HEAD, TAIL = 0, 1, 2
SPLIT = 256  # the head's row tile; a remainder of at most SPLIT // 2 rows goes to the tail
_ALL_ROWS: gl.constexpr = gl.constexpr(ALL_ROWS)  # the same values inside jit functions
_HEAD: gl.constexpr = gl.constexpr(HEAD)
_TAIL: gl.constexpr = gl.constexpr(TAIL)
_SPLIT: gl.constexpr = gl.constexpr(SPLIT)


def row_launches(n: int, num_experts: int) -> list[tuple[int, int]]:
    """The launches (row tile, ``ROWS``) of a grouped GEMM over n plan rows, by the rows an expert averages (timed by
    tools/nf4_row_tile_bench.py on an H200): under 256, 128-row tiles (a weight tile's dequantization then serves
    few rows: 1.7x faster than 256 at 96 rows); 256 to 1024, 256-row heads and 128-row tails (4-7 % faster than
    256-row tiles alone at 384, 512 and 1024 rows; 0-2 % at 1536); above, 256-row tiles (at 2048 rows an expert
    the tail launch's last, partly empty wave cost more than the padding it saves)."""
    if n < SPLIT * num_experts:
        return [(SPLIT // 2, ALL_ROWS)]
    if n <= 4 * SPLIT * num_experts:
        return [(SPLIT, HEAD), (SPLIT // 2, TAIL)]
    return [(SPLIT, ALL_ROWS)]


def _row_tiles(n: int, num_experts: int, block_m: int, rows: int) -> int:
    """Upper bound on a launch's row tiles (``_expert_tile``'s count): at most one tail tile an expert."""
    return min(num_experts, n) if rows == TAIL else num_row_tiles(n, num_experts, block_m)


def runs(rows: torch.Tensor, weight, mode: int, lowrank: bool) -> bool:
    """Whether ``grouped_gemm`` takes this kernel: an sm_90 GPU (not the interpreter), bf16 / fp16 rows with unit
    column stride and 16-byte aligned rows, an NF4 weight with byte pairs along a tile axis, K a multiple of 64
    (and N of 16 for pairs along N)."""
    if lowrank or mode not in (ROW_PAIRS, COLUMN_PAIRS) or interpreting() or not rows.is_cuda:
        return False
    if rows.dtype not in (torch.bfloat16, torch.float16) or rows.stride(1) != 1 or rows.stride(0) % 8:
        return False
    if rows.data_ptr() % 16 or weight.shape[1] % BLOCK_K or (mode == COLUMN_PAIRS and weight.shape[2] % 16):
        return False
    return torch.cuda.get_device_capability(rows.device) == (9, 0)


@gluon.constexpr_function
def _tile_shapes(column_pairs, block_n):
    """(code bytes, dequantized W) shapes of one BLOCK_K = 64 step of a weight tile: [64, BLOCK_N / 2] and
    [64, BLOCK_N] for byte pairs along N, [BLOCK_N, 32] and [BLOCK_N, 64] for pairs along K."""
    if column_pairs:
        return [BLOCK_K, block_n // 2], [BLOCK_K, block_n]
    return [block_n, BLOCK_K // 2], [block_n, BLOCK_K]


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _expert_tile(counts_ptr, E, pid_m, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_E: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
    """``tiling.expert_tile`` in gluon, over the rows ``ROWS`` of each expert: (real row tiles, expert, first row,
    end row of the tiled rows) of ``pid_m``."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs_e = gl.arange(0, BLOCK_E, layout=layout)
    cnt = gl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(gl.int32)
    first = cnt * 0
    span = cnt
    if ROWS != _ALL_ROWS:  # HEAD or TAIL: the head ends before a remainder of 1 .. SPLIT / 2 rows, which is the tail
        rest = cnt % _SPLIT
        head = gl.where((rest > 0) & (rest <= _SPLIT // 2), cnt - rest, cnt)
        if ROWS == _HEAD:
            span = head
        else:
            first = head
            span = cnt - head
    tiles = (span + BLOCK_M - 1) // BLOCK_M
    cum = gl.associative_scan(tiles, 0, _add)  # inclusive
    expert = gl.sum((cum <= pid_m).to(gl.int32), 0)
    before = offs_e < expert
    tile_base = gl.sum(gl.where(before, tiles, 0), 0)
    mine = offs_e == expert
    start = gl.sum(gl.where(before, cnt, 0) + gl.where(mine, first, 0), 0)
    return gl.sum(tiles, 0), expert, start + (pid_m - tile_base) * BLOCK_M, start + gl.sum(gl.where(mine, span, 0), 0)


@gluon.jit
def _program_tile(counts_ptr, n_rows, E, N, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The tile map of ``tiling.gemm_program`` over the rows ``ROWS`` (the grid's row tiles: ``_row_tiles``): (row
    tile, column tile, real row tiles, expert, first row, end row) of this program; row tiles past the real ones
    have nothing to do."""
    if ROWS == _TAIL:
        num_pid_m = gl.minimum(E, n_rows)
    else:
        num_pid_m = gl.cdiv(n_rows, BLOCK_M) + gl.minimum(E, n_rows)
    pid_m, pid_n = swizzle(gl.program_id(0), num_pid_m, gl.cdiv(N, BLOCK_N), GROUP_M)
    total, expert, row_start, row_end = _expert_tile(counts_ptr, E, pid_m, ROWS, BLOCK_M, BLOCK_E, num_warps)
    return pid_m, pid_n, total, expert, row_start, row_end


@gluon.jit
def _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, t, num_k, code_step, STAGES: gl.constexpr,
               BK: gl.constexpr):  # fmt: skip
    """Start the copies of tile t's A rows and code bytes (``code_in``: those in range; the others read 0) into
    stage t % STAGES, one commit group (empty past K)."""
    _copy_to_shared(a_smem.index(t % STAGES), a_ptrs + t * BK, mask=t < num_k)
    _copy_to_shared(code_smem.index(t % STAGES), code_ptrs + t * code_step, mask=code_in & (t < num_k))
    async_copy.commit_group()


@gluon.jit
def _tile_scales(scale_ptrs, t, num_k, COLUMN_PAIRS: gl.constexpr):
    """Tile t's block scales: one per column of W (ROW_PAIRS), or per row of the tile its two 64-column blocks."""
    if COLUMN_PAIRS:
        first = gl.load(scale_ptrs[0] + t * scale_ptrs[2], mask=t < num_k)
        second = gl.load(scale_ptrs[1] + t * scale_ptrs[2], mask=t < num_k)
    else:
        first = gl.load(scale_ptrs[0] + t, mask=t < num_k)
        second = first
    return first, second


@gluon.jit
def _codebook_entry(table_ptr, shape: gl.constexpr, layout: gl.constexpr):
    """This lane's codebook entry (NF4_CODE[lane % 16], fp32) as a tensor of ``shape`` in ``layout``, for
    ``_code_values``: loaded once before a kernel's loop (ptxas keeps one register of it)."""
    table = table_ptr + gl.zeros(shape, gl.int32, layout=layout)
    return gl.inline_asm_elementwise(_CODE_ENTRY_PTX, "=f,l", [table], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _code_values(byte, entry):
    """(NF4_CODE[byte >> 4], NF4_CODE[byte & 15]) (fp32) of uint8 code bytes: the word lookup of
    ``nf4._decode_bytes``, four bytes a call, shuffled from ``entry`` (``_codebook_entry`` in the bytes' layout)."""
    return gl.inline_asm_elementwise(_ENTRY_LOOKUP_PTX, "=f,=f,=f,=f,=f,=f,=f,=f,r,f,f,f,f", [byte, entry],
                                     dtype=(gl.float32, gl.float32), is_pure=True, pack=4)  # fmt: skip


@gluon.jit
def _dequantize(code_stage, w_buffer, scales, entry, COLUMN_PAIRS: gl.constexpr, code_layout: gl.constexpr,
                w_layout: gl.constexpr):  # fmt: skip
    """Dequantize a tile's code bytes (``code_stage``) with its ``scales`` into ``w_buffer``: W's [BLOCK_N, BLOCK_K]
    rows (ROW_PAIRS, bytes [BLOCK_N, BLOCK_K / 2]) or [BLOCK_K, BLOCK_N] (COLUMN_PAIRS, bytes [BLOCK_K, BLOCK_N / 2])
    in the operand dtype; ``entry``: ``_codebook_entry`` in ``code_layout``."""
    byte = code_stage.load(code_layout)
    high, low = _code_values(byte, entry)
    if COLUMN_PAIRS:  # byte j of a row holds columns 2j, 2j + 1: the first 32 bytes are the first block
        pair = gl.arange(0, byte.shape[1], layout=gl.SliceLayout(0, code_layout))
        scale = gl.where((pair < 32)[None, :], scales[0][:, None], scales[1][:, None])
    else:
        scale = scales[0][:, None]
    w = gl.reshape(gl.join(high * scale, low * scale), [byte.shape[0], 2 * byte.shape[1]])  # 2j + 1 beside 2j
    w_buffer.store(gl.convert_layout(w.to(w_buffer.dtype), w_layout))


@gluon.jit
def _dequantize_tile(code_smem, w_smem, scales, entry, k, STAGES: gl.constexpr, COLUMN_PAIRS: gl.constexpr,
                     code_layout: gl.constexpr, w_layout: gl.constexpr):  # fmt: skip
    """Wait for tile k's copies, then dequantize its code bytes with its ``scales`` into B buffer k % 2."""
    async_copy.wait_group(STAGES - 2)  # this thread's copies of tile k are done
    _cta_barrier()  # and every thread's
    _dequantize(code_smem.index(k % STAGES), w_smem.index(k % 2), scales, entry, COLUMN_PAIRS, code_layout,
                w_layout)  # fmt: skip
    fence_async_shared()  # the stores, before the MMA reads them through the async proxy
    _cta_barrier()


@gluon.jit
def _mma(a_stage, w_buffer, acc, COLUMN_PAIRS: gl.constexpr, use_acc: gl.constexpr):
    """Start an MMA: acc += ``a_stage`` @ ``w_buffer`` (asynchronous)."""
    if COLUMN_PAIRS:
        b = w_buffer
    else:
        b = w_buffer.permute((1, 0))
    return warpgroup_mma(a_stage, b, acc, use_acc=use_acc, is_async=True)


@gluon.jit
def _lora(acc, u_ptr, l_ptr, rows64, expert, offs_n, n_in, R, stride_um, stride_ur, stride_le, stride_lr, stride_ln,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_R: gl.constexpr, num_warps: gl.constexpr,
          TRANSPOSED: gl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] + u[rows] @ L[expert], or (TRANSPOSED: the register-operand kernel's acc [BLOCK_N,
    BLOCK_M]) acc + (u[rows] @ L[expert])ᵀ = L[expert]ᵀ @ uᵀ, over the rank BLOCK_R at a time, each chunk rounded to
    the operand dtype. The L tile is [BLOCK_R, BLOCK_N] or, TRANSPOSED, [BLOCK_N, BLOCK_R]: ``L_AXIS`` is its N axis."""
    dtype: gl.constexpr = u_ptr.dtype.element_ty
    u_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])
    if TRANSPOSED:
        l_layout: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
        L_SHAPE: gl.constexpr = [BLOCK_N, BLOCK_R]
        L_AXIS: gl.constexpr = 0
    else:
        l_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        L_SHAPE: gl.constexpr = [BLOCK_R, BLOCK_N]
        L_AXIS: gl.constexpr = 1
    u_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_R],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_R], dtype))  # fmt: skip
    l_smem = gl.allocate_shared_memory(dtype, L_SHAPE, gl.NVMMASharedLayout.get_default_for(L_SHAPE, dtype))
    u_rows = gl.convert_layout(rows64, gl.SliceLayout(1, u_layout))
    l_cols = gl.convert_layout(offs_n, gl.SliceLayout(1 - L_AXIS, l_layout))
    l_cols_in = gl.convert_layout(n_in, gl.SliceLayout(1 - L_AXIS, l_layout))
    for r0 in range(0, R, BLOCK_R):
        ur = r0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, u_layout))
        u = gl.load(u_ptr + u_rows[:, None] * stride_um + ur[None, :] * stride_ur, mask=(ur < R)[None, :], other=0.0)
        lr = r0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(L_AXIS, l_layout))
        l_ptrs = (l_ptr + expert.to(gl.int64) * stride_le + gl.expand_dims(lr, L_AXIS) * stride_lr
                  + gl.expand_dims(l_cols, 1 - L_AXIS) * stride_ln)  # fmt: skip
        lt = gl.load(l_ptrs, mask=gl.expand_dims(lr < R, L_AXIS) & gl.expand_dims(l_cols_in, 1 - L_AXIS), other=0.0)
        _cta_barrier()  # every warpgroup's previous chunk MMA is done with the buffers
        u_smem.store(u.to(dtype))
        l_smem.store(lt.to(dtype))
        fence_async_shared()
        _cta_barrier()
        if TRANSPOSED:
            acc = warpgroup_mma(l_smem, u_smem.permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(u_smem, l_smem, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return acc


@gluon.jit
def _operands(a_ptr, gather_ptr, codes_ptr, scales_ptr, expert, row_start, row_end, pid_n, N, stride_am, stride_we,
              stride_wk, stride_wn, GATHER: gl.constexpr, COLUMN_PAIRS: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, a_layout: gl.constexpr, code_layout: gl.constexpr):  # fmt: skip
    """Where a program's tiles come from: (A row pointers at k = 0 [BLOCK_M, BLOCK_K], their plan rows clamped into
    the expert's block, code byte pointers at k = 0, which bytes are in range, the bytes' step along K, the block
    scales' pointers for ``_tile_scales``)."""
    BK: gl.constexpr = 64
    CODE_ROWS: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[0][0]
    CODE_COLS: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[0][1]
    # A rows (token rows through ``gather`` when GATHER), clamped into the expert's block: loads stay in bounds
    offs_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
    rows64 = gl.where(offs_m < row_end, offs_m, row_start).to(gl.int64)
    if GATHER:
        a_rows = gl.load(gather_ptr + rows64).to(gl.int64)
    else:
        a_rows = rows64
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + gl.arange(0, BK, layout=gl.SliceLayout(0, a_layout))[None, :]
    # the expert's codes and scales; columns past N read code 0 and a scale in range (finite values, never stored)
    w_codes, w_scales = nf4_expert(codes_ptr, scales_ptr, expert, stride_we)
    code_r = gl.arange(0, CODE_ROWS, layout=gl.SliceLayout(1, code_layout))
    code_c = gl.arange(0, CODE_COLS, layout=gl.SliceLayout(0, code_layout))
    if COLUMN_PAIRS:  # bytes [BK rows k, BLOCK_N / 2 column pairs]; a row's two blocks at 64-column steps
        gl.static_assert(BLOCK_N == 128, "two blocks of 64 columns")
        pair = pid_n * (BLOCK_N // 2) + code_c
        code_ptrs = w_codes + code_r[:, None] * (stride_wk // 2) + pair[None, :]
        code_in = (pair < N // 2)[None, :]  # N a multiple of 16 (``runs``): whole words in or out
        code_step = BK * (stride_wk // 2)
        block = code_r * (stride_wk // 64) + pid_n * (BLOCK_N // 64)
        last_block = code_r * (stride_wk // 64) + (N - 1) // 64
        scale_ptrs = (w_scales + block, w_scales + gl.minimum(block + 1, last_block), BK * (stride_wk // 64))
    else:  # bytes [BLOCK_N columns n, BK / 2 row pairs]; a column's block is the step
        cols = gl.minimum(pid_n * BLOCK_N + code_r, N - 1)
        code_ptrs = w_codes + cols[:, None] * (stride_wn // 2) + code_c[None, :]
        code_in = (code_c >= 0)[None, :]
        code_step = BK // 2
        scale_ptrs = (w_scales + cols * (stride_wn // 64), w_scales, 0)
    return a_ptrs, rows64, code_ptrs, code_in, code_step, scale_ptrs


@gluon.jit
def _grouped_nf4_kernel(
    a_ptr, gather_ptr, codes_ptr, scales_ptr, table_ptr, b_ptr, rw_ptr, rows_ptr, out_ptr, counts_ptr, u_ptr, l_ptr,
    n_rows, E, N, K, R,
    stride_am, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_om,
    stride_um, stride_ur, stride_le, stride_lr, stride_ln,
    GATHER: gl.constexpr, HAS_BIAS: gl.constexpr, SCALE: gl.constexpr, HAS_LORA: gl.constexpr,
    BLOCK_R: gl.constexpr, COLUMN_PAIRS: gl.constexpr, BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr,
    ROWS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BK: gl.constexpr = 64
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n, total, expert, row_start, row_end = _program_tile(counts_ptr, n_rows, E, N, ROWS, BLOCK_M, BLOCK_N,
                                                                    BLOCK_E, GROUP_M, num_warps)  # fmt: skip
    if pid_m >= total:
        return

    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    code_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    w_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    CODE_SHAPE: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[0]
    W_SHAPE: gl.constexpr = _tile_shapes(COLUMN_PAIRS, BLOCK_N)[1]
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BK],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BK], dtype))  # fmt: skip
    code_smem = gl.allocate_shared_memory(gl.uint8, [STAGES] + CODE_SHAPE, gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    w_smem = gl.allocate_shared_memory(dtype, [2] + W_SHAPE, gl.NVMMASharedLayout.get_default_for(W_SHAPE, dtype))

    a_ptrs, rows64, code_ptrs, code_in, code_step, scale_ptrs = _operands(
        a_ptr, gather_ptr, codes_ptr, scales_ptr, expert, row_start, row_end, pid_n, N, stride_am, stride_we,
        stride_wk, stride_wn, GATHER, COLUMN_PAIRS, BLOCK_M, BLOCK_N, a_layout, code_layout,
    )  # fmt: skip
    num_k = K // BK
    entry = _codebook_entry(table_ptr, CODE_SHAPE, code_layout)

    for t in gl.static_range(STAGES - 1):
        _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, t, num_k, code_step, STAGES, BK)
    # step 0 peeled, so no path reaches an MMA wait through the accumulator's zeros (ptxas would serialize them)
    scales = _tile_scales(scale_ptrs, 0, num_k, COLUMN_PAIRS)
    _dequantize_tile(code_smem, w_smem, scales, entry, 0, STAGES, COLUMN_PAIRS, code_layout, w_layout)
    scales = _tile_scales(scale_ptrs, 1, num_k, COLUMN_PAIRS)  # each tile's a step ahead, off the critical path
    _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, STAGES - 1, num_k, code_step, STAGES, BK)
    acc = warpgroup_mma_init(gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma_layout))
    acc = _mma(a_smem.index(0), w_smem.index(0), acc, COLUMN_PAIRS, False)
    for k in range(1, num_k):
        _dequantize_tile(code_smem, w_smem, scales, entry, k, STAGES, COLUMN_PAIRS, code_layout, w_layout)
        scales = _tile_scales(scale_ptrs, k + 1, num_k, COLUMN_PAIRS)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))  # this warpgroup's MMA k - 1 is done
        _cta_barrier()  # and every warpgroup's: its A stage and B buffer may be overwritten
        if COLUMN_PAIRS:  # MMA k before the copies: measured faster for pairs along N only (BENCHMARKS.md)
            acc = _mma(a_smem.index(k % STAGES), w_smem.index(k % 2), acc, COLUMN_PAIRS, True)
            _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, k + STAGES - 1, num_k, code_step, STAGES, BK)
        else:
            _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, k + STAGES - 1, num_k, code_step, STAGES, BK)
            acc = _mma(a_smem.index(k % STAGES), w_smem.index(k % 2), acc, COLUMN_PAIRS, True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    # epilogue in the accumulator's layout: + u @ L[e], + bias, * routing weight; one rounding, masked store
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    n_in = offs_n < N
    out_rows = gl.convert_layout(rows64, gl.SliceLayout(1, mma_layout))
    out_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    if HAS_LORA:
        acc = _lora(acc, u_ptr, l_ptr, rows64, expert, offs_n, n_in, R, stride_um, stride_ur, stride_le, stride_lr,
                    stride_ln, BLOCK_M, BLOCK_N, BLOCK_R, num_warps, False)  # fmt: skip
    if HAS_BIAS:
        bias = gl.load(b_ptr + expert.to(gl.int64) * stride_be + offs_n * stride_bn, mask=n_in, other=0.0)
        acc += bias.to(gl.float32)[None, :]
    if SCALE:
        slot = gl.load(rows_ptr + out_rows)
        acc *= gl.load(rw_ptr + slot).to(gl.float32)[:, None]
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :]
    gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(out_m < row_end)[:, None] & n_in[None, :])


_GROUPED_NF4 = FastKernel(_grouped_nf4_kernel)  # repeat launches skip gluon's per-call argument binding


# The weight as the register operand (byte pairs along K at 256-row tiles, ``_uses_register_weight``): the
# transposed product out[rows, cols]ᵀ = W[e]ᵀ[cols, K] @ A[rows, K]ᵀ, its first operand the weight tile
# dequantized in the registers the warpgroup MMA reads (``_WEIGHT_BYTES`` is the layout of a tile's code bytes
# whose elements land there), its second the A rows in shared memory. Each warpgroup dequantizes only its own 64
# weight rows and the tile never goes through shared memory: no B-tile stores, fence or barrier for them, and the
# wgmma reads only the A rows from shared memory. A loop step:
#
#     wait for tile k's A rows and code bytes (cp.async, STAGES - 2 tiles ahead); barrier: every warpgroup is past
#     its wait for MMA k - 2, so its stage takes tile k + STAGES - 2's copies now
#     dequantize tile k into register set k % 2                       <- MMA k - 1 runs meanwhile
#     start MMA k; wait for MMA k - 1, which frees register set (k - 1) % 2
#
# Two register sets alternate (an MMA reads its register operand until the wait that retires it), so the loop is
# unrolled by two and K's steps of 64 are counted even or odd on the host (``EVEN_STEPS``).
REGISTER_STAGES = 4
# tile row n's byte j holds elements 2j and 2j + 1 of W[e]ᵀ's row n: the operand layout's (n, k) with k // 2 = j
_WEIGHT_BYTES: gl.constexpr = gl.DistributedLinearLayout(
    reg_bases=[[8, 0], [0, 4], [0, 8], [0, 16]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
    warp_bases=[[16, 0], [32, 0], [64, 0]], block_bases=[], shape=[BLOCK_N, BLOCK_K // 2])  # fmt: skip


def _uses_register_weight(mode: int, block_m: int) -> bool:
    """Whether a launch takes the register-operand kernel: byte pairs along K at 256-row tiles, where it beat the
    kernel above on the same buffers at every benchmark shape; at 128-row tiles it lost (16 byte loads a thread a
    step), and for pairs along N too (a scale load per k row: BENCHMARKS.md, "the weight as the register operand")."""
    return mode == ROW_PAIRS and block_m == SPLIT


@gluon.jit
def _weight_registers(code_stage, scale, entry, dtype: gl.constexpr, byte_layout: gl.constexpr,
                      w_layout: gl.constexpr):  # fmt: skip
    """A weight tile [BLOCK_N, 64] in the registers of the MMA's first operand (``w_layout``) from its code bytes
    (``code_stage`` [BLOCK_N, 32], loaded in ``byte_layout``: ``_WEIGHT_BYTES``) and the scale of each of its rows;
    ``entry``: ``_codebook_entry`` in ``byte_layout``."""
    byte = code_stage.load(byte_layout)
    high, low = _code_values(byte, entry)
    row_scale = scale[:, None]
    w = gl.reshape(gl.join(high * row_scale, low * row_scale), [byte.shape[0], 2 * byte.shape[1]])
    return gl.convert_layout(w.to(dtype), w_layout, assert_trivial=True)


@gluon.jit
def _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry, k, num_k,
                   STAGES: gl.constexpr, dtype: gl.constexpr, byte_layout: gl.constexpr,
                   w_layout: gl.constexpr):  # fmt: skip
    """Wait for tile k's copies, start tile k + STAGES - 2's, dequantize tile k: (its registers, tile k + 1's row
    scales)."""
    async_copy.wait_group(STAGES - 3)  # this thread's copies of tile k are done
    _cta_barrier()  # and every thread's; every warpgroup is past its wait for MMA k - 2, whose stage is reused now
    _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, k + STAGES - 2, num_k, 32, STAGES, 64)
    w = _weight_registers(code_smem.index(k % STAGES), scale, entry, dtype, byte_layout, w_layout)
    return w, gl.load(scale_ptrs + (k + 1), mask=k + 1 < num_k, other=1.0)


@gluon.jit
def _register_mma(w, a_smem, acc, k, older, STAGES: gl.constexpr):
    """Start MMA k (acc += w @ A stage k ᵀ), then wait for MMA k - 1, whose registers ``older`` are free after it."""
    acc = warpgroup_mma(w, a_smem.index(k % STAGES).permute((1, 0)), acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc, older))


@gluon.jit
def _register_nf4_kernel(
    a_ptr, gather_ptr, codes_ptr, scales_ptr, table_ptr, b_ptr, rw_ptr, rows_ptr, out_ptr, counts_ptr, u_ptr, l_ptr,
    n_rows, E, N, K, R,
    stride_am, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_om,
    stride_um, stride_ur, stride_le, stride_lr, stride_ln,
    GATHER: gl.constexpr, HAS_BIAS: gl.constexpr, SCALE: gl.constexpr, HAS_LORA: gl.constexpr,
    BLOCK_R: gl.constexpr, BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, ROWS: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, EVEN_STEPS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BK: gl.constexpr = 64
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    gl.static_assert(BLOCK_N == 128 and num_warps == 8, "_WEIGHT_BYTES: 128 weight rows over two warpgroups")
    pid_m, pid_n, total, expert, row_start, row_end = _program_tile(counts_ptr, n_rows, E, N, ROWS, BLOCK_M, BLOCK_N,
                                                                    BLOCK_E, GROUP_M, num_warps)  # fmt: skip
    if pid_m >= total:
        return

    a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    code_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    w_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    byte_layout: gl.constexpr = _WEIGHT_BYTES
    out_layout: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])  # 8 columns a store
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BK],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BK], dtype))  # fmt: skip
    code_smem = gl.allocate_shared_memory(
        gl.uint8, [STAGES, BLOCK_N, BK // 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    a_ptrs, rows64, code_ptrs, code_in, code_step, _ = _operands(
        a_ptr, gather_ptr, codes_ptr, scales_ptr, expert, row_start, row_end, pid_n, N, stride_am, stride_we,
        stride_wk, stride_wn, GATHER, False, BLOCK_M, BLOCK_N, a_layout, code_layout,
    )  # fmt: skip
    _, w_scales = nf4_expert(codes_ptr, scales_ptr, expert, stride_we)
    scale_rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, byte_layout)), N - 1)
    scale_ptrs = w_scales + scale_rows * (stride_wn // 64)  # a weight row's block is the step
    num_k = K // BK
    entry = _codebook_entry(table_ptr, [BLOCK_N, BK // 2], byte_layout)

    for t in gl.static_range(STAGES - 2):
        _copy_tile(a_smem, code_smem, a_ptrs, code_ptrs, code_in, t, num_k, code_step, STAGES, BK)
    scale = gl.load(scale_ptrs)
    acc = warpgroup_mma_init(gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma_layout))
    # the loop takes steps in pairs (register sets b, then a) after a step in set a: an even count peels two
    if EVEN_STEPS:
        w_b, scale = _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry, 0,
                                    num_k, STAGES, dtype, byte_layout, w_layout)  # fmt: skip
        acc = warpgroup_mma(w_b, a_smem.index(0).permute((1, 0)), acc, use_acc=False, is_async=True)
        acc, w_b = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_b))
        w_a, scale = _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry, 1,
                                    num_k, STAGES, dtype, byte_layout, w_layout)  # fmt: skip
        acc, w_b = _register_mma(w_a, a_smem, acc, 1, w_b, STAGES)
    else:
        w_a, scale = _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry, 0,
                                    num_k, STAGES, dtype, byte_layout, w_layout)  # fmt: skip
        acc = warpgroup_mma(w_a, a_smem.index(0).permute((1, 0)), acc, use_acc=False, is_async=True)
        acc, w_a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, w_a))
    for k in range(1 + EVEN_STEPS, num_k, 2):
        w_b, scale = _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry, k,
                                    num_k, STAGES, dtype, byte_layout, w_layout)  # fmt: skip
        acc, w_a = _register_mma(w_b, a_smem, acc, k, w_a, STAGES)
        w_a, scale = _register_step(a_smem, code_smem, a_ptrs, code_ptrs, code_in, scale, scale_ptrs, entry,
                                    k + 1, num_k, STAGES, dtype, byte_layout, w_layout)  # fmt: skip
        acc, w_b = _register_mma(w_a, a_smem, acc, k + 1, w_b, STAGES)
    acc, w_a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_a))
    async_copy.wait_group(0)

    # epilogue on acc [cols, rows]: + (u @ L[e])ᵀ, + bias per column, * routing weight per row; one rounding, then
    # each thread's 8 consecutive columns of a row in one store
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
    n_in = offs_n < N
    if HAS_LORA:
        acc = _lora(acc, u_ptr, l_ptr, rows64, expert, offs_n, n_in, R, stride_um, stride_ur, stride_le, stride_lr,
                    stride_ln, BLOCK_M, BLOCK_N, BLOCK_R, num_warps, True)  # fmt: skip
    if HAS_BIAS:
        bias = gl.load(b_ptr + expert.to(gl.int64) * stride_be + offs_n * stride_bn, mask=n_in, other=0.0)
        acc += bias.to(gl.float32)[:, None]
    if SCALE:
        slot = gl.load(rows_ptr + gl.convert_layout(rows64, gl.SliceLayout(0, mma_layout)))
        acc *= gl.load(rw_ptr + slot).to(gl.float32)[None, :]
    out = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), out_layout)
    out_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))
    out_m = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_layout))
    out_rows = gl.convert_layout(rows64, gl.SliceLayout(0, out_layout))
    out_ptrs = out_ptr + out_rows[None, :] * stride_om + out_n[:, None]
    gl.store(out_ptrs, out, mask=(out_m < row_end)[None, :] & (out_n < N)[:, None])


_REGISTER_NF4 = FastKernel(_register_nf4_kernel)


def grouped_gemm_nf4(rows, weight_in_out, counts, n, out, mode, table, gather=None, bias=None, routing_weights=None,
                     sorted_rows=None, lora=None, row_tile=None):  # fmt: skip
    """``grouped_gemm`` on these kernels (``runs`` said yes): fills and returns ``out`` [n, N], in the launches of
    ``row_launches`` (or all rows in tiles of ``row_tile``, 128 or 256: tools/nf4_row_tile_bench.py times them),
    each on the register-operand kernel where ``_uses_register_weight``."""
    num_experts, k_dim, n_dim = weight_in_out.shape
    launches = [(row_tile, ALL_ROWS)] if row_tile else row_launches(n, num_experts)
    u, lw = lora if lora is not None else (out, out)
    rank = u.shape[1] if lora is not None else 0
    scales = weight_in_out.absmax  # fp32 (a double-quantized weight's dequantized here, once for both launches)
    for bm, part in launches:  # each fills its own rows of out
        grid = (_row_tiles(n, num_experts, bm, part) * cdiv(n_dim, BLOCK_N),)
        args = (
            rows, gather if gather is not None else counts, weight_in_out.packed, scales, table,
            bias if bias is not None else out, routing_weights if routing_weights is not None else out,
            sorted_rows if routing_weights is not None else counts, out, counts, u, lw,
            n, num_experts, n_dim, k_dim, rank,
            rows.stride(0), weight_in_out.stride(0), weight_in_out.stride(1), weight_in_out.stride(2),
            *(bias.stride() if bias is not None else (0, 0)), out.stride(0),
            *(u.stride() if lora is not None else (0, 0)), *(lw.stride() if lora is not None else (0, 0, 0)),
        )  # fmt: skip
        shared = {
            "GATHER": gather is not None,
            "HAS_BIAS": bias is not None,
            "SCALE": routing_weights is not None,
            "HAS_LORA": lora is not None,
            "BLOCK_R": rank_block(rank),
            "BLOCK_E": block_e(num_experts),
            "GROUP_M": 8,
            "ROWS": part,
            "BLOCK_M": bm,
            "BLOCK_N": BLOCK_N,
            "num_warps": NUM_WARPS,
        }
        if _uses_register_weight(mode, bm):
            _REGISTER_NF4[grid](*args, STAGES=REGISTER_STAGES, EVEN_STEPS=(k_dim // BLOCK_K) % 2 == 0, **shared)
        else:
            _GROUPED_NF4[grid](*args, COLUMN_PAIRS=mode == COLUMN_PAIRS, STAGES=STAGES, **shared)
    return out
