"""The autotuner never changes what a launch computes, and its choices persist on disk.

Under the interpreter every kernel family normally has one config (no tuning). Here each family gets three, and the
tuning timer runs every candidate on the live buffers (as ``triton.testing.do_bench`` does on a GPU) and prefers
the last one, so the real launch follows a tuning pass that ran every config. The first call of every engine path
(fused and split LoRA, fused and split dA, torch and Triton plain GEMMs; gated, non-gated, gpt-oss; frozen and
trainable base) must equal the reference and, bit for bit, the same call once tuned.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing

import pytest
import torch
from test_triton_lora import ALL, FROZEN_BASE, NAMES, make_case, run
from triton_compare import assert_matches

pytest.importorskip("triton")

from moekit.backend import triton_available
from moekit.engines.reference import experts_reference
from moekit.engines.triton import experts_triton
from moekit.kernels import tuning as tuner
from moekit.kernels.tuning_cache import TuningCache
from moekit.options import OPTIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(DEVICE == "cuda" or not triton_available(DEVICE), reason="forces the interpreter's spaces"),
]

# Three candidates per family: block sizes differ, so a wrong restore or a stale config changes the result
_SPACES = {
    family: [(16, bn, bk, 4, 1), (32, bn, bk, 4, 1), (16, 2 * bn, bk, 4, 1) if bn else (32, bn, bk, 2, 1)]
    for family, ((_, bn, bk, _, _),) in ((f, s["interpret"]) for f, s in tuner._SPACES.items())
}


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Several configs per family, a timer that runs each candidate (twice) and prefers the last, empty choices
    and an empty cache directory; yields the list of timed calls."""
    monkeypatch.setattr(OPTIONS, "cache_dir", str(tmp_path))
    monkeypatch.setattr(OPTIONS, "pinned_config", None)
    for family, space in _SPACES.items():
        monkeypatch.setitem(tuner._SPACES[family], "interpret", space)
    countdown = itertools.count(1000, -1)
    timed = []

    def timer(call):
        call()
        call()  # a second run on the same buffers, as any benchmark loop does
        timed.append(call)
        return float(next(countdown))

    monkeypatch.setattr(tuner, "_time_config", timer)
    monkeypatch.setattr(tuner, "_tuning_cache", lambda: TuningCache("interpreter", "test"))
    for kernel in tuner.Autotuned.registry:
        monkeypatch.setattr(kernel, "chosen", {})
    return timed


CASES = {
    # name: (make_case kwargs, options, requires_grad)
    "relu2-fused-lora": ({"layout": "relu2"}, {"lora_gemm": "fused"}, FROZEN_BASE),
    "relu2-split-lora": ({"layout": "relu2", "sentinel_fraction": 0.2}, {"lora_gemm": "split"}, FROZEN_BASE),
    "silu-split-lora-trainable": ({"layout": "silu_glu"}, {"lora_gemm": "split"}, ALL),
    "gpt_oss-triton-gemms": ({"layout": "gpt_oss", "ranks": (5, 80)}, {"plain_gemm": "triton"}, ALL),
    "silu-no-lora": ({"layout": "silu_glu", "projections": ()}, {}, ALL),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_first_call_equals_tuned_call(tuning, monkeypatch, name):
    kwargs, options, requires_grad = CASES[name]
    for key, value in options.items():
        monkeypatch.setattr(OPTIONS, key, value)
    case = make_case(T=21, E=3, **kwargs)
    first = run(experts_triton, case, requires_grad)
    assert tuning, "no kernel tuned: the test does not exercise the tuner"
    tuned_calls = len(tuning)
    second = run(experts_triton, case, requires_grad)
    assert len(tuning) == tuned_calls, "a tuned key was tuned again"
    for label, a, b in zip(NAMES, first, second):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), f"{label}: the first (tuning) call differs from the tuned one"
    assert_matches(first, run(experts_reference, case, requires_grad), None, NAMES, 1e-5, None)
    # the real launch used the config the timer preferred (the last), not the default
    chosen = [c for k in tuner.Autotuned.registry for c in k.chosen.values()]
    assert chosen and all(c["BLOCK_M"] == 32 or c.get("BLOCK_N") == 32 or c["num_warps"] == 2 for c in chosen)


def test_restore_is_needed(tuning, monkeypatch):
    """Mutation check: without restoring what the in-place kernels overwrite, the first call is wrong."""
    monkeypatch.setattr(OPTIONS, "lora_gemm", "split")
    for kernel in tuner.Autotuned.registry:
        monkeypatch.setattr(kernel, "restore", ())
    case = make_case(layout="relu2", T=21, E=3)
    first = run(experts_triton, case)
    ref = run(experts_reference, case)
    with pytest.raises(AssertionError):
        assert_matches(first, ref, None, NAMES, 1e-5, None)


def test_choices_persist_across_processes(tuning, monkeypatch, tmp_path):
    """A second process (fresh choices) reads the tuned configs from disk and times nothing."""
    case = make_case(layout="silu_glu", T=21, E=3)
    first = run(experts_triton, case)
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1 and files[0].name == "interpreter-tritontest.json"
    entries = json.loads(files[0].read_text())["entries"]
    assert len(entries) == sum(len(k.chosen) for k in tuner.Autotuned.registry)
    for kernel in tuner.Autotuned.registry:  # as in a new process
        monkeypatch.setattr(kernel, "chosen", {})
    monkeypatch.setattr(tuner, "_time_config", lambda call: pytest.fail("tuned again despite the cache"))
    second = run(experts_triton, case)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


def test_stale_and_corrupt_entries_are_retuned(tuning, tmp_path):
    cache = tuner._tuning_cache()
    case = make_case(layout="relu2", T=9, E=3, projections=())
    run(experts_triton, case)
    tuned = len(tuning)
    with open(cache.path) as handle:
        entries = json.load(handle)["entries"]
    stale = {entry: {**config, "BLOCK_M": 48} for entry, config in entries.items()}  # outside every space
    cache._write(stale)
    for kernel in tuner.Autotuned.registry:
        kernel.chosen.clear()
    run(experts_triton, case)
    assert len(tuning) == 2 * tuned, "a config outside the space was used instead of tuning again"
    with open(cache.path, "w") as handle:
        handle.write("{ not json")
    with pytest.warns(RuntimeWarning, match="tuning cache disabled"):
        assert TuningCache("interpreter", "test").lookup("anything") is None


def _writer(directory: str, worker: int, count: int) -> None:
    OPTIONS.cache_dir = directory  # a forked child: its own copy of the options
    cache = TuningCache("gpu", "1.0")
    for i in range(count):
        cache.store(f"kernel{worker}|{i}", {"BLOCK_M": i})


def test_concurrent_writers_keep_every_entry(monkeypatch, tmp_path):
    monkeypatch.setattr(OPTIONS, "cache_dir", str(tmp_path))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    cache = TuningCache("gpu", "1.0")
    assert all(cache.lookup(f"kernel{w}|{i}") == {"BLOCK_M": i} for w in range(3) for i in range(40))
    assert not [p for p in (tmp_path / "tuning").iterdir() if p.suffix == ".tmp"]
