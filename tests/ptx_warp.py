"""A warp of 32 lanes running the small PTX subset of moekit's inline-asm codebook lookups, on the CPU.

The interpreter never runs a kernel's ``tl.inline_asm_elementwise`` branch, so without this its PTX would first run
on a GPU. ``run_warp`` executes an asm block's instructions in order for every lane, with ``$n`` operands bound per
lane and a flat fp32 memory for ``ld.global``. An instruction outside the subset raises, so a lookup that grows a
new instruction needs this file to grow with it rather than passing untested.
"""

from __future__ import annotations

import ast
import inspect
import struct

MASK32 = 0xFFFFFFFF


def asm_of(jit_function) -> tuple[str, str]:
    """(asm text, constraints) of the single ``tl.inline_asm_elementwise`` call in a jit function's source: string
    literals, or names of the function's module (a ``tl.constexpr`` is unwrapped)."""
    function = getattr(jit_function, "fn", jit_function)
    tree = ast.parse(inspect.cleandoc(inspect.getsource(function)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", None) == "inline_asm_elementwise"]  # fmt: skip
    assert len(calls) == 1, f"expected one inline_asm_elementwise call, found {len(calls)}"

    def text(node) -> str:
        if isinstance(node, ast.Name):
            found = function.__globals__[node.id]
            return getattr(found, "value", found)
        return ast.literal_eval(node)

    asm, constraints = calls[0].args[:2]
    return text(asm), text(constraints)


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _prmt(a: int, b: int, selector: int) -> int:
    source = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 15
        byte = source[nibble & 7]
        if nibble & 8:  # sign-replicate mode
            byte = 255 if byte & 128 else 0
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, table: int) -> int:
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((table >> index) & 1) << bit
    return out


def run_warp(asm: str, operands: list[dict[str, int]], memory: dict[int, int]) -> list[dict[str, int]]:
    """Run ``asm`` (one ``{ ... }`` block) on 32 lanes; ``operands[lane]`` binds ``$n`` to 32/64-bit integers (f32
    as bits) and is returned with every register the block wrote; ``memory`` maps byte addresses to 32-bit words."""
    assert len(operands) == 32
    body = asm.strip()
    assert body.startswith("{") and body.endswith("}"), "one { ... } block"
    lanes = [dict(bound) for bound in operands]
    predicates: list[dict[str, bool]] = [{} for _ in range(32)]
    for statement in (s.strip() for s in body[1:-1].split(";")):
        if not statement or statement.startswith(".reg"):
            continue
        opcode, _, rest = statement.partition(" ")
        args = [a.strip() for a in rest.split(",")]

        def value(lane: int, token: str) -> int:
            if token == "%laneid":
                return lane
            if token in lanes[lane]:
                return lanes[lane][token]
            return int(token, 0) & MASK32

        if opcode == "shfl.sync.idx.b32":
            dst, src, index, clamp, member_mask = args
            assert (value(0, clamp), value(0, member_mask)) == (31, MASK32), "a whole warp, no segments"
            sources = [lanes[lane][src] for lane in range(32)]
            for lane in range(32):
                lanes[lane][dst] = sources[value(lane, index) & 31]
            continue
        for lane in range(32):
            regs, get = lanes[lane], (lambda token, lane=lane: value(lane, token))
            if opcode in ("mov.u32", "mov.b32"):
                regs[args[0]] = get(args[1])
            elif opcode == "and.b32":
                regs[args[0]] = get(args[1]) & get(args[2])
            elif opcode == "or.b32":
                regs[args[0]] = get(args[1]) | get(args[2])
            elif opcode in ("shr.b32", "shr.u32"):
                regs[args[0]] = get(args[1]) >> min(get(args[2]), 32)
            elif opcode == "shl.b32":
                regs[args[0]] = (get(args[1]) << min(get(args[2]), 32)) & MASK32
            elif opcode == "mul.wide.u32":
                regs[args[0]] = get(args[1]) * get(args[2])
            elif opcode == "add.s64":
                regs[args[0]] = (get(args[1]) + get(args[2])) & (2**64 - 1)
            elif opcode == "ld.global.nc.f32":
                regs[args[0]] = memory[regs[args[1].strip("[]")]]
            elif opcode == "prmt.b32":
                regs[args[0]] = _prmt(get(args[1]), get(args[2]), get(args[3]))
            elif opcode == "lop3.b32":
                regs[args[0]] = _lop3(get(args[1]), get(args[2]), get(args[3]), get(args[4]))
            elif opcode == "setp.ne.u32":
                predicates[lane][args[0]] = get(args[1]) != get(args[2])
            elif opcode == "selp.b32":
                regs[args[0]] = get(args[1]) if predicates[lane][args[3]] else get(args[2])
            else:
                raise NotImplementedError(f"PTX instruction {opcode!r} is not emulated (tests/ptx_warp.py)")
    return lanes
