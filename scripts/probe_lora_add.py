"""Probe: what the split LoRA GEMM costs, piece by piece, at real shapes (issue #4).

    PYTHONPATH=src python scripts/probe_lora_add.py --preset nemotron3-nano,qwen3-30b-a3b --tokens 8192,32768

For the two big GEMMs that take a LoRA term where split (the forward down-projection and dX), times the base
product on torch's grouped_mm, the Triton GEMM without and with the fused LoRA term, and the in-place add of
u @ L[e] (``kernels.lora_add``), with the add's effective bandwidth against torch's own ``add_`` over the same
bytes (the ceiling a memory-bound pass reaches on this card); with ``--configs``, every tile config of the add.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

from moekit.tools.bench import PRESETS, make_routing
from moekit.grouped import grouped_matmul
from moekit.kernels import grouped_gemm, lora_add
from moekit.kernels.tiling import Autotuned, configs
from moekit.plan import build_plan


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def probe(preset: str, tokens: int, rank: int, config_sweep: bool) -> None:
    shape = PRESETS[preset]
    _, index, _ = make_routing(shape, tokens, "cuda", torch.bfloat16)
    plan = build_plan(index, shape.num_experts)
    n, experts = plan.num_rows, shape.num_experts
    width = 2 * shape.intermediate if shape.gated else shape.intermediate
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size, std=1.0):
        return (torch.randn(*size, device="cuda", generator=gen) * std).to(torch.bfloat16)

    # The forward down-projection a [S, I] @ W_down[e] [I, H]; dX dh [S, W] @ W_up[e]ᵀ [W, H]
    for name, k_dim in (("fwd down", shape.intermediate), ("dX", width)):
        rows, weight = rand(n, k_dim), rand(experts, k_dim, shape.hidden, std=k_dim**-0.5)
        u, factor = rand(n, rank), rand(experts, rank, shape.hidden, std=0.01)
        probe_gemm(f"{preset} T={tokens} r={rank} {name}", plan, rows, weight, u, factor, config_sweep)
        torch.cuda.empty_cache()


def probe_gemm(label: str, plan, rows, weight, u, factor, config_sweep: bool) -> None:
    n, counts = plan.num_rows, plan.tokens_per_expert
    base = grouped_matmul(rows, weight, plan)
    gmm = bench_ms(lambda: grouped_matmul(rows, weight, plan))
    fused = bench_ms(lambda: grouped_gemm(rows, weight, counts, n, lora=(u, factor)))
    plain = bench_ms(lambda: grouped_gemm(rows, weight, counts, n))
    add = bench_ms(lambda: lora_add(base, u, factor, counts, n))
    other = base.clone()
    torch_add = bench_ms(lambda: base.add_(other).sub_(other))  # two passes, base unchanged
    out_bytes = 2 * base.numel() * base.element_size() + u.numel() * u.element_size()
    print(
        f"{label} (S={n}, K={rows.shape[1]}, N={base.shape[1]}): grouped_mm {gmm:.3f} ms, triton plain {plain:.3f}, "
        f"triton fused LoRA {fused:.3f}, split = grouped_mm + add {gmm + add:.3f} | add {add:.3f} ms = "
        f"{gbs(out_bytes, add):.0f} GB/s; torch add_ {gbs(6 * base.numel() * base.element_size(), torch_add):.0f} GB/s",
        flush=True,
    )
    if config_sweep:
        module = sys.modules["moekit.kernels.lora_add"]  # the package exports the function under the same name
        for i in range(len(configs("lora_add"))):
            os.environ["MOEKIT_TRITON_AUTOTUNE"] = f"config:{i}"
            module._KERNEL = Autotuned(module._lora_add_kernel, "lora_add", key=["N", "R", "M_BUCKET"])
            ms = bench_ms(lambda: lora_add(base, u, factor, counts, n))
            print(f"    add config {i} {configs('lora_add')[0]}: {ms:.3f} ms {gbs(out_bytes, ms):.0f} GB/s")
        os.environ.pop("MOEKIT_TRITON_AUTOTUNE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nemotron3-nano,qwen3-30b-a3b")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--configs", action="store_true", help="also time every tile config of the add")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for preset in args.preset.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            probe(preset, tokens, args.rank, args.configs)


if __name__ == "__main__":
    main()
