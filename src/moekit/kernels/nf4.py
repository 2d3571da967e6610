"""NF4 weights as a GEMM's B operand: each [BLOCK_K, BLOCK_N] tile dequantized as the main loop loads it.

An ``NF4Tensor`` view [E, K, N] (``moekit.quant.tensor``) keeps the dense weight's strides over two flat buffers,
the weight as stored: element (e, k, n) is at offset f = e·stride(0) + k·stride(1) + n·stride(2), its 4-bit code in
byte f >> 1 of ``packed`` (the high nibble when f is even) and its scale at f >> 6 of ``absmax``:

    w[e, k, n] = NF4_CODE[code(f)] * absmax[f >> 6]      in fp32; ``mma`` rounds it to the operand dtype

A kernel advances the codes by expert·stride(0) / 2 and the scales by expert·stride(0) / 64 (int64; every expert
is whole blocks of 64) and names a tile by the int32 offset of its first element inside the expert, its strides
and how many of its rows and columns are in range (``nf4_expert``, ``nf4_tile``). No dequantized copy of a weight
exists anywhere: only the tile in registers.

Where one tile axis has unit stride and every pair (f, f + 1) along it starts at an even f (``nf4_mode``, on the
host), the tile is read as the half-length tile of its bytes: contiguous, so the loads are vectorised and the
software pipeliner stages them like any GEMM operand; one lookup (``byte_table``, 256 x 2 fp32) gives both codes'
values and one scale serves both elements. Elsewhere each element takes its own byte, lookup and scale. On the GPU
the lookups (small, read-only tables: L1 hits) are plain loads, kept out of the pipeliner: staged as tl.load
gathers through shared memory they took 224-272 KB at 128x128x64 tiles with 4 stages (compiled for sm_90), over
the 227 KB an SM has.
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
COLUMN_PAIRS = 2  # NF4, elements 2j and 2j + 1 of a tile row share a byte (unit column stride)
ROW_PAIRS = 3  # NF4, elements 2i and 2i + 1 of a tile column share a byte (unit row stride)
_ELEMENTS: tl.constexpr = tl.constexpr(ELEMENTS)  # the same values inside jit functions
_ROW_PAIRS: tl.constexpr = tl.constexpr(ROW_PAIRS)
_ZERO_PAIR: tl.constexpr = tl.constexpr(0x77)  # a byte whose two codes are NF4's 0.0: what masked elements read
# ``numerics.interpreting()`` (numerics imports this module, so it is read here again)
_INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def nf4_mode(weight, cols: int, column_shift: int = 0) -> int:
    """The W_NF4 constexpr for a B operand ``weight`` viewed [E, K, N] whose tiles start at even rows and at even
    columns plus ``column_shift``, with K rows and ``cols`` columns in range (the kernel's column count)."""
    if not isinstance(weight, NF4Tensor):
        return DENSE
    _, rows, _ = weight.shape
    _, stride_k, stride_n = weight.stride()
    if stride_n == 1 and stride_k % 2 == 0 and column_shift % 2 == 0 and cols % 2 == 0:
        return COLUMN_PAIRS
    if stride_k == 1 and stride_n % 2 == 0 and rows % 2 == 0:
        return ROW_PAIRS
    return ELEMENTS


def byte_table(device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: the NF4 values of a byte's high and low code (cached per device): one 8-byte lookup decodes a
    byte."""
    key = str(device)
    table = _BYTE_TABLES.get(key)
    if table is None:
        code = nf4_code(device)
        byte = torch.arange(256, device=device)
        table = _BYTE_TABLES[key] = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1).contiguous()
    return table


_BYTE_TABLES: dict[str, torch.Tensor] = {}


def weight_operands(weight, cols: int, column_shift: int = 0) -> tuple:
    """(w_ptr, ws_ptr, code_ptr, W_NF4) kernel arguments of a B operand (``nf4_mode``): an NF4 weight's codes,
    scales, byte table (``byte_table``) and mode, or a dense weight and itself twice as placeholders (never read)."""
    mode = nf4_mode(weight, cols, column_shift)
    if mode == DENSE:
        return weight, weight, weight, DENSE
    return weight.packed, weight.absmax, byte_table(weight.device), mode


@triton.jit
def nf4_expert(codes_ptr, scales_ptr, expert, stride_we):
    """(codes, scales) of expert ``expert``: the buffers advanced by its first element's offset (int64)."""
    first = expert.to(tl.int64) * stride_we
    return codes_ptr + first // 2, scales_ptr + first // 64


@triton.jit
def _lookup(ptrs, PAIR: tl.constexpr):
    """The fp32 value at ``ptrs`` (with PAIR, the two at ptrs and ptrs + 1) in a small read-only table, by plain
    loads (L1): the software pipeliner would stage tl.load's gathers through shared memory, more of it than the
    GEMM's operands take."""
    if _INTERPRETING:
        first = tl.load(ptrs)
        second = tl.load(ptrs + 1) if PAIR else first
    elif PAIR:
        first, second = tl.inline_asm_elementwise(
            "ld.global.nc.v2.f32 {$0, $1}, [$2];", "=f,=f,l", [ptrs], dtype=(tl.float32, tl.float32), is_pure=True,
            pack=1,
        )  # fmt: skip
    else:
        first = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                          is_pure=True, pack=1)  # fmt: skip
        second = first
    return first, second


@triton.jit
def nf4_tile(codes_ptr, scales_ptr, table_ptr, origin, rows, cols, stride_k, stride_n,
             BK: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    """The fp32 weight tile [BK, BN] whose first element is at int32 in-expert offset ``origin`` of an expert's
    ``codes_ptr`` / ``scales_ptr`` (``nf4_expert``), the next at ``stride_k`` / ``stride_n``; 0 past its first
    ``rows`` rows and ``cols`` columns. ``table_ptr``: ``byte_table``; ``MODE``: a W_NF4 value other than DENSE."""
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    if MODE == _ELEMENTS:
        offs = origin + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n
        mask = (offs_k < rows)[:, None] & (offs_n < cols)[None, :]
        byte = tl.load(codes_ptr + (offs >> 1), mask=mask, other=_ZERO_PAIR).to(tl.int32)
        # an even offset's code is the byte's high one: the table's first column
        value, _ = _lookup(table_ptr + byte * 2 + (offs & 1), False)
        scale, _ = _lookup(scales_ptr + tl.where(mask, offs >> 6, 0), False)
        values = value * scale
    else:
        # the tile's bytes, each a pair of elements along its contiguous axis, in a half-length tile
        if MODE == _ROW_PAIRS:
            offs_i = tl.arange(0, BK // 2)
            pair = origin // 2 + offs_i[:, None] + offs_n[None, :] * (stride_n // 2)
            mask = (offs_i < rows // 2)[:, None] & (offs_n < cols)[None, :]
        else:
            offs_j = tl.arange(0, BN // 2)
            pair = origin // 2 + offs_k[:, None] * (stride_k // 2) + offs_j[None, :]
            mask = (offs_k < rows)[:, None] & (offs_j < cols // 2)[None, :]
        byte = tl.load(codes_ptr + pair, mask=mask, other=_ZERO_PAIR).to(tl.int32)
        high, low = _lookup(table_ptr + byte * 2, True)
        scale, _ = _lookup(scales_ptr + tl.where(mask, pair >> 5, 0), False)  # the block of elements 2·pair, +1
        high, low = high * scale, low * scale
        if MODE == _ROW_PAIRS:
            values = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1)), (BK, BN))
        else:
            values = tl.interleave(high, low)
    return values
