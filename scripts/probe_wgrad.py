"""How fast is torch's grouped_mm at the weight-gradient shape (dW_e = Σ dYᵀ X over an expert's rows)?

    PYTHONPATH=src python scripts/probe_wgrad.py

The Triton weight-gradient kernel runs at ~270-340 TFLOP/s at the Nemotron-3-Nano shape (H200); if cuBLAS/
CUTLASS grouped GEMM does much better here, the Triton engine should hand its weight gradients to it.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from moekit.kernels import grouped_gemm
from moekit.plan import build_plan

SHAPES = {"nemotron3-nano": (2688, 1856, 128, 6), "qwen3-30b-a3b": (2048, 1536, 128, 8)}  # H, up width, E, K


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    print(torch.cuda.get_device_name())
    for name, (hidden, width, experts, top_k) in SHAPES.items():
        tokens = 8192
        index = torch.randn(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
        plan = build_plan(index, experts)
        n = plan.num_routed
        rows = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(n, width, device="cuda", dtype=torch.bfloat16)
        ms = time_ms(lambda grad=grad, rows=rows, offs=plan.offsets: F.grouped_mm(grad.t(), rows, offs=offs))
        tflops = 2 * n * hidden * width / (ms * 1e-3) / 1e12
        print(f"{name}: grouped_mm weight gradient [E={experts}, {width}, {hidden}] over {n} rows: "
              f"{ms:.3f} ms, {tflops:.0f} TFLOP/s")
        # Plain (no gather, no epilogue) grouped GEMMs of the forward/dX shapes: torch's against the Triton kernel.
        for left, right in ((grad, (experts, width, hidden)), (rows, (experts, hidden, width))):
            weight = torch.randn(right[0], right[2], right[1], device="cuda", dtype=torch.bfloat16) * 0.02
            weight = weight.transpose(1, 2)  # [E, in, out] view of an [E, out, in] parameter, as the engine has
            flops = 2 * n * right[1] * right[2]
            for label, fn in (
                ("grouped_mm", lambda a=left, w=weight, offs=plan.offsets: F.grouped_mm(a, w, offs=offs)),
                ("triton", lambda a=left, w=weight, c=plan.tokens_per_expert, rows=n: grouped_gemm(a, w, c, rows)),
            ):
                ms = time_ms(fn)
                print(f"  {label:10s} [{n}, {right[1]}] @ [E, {right[1]}, {right[2]}]: {ms:.3f} ms, "
                      f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
