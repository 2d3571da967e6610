"""NF4 weights as a GEMM's B operand: each [BLOCK_K, BLOCK_N] tile dequantized as the main loop loads it.

An ``NF4Tensor`` view [E, K, N] (``moekit.quant.tensor``) keeps the dense weight's strides over two flat buffers,
the weight as stored: element (e, k, n) is at offset f = e·stride(0) + k·stride(1) + n·stride(2), its 4-bit code in
byte f >> 1 of ``packed`` (the high nibble when f is even) and its scale at f >> 6 of ``absmax``:

    w[e, k, n] = NF4_CODE[code(f)] * absmax[f >> 6]      in fp32; ``mma`` rounds it to the operand dtype

A kernel advances the codes by expert·stride(0) / 2 and the scales by expert·stride(0) / 64 (int64; every expert
is whole blocks of 64) and names a tile by the int32 offset of its first element inside the expert, its strides
and how many of its rows and columns are in range (``nf4_expert``, ``nf4_tile``). No dequantized copy of a weight
exists anywhere: only the tile in registers.

The codebook lookup is a warp shuffle (``_decode``; ``_decode_bytes`` for a word of four code bytes): lane l holds
NF4_CODE[l % 16] and a code c reads lane c, so no element gathers from memory (gathers from a table in L1 cost a
wavefront per distinct line). Byte permutes over the codebook's byte planes, which spare the shared-memory pipe the
shuffles load, were no faster on Hopper: the NF4 GEMMs are latency-bound, because triton makes the MMA on a tile
stored from registers wait for that tile (BENCHMARKS.md). Where one tile axis has unit stride and the
64-element blocks line up with the tile (``nf4_mode``, on the host), the tile is read as the half-length tile of its
bytes, each the pair of elements along that axis: contiguous, so the loads are vectorised and the software pipeliner
stages them like any GEMM operand, and the scales are one per column (blocks along K) or one per row and 64 columns
(blocks along N), broadcast in registers. Elsewhere each element takes its own byte and scale. Past a tile's rows
and columns its values are finite (the zero-padded A tile cancels them, the stores mask them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.nf4 import nf4_code
from ..quant.tensor import NF4Tensor

# The kernels' W_NF4 constexpr: how the B operand is read
DENSE = 0  # a plain tensor: tl.load
ELEMENTS = 1  # NF4, one code byte, lookup and scale per element
COLUMN_PAIRS = 2  # NF4, elements 2j and 2j + 1 of a tile row share a byte, a row's blocks span 64 columns
ROW_PAIRS = 3  # NF4, elements 2i and 2i + 1 of a tile column share a byte, a column's block spans the tile
_ELEMENTS: tl.constexpr = tl.constexpr(ELEMENTS)  # the same values inside jit functions
_ROW_PAIRS: tl.constexpr = tl.constexpr(ROW_PAIRS)
# ``numerics.interpreting()`` (numerics imports this module, so it is read here again)
_INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def nf4_mode(weight, cols: int, column_shift: int = 0) -> int:
    """The W_NF4 constexpr for a B operand ``weight`` viewed [E, K, N] whose tiles start at rows that are multiples
    of BLOCK_K (which divides 64) and at columns that are multiples of BLOCK_N plus ``column_shift``, with K rows
    and ``cols`` columns in range (the kernel's column count). Pairs need every byte inside the tile and its
    blocks of 64 lined up with the tiles: stored rows a multiple of 64 long (so also every expert's first row)."""
    if not isinstance(weight, NF4Tensor):
        return DENSE
    _, rows, _ = weight.shape
    _, stride_k, stride_n = weight.stride()
    if stride_n == 1 and stride_k % 64 == 0 and column_shift % 64 == 0 and cols % 2 == 0:
        return COLUMN_PAIRS
    if stride_k == 1 and stride_n % 64 == 0 and rows % 2 == 0:
        return ROW_PAIRS
    return ELEMENTS


def code_table(device: torch.device) -> torch.Tensor:
    """fp32 [16]: the NF4 codebook on ``device`` (cached per device; 64 bytes, one L1 line)."""
    key = str(device)
    table = _CODE_TABLES.get(key)
    if table is None:
        table = _CODE_TABLES[key] = nf4_code(device)
    return table


_CODE_TABLES: dict[str, torch.Tensor] = {}


def weight_operands(weight, cols: int, column_shift: int = 0) -> tuple:
    """(w_ptr, ws_ptr, code_ptr, W_NF4) kernel arguments of a B operand (``nf4_mode``): an NF4 weight's codes,
    scales, codebook (``code_table``) and mode, or a dense weight and itself twice as placeholders (never read)."""
    mode = nf4_mode(weight, cols, column_shift)
    if mode == DENSE:
        return weight, weight, weight, DENSE
    return weight.packed, weight.absmax, code_table(weight.device), mode


@triton.jit
def nf4_expert(codes_ptr, scales_ptr, expert, stride_we):
    """(codes, scales) of expert ``expert``: the buffers advanced by its first element's offset (int64)."""
    first = expert.to(tl.int64) * stride_we
    return codes_ptr + first // 2, scales_ptr + first // 64


@triton.jit
def _decode(code, table_ptr):
    """NF4_CODE[code] (fp32) for int32 codes in [0, 16), ``table_ptr`` the codebook (``code_table``). On the GPU a
    warp shuffle: every lane loads entry lane % 16 (one L1 line; ptxas keeps one load for all of a thread's codes)
    and code c reads lane c, a pure function of (code, table) whichever thread runs it; the whole warp runs
    elementwise code together, as shfl.sync needs. Under the interpreter a load."""
    if _INTERPRETING:
        value = tl.load(table_ptr + code)
    else:
        value = tl.inline_asm_elementwise(
            "{ .reg .u32 lane; .reg .u64 entry; .reg .f32 mine; mov.u32 lane, %laneid; and.b32 lane, lane, 15; "
            "mul.wide.u32 entry, lane, 4; add.s64 entry, entry, $2; ld.global.nc.f32 mine, [entry]; "
            "shfl.sync.idx.b32 $0, mine, $1, 31, -1; }",
            "=f,r,l", [code, tl.broadcast_to(table_ptr, code.shape)], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    return value


# The shuffle lookup's PTX, four bytes a call: $0-$3 receive the values of the high codes of the four bytes packed
# in $8, $4-$7 those of the low codes, shuffled from the lane's codebook entry ``{entry}`` (lane l holds entry
# l % 16, so the word shifted right by a code's bit position is that code's source lane: shfl.sync reads its low
# 5 bits). ``_WORD_LOOKUP_PTX`` (``_decode_bytes``) loads the entry itself from the codebook at $9;
# ``_ENTRY_LOOKUP_PTX`` (``nf4_hopper``) takes it in $9, loaded once before a kernel's loop by ``_CODE_ENTRY_PTX``
# ($0 from the codebook at $1), so the loop has no load, lane read or address of it.
_LOAD_ENTRY = (
    "mov.u32 lane, %laneid; and.b32 lane, lane, 15; mul.wide.u32 entry, lane, 4; add.s64 entry, entry, {table}; "
    "ld.global.nc.f32 {entry_value}, [entry]; "
)
_SHUFFLES = "".join(
    f"shr.b32 s, $8, {shift}; shfl.sync.idx.b32 ${out}, {{entry}}, s, 31, -1; " if shift else
    f"shfl.sync.idx.b32 ${out}, {{entry}}, $8, 31, -1; "
    for out, shift in ((0, 4), (4, 0), (1, 12), (5, 8), (2, 20), (6, 16), (3, 28), (7, 24))
)  # fmt: skip
_WORD_LOOKUP_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .u32 lane, s; .reg .u64 entry; .reg .f32 mine; "
    + _LOAD_ENTRY.format(table="$9", entry_value="mine") + _SHUFFLES.format(entry="mine") + "}"
)  # fmt: skip
_CODE_ENTRY_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .u32 lane; .reg .u64 entry; " + _LOAD_ENTRY.format(table="$1", entry_value="$0") + "}"
)
_ENTRY_LOOKUP_PTX: tl.constexpr = tl.constexpr("{ .reg .u32 s; " + _SHUFFLES.format(entry="$9") + "}")


@triton.jit
def _decode_bytes(byte, table_ptr):
    """(NF4_CODE[byte >> 4], NF4_CODE[byte & 15]) (fp32) for uint8 code bytes, ``table_ptr`` the codebook. On the GPU
    the ``_decode`` shuffle taken four bytes at a time, as the 32-bit word that holds them: ``shfl.sync`` reads the
    source lane from the low 5 bits of its index and lanes l and l + 16 hold the same entry, so the code at bit s
    of the word is looked up from the word shifted right by s, with no masking and no unpacking of the bytes."""
    if _INTERPRETING:
        code = byte.to(tl.int32)
        high, low = _decode(code >> 4, table_ptr), _decode(code & 15, table_ptr)
    else:
        high, low = tl.inline_asm_elementwise(
            _WORD_LOOKUP_PTX,
            "=f,=f,=f,=f,=f,=f,=f,=f,r,l,l,l,l", [byte, tl.broadcast_to(table_ptr, byte.shape)],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4,
        )  # fmt: skip
    return high, low


@triton.jit
def _gather(ptrs):
    """fp32 values at ``ptrs`` by plain loads (L1), out of the software pipeliner: staged through shared memory, a
    gather per element of every stage would take more of it than the GEMM's operands."""
    if _INTERPRETING:
        value = tl.load(ptrs)
    else:
        value = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                          is_pure=True, pack=1)  # fmt: skip
    return value


@triton.jit
def nf4_tile(codes_ptr, scales_ptr, table_ptr, origin, rows, cols, stride_k, stride_n,
             BK: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    """The fp32 weight tile [BK, BN] whose first element is at int32 in-expert offset ``origin`` of an expert's
    ``codes_ptr`` / ``scales_ptr`` (``nf4_expert``), the next at ``stride_k`` / ``stride_n``; finite past its first
    ``rows`` rows and ``cols`` columns. ``table_ptr``: ``code_table``; ``MODE``: a W_NF4 value other than DENSE."""
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    if MODE == _ELEMENTS:
        offs = origin + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n
        mask = (offs_k < rows)[:, None] & (offs_n < cols)[None, :]
        byte = tl.load(codes_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> (4 - (offs & 1) * 4)) & 15  # an even offset's code is the byte's high one
        scale = _gather(scales_ptr + tl.where(mask, offs >> 6, 0))
        values = tl.where(mask, _decode(code, table_ptr) * scale, 0.0)
    else:
        # the tile's bytes, each a pair of elements along its contiguous axis, in a half-length tile; masked bytes
        # read 0 (codes 0: finite values)
        if MODE == _ROW_PAIRS:
            tl.static_assert(64 % BK == 0, "a tile's rows must lie in one block")
            offs_i = tl.arange(0, BK // 2)
            pair = origin // 2 + offs_i[:, None] + offs_n[None, :] * (stride_n // 2)
            mask = (offs_i < rows // 2)[:, None] & (offs_n < cols)[None, :]
            # each column's BK elements lie in one block: one scale per column
            scale = tl.load(scales_ptr + ((origin + offs_n * stride_n) >> 6), mask=offs_n < cols, other=0.0)
            scale = scale[None, :]
        else:
            offs_j = tl.arange(0, BN // 2)
            pair = origin // 2 + offs_k[:, None] * (stride_k // 2) + offs_j[None, :]
            mask = (offs_k < rows)[:, None] & (offs_j < cols // 2)[None, :]
            # each row's blocks span 64 columns from the tile's first (a multiple of 64, or of BN < 64)
            first_block = (origin + offs_k * stride_k) >> 6
            if BN >= 64:
                offs_b = tl.arange(0, BN // 64)
                scale = tl.load(scales_ptr + first_block[:, None] + offs_b[None, :],
                                mask=(offs_k < rows)[:, None] & (offs_b * 64 < cols)[None, :], other=0.0)  # fmt: skip
                scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BK, BN // 64, 32)), (BK, BN // 2))
            else:
                scale = tl.load(scales_ptr + first_block, mask=offs_k < rows, other=0.0)[:, None]
        high, low = _decode_bytes(tl.load(codes_ptr + pair, mask=mask, other=0), table_ptr)
        high *= scale
        low *= scale
        if MODE == _ROW_PAIRS:
            values = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1)), (BK, BN))
        else:
            values = tl.interleave(high, low)
    return values
