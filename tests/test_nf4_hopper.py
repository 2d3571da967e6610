"""The Hopper NF4 grouped GEMMs (``moekit.kernels.nf4_hopper``), which gluon cannot run on the CPU, compiled
offline for sm_90 with this triton: each variant the engine launches (the shared-memory-operand kernel: byte pairs
along K and along N, row tiles of 128 and 256 over all rows, the 256-row heads and the 128-row tails; the
register-operand kernel: pairs along K at 256-row tiles, an even and an odd count of K steps; plain and with every
epilogue: gathered rows, bias, routing weight, LoRA) builds, keeps its warpgroup MMAs asynchronous (ptxas prints
advisory C7515 when it serializes them) and does not spill; in the register-operand kernel no instruction writes a
register that an MMA still in flight reads (read from the SASS); and the host's choices of kernel (``runs``) and
of row tiles (``row_launches``) take only what the kernels handle. Their values are checked on the GPU
(tests/gpu/test_gpu_nf4.py). The compiles run in a process of their own: the interpreter, which this suite runs
kernels under, patches triton's language in place, which gluon's compiler cannot take."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

# argv[1]: a folder; compiles each variant of argv[2:] (COLUMN_PAIRS,BLOCK_M,gather and epilogues,ROWS of the
# shared-memory-operand kernel, or with a fifth field, EVEN_STEPS, the register-operand kernel) to a PTX file there
_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from moekit.kernels import nf4_hopper

folder, *variants = sys.argv[1:]
pointers = {"a_ptr": "*bf16", "gather_ptr": "*i64", "codes_ptr": "*u8", "scales_ptr": "*fp32", "table_ptr": "*fp32",
            "b_ptr": "*bf16", "rw_ptr": "*fp32", "rows_ptr": "*i64", "out_ptr": "*bf16", "counts_ptr": "*i64",
            "u_ptr": "*bf16", "l_ptr": "*fp32"}
for variant in variants:
    column_pairs, block_m, epilogues, rows, *even = (int(v) for v in variant.split(","))
    constants = dict(ROWS=rows, GATHER=bool(epilogues), HAS_BIAS=bool(epilogues), SCALE=bool(epilogues),
                     HAS_LORA=bool(epilogues), BLOCK_R=16, BLOCK_E=128, GROUP_M=8, BLOCK_M=block_m,
                     BLOCK_N=nf4_hopper.BLOCK_N, num_warps=nf4_hopper.NUM_WARPS)
    if even:
        kernel = nf4_hopper._register_nf4_kernel
        constants |= dict(STAGES=nf4_hopper.REGISTER_STAGES, EVEN_STEPS=bool(even[0]))
    else:
        kernel = nf4_hopper._grouped_nf4_kernel
        constants |= dict(STAGES=nf4_hopper.STAGES, COLUMN_PAIRS=bool(column_pairs))
    names = list(kernel.arg_names)
    signature = {name: pointers.get(name, "i32") for name in names if name not in constants}
    signature |= dict.fromkeys(constants, "constexpr")
    unit = {"stride_ur", "stride_ln", "stride_bn", "stride_wn" if column_pairs else "stride_wk"}
    # as triton specializes torch tensors and sizes: 16-aligned pointers, multiples of 16, unit strides
    aligned = {(names.index(name),): [["tt.divisibility", 16]]
               for name in [*pointers, "N", "K", "stride_am", "stride_we", "stride_wk", "stride_wn", "stride_om"]
               if name not in unit}
    source = GluonASTSource(kernel, signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": nf4_hopper.NUM_WARPS})
    open(f"{folder}/{variant.replace(',', '_')}.ptx", "w").write(compiled.asm["ptx"])
"""
VARIANTS = ["1,256,0,1", "0,128,1,2", "1,256,1,1", "1,128,0,0"]  # ROWS: ALL_ROWS 0, HEAD 1, TAIL 2
REGISTER_VARIANTS = ["0,256,0,1,0", "0,256,1,0,1", "0,256,1,1,0", "0,256,0,0,1"]  # pairs along K, 256-row tiles


def _compile(folder, variants):
    """{variant: (its PTX, ptxas -v's report)} of the engine's kernel (see ``_COMPILE``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE, str(folder), *variants], env=env, check=True,
                   capture_output=True, text=True)  # fmt: skip
    built = {}
    for variant in variants:
        ptx = folder / f"{variant.replace(',', '_')}.ptx"
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".o"))],
                              capture_output=True, text=True, check=True).stderr  # fmt: skip
        built[variant] = ptx.read_text(), info
    return built


def test_compiles_for_hopper_with_asynchronous_mmas(tmp_path):
    for variant, (ptx, info) in _compile(tmp_path, VARIANTS + REGISTER_VARIANTS).items():
        assert ptx.count("wgmma.mma_async") >= 8, variant
        assert "C7515" not in info and "0 bytes spill stores" in info, (variant, info)


def _sass(obj):
    """[(address, instruction)] of a cubin, by the cuobjdump beside triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    text = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", text)]


def _writes_to_registers_in_flight(instructions):
    """Instructions that write a register an issued MMA reads before a ``WARPGROUP.DEPBAR`` retires that MMA:
    HGMMA's second operand, four registers from the one named, is its register A operand (a descriptor otherwise);
    ``DEPBAR.LE gsb0, N`` leaves the last N MMA groups in flight."""
    in_flight, group, found = [], set(), []
    for address, text in instructions:
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        opcode, _, operands = text.partition(" ")
        if opcode.startswith("HGMMA"):
            a = re.match(r"\s*R\d+,\s*R(\d+),", operands)
            group |= set(range(int(a.group(1)), int(a.group(1)) + 4)) if a else set()
            if "gsb0" in operands:
                in_flight, group = [*in_flight, group], set()
        elif text.startswith("WARPGROUP.DEPBAR.LE gsb0"):
            keep = int(operands.rsplit(",", 1)[1], 16)
            in_flight = in_flight[len(in_flight) - keep :] if keep else []
        elif not opcode.startswith(("ST", "BAR", "WARPGROUP", "BRA", "LDGSTS", "LDGDEPBAR", "DEPBAR", "EXIT")):
            target = re.match(r"R(\d+)\b", operands.split(",")[0].strip())
            width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
            busy = set().union(*in_flight)
            if target and busy & set(range(int(target.group(1)), int(target.group(1)) + width)):
                found.append((hex(address), text))
    return found


def test_register_operands_are_not_overwritten_in_flight(tmp_path):
    """The register-operand kernel's main loop, read from its SASS through two trips (the back edge included):
    each MMA's weight registers stay untouched until the wait that retires it. The checker itself is shown to flag
    such a write (the fault of the one-register-set loop the alternation replaced, which gave NaN on the GPU)."""
    _compile(tmp_path, REGISTER_VARIANTS[:1] + REGISTER_VARIANTS[3:])
    for variant in (REGISTER_VARIANTS[0], REGISTER_VARIANTS[3]):
        instructions = _sass(tmp_path / f"{variant.replace(',', '_')}.o")
        jumps = [(int(m.group(1), 16), a) for a, i in instructions if (m := re.search(r"BRA\s+0x([0-9a-f]+)", i))]
        start, end = next((to, at) for to, at in jumps if to < at)  # the main loop: the first backward branch
        body = [x for x in instructions if start <= x[0] <= end]
        assert sum("HGMMA" in i for _, i in body) >= 8, variant
        before = [x for x in instructions if x[0] < start]
        assert not _writes_to_registers_in_flight(before + body + body), variant
    hazard = [(0, "HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR4], R24, gsb0"), (16, "LDS.U8 R153, [R1]")]
    assert _writes_to_registers_in_flight(hazard) == [("0x10", "LDS.U8 R153, [R1]")]


def test_runs_only_where_the_kernel_applies(monkeypatch):
    """``runs``: never on the CPU or the interpreter, and on an sm_90 GPU only for bf16 / fp16 rows with unit
    column stride, byte pairs along a tile axis, K a multiple of 64 (N of 16 for pairs along N), no low-rank GEMM."""
    from moekit.kernels import nf4_hopper
    from moekit.kernels.nf4 import COLUMN_PAIRS, DENSE, ELEMENTS, ROW_PAIRS

    class Rows:  # a CUDA tensor's face, on the CPU
        def __init__(self, dtype=torch.bfloat16, strides=(64, 1), ptr=0):
            self.is_cuda, self.device, self.dtype, self._strides, self._ptr = True, "cuda", dtype, strides, ptr

        def stride(self, dim):
            return self._strides[dim]

        def data_ptr(self):
            return self._ptr

    weight = torch.empty(4, 128, 96)  # viewed [E, K, N]
    monkeypatch.setattr(nf4_hopper, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert nf4_hopper.runs(Rows(), weight, ROW_PAIRS, False)
    assert nf4_hopper.runs(Rows(torch.float16), weight, COLUMN_PAIRS, False)
    refused = [
        (Rows(), weight, ROW_PAIRS, True),  # low-rank
        (Rows(), weight, ELEMENTS, False),
        (Rows(), weight, DENSE, False),
        (Rows(torch.float32), weight, ROW_PAIRS, False),
        (Rows(strides=(1, 64)), weight, ROW_PAIRS, False),
        (Rows(strides=(60, 1)), weight, ROW_PAIRS, False),
        (Rows(ptr=8), weight, ROW_PAIRS, False),
        (Rows(), torch.empty(4, 96, 128), ROW_PAIRS, False),  # K = 96
        (Rows(), torch.empty(4, 128, 40), COLUMN_PAIRS, False),  # N = 40
    ]
    for args in refused:
        assert not nf4_hopper.runs(*args)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not nf4_hopper.runs(Rows(), weight, ROW_PAIRS, False)
    monkeypatch.setattr(nf4_hopper, "interpreting", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not nf4_hopper.runs(Rows(), weight, ROW_PAIRS, False)


def test_row_launches():
    """128-row tiles where the experts average under 256 rows, 256-row heads and 128-row tails (two launches) up to
    1024, 256-row tiles above; a launch's grid bound holds every row tile it can have."""
    from moekit.kernels import nf4_hopper

    assert nf4_hopper.row_launches(256 * 128, 128) == [(256, nf4_hopper.HEAD), (128, nf4_hopper.TAIL)]
    assert nf4_hopper.row_launches(256 * 128 - 1, 128) == [(128, nf4_hopper.ALL_ROWS)]
    assert nf4_hopper.row_launches(0, 8) == [(128, nf4_hopper.ALL_ROWS)]
    assert nf4_hopper.row_launches(1024 * 32, 32) == [(256, nf4_hopper.HEAD), (128, nf4_hopper.TAIL)]
    assert nf4_hopper.row_launches(1024 * 32 + 1, 32) == [(256, nf4_hopper.ALL_ROWS)]
    counts = [384, 0, 256, 385, 129, 1, 640, 300, 128, 513]
    n, experts = sum(counts), len(counts)
    heads = sum((c - c % 256 if 0 < c % 256 <= 128 else c + 255) // 256 for c in counts)
    tails = sum(0 < c % 256 <= 128 for c in counts)
    assert (heads, tails) == (10, 6)
    assert nf4_hopper._row_tiles(n, experts, 256, nf4_hopper.HEAD) >= heads
    assert nf4_hopper._row_tiles(n, experts, 128, nf4_hopper.TAIL) >= tails
