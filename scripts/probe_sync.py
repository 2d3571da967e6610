"""Probe: what a host sync in the dispatch plan costs. Times benchmark steps (``moekit.tools.bench.make_step``) with the
plan as it is (no sync) and with one forced sync per call (reading ``plan.num_routed``, as the plan did before),
against grouped_mm, all in one process. Two timings each (medians of 20 steps): the host waiting for the GPU after
every step, and steps queued back to back (the host may run ahead of the GPU; ``moekit bench``'s "ms")."""

from __future__ import annotations

import statistics

import torch

from moekit import backend
from moekit.tools.bench import PRESETS, _timer, make_step

no_sync = backend.build_plan


def synced_plan(top_k_index, num_experts):
    plan = no_sync(top_k_index, num_experts)
    _ = plan.num_routed  # the host waits for the router and everything queued before it
    return plan


def time_step(step, repeats=20):
    for _ in range(3):
        step()
    single = statistics.median(_timer("cuda", back_to_back=False)(step, repeats))
    return single, statistics.median(_timer("cuda")(step, repeats))


def main() -> None:
    print(torch.cuda.get_device_name())
    for preset in ("nemotron3-nano", "qwen3-30b-a3b"):
        for mode in ("fwd", "full", "lora"):
            row = {}
            for name in ("grouped_mm", "synced", "no_sync"):
                backend.build_plan = synced_plan if name == "synced" else no_sync
                impl = "grouped_mm" if name == "grouped_mm" else "moekit-triton"
                row[name] = time_step(make_step(PRESETS[preset], impl, mode, 8192, "cuda", torch.bfloat16))
                torch.cuda.empty_cache()
            base = row["grouped_mm"]
            cells = [
                f"{k} {v[0]:.3f}/{v[1]:.3f} ms ({base[0] / v[0]:.2f}x/{base[1] / v[1]:.2f}x)" for k, v in row.items()
            ]
            print(f"{preset:15s} {mode:5s} T=8192: " + "  ".join(cells), flush=True)
    backend.build_plan = no_sync


if __name__ == "__main__":
    main()
