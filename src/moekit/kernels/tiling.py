"""The tile map and the autotuning space shared by every grouped kernel.

Tile map. The plan sorts rows by expert: expert e owns rows [start_e, start_e + count_e) with
start_e = sum(count[:e]). A grouped GEMM rounds every expert's count up to the row tile BLOCK_M, so expert e owns
ceil(count_e / BLOCK_M) row tiles and no tile straddles two experts. Program ``pid_m`` finds its (expert, row start)
inside the kernel from ``plan.tokens_per_expert`` (one vector load of E counts, a cumsum and three reductions):
no host sync, no tile-map tensor, and it stays right whatever BLOCK_M the autotuner picks. The grid is the upper
bound ceil(n / BLOCK_M) + min(E, n) row tiles (every expert wastes at most one partial tile); programs past the
real number of tiles return at once.

Autotuning (``Autotuned``). A handful of configs per GPU generation (Hopper: sm_90; Ampere and later otherwise),
keyed on the static problem sizes plus a power-of-two bucket of rows per expert, so tuning runs once per layer shape
and costs seconds; the choices persist on disk (``tuning_cache``), so only the first process on a machine pays
them. Tuning never changes what a launch computes: arguments a kernel overwrites are restored after every config.
Under ``TRITON_INTERPRET=1`` a single small config is used (no timing), unless a test sets a larger space.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import os
import time
from typing import ClassVar

import torch
import triton
import triton.language as tl

from .launch import FastKernel
from .tuning_cache import TuningCache


@triton.jit
def expert_tile(counts_ptr, E, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(number of real row tiles, expert, first row, end row of the expert) of row tile ``pid_m``."""
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)  # inclusive
    total = tl.sum(tiles, 0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    before = offs_e < expert
    tile_base = tl.sum(tl.where(before, tiles, 0), 0)
    row_base = tl.sum(tl.where(before, cnt, 0), 0)
    count = tl.sum(tl.where(offs_e == expert, cnt, 0), 0)
    row_start = row_base + (pid_m - tile_base) * BLOCK_M
    return total, expert, row_start, row_base + count


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each column sweep (L2 reuse of weights and rows)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# Test-only: when True, every buffer a kernel must fully write is allocated filled with NaN instead of left
# uninitialised, so an element no program wrote shows up as NaN in the results.
POISON_OUTPUTS = os.environ.get("MOEKIT_TRITON_POISON", "0") == "1"


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled under ``POISON_OUTPUTS`` (floating dtypes)."""
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (same strides when ``t`` is dense), or NaN-filled under ``POISON_OUTPUTS``."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_OUTPUTS and t.dtype.is_floating_point else out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Host-side integer helpers. triton.cdiv / next_power_of_2 are constexpr functions in newer triton (~2 µs a call
# through their wrapper); the launch path calls these a few dozen times per step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def num_row_tiles(n: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a plan with n routed rows (see the module docstring)."""
    return cdiv(n, block_m) + min(num_experts, n)


def block_e(num_experts: int) -> int:
    return max(next_power_of_2(num_experts), 16)


def rows_bucket(n: int, num_experts: int) -> int:
    """Autotune key: rows per expert rounded to a power of two (capped), so tuning does not rerun every step."""
    return min(next_power_of_2(max(n // max(num_experts, 1), 1)), 4096)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr of ``mma``: fp32 operands use the exact (ieee) dot so results match the
    reference to ~1e-5, never tf32. The interpreter's dot mishandles bf16 operands (it multiplies their raw
    uint16 storage), so there bf16 tiles are upcast to fp32 first ("upcast"; values unchanged, exact products)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"  # ignored by tl.dot for 16-bit operands


# The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even); under it, round first.
_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 tile -> ``dtype``, rounding to nearest even everywhere (a plain cast on the GPU)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def as_operand(x, dtype: tl.constexpr):
    """A tile in the GEMM operand dtype ``dtype``, rounded to nearest when it was loaded in another (the LoRA A
    factor is read straight from its parameter, fp32 under PEFT: the same values a copy in ``dtype`` would hold)."""
    if x.dtype != dtype:
        x = to_dtype(x.to(tl.float32), dtype)
    return x


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see ``dot_precision``); ``b`` is taken in ``a``'s dtype (``as_operand``)."""
    b = as_operand(b, a.dtype)
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


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


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel family and generation.
_SPACES = {
    # (128, 128, 64, 8, 3) and friends fit two programs per SM (<= 113 KB of shared memory): one's epilogue
    # overlaps the other's main loop.
    "gemm": {
        "hopper": [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                   (128, 256, 64, 8, 4)],
        "ampere": [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)],
        "interpret": [(16, 16, 16, 4, 1)],
    },
    # up-projection of gated layouts: two accumulators (gate and up) of BLOCK_N columns each. (128, 128, 64, 8, 4):
    # 472 TFLOP/s at Qwen3's shape on an H100 against 446 for the best other (scripts/probe_tiles.py)
    "gated": {
        "hopper": [(128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4),
                   (128, 128, 64, 8, 4)],
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
    # column tile's loads with this one's store. The best four of 36 measured on an H200 (probe_lora_add.py)
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
    ``MOEKIT_TRITON_AUTOTUNE=0`` keeps only the first (default) config: no tuning (test runs that compile many
    kernel variants). ``MOEKIT_TRITON_AUTOTUNE=config:N`` keeps only the N-th (the last where a family has fewer),
    so a correctness run can go through every config the tuner may pick (``scripts/gpu_check.py --config N``)."""
    space = _SPACES[family][_generation()]
    if element_size > 2 and _generation() != "interpret":
        space = [(bm, bn, min(bk, 32), w, min(s, 4 if family.startswith("wgrad") else 3)) for bm, bn, bk, w, s in space]
    if family.startswith("wgrad"):  # the chunk table is built for one BLOCK_K
        space = [(bm, bn, wgrad_block_k(element_size), w, s) for bm, bn, _, w, s in space]
        space = list(dict.fromkeys(space))
    space = [_cfg(*c) for c in space]
    tune = os.environ.get("MOEKIT_TRITON_AUTOTUNE", "1")
    if tune == "0":
        return space[:1]
    if tune.startswith("config:"):
        return [space[min(int(tune.removeprefix("config:")), len(space) - 1)]]
    return space


def rank_block(rank: int, cap: int = 64) -> int:
    """Tile width over a LoRA rank R: the next power of two, at least 16 (tl.dot's minimum), at most ``cap``
    (larger ranks take several steps or tiles)."""
    return max(16, min(next_power_of_2(max(rank, 1)), cap))


def lora_preload(rank: int) -> bool:
    """``LORA_PRELOAD`` of the fused-LoRA GEMMs: with one rank step (R <= 64) the u / B tiles are loaded before
    the main loop and multiplied after it, so their latency hides under the main loop instead of adding to
    every tile's tail. ``MOEKIT_TRITON_LORA_PRELOAD=0`` turns it off (then a loop over R after the main loop)."""
    return 0 < rank <= rank_block(rank) and os.environ.get("MOEKIT_TRITON_LORA_PRELOAD", "1") != "0"


def wgrad_block_k(dtype_or_size) -> int:
    """Rows per step (and per chunk) of the weight-gradient kernel: fixed per operand width and generation."""
    size = dtype_or_size if isinstance(dtype_or_size, int) else dtype_or_size.itemsize
    if _generation() == "interpret":
        return 16
    return 64 if size <= 2 else 32


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (8 under the interpreter / on the CPU)."""
    if device.type != "cuda" or interpreting():
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def min_block_n(family: str) -> int:
    """Smallest BLOCK_N any config of ``family`` may use, on any generation."""
    return min(c[1] for spaces in _SPACES[family].values() for c in spaces)


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
        key = (
            size,
            tuple(kwargs[k] if k in kwargs else args[self._position[k]] for k in self.key),
            tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
        )
        chosen = self.chosen.get(key)
        if chosen is None:
            chosen = self.chosen[key] = self._choose(key, size, grid, args, kwargs)
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
