"""The Hopper NF4 grouped GEMMs (``moekit.kernels.nf4_hopper``) at row tiles of 128, of 256, and in 256-row tiles with
128-row tails, on the same buffers (GPU only): the measurement behind ``nf4_hopper.row_launches`` (each launch on the
kernel ``nf4_hopper._uses_register_weight`` picks: byte pairs along K at 256-row tiles on the register-operand
kernel); beside them the Triton NF4 kernel of ``grouped_gemm`` (autotuned), which runs where the gluon kernels do
not.

    PYTHONPATH=src python tools/nf4_row_tile_bench.py

Random top-k routing at Nemotron-3-Nano's and Qwen3-30B-A3B's widths; per GEMM (the forward read of a stored
[E, out, in] weight, byte pairs along K; dX's transposed read, pairs along N) the µs of each plan, the one
``row_launches`` picks, the outputs' max relative difference to the first (the same sums: 0), and the Triton
kernel's µs and difference (its own summation order).
"""

from __future__ import annotations

import functools

import torch
import triton.testing

from moekit.kernels import grouped_gemm, nf4_hopper
from moekit.kernels.nf4 import code_table, nf4_mode
from moekit.plan import build_plan
from moekit.quant import NF4Tensor

CASES = [  # label, tokens, experts, top-k, hidden, intermediate
    ("nemotron 8k", 8192, 128, 6, 2688, 1856),
    ("qwen3 8k", 8192, 128, 8, 2048, 768),
    ("nemotron 2k", 2048, 128, 6, 2688, 1856),
    ("qwen3 2k", 2048, 128, 8, 2048, 768),
    ("nemotron 32k", 32768, 128, 6, 2688, 1856),
    ("gpt-oss 8k", 8192, 32, 4, 2880, 2880),
    ("mixtral 8k", 8192, 8, 2, 4096, 14336),
]


def grouped_gemms(cases):
    """Per case (label, tokens, experts, top-k, hidden, intermediate) and GEMM (the forward read of a stored [E, out,
    in] weight, byte pairs along K; dX's transposed read, pairs along N): (label, GEMM, plan of random top-k routing,
    NF4 weight viewed [E, K, N], its ``nf4_mode``, random bf16 rows [n, K]) on the GPU."""
    torch.manual_seed(0)
    for label, tokens, experts, top_k, hidden, inner in cases:
        plan = build_plan(torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices, experts)
        for name, stored, transposed in (("down/up-fwd (pairs along K)", (experts, hidden, inner), True),
                                         ("dX (pairs along N)", (experts, inner, hidden), False)):  # fmt: skip
            weight = NF4Tensor.quantize(torch.randn(stored, device="cuda") / inner**0.5, dtype=torch.bfloat16)
            view = weight.transpose(1, 2) if transposed else weight
            rows = torch.randn(plan.num_rows, view.shape[1], device="cuda", dtype=torch.bfloat16)
            yield label, name, plan, view, nf4_mode(view, view.shape[2]), rows


def main() -> None:
    table = code_table(torch.device("cuda"))
    for label, name, plan, view, mode, rows in grouped_gemms(CASES):
        n, experts = plan.num_rows, view.shape[0]
        outs, times = [], []
        for row_tile in (128, 256, None):  # None: row_launches' plan
            out = torch.empty(n, view.shape[2], device="cuda", dtype=torch.bfloat16)
            launch = functools.partial(nf4_hopper.grouped_gemm_nf4, rows, view, plan.tokens_per_expert, n, out,
                                       mode, table, row_tile=row_tile)  # fmt: skip
            launch()
            times.append(triton.testing.do_bench(launch, warmup=10, rep=60) * 1e3)
            outs.append(out.float())
        diff = max(((out - outs[0]).abs().max() / outs[0].abs().max()).item() for out in outs[1:])
        runs, nf4_hopper.runs = nf4_hopper.runs, lambda *args: False  # grouped_gemm: the Triton kernel
        try:
            triton_gemm = functools.partial(grouped_gemm, rows, view, plan.tokens_per_expert, n)
            triton_out = triton_gemm().float()  # tunes on first call
            triton_us = triton.testing.do_bench(triton_gemm, warmup=10, rep=60) * 1e3
        finally:
            nf4_hopper.runs = runs
        triton_diff = ((triton_out - outs[0]).abs().max() / outs[0].abs().max()).item()
        launches = nf4_hopper.row_launches(n, experts)
        chosen = "256 + 128 tails" if len(launches) == 2 else f"{launches[0][0]}"
        print(f"{label:12s} {name:28s} mode {mode} n={n}: bm128 {times[0]:8.1f} us  bm256 {times[1]:8.1f} us  "
              f"plan ({chosen}) {times[2]:8.1f} us  diff {diff:.1e}  triton {triton_us:8.1f} us  "
              f"diff {triton_diff:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
