"""Same-call A/B of code variants: `moekit bench` in alternating processes, one table on stdout, one JSON.

    git archive <rev> src | tar -x -C ab_old        # on your machine: the older code, untracked (carried over)
    python tools/ab_bench.py --variant old=ab_old/src --variant new=src --rounds 2 --json $OUT/ab.json -- \\
        --preset nemotron3-nano --tokens 8192,32768 --modes lora --lora-rank 16,64 --impls moekit-triton

    python tools/ab_bench.py --variant fused=src --variant split=src --option fused:lora_gemm=fused \\
        --option split:lora_gemm=split -- --preset gpt-oss-20b --modes lora --impls moekit-triton

A variant is a ``PYTHONPATH`` (older code, or this code) and optionally fields of ``moekit.options.OPTIONS`` set
for its process (``--option NAME:FIELD=VALUE``, VALUE read as JSON where it parses, else as a string): the way to
A/B the switches that are not environment variables. Each round runs every variant once, in the order given
(old, new, old, new, ...), each in its own process: two processes of one variant show the spread between
processes (up to 4 % on an H200, 30 % where a step is host-bound), which a difference between variants must
exceed to mean anything. The summary goes to stdout and all records into one JSON file, so nothing depends on
fetching many files back from the GPU machine (the device tool returns a limited number). Arguments after ``--``
go to ``moekit bench`` unchanged; a process that fails or times out is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import defaultdict


def check_variant(path: str) -> None:
    """Fail unless ``PYTHONPATH=path`` makes Python import moekit from ``path``: an editable install's import hook
    takes precedence over PYTHONPATH, and then every variant would silently run the installed code."""
    env = {**os.environ, "PYTHONPATH": path}
    probe = [sys.executable, "-c", "import moekit; print(moekit.__file__)"]
    found = subprocess.run(probe, check=False, env=env, capture_output=True, text=True).stdout.strip()
    if not os.path.abspath(found).startswith(os.path.abspath(path) + os.sep):
        raise SystemExit(
            f"with PYTHONPATH={path}, moekit imports from {found or 'nowhere'}: run where moekit is not installed "
            "(the GPU machine), or `pip uninstall moekit` first"
        )


# `moekit bench` with fields of moekit.options.OPTIONS set for the whole process: argv[1] is the fields as JSON.
_WITH_OPTIONS = """
import json, sys
from moekit.options import override
from moekit.tools.cli import main
with override(**json.loads(sys.argv[1])):
    raise SystemExit(main(sys.argv[2:]))
"""


def parse_option(spec: str) -> tuple[str, str, object]:
    """``NAME:FIELD=VALUE`` -> (variant, field, value); VALUE as JSON where it parses (1, true, null), else text."""
    name, sep, assignment = spec.partition(":")
    field, eq, text = assignment.partition("=")
    if not (sep and eq and name and field):
        raise SystemExit(f"--option takes NAME:FIELD=VALUE, got {spec!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return name, field, value


def run_variant(
    name: str, path: str, bench_args: list[str], timeout: float, options: dict | None = None
) -> tuple[list[dict], str]:
    """The records of one `moekit bench` process run with ``PYTHONPATH=path`` (and ``options`` set on
    ``moekit.options.OPTIONS``), and how it ended."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "records.json")
        env = {**os.environ, "PYTHONPATH": path}
        bench = [*bench_args, "--json", out]
        if options:
            command = [sys.executable, "-c", _WITH_OPTIONS, json.dumps(options), "bench", *bench]
        else:
            command = [sys.executable, "-m", "moekit", "bench", *bench]
        try:
            done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:.0f} s"
        if done.returncode != 0 or not os.path.exists(out):
            return [], f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ['no output']}"
        with open(out) as handle:
            return json.load(handle), "ok"


def summary(records: list[dict], variants: list[str]) -> list[str]:
    """One line per case: each variant's ms per process, then its step GiB."""
    cases: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if "ms" in record:
            key = (record["shape"], record["tokens"], record["mode"], record.get("lora_rank"), record["impl"])
            cases[key][record["variant"]].append(record)
    lines = []
    for (shape, tokens, mode, rank, impl), by_variant in sorted(cases.items(), key=str):
        label = f"{shape} T={tokens} {mode}{f' r={rank}' if rank else ''} {impl}:"
        cells = []
        for name in variants:
            runs = by_variant.get(name, [])
            ms = " / ".join(f"{r['ms']:.3f}" for r in runs) or "-"
            step_gib = runs[0].get("step_gib", math.nan) if runs else math.nan  # NaN on the CPU
            gib = "" if math.isnan(step_gib) else f", {step_gib:.3f} GiB"
            cells.append(f"{name} {ms} ms{gib}")
        lines.append(f"{label} " + " | ".join(cells))
    return lines


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME=PYTHONPATH (repeat; run in order)")
    parser.add_argument(
        "--option", action="append", default=[], help="NAME:FIELD=VALUE, a moekit.options field for variant NAME"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per process")
    parser.add_argument("--json", help="write every record (with its variant and process) to this file")
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    variants = [tuple(spec.split("=", 1)) for spec in args.variant]
    if any(len(v) != 2 or not v[0] for v in variants):
        parser.error("--variant takes NAME=PYTHONPATH")
    options: dict[str, dict] = {}
    for spec in args.option:
        name, field, value = parse_option(spec)
        if name not in dict(variants):
            parser.error(f"--option {spec!r} names no variant")
        options.setdefault(name, {})[field] = value
    for _, path in variants:
        check_variant(path)
    records = []
    for round_index in range(args.rounds):
        for name, path in variants:
            got, how = run_variant(name, path, bench_args, args.timeout, options.get(name))
            print(f"round {round_index + 1} {name} ({path}): {how}, {len(got)} records", flush=True)
            records += [{**r, "variant": name, "options": options.get(name, {}), "process": round_index} for r in got]
    print("\n".join(summary(records, [name for name, _ in variants])))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
