"""Where does one expert-layer step spend its GPU time? Kernel-level breakdown of a `moekit bench` case.

    PYTHONPATH=src python tools/profile_step.py --preset nemotron3-nano --tokens 8192 --mode lora [--option F=V]

Prints the median step time (CUDA events, as the benchmark measures it), the host's own time per step (5 steps
queued with no sync, the routing checks' read-back left for after: when it exceeds the step time, the host bounds
the step), the gaps (step time minus kernel time) and torch.profiler's per-kernel CUDA time averaged over the
profiled steps, largest first. ``--option FIELD=VALUE`` sets a field of ``moekit.options.OPTIONS`` for the run
(repeatable; VALUE as JSON where it parses).
``--python`` adds the host's own time by function (cProfile), ``--tuning`` the config the tuner chose per key.

``--ncu``: after the warm-up steps, one step between ``cudaProfilerStart`` / ``cudaProfilerStop`` and nothing else,
for Nsight Compute's hardware counters on exactly that step's kernels (tuning stays outside the range):

    ncu --profile-from-start off -k regex:"grouped_gemm|up_proj|act_backward" --section SpeedOfLight \
        --section Occupancy --section SchedulerStats python tools/profile_step.py --preset qwen3-30b-a3b \
        --tokens 8192 --mode lora --impl moekit-triton+nf4 --ncu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

import moekit.plan as plan_module
from moekit.options import override, parse_assignments
from moekit.tools.bench import PRESETS, _timer, add_case_arguments, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser)
    parser.add_argument("--impl", default="moekit-triton")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--python", action="store_true", help="also profile the host side (cProfile, own time)")
    parser.add_argument("--tuning", action="store_true", help="also print the config the autotuner chose per key")
    parser.add_argument("--option", action="append", default=[], help="FIELD=VALUE of moekit.options (repeatable)")
    parser.add_argument("--ncu", action="store_true", help="one step inside a CUDA profiler range, for ncu; no timing")
    args = parser.parse_args()
    with override(**parse_assignments(args.option)) if args.option else contextlib.nullcontext():
        profile(args)


def profile(args: argparse.Namespace) -> None:
    step = make_step(
        PRESETS[args.preset], args.impl, args.mode, args.tokens, "cuda", torch.bfloat16, lora_rank=args.lora_rank
    )

    for _ in range(3):
        step()
    if args.ncu:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    ms = statistics.median(_timer("cuda")(step, 10))
    torch.cuda.synchronize()
    # No sync in a step: the host runs ahead, and this is its own time per step. The routing range checks would
    # hold it MAX_PENDING_CHECKS steps ahead of the GPU (each new call waits for the check that many calls back),
    # so they queue up here; 5 steps stay well inside CUDA's launch queue, past which launches block too.
    pending, plan_module.MAX_PENDING_CHECKS = plan_module.MAX_PENDING_CHECKS, 1 << 30
    try:
        begin = time.perf_counter()
        for _ in range(5):
            step()
        host_ms = (time.perf_counter() - begin) * 1e3 / 5
    finally:
        plan_module.MAX_PENDING_CHECKS = pending
    torch.cuda.synchronize()
    plan_module.raise_pending_routing_errors()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / args.steps / 1e3
    print(
        f"{args.preset} T={args.tokens} {args.mode} r={args.lora_rank} {args.impl}: step {ms:.3f} ms (events), "
        f"kernels {total:.3f} ms/step, gaps {ms - total:.3f} ms, host {host_ms:.3f} ms/step"
    )
    for e in events[: args.rows]:
        per_step = e.device_time_total / args.steps / 1e3
        print(f"  {per_step:7.3f} ms  x{e.count // args.steps:<3d} {e.key[:100]}")
    if args.tuning:
        from moekit.kernels.tuning import tuning_report

        for line in tuning_report():
            print("  tuned:", line)
    if args.python:  # host time per step by function (time blocked in a device sync shows up as its own time)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler)
        print(f"  host: {stats.total_tt / args.steps * 1e3:.3f} ms/step; own time per step, largest first:")
        rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[: args.rows]
        for (path, line, name), (_, calls, own, cumulative, _) in rows:
            where = f"{os.path.basename(path)}:{line}({name})"
            print(
                f"  {own / args.steps * 1e3:7.3f} ms own {cumulative / args.steps * 1e3:7.3f} cum "
                f"x{calls // args.steps:<4d} {where[:90]}"
            )


if __name__ == "__main__":
    main()
