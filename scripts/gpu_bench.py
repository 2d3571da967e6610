"""The Triton-engine benchmark of the issue tracker, in one GPU call.

    PYTHONPATH=src python scripts/gpu_bench.py --out benchmarks/results/triton-engine.json

For each shape and T: transformers grouped_mm, moekit reference and moekit Triton; forward and full
forward+backward; median ms, TFLOP/s and peak memory. Prints a summary table last.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.bench import PRESETS, dense_matmul_tflops, run_case


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--impls", default="grouped_mm,moekit-reference,moekit-triton")
    parser.add_argument("--modes", default="fwd,full")
    parser.add_argument("--lora-ranks", default="16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    dense = dense_matmul_tflops()
    print(f"card: {card}; dense bf16 8192^3 matmul: {dense:.0f} TFLOP/s", flush=True)
    records = []
    for shape_name in args.shapes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            for mode in args.modes.split(","):
                for rank in map(int, args.lora_ranks.split(",")) if mode == "lora" else [16]:
                    for impl in args.impls.split(","):
                        try:
                            record = run_case(PRESETS[shape_name], impl, mode, tokens, lora_rank=rank, card=card)
                        except Exception as error:  # noqa: BLE001 - a failed row is reported, not fatal to the sweep
                            record = {"card": card, "shape": shape_name, "impl": impl, "mode": mode,
                                      "tokens": tokens, "error": f"{type(error).__name__}: {error}"[:300]}
                            torch.cuda.empty_cache()
                        record["dense_tflops"] = dense
                        records.append(record)
                        print(json.dumps(record), flush=True)
    with open(args.out, "w") as handle:
        json.dump(records, handle, indent=1)
    print(f"\n{'shape':16} {'T':>6} {'mode':5} {'impl':18} {'ms':>9} {'TF/s':>6} {'GiB':>6} {'x gmm':>6}")
    base = {(r["shape"], r["tokens"], r["mode"], r.get("lora_rank")): r for r in records
            if r["impl"] == "grouped_mm" and "ms" in r}
    for r in records:
        if "ms" not in r:
            print(f"{r['shape']:16} {r['tokens']:>6} {r['mode']:5} {r['impl']:18} {r['error'][:60]}")
            continue
        ref = base.get((r["shape"], r["tokens"], r["mode"], r.get("lora_rank")))
        speedup = ref["ms"] / r["ms"] if ref else float("nan")
        print(f"{r['shape']:16} {r['tokens']:>6} {r['mode']:5} {r['impl']:18} {r['ms']:9.2f} {r['tflops']:6.0f} "
              f"{r['peak_gib']:6.2f} {speedup:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
