"""Autotuning: each kernel family's small config space per GPU generation, and the tuner that picks from it.

A handful of configs per GPU generation (Hopper: sm_90; Ampere and later otherwise), keyed on the static problem
sizes plus a power-of-two bucket of rows per expert, so tuning runs once per layer shape and costs seconds; the
choices persist on disk (``tuning_cache``), so only the first process on a machine pays them. Tuning never
changes what a launch computes: arguments a kernel overwrites are restored after every config.
``OPTIONS.pinned_config`` pins every family to one config instead (no tuning). Under the interpreter a single
small config is used (no timing), unless a test sets a larger space.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import time
from typing import ClassVar

import torch
import triton

from ..options import OPTIONS
from .launch import FastKernel
from .numerics import interpreting
from .tuning_cache import TuningCache


def _cfg(bm, bn, bk, warps, stages, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")) -> dict:
    """A config as launch keywords; a block size of 0 is left out (the launch passes it)."""
    meta = {name: size for name, size in zip(names, (bm, bn, bk)) if size}
    return {**meta, "num_warps": warps, "num_stages": stages}


@functools.cache
def _generation() -> str:
    if interpreting() or not torch.cuda.is_available():
        return "interpret"
    major, _ = torch.cuda.get_device_capability()
    return "hopper" if major >= 9 else "ampere"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel family and generation; the first is the default.
_SPACES = {
    # (128, 128, 64, 8, 3) and friends fit two programs per SM (<= 113 KB of shared memory): one's epilogue
    # overlaps the other's main loop.
    "gemm": {
        "hopper": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                   (128, 256, 64, 8, 4)],
        "ampere": [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # up-projection of gated layouts: two accumulators (gate and up) of BLOCK_N columns each. (128, 128, 64, 8, 4)
    # measured about 6 % faster than the best other at Qwen3's shape on an H100.
    "gated": {
        "hopper": [(128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4),
                   (128, 128, 64, 8, 4)],
        "ampere": [(128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 3)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # NF4 B operands (kernels/nf4.py): each B tile costs ~3.5 instructions an element to dequantize, one of them a
    # warp shuffle, once per program, and the program's warpgroup MMA waits for it (the loop is latency-bound, see
    # BENCHMARKS.md), so either row tiles of 256 (half the dequantization per multiply-add) or 4-warp
    # programs of which two or three share an SM (one dequantizes while another multiplies: (128, 128, 64, 4, 3)
    # compiles to 255 registers, (128, 64, 64, 4, 3) to 168, gated (128, 32, 64, 4, 3) to 136). All compile for
    # sm_90 without spills.
    "gemm_nf4": {
        "hopper": [(128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                   (64, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 4)],
        "ampere": [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    "gated_nf4": {
        "hopper": [(128, 64, 64, 8, 4), (256, 64, 64, 8, 3), (256, 64, 64, 8, 4), (128, 128, 64, 8, 3),
                   (64, 128, 64, 4, 4), (128, 64, 64, 4, 3), (128, 32, 64, 4, 3)],
        "ampere": [(128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 3)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # dA: the activation-backward epilogue holds several tiles at once; these compile without spills on sm_90
    "actgrad": {
        "hopper": [(128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (128, 128, 64, 8, 4), (64, 64, 64, 4, 4)],
        "ampere": [(64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # weight gradients: BLOCK_M x BLOCK_N output tile, BLOCK_K rows per step (one flat loop over the chunks of
    # several experts, see weight_grad.py). The chain chunk table (-> row index) -> rows costs the pipeliner
    # stages: num_stages S leaves S-2 operand buffers for plan-ordered rows, about S-4 for gathered ones.
    # Configs over the shared-memory limit for one variant fail to compile and the autotuner skips them.
    "wgrad": {
        "hopper": [(128, 128, 64, 8, 7), (128, 128, 64, 8, 5), (128, 256, 64, 8, 6), (256, 128, 64, 8, 6),
                   (128, 256, 64, 8, 7)],
        "ampere": [(128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # LoRA low-rank GEMMs (u = rows @ A[e]ᵀ, v = rows @ B[e]): N = the rank R, so BLOCK_N (0 here) is not
    # tuned but set at launch from R (``rank_block``); memory-bound, so deep pipelines over long K steps.
    "lowrank": {
        "hopper": [(64, 0, 128, 4, 4), (128, 0, 64, 4, 4), (128, 0, 128, 8, 3), (32, 0, 128, 4, 4)],
        "ampere": [(64, 0, 64, 4, 4), (128, 0, 64, 4, 3)],
        "interpret": [(16, 0, 16, 4, 1)],
    },
    # out += u @ L[e] in place (kernels/lora_add.py): one program per row tile sweeps every column tile (BLOCK_K, 0
    # here, is unused). Memory-bound: short row tiles keep many programs in flight; 3 stages overlap the next
    # column tile's loads with this one's store. The best four of 36 measured on an H200.
    "lora_add": {
        "hopper": [(32, 256, 0, 4, 3), (32, 128, 0, 8, 3), (64, 128, 0, 4, 3), (64, 256, 0, 8, 3)],
        "ampere": [(32, 128, 0, 4, 3), (64, 128, 0, 4, 2)],
        "interpret": [(16, 16, 0, 4, 1)],
    },
    # LoRA factor gradients (dA, dB: one side is the rank R): BLOCK_N (the R side) set at launch
    "wgrad_lr": {
        "hopper": [(128, 0, 64, 4, 5), (64, 0, 64, 4, 6), (256, 0, 64, 8, 4)],
        "ampere": [(128, 0, 64, 4, 4), (64, 0, 64, 4, 4)],
        "interpret": [(16, 0, 16, 4, 1)],
    },
}  # fmt: skip


def configs(family: str, element_size: int = 2) -> list[dict]:
    """The autotuning space of ``family`` on this GPU generation for operands of ``element_size`` bytes (4-byte
    operands get BLOCK_K 32 and at most 3 stages, so their tiles fit in shared memory).
    With ``OPTIONS.pinned_config`` N (read at each call) only the N-th config is kept (the last where a family
    has fewer; 0: the default config): no tuning, or a correctness run through every config the tuner may pick."""
    space = _SPACES[family][_generation()]
    if element_size > 2 and _generation() != "interpret":
        space = [(bm, bn, min(bk, 32), w, min(s, 4 if family.startswith("wgrad") else 3)) for bm, bn, bk, w, s in space]
    if family.startswith("wgrad"):  # the chunk table is built for one BLOCK_K
        space = [(bm, bn, wgrad_block_k(element_size), w, s) for bm, bn, _, w, s in space]
        space = list(dict.fromkeys(space))
    space = [_cfg(*c) for c in space]
    pinned = OPTIONS.pinned_config
    if pinned is None:
        return space
    return [space[min(pinned, len(space) - 1)]]


def wgrad_block_k(dtype_or_size) -> int:
    """Rows per step (and per chunk) of the weight-gradient kernel: fixed per operand width and generation."""
    size = dtype_or_size if isinstance(dtype_or_size, int) else dtype_or_size.itemsize
    if _generation() == "interpret":
        return 16
    return 64 if size <= 2 else 32


def _time_config(kernel_call) -> float:
    """Tuning timer (ms): a config that fails to build for this variant (any error) is skipped, not fatal. Under
    the interpreter (tests that force several configs) one timed call."""
    try:
        if interpreting():
            start = time.perf_counter()
            kernel_call()
            return (time.perf_counter() - start) * 1e3
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, return_mode="median")
    except Exception:  # noqa: BLE001
        return float("inf")


@functools.cache
def _tuning_cache() -> TuningCache:
    device = "interpreter" if interpreting() or not torch.cuda.is_available() else torch.cuda.get_device_name()
    return TuningCache(device, triton.__version__)


class Autotuned:
    """A jit kernel that picks its launch config per key from the small space of ``family`` (``configs``).

    Launch as ``kernel.get(dtype)[grid](*args, **constexprs)`` with ``grid`` a function of the config's
    meta-parameters; runtime arguments positionally. The key is the ``key`` arguments, the operand width and the
    tensor dtypes. The first launch of a key takes the config stored on disk for it (``tuning_cache``), else times
    every config and stores the fastest; then the kernel runs once for real. Later launches of the key go straight
    to the compiled kernel with that config (``launch.FastKernel``: a tuner that re-derives its key from every
    argument costs ~75 µs of host time per launch, which at 8k tokens leaves the GPU idle between kernels).
    The choices hold for one ``OPTIONS.pinned_config``: a launch under another value chooses again.

    Tuning runs each config many times on the call's own buffers. A kernel that can overwrite what it reads names
    the pair in ``restore``: (read argument, written argument), e.g. ("out_ptr", "out_ptr") for an in-place add,
    ("h_ptr", "dh_ptr") for dh written over h. When the two share memory in a call, the read one is copied before
    tuning and put back after every config (one extra copy of it, on the first launch of a key only), so the real
    launch sees the inputs the caller passed. Outputs that are only written need nothing: the real launch writes
    them again.
    """

    registry: ClassVar[list[Autotuned]] = []

    def __init__(self, jit_fn, family: str, key: list[str], restore: tuple[tuple[str, str], ...] = ()):
        self.jit_fn, self.family, self.key = jit_fn, family, key
        self.fast = FastKernel(jit_fn)
        self.chosen: dict[tuple, dict] = {}  # launch key -> the chosen config's launch keywords
        self.pinned = OPTIONS.pinned_config  # the OPTIONS.pinned_config that ``chosen`` was made under
        self._position = {name: i for i, name in enumerate(jit_fn.arg_names)}
        unknown = [name for pair in restore for name in pair if name not in self._position]
        if unknown:
            raise ValueError(f"{jit_fn.__name__}: restore names unknown arguments {unknown}")
        self.restore = tuple((self._position[read], self._position[written]) for read, written in restore)
        Autotuned.registry.append(self)

    @functools.cached_property
    def name(self) -> str:
        """Kernel name, family and a hash of its source with its jit dependencies (the tuning cache's kernel id)."""
        source = getattr(self.jit_fn, "cache_key", None)
        if source is None:  # the interpreter's functions have no cache key
            source = hashlib.sha256(inspect.getsource(self.jit_fn.fn).encode()).hexdigest()
        return f"{self.jit_fn.__name__}[{self.family}]@{source[:16]}"

    def get(self, dtype: torch.dtype):
        return _Launch(self, dtype.itemsize)

    def launch(self, size: int, grid, args: tuple, kwargs: dict) -> None:
        if OPTIONS.pinned_config != self.pinned:  # the choices were made for another pinned config
            self.chosen, self.pinned = {}, OPTIONS.pinned_config
        key = (
            size,
            tuple(kwargs[k] if k in kwargs else args[self._position[k]] for k in self.key),
            tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
        )
        chosen = self.chosen.get(key)
        if chosen is None:
            chosen = self.chosen[key] = _rank0_choice(self._choose(key, size, grid, args, kwargs), self.family, size)
        self.fast.launch(grid, args, {**kwargs, **chosen})

    def _choose(self, key: tuple, size: int, grid, args: tuple, kwargs: dict) -> dict:
        space = configs(self.family, size)
        if len(space) == 1:
            return space[0]
        entry = f"{self.name}|{key!r}"
        stored = _tuning_cache().lookup(entry)
        if stored in space:  # an entry outside today's space is stale: tune again
            return stored
        best = self._tune(space, grid, args, kwargs)
        _tuning_cache().store(entry, best)
        return best

    def _tune(self, space: list[dict], grid, args: tuple, kwargs: dict) -> dict:
        """The fastest config of ``space``, the arguments in ``restore`` put back after each one."""
        overwritten = {read for read, written in self.restore if _shares_memory(args[read], args[written])}
        saved = {i: args[i].clone() for i in overwritten}
        timings = []
        for config in space:
            timings.append(_time_config(lambda config=config: self.jit_fn[grid](*args, **kwargs, **config)))
            for i, copy in saved.items():
                args[i].copy_(copy)
        del saved
        # Configs that fail to build leave their tracebacks in reference cycles that hold the step's tensors until
        # Python's cycle collector runs (0.5-2.5 GiB between steps at r=64 LoRA before a collection): once per key.
        gc.collect()
        best = min(range(len(space)), key=timings.__getitem__)
        if timings[best] == float("inf"):
            raise RuntimeError(f"{self.jit_fn.__name__}: no config of the '{self.family}' space builds for this call")
        return space[best]


def _rank0_choice(config: dict, family: str, size: int) -> dict:
    """``config``, or under ``OPTIONS.tuning_broadcast`` in a process group of several ranks rank 0's choice for the
    same key (every rank reaches each new key in the same order and joins the broadcast; one-config spaces, where
    there is nothing to choose, skip it)."""
    import torch.distributed as dist

    space = configs(family, size)
    if not OPTIONS.tuning_broadcast or len(space) == 1 or not (dist.is_available() and dist.is_initialized()):
        return config
    index = [space.index(config)]
    dist.broadcast_object_list(index, src=0)
    return space[index[0]]


def _shares_memory(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not a.numel() or not b.numel():
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Launch:
    """``Autotuned.get(dtype)[grid](*args, **kwargs)``."""

    __slots__ = ("kernel", "size")

    def __init__(self, kernel: Autotuned, size: int):
        self.kernel, self.size = kernel, size

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.launch(self.size, grid, args, kwargs)


def tuning_report() -> list[str]:
    """One line per tuned key: kernel, key, chosen config (for logs)."""
    return [
        f"{kernel.jit_fn.__name__}[{kernel.family}] {key}: {config}"
        for kernel in Autotuned.registry
        for key, config in kernel.chosen.items()
    ]
