"""Probe: where the host time of a benchmark step goes, and what one Triton launch costs on the host.

    PYTHONPATH=src python scripts/probe_launch.py --preset qwen3-30b-a3b --tokens 8192 --mode lora

1. Host ms per step (steps queued back to back, no sync inside: the host's own time), three ways: as is; with every
   launch through triton's jit function (``kernels.launch.ENABLED`` off, when the code has it); with every Triton
   launch a no-op (what the rest of the step costs the host), and that step's host time by function (cProfile).
2. Host µs per launch of each kernel the step launches through ``Autotuned``, replayed with the step's own
   arguments: through ``Autotuned.launch``, through the jit function with the chosen config, and through the
   compiled kernel's runner.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import triton

from moekit import kernels
from moekit.tools.bench import PRESETS, add_case_arguments, make_step
from moekit.kernels import tiling


def host_us(fn, repeats: int, warmup: int = 1) -> float:
    """Host µs per call of ``fn``: calls queued back to back, no sync between them (the host's own time)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed * 1e6 / repeats


def host_ms(step) -> float:
    return host_us(step, repeats=20, warmup=3) / 1e3


def per_call_us(fn) -> float:
    return host_us(fn, repeats=200)


def replay(kernel, tuner, grid, call_args: tuple, kwargs: dict) -> None:
    """Host µs per launch of one recorded launch: through Autotuned, the jit function and the compiled kernel."""
    key = (
        tuple(kwargs[k] if k in kwargs else call_args[kernel._position[k]] for k in kernel.key),
        tuple(a.dtype for a in call_args if isinstance(a, torch.Tensor)),
    )
    chosen = kernel.chosen[key]
    compiled = kernel.jit_fn[grid](*call_args, **kwargs, **chosen)
    options = {k: v for k, v in chosen.items() if k not in kernel._position}
    constexprs = {k: v for k, v in chosen.items() if k in kernel._position}
    bound = kernel.jit_fn.signature.bind(*call_args, **kwargs, **constexprs)
    bound.apply_defaults()
    values = tuple(bound.arguments.values())
    runner = compiled[(tuple(grid(dict(bound.arguments))) + (1, 1))[:3]]
    via_autotuned = per_call_us(lambda: kernel.launch(tuner, grid, call_args, kwargs))
    via_jit = per_call_us(lambda: kernel.jit_fn[grid](*call_args, **kwargs, **chosen))
    via_compiled = per_call_us(lambda: runner(*values))
    print(
        f"  {kernel.jit_fn.__name__:24s} [{kernel.family:8s}] host µs/launch: Autotuned {via_autotuned:6.1f}, "
        f"jit {via_jit:6.1f}, compiled runner {via_compiled:6.1f}  (options {options})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, preset="qwen3-30b-a3b", mode="lora")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    step = make_step(PRESETS[args.preset], "moekit-triton", args.mode, args.tokens, "cuda", torch.bfloat16, args.lora_rank)
    label = f"{args.preset} T={args.tokens} {args.mode} r={args.lora_rank}"
    print(f"{label}: host {host_ms(step):.3f} ms/step as is")
    if hasattr(kernels, "launch"):
        kernels.launch.ENABLED = False
        print(f"{label}: host {host_ms(step):.3f} ms/step with every launch through triton's jit (fast launch off)")
        kernels.launch.ENABLED = True

    # Record the launches of one step, then replay each (same arguments) three ways.
    calls = []
    real_launch = tiling.Autotuned.launch

    def recording_launch(self, tuner, grid, call_args, kwargs):
        real_launch(self, tuner, grid, call_args, kwargs)
        calls.append((self, tuner, grid, call_args, kwargs))

    tiling.Autotuned.launch = recording_launch
    step()
    tiling.Autotuned.launch = real_launch
    torch.cuda.synchronize()
    for call in calls:
        replay(*call)

    # The step with every Triton launch a no-op: the rest of the host's work.
    jit_run = triton.runtime.jit.JITFunction.run
    tiling.Autotuned.launch = lambda *a, **k: None
    triton.runtime.jit.JITFunction.run = lambda *a, **k: None
    if hasattr(kernels, "launch"):
        kernels.launch.ENABLED = False  # launches of compiled kernels would bypass the patched jit function
    print(f"  host {host_ms(step):.3f} ms/step with no Triton launches (outputs garbage); own time per step:")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        step()
    profiler.disable()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: item[1][2], reverse=True)[:25]
    for (path, line, name), (_, count, own, cumulative, _) in rows:
        where = f"{path.split('/')[-1]}:{line}({name})"
        print(f"  {own * 100:7.3f} ms own {cumulative * 100:7.3f} cum x{count // 10:<4d} {where}")
    tiling.Autotuned.launch = real_launch
    triton.runtime.jit.JITFunction.run = jit_run


if __name__ == "__main__":
    main()
