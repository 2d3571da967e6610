"""The GPU branch of the NF4 codebook lookups: their inline PTX run lane by lane on the CPU (``ptx_warp``) against
the NF4 table, bit for bit. The interpreter takes the other branch of ``_decode`` / ``_decode_bytes``, so these
tests are what checks the PTX before a GPU does: every code in every lane, every byte value, and a broken shift
caught. tools/nf4_operand_bench.py's one-operand lookup is checked the same way."""

from __future__ import annotations

import random

import pytest
from ptx_warp import asm_of, f32_bits, run_warp

pytest.importorskip("triton")

from moekit.kernels import nf4 as nf4_kernels
from moekit.quant.nf4 import NF4_VALUES

TABLE_BITS = [f32_bits(value) for value in NF4_VALUES]
TABLE_BASE = 0x7F0000001000  # where the codebook's 16 fp32 entries sit in the emulated memory
MEMORY = {TABLE_BASE + 4 * i: bits for i, bits in enumerate(TABLE_BITS)}


def test_decode_reads_each_lanes_code():
    asm, constraints = asm_of(nf4_kernels._decode)
    assert constraints == "=f,r,l"  # $0 the value, $1 the code, $2 the codebook
    for codes in (list(range(16)) * 2, [15 - lane % 16 for lane in range(32)], [7] * 32):
        lanes = run_warp(asm, [{"$1": code, "$2": TABLE_BASE} for code in codes], MEMORY)
        assert [lane["$0"] for lane in lanes] == [TABLE_BITS[code] for code in codes]


def _decode_words(asm: str, words: list[int]) -> list[dict[str, int]]:
    # pack=4: $8 holds four code bytes (element i in byte i), $9-$12 the codebook pointer of each element
    return run_warp(asm, [{"$8": w, **{f"${9 + i}": TABLE_BASE for i in range(4)}} for w in words], MEMORY)


def test_decode_bytes_reads_both_codes_of_every_byte():
    asm, constraints = asm_of(nf4_kernels._decode_bytes)
    assert constraints == "=f,=f,=f,=f,=f,=f,=f,=f,r,l,l,l,l"  # $0-$3 high codes, $4-$7 low codes, of bytes 0-3
    every_byte = list(range(256))
    words = [every_byte[4 * w] | every_byte[4 * w + 1] << 8 | every_byte[4 * w + 2] << 16 | every_byte[4 * w + 3] << 24
             for w in range(64)]  # fmt: skip
    words += [random.Random(seed).getrandbits(32) for seed in range(64)] + [0, 0xFFFFFFFF, 0x0F0F0F0F, 0xF0F0F0F0]
    words += [0x12345678] * (32 - len(words) % 32)
    for first in range(0, len(words), 32):
        warp = words[first : first + 32]
        for word, lane in zip(warp, _decode_words(asm, warp)):
            for i in range(4):
                byte = (word >> (8 * i)) & 255
                want = (TABLE_BITS[byte >> 4], TABLE_BITS[byte & 15])
                assert (lane[f"${i}"], lane[f"${4 + i}"]) == want, f"word {word:#x}, byte {i}"


def test_a_broken_lookup_is_caught():
    asm, _ = asm_of(nf4_kernels._decode_bytes)
    broken = asm.replace("shr.b32 s, $8, 12;", "shr.b32 s, $8, 13;")
    assert broken != asm
    word = 0x00005A00  # byte 1 = 0x5A: its high code (5) is the one shifted by 12
    lane = _decode_words(broken, [word] * 32)[0]
    assert lane["$1"] != TABLE_BITS[5]


def test_operand_bench_lane_lookup():
    """tools/nf4_operand_bench.py: each lane builds its codebook entry from its lane id (no memory), then one
    shuffle: an inline asm of one operand, which triton hoists layout conversions through."""
    from test_cli_tools import _tool

    asm, constraints = asm_of(_tool("nf4_operand_bench")._decode_lane)
    assert constraints == "=f,r"
    for codes in (list(range(16)) * 2, [random.Random(lane).randrange(16) for lane in range(32)]):
        lanes = run_warp(asm, [{"$1": code} for code in codes], memory={})
        assert [lane["$0"] for lane in lanes] == [TABLE_BITS[code] for code in codes]
