"""What one benchmark step allocates, traced on the CPU: the step's peak memory, where it happens and what led to it.

    python tools/trace_memory.py --preset qwen3-30b-a3b --tokens 8192 --mode lora --lora-rank 64 [--option F=V]

The Triton engine runs with every kernel launch a no-op (TRITON_INTERPRET=1, outputs left unwritten), so the step
allocates exactly the buffers it allocates on a GPU, at full size, in seconds. After every torch op the live heap
bytes are read from glibc (``mallinfo2``: in-use heap plus mmap'd blocks). The peak above the step's start
predicts ``step_gib`` of ``moekit bench`` (peak minus resident): at nine LoRA and full-training cases it matched
the GPU's measurement within 1 MiB (e.g. Qwen3 8k r = 64: 799 MiB; Nemotron full at 32k: 4484 MiB against
4.378 GiB). torch's grouped_mm is stubbed to allocate only its output (its own workspace is not traced). The
printout lists the ops that moved the heap, with the moekit source lines that ran them, and marks the peak.
``--option FIELD=VALUE`` sets a field of ``moekit.options.OPTIONS`` (e.g. ``plain_gemm=triton``). A prediction to
check on the GPU, not a measurement of it. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class HeapTrace(TorchDispatchMode):
    """Live heap bytes after every torch op, with the innermost three moekit source lines that ran it."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[int, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}moekit{os.sep}" in f.filename]
        where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames[-3:])) or "-"
        self.log.append((heap_bytes(), str(func), where))
        return out


def _grouped_mm_output(left, right, offs):
    """An unwritten tensor of grouped_mm's output shape and dtype: [n, out] for rows @ [E, in, out], [E, p, q] for
    [p, n] @ [n, q] (weight gradients)."""
    if right.dim() == 3:
        return left.new_empty(left.shape[0], right.shape[-1])
    return left.new_empty(offs.shape[0], left.shape[0], right.shape[-1])


def silence_kernels() -> None:
    """Every Triton launch and torch grouped_mm call a no-op that allocates only its output (the Triton engine
    itself is forced onto the CPU by ``override(backend="triton")``, which the interpreter allows)."""
    from triton.runtime.interpreter import InterpretedFunction

    import moekit.grouped
    from moekit.kernels.tuning import Autotuned

    InterpretedFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    Autotuned.launch = lambda *args, **kwargs: None
    moekit.grouped._GROUPED_MM = lambda left, right, offs: _grouped_mm_output(left, right, offs)
    moekit.grouped._grouped_mm_works = lambda *args: True


def main() -> None:
    from moekit.options import override, parse_assignments
    from moekit.tools.bench import add_case_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, preset="qwen3-30b-a3b", mode="lora")
    parser.add_argument("--min-mib", type=float, default=4.0, help="list the ops that moved the heap by this much")
    parser.add_argument("--option", action="append", default=[], help="FIELD=VALUE of moekit.options (repeatable)")
    args = parser.parse_args()
    silence_kernels()
    with override(backend="triton", **parse_assignments(args.option)):
        trace_step(args)


def trace_step(args: argparse.Namespace) -> None:
    from moekit.tools.bench import PRESETS, make_step

    step = make_step(
        PRESETS[args.preset], "moekit-triton", args.mode, args.tokens, "cpu", torch.bfloat16, args.lora_rank
    )
    step()
    step()
    start = heap_bytes()
    trace = HeapTrace()
    with trace:
        step()
    peak_at = max(range(len(trace.log)), key=lambda i: trace.log[i][0])
    mib = 2**20
    peak_mib = (trace.log[peak_at][0] - start) / mib
    print(
        f"{args.preset} T={args.tokens} {args.mode} r={args.lora_rank}: step peak {peak_mib:.0f} MiB above the start "
        f"({start / mib:.0f} MiB resident), at op {peak_at} of {len(trace.log)}"
    )
    before = start
    for i, (live, op, where) in enumerate(trace.log):
        if abs(live - before) >= args.min_mib * mib or i == peak_at:
            mark = ">" if i == peak_at else " "
            print(f"{mark} {i:4d} {(live - start) / mib:8.0f} MiB {(live - before) / mib:+7.0f}  {op[:36]:36s} {where}")
        before = live


if __name__ == "__main__":
    main()
