"""One NF4 GEMM, out[M, N] = x[M, K] @ W[N, K]^T, computed with the NF4 weight as each of wgmma's operands.

    PYTHONPATH=src python tools/nf4_operand_bench.py [--shapes 8192,4096,4096;4096,2048,768]   # GPU: times
    TRITON_INTERPRET=1 PYTHONPATH=src python tools/nf4_operand_bench.py --check                # CPU: values, fp16

The question it answers is which operand the dequantized weight should be. Rows, all in one process:
- ``dense``: bf16 W, both operands staged by the software pipeliner; the baseline.
- ``B operand``: moekit's kernels today. The codes are read by ``nf4_tile`` (ROW_PAIRS: bitsandbytes' packing,
  elements 2i and 2i + 1 in a byte), dequantized in registers and stored to shared memory as the B tile. Triton
  then waits for each MMA to finish before the next tile (``warp_group_dot_wait {pendings = 0}``), so within a
  program dequantization and MMA take turns.
- ``register A``: out^T = W x^T, with the weight tile as the register A operand. Its codes are packed in halves
  (byte j of each 64-element block holds elements j and j + 32), so the two nibbles of a byte are the same
  column of two K-halves and the whole dequantization is elementwise: triton loads the staged code bytes straight
  into the operand's register layout, with no dequantized tile in shared memory. That takes a codebook lookup
  with one operand (``_decode_lane``: each lane builds its codebook entry from its lane id, then one shuffle).
  ``×2 acc`` gives the two K-halves their own accumulators, which lets triton keep MMAs in flight across
  iterations.
- ``pipelined (gluon)`` (GPU only): the engine's Hopper kernels (``moekit.kernels.nf4_hopper``, one expert),
  bitsandbytes' packing, the loop written out in gluon so that each MMA runs while the next tile is dequantized;
  row tiles of 128 (the tile a B operand in a second shared-memory buffer) and 256 (the tile the register operand
  of the transposed product); the column tile, stages and warps are fixed.

Each row's output is checked against the fp32 product of x and the dequantized weight (tolerance 1e-2, the bf16
rounding of the output is ~3e-3), so a fast wrong kernel shows as wrong.
"""

from __future__ import annotations

import argparse
import functools
import os
import struct
import sys

import torch
import triton
import triton.language as tl
import triton.testing
from triton.compiler.errors import CompilationError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from moekit.kernels.nf4 import ROW_PAIRS, nf4_tile
from moekit.kernels.nf4_hopper import grouped_gemm_nf4
from moekit.quant import NF4Tensor
from moekit.quant.nf4 import NF4_VALUES, dequantize_nf4, nf4_code, quantize_nf4

_INTERPRETING: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
_ROW_PAIRS: tl.constexpr = tl.constexpr(ROW_PAIRS)


def _lane_entry_ptx() -> str:
    """PTX that leaves NF4_CODE[laneid % 16] in register ``mine`` without reading memory: per byte j of the fp32
    bits, ``prmt`` picks byte j of entry lane & 7 from words holding entries 0-7 and 8-15, and lane & 8 picks one."""
    bits = [struct.unpack("<I", struct.pack("<f", value))[0] for value in NF4_VALUES]
    lines = ["mov.u32 lane, %laneid;", "and.b32 sel, lane, 7;", "and.b32 lane, lane, 8;", "setp.ne.u32 p, lane, 0;",
             "mov.u32 mine, 0;"]  # fmt: skip
    for j in range(4):
        word = [sum(((bits[4 * q + b] >> (8 * j)) & 255) << (8 * b) for b in range(4)) for q in range(4)]
        lines += [f"prmt.b32 lo, {word[0]:#x}, {word[1]:#x}, sel;", f"prmt.b32 hi, {word[2]:#x}, {word[3]:#x}, sel;",
                  "selp.b32 v, hi, lo, p;", "and.b32 v, v, 255;", f"shl.b32 v, v, {8 * j};", "or.b32 mine, mine, v;"]  # fmt: skip
    return " ".join(lines)


_LANE_DECODE: tl.constexpr = tl.constexpr(
    "{ .reg .u32 lane, sel, lo, hi, v, mine; .reg .pred p; "
    + _lane_entry_ptx()
    + " shfl.sync.idx.b32 $0, mine, $1, 31, -1; }"
)


@triton.jit
def _decode_lane(code, table_ptr):
    """NF4_CODE[code] (fp32) as an inline asm of one operand, which triton hoists layout conversions through."""
    if _INTERPRETING:
        value = tl.load(table_ptr + code)
    else:
        value = tl.inline_asm_elementwise(_LANE_DECODE, "=f,r", [code], dtype=tl.float32, is_pure=True, pack=1)
    return value


@triton.jit
def _dense_gemm(x_ptr, w_ptr, out_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
        w = tl.load(w_ptr + offs_n[None, :] * K + (k + offs_k)[:, None])  # W^T tile [BK, BN]
        acc = tl.dot(x, w, acc)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _b_operand_gemm(x_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, M, N, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
        # W^T tile [BK, BN]: element (k, n) at n·K + k, bitsandbytes' byte pairs along k
        w = nf4_tile(
            codes_ptr, scales_ptr, table_ptr, pid_n * BN * K + k, K - k, N - pid_n * BN, 1, K, BK, BN, _ROW_PAIRS
        )
        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _register_a_gemm(x_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, TWO_ACC: tl.constexpr):  # fmt: skip
    # out^T tile [BN, BM] = W tile [BN, 64] @ x^T tile [64, BM], one 64-element block of each weight row per step
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, 32)
    acc_first = tl.zeros((BN, BM), tl.float32)
    acc_second = tl.zeros((BN, BM), tl.float32)
    for block in range(K // 64):
        x_first = tl.load(x_ptr + offs_m[None, :] * K + (block * 64 + offs_j)[:, None])  # x^T rows j
        x_second = tl.load(x_ptr + offs_m[None, :] * K + (block * 64 + 32 + offs_j)[:, None])  # rows j + 32
        code = tl.load(codes_ptr + offs_n[:, None] * (K // 2) + (block * 32 + offs_j)[None, :]).to(tl.int32)
        scale = tl.load(scales_ptr + offs_n * (K // 64) + block)[:, None]
        w_first = (_decode_lane(code >> 4, table_ptr) * scale).to(x_ptr.dtype.element_ty)
        w_second = (_decode_lane(code & 15, table_ptr) * scale).to(x_ptr.dtype.element_ty)
        acc_first = tl.dot(w_first, x_first, acc_first)
        if TWO_ACC:
            acc_second = tl.dot(w_second, x_second, acc_second)
        else:
            acc_first = tl.dot(w_second, x_second, acc_first)
    out = acc_first + acc_second
    tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], out.to(out_ptr.dtype.element_ty))


def pack_halves(packed: torch.Tensor) -> torch.Tensor:
    """moekit's packing (bitsandbytes': elements 2i and 2i + 1 in byte i, the first high) of rows [N, K/2] repacked
    in halves: byte j of each 64-element block holds elements j (high) and j + 32."""
    n = packed.shape[0]
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).view(n, -1, 64)  # [N, K/64, 64]
    return ((codes[:, :, :32] << 4) | codes[:, :, 32:]).reshape(n, -1)


def run(shapes, configs, device: str, dtype: torch.dtype = torch.bfloat16, repeat_ms: int = 200) -> list[dict]:
    """One row per (shape, kernel, config): microseconds (GPU only) and the max relative error."""
    rows = []
    table = nf4_code(device)
    for m, n, k in shapes:
        if k % 64:
            raise SystemExit(f"--shapes: K must be a multiple of 64, got {k}")
        gen = torch.Generator(device="cpu").manual_seed(m + n + k)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        weight = quantize_nf4(torch.randn(n, k, generator=gen).to(device))  # moekit's storage, [N, K] row-major
        pairs, absmax = weight.packed.view(n, k // 2), weight.absmax.view(n, k // 64)
        halves = pack_halves(pairs).contiguous()
        dequantized = dequantize_nf4(weight, dtype)
        truth = x.float() @ dequantized.float().t()
        for name, (bm, bn, bk, warps, stages) in configs:
            out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
            if name == "dense":
                kernel, args = _dense_gemm, (x, dequantized, out, m, n, k, bm, bn, bk)
            elif name == "B operand":
                kernel, args = _b_operand_gemm, (x, pairs, absmax, table, out, m, n, k, bm, bn, bk)
            elif name == "pipelined (gluon)":  # GPU only: gluon has no interpreter
                kernel, view = None, NF4Tensor(weight.packed.view(1, -1), weight.absmax.view(1, -1), (1, n, k), dtype)
                counts = torch.tensor([m], device=device)
                launch = functools.partial(grouped_gemm_nf4, x, view.transpose(1, 2), counts, m, out, ROW_PAIRS, table,
                                           row_tile=bm)  # fmt: skip
            else:
                kernel = _register_a_gemm
                args = (x, halves, absmax, table, out, m, n, k, bm, bn, name.endswith("×2 acc"))
            if kernel is not None:
                launch = functools.partial(kernel[(m // bm, n // bn)], *args, num_warps=warps, num_stages=stages)
            row = {"shape": (m, n, k), "kernel": name, "config": (bm, bn, bk, warps, stages), "us": float("nan"),
                   "tflops": float("nan"), "error": float("nan"), "ok": False, "failure": ""}  # fmt: skip
            try:
                launch()
            # a kernel that does not import, compile or launch is a row, not the end of the run
            except (CompilationError, ImportError, RuntimeError, ValueError, TypeError, AssertionError) as failure:
                row["failure"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:160]}"
                rows.append(row)
                continue
            row["error"] = ((out.float() - truth).abs().max() / truth.abs().max()).item()
            row["ok"] = row["error"] <= 1e-2
            if device == "cuda":
                row["us"] = triton.testing.do_bench(launch, warmup=25, rep=repeat_ms) * 1e3
                row["tflops"] = 2 * m * n * k / row["us"] / 1e6
            rows.append(row)
    return rows


# (kernel, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)); BLOCK_K of register A is a 64-element block
GPU_CONFIGS = [
    ("dense", (128, 128, 64, 8, 4)),
    ("B operand", (128, 128, 64, 4, 3)),
    ("B operand", (128, 128, 64, 8, 4)),
    ("register A", (128, 128, 64, 8, 3)),
    ("register A", (256, 128, 64, 8, 3)),
    ("register A ×2 acc", (128, 128, 64, 8, 3)),
    ("pipelined (gluon)", (128, 128, 64, 8, 3)),
    ("pipelined (gluon)", (256, 128, 64, 8, 3)),
]
CHECK_CONFIGS = [("dense", (32, 32, 32, 4, 1)), ("B operand", (32, 32, 32, 4, 1)), ("register A", (32, 32, 64, 4, 1)),
                 ("register A ×2 acc", (32, 32, 64, 4, 1))]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192,4096,4096;4096,2048,768;16384,768,2048", help="M,N,K;...")
    parser.add_argument("--check", action="store_true", help="tiny shapes, values only (the CPU interpreter)")
    args = parser.parse_args(argv)
    shapes = [(64, 64, 128)] if args.check else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the interpreter's dot mishandles bf16 operands (moekit.kernels.numerics), so --check runs in fp16
    rows = run(
        shapes, CHECK_CONFIGS if args.check else GPU_CONFIGS, device, torch.float16 if args.check else torch.bfloat16
    )
    print(torch.cuda.get_device_name() if device == "cuda" else "cpu", f"triton {triton.__version__}")
    dense_us = {row["shape"]: row["us"] for row in rows if row["kernel"] == "dense"}
    for row in rows:
        ratio = row["us"] / dense_us[row["shape"]]
        verdict = "ok" if row["ok"] else f"FAILED {row['failure']}" if row["failure"] else "WRONG"
        print(f"{row['shape']} {row['kernel']:18s} {row['config']} {row['us']:9.1f} us {row['tflops']:7.1f} TFLOP/s "
              f"{ratio:5.2f}x dense  max rel err {row['error']:.1e} {verdict}")  # fmt: skip
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
