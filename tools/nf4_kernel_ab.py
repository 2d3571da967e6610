"""Variants of the Hopper NF4 kernels (``moekit.kernels.nf4_hopper``) against the engine's, per GEMM, on the same
buffers, in one process (GPU only):

    PYTHONPATH=src python tools/nf4_kernel_ab.py VARIANT.py [VARIANT.py ...] [--rounds 3]

A variant is a copy of ``src/moekit/kernels/nf4_hopper.py`` with a change (e.g. ``git show REV:src/moekit/kernels/
nf4_hopper.py > old.py`` for older code: the device copies the working tree, not git). Each is loaded as a module
beside the engine's (its relative imports resolve to this checkout's kernels) and launched through its own
``grouped_gemm_nf4`` at the engine's row-tile plans, on tools/nf4_row_tile_bench.py's GEMMs (random top-k routing;
the forward's read with byte pairs along K, dX's with pairs along N). Per GEMM: the engine's µs, each variant's µs
and ratio (median of ``--rounds`` runs), and whether its output has the engine's bits (a reordering must; a change
of the summation may not, and then its max relative difference shows instead); last, each variant's geometric
mean of the ratios. A kernel timed later in a round reads slower (the card warms: 1-4 % on an H200), so each round
starts one kernel later than the one before, and a ``control`` (the engine's own file, loaded as a variant) shows
what a change that does nothing reads. Grew out of BENCHMARKS.md's loop-order A/B.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import pathlib
import statistics
import sys

import torch
import triton.testing

from moekit.kernels import nf4_hopper
from moekit.kernels.nf4 import code_table

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from nf4_row_tile_bench import CASES, grouped_gemms


def load_variant(path: pathlib.Path):
    """``path`` as a module of the package ``moekit.kernels``: a file of its own there while this process runs (gluon
    reads the kernels' source), removed at exit."""
    name = f"_ab_{path.stem.replace('-', '_')}"
    target = pathlib.Path(nf4_hopper.__file__).with_name(f"{name}.py")
    target.write_text(path.read_text())
    atexit.register(target.unlink, missing_ok=True)
    spec = importlib.util.spec_from_file_location(f"moekit.kernels.{name}", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", type=pathlib.Path, help="copies of nf4_hopper.py with a change")
    parser.add_argument("--rounds", type=int, default=4, help="timed runs of each kernel, rotated (median)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("nf4_kernel_ab: the gluon kernels run on an sm_90 GPU (Hopper) only")
    control = pathlib.Path(nf4_hopper.__file__)
    kernels = {"engine": nf4_hopper, "control": load_variant(control)}
    kernels |= {path.stem: load_variant(path) for path in args.variants}
    table = code_table(torch.device("cuda"))
    ratios = {name: [] for name in kernels if name != "engine"}
    for label, gemm, plan, view, mode, rows in grouped_gemms(CASES):
        outs, launches = {}, {}
        for name, module in kernels.items():
            out = torch.full((plan.num_rows, view.shape[2]), float("nan"), device="cuda", dtype=torch.bfloat16)
            launches[name] = functools.partial(module.grouped_gemm_nf4, rows, view, plan.tokens_per_expert,
                                               plan.num_rows, out, mode, table)  # fmt: skip
            outs[name] = launches[name]().clone()  # compiles
        times = {name: [] for name in kernels}
        names = list(kernels)
        for round_ in range(args.rounds):
            start = round_ % len(names)
            for name in names[start:] + names[:start]:
                times[name].append(triton.testing.do_bench(launches[name], warmup=5, rep=40) * 1e3)
        base = statistics.median(times["engine"])
        line = f"{label:12s} {gemm:28s} engine {base:8.1f} us"
        routed = slice(0, int(plan.offsets[-1]))  # rows past the routed ones are never written
        for name, ratio in ratios.items():
            us = statistics.median(times[name])
            ours, want = outs[name][routed].float(), outs["engine"][routed].float()
            same = torch.equal(outs[name][routed], outs["engine"][routed])
            diff = "same bits" if same else f"differs {((ours - want).abs().max() / want.abs().max()).item():.1e}"
            ratio.append(us / base)
            line += f"  {name} {us:8.1f} ({us / base:.3f}, {diff})"
        print(line, flush=True)
    for name, values in ratios.items():
        print(f"{name}: geometric mean {statistics.geometric_mean(values):.4f} over {len(values)} GEMMs")


if __name__ == "__main__":
    main()
