"""moekit's switches, read once from the environment into one object that the engines and kernels read.

Four environment variables are a user's to set:

    MOEKIT_BACKEND          "reference" | "triton" | unset: force an engine (default: Triton on CUDA where the
                            kernels cover the call, the reference engine elsewhere)
    MOEKIT_TRITON_AUTOTUNE  "1" (tune over each kernel's small config space) | "0" (each kernel's default
                            config) | "config:N" (each kernel's N-th config, for correctness runs over every config)
    MOEKIT_CACHE_DIR        where tuned kernel configs persist (default ``$XDG_CACHE_HOME/moekit``)
    MOEKIT_TUNING_BROADCAST "1": in a torch.distributed process group every rank takes rank 0's tuned config for
                            each new tuning key (a broadcast at the key's first launch: every rank must reach the
                            same keys in the same order, as data-parallel ranks of equal batch shapes do); "0" or
                            unset: each rank tunes for itself (ranks may then run different tile configs)

The other fields are not environment variables: tests and measurements set them on ``OPTIONS`` (``override``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator

ENGINES = ("reference", "triton")


class OptionsError(ValueError):
    """A MOEKIT_* environment variable holds a value moekit does not know (a one-line message naming it)."""


def _choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise OptionsError(f"{name} must be one of {', '.join(v or '(unset)' for v in valid)}; got {value!r}")
    return value


def _autotune(value: str) -> int | None:
    """None: tune; otherwise the index of the one config each kernel family keeps."""
    if value == "1":
        return None
    if value == "0":
        return 0
    index = value.removeprefix("config:")
    if value.startswith("config:") and index.isdigit():
        return int(index)
    raise OptionsError(f"MOEKIT_TRITON_AUTOTUNE must be 1, 0 or config:N (N >= 0); got {value!r}")


@dataclasses.dataclass
class Options:
    # The engine: "" (choose per call), "reference" or "triton" (an error where it cannot run the call).
    backend: str = ""
    # Autotuning: None tunes; an int pins each kernel family's config of that index (0: its default).
    pinned_config: int | None = None
    # Where tuned configs persist; None: $XDG_CACHE_HOME/moekit (~/.cache/moekit).
    cache_dir: str | None = None
    # Who runs the grouped GEMMs that need no gather and no epilogue: "torch" (its grouped_mm where it runs,
    # faster than the Triton kernels at every measured shape) or "triton" (tests: the Triton GEMMs everywhere).
    plain_gemm: str = "torch"
    # A big GEMM with a LoRA term: "auto" (split where the reduction is long, ``engines.triton.SPLIT_LORA_MIN_K``),
    # "split" (base product on grouped_mm, the LoRA term added in place) or "fused" (both in one Triton kernel).
    lora_gemm: str = "auto"
    # Distributed: every rank takes rank 0's tuned config (MOEKIT_TUNING_BROADCAST, see the module docstring).
    tuning_broadcast: bool = False
    # Tests: every buffer a kernel must fully write starts as NaN, so an element no program wrote shows.
    poison_outputs: bool = False

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Options:
        """The options the environment asks for; raises ``OptionsError`` for a value moekit does not know."""
        env = os.environ if environ is None else environ
        return cls(
            backend=_choice("MOEKIT_BACKEND", env.get("MOEKIT_BACKEND", "").strip().lower(), ("", *ENGINES)),
            pinned_config=_autotune(env.get("MOEKIT_TRITON_AUTOTUNE", "1").strip()),
            cache_dir=env.get("MOEKIT_CACHE_DIR") or None,
            tuning_broadcast=_choice(
                "MOEKIT_TUNING_BROADCAST", env.get("MOEKIT_TUNING_BROADCAST", "0").strip(), ("0", "1", "")
            )
            == "1",
        )


def _initial() -> tuple[Options, OptionsError | None]:
    """Options from the environment at import; a bad value is kept and raised where the engine is chosen (so
    ``import moekit`` itself never fails on it, and the command line can print it as one line)."""
    try:
        return Options.from_env(), None
    except OptionsError as error:
        return Options(), error


OPTIONS, _ENV_ERROR = _initial()


def check_environment() -> None:
    """Raise the ``OptionsError`` of a bad MOEKIT_* value found at import, if any."""
    if _ENV_ERROR is not None:
        raise _ENV_ERROR


def parse_assignments(specs: list[str]) -> dict:
    """``FIELD=VALUE`` strings (a tool's ``--option``) -> ``override``'s keyword arguments (VALUE as JSON where it
    parses, else the string)."""
    changes = {}
    for spec in specs:
        field, eq, text = spec.partition("=")
        if not (eq and field):
            raise ValueError(f"--option takes FIELD=VALUE, got {spec!r}")
        try:
            changes[field] = json.loads(text)
        except json.JSONDecodeError:
            changes[field] = text
    return changes


@contextlib.contextmanager
def override(**changes) -> Iterator[Options]:
    """Set fields of ``OPTIONS`` for the duration of a ``with`` block (tests, benchmarks)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Options)}
    if unknown:
        raise TypeError(f"unknown moekit option(s): {sorted(unknown)}")
    saved = {name: getattr(OPTIONS, name) for name in changes}
    for name, value in changes.items():
        setattr(OPTIONS, name, value)
    try:
        yield OPTIONS
    finally:
        for name, value in saved.items():
            setattr(OPTIONS, name, value)
