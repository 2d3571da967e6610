"""Expert-layer benchmark: transformers' backends against moekit's engines on real model shapes.

One record per (shape, impl, mode, tokens): median ms over timed repeats (on a GPU, CUDA events with the steps
queued back to back, and ``ms_synced`` with the host waiting for the GPU after every step; on the CPU, the wall
clock), TFLOP/s from the FLOP count of the expert GEMMs (gated fwd 6·T·K·H·I, non-gated 4·T·K·H·I; full = 3× fwd,
LoRA and frozen = 2× fwd) and the peak memory allocated during the timed step.

Modes: "fwd" (no grad), "full" (forward + backward, trainable expert weights), "lora" (PEFT LoRA on both expert
weights, base frozen; one case per ``--lora-rank``), "frozen" (forward + backward with the base frozen and no
LoRA: input and routing-weight gradients only, the cost LoRA adds to).

A moekit impl runs with ``moekit.options.OPTIONS.backend`` set for its steps only (``moekit-reference``,
``moekit-triton`` force that engine; ``moekit`` lets moekit choose), never through the environment.

NF4 (``--quant nf4``): a moekit impl with the suffix ``+nf4`` (``moekit+nf4``, ``moekit-triton+nf4``) runs on the
same experts module with its weights quantized to frozen NF4 (``moekit.quant.experts.quantize_module``), in the
fwd and lora modes (full fine-tuning is impossible on the frozen NF4 base). Its records also carry the expert
weights' bytes (NF4 codes + absmax against the dense weights) and a value check: the step's output, input and
routing-weight gradients and LoRA gradients against moekit's reference engine in float32 on a dense module
holding ``weight.dequantize()`` and the same LoRA factors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..options import override
from ..quant.experts import TOOL_QUANTS, expert_weight_names, quantize_module, tool_quant_options
from ..quant.tensor import NF4Tensor, held_bytes
from .cli import HelpFormatter, PlainProgress
from .cli import console as make_console


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    gated: bool
    act: str  # "relu2", "silu", "gpt_oss"

    def forward_flops(self, tokens: int) -> float:
        return (6 if self.gated else 4) * tokens * self.top_k * self.hidden * self.intermediate


PRESETS = {
    shape.name: shape
    for shape in (
        Shape("nemotron3-nano", 2688, 1856, 128, 6, gated=False, act="relu2"),
        Shape("qwen3-30b-a3b", 2048, 768, 128, 8, gated=True, act="silu"),
        Shape("gpt-oss-20b", 2880, 2880, 32, 4, gated=True, act="gpt_oss"),
        Shape("mixtral-8x7b", 4096, 14336, 8, 2, gated=True, act="silu"),
        Shape("deepseek-v3", 7168, 2048, 256, 8, gated=True, act="silu"),
        # NemotronH with a latent MoE: experts run in a 1024-wide latent space.
        Shape("nemotron-latent", 1024, 2688, 512, 22, gated=False, act="relu2"),
        Shape("tiny", 256, 128, 16, 4, gated=True, act="silu"),
    )
}

IMPLS = ("eager", "grouped_mm", "moekit", "moekit-reference", "moekit-triton")
MODES = ("fwd", "full", "lora", "frozen")
QUANTS = TOOL_QUANTS  # a moekit impl on NF4 expert weights: "moekit+nf4", "moekit-triton+nf4-dq"
NF4_MODES = ("fwd", "lora")  # full: the NF4 base is frozen; frozen: not what --quant nf4 measures
# The value check of an NF4 row: max relative error (max |got - want| / max |want|) per compared tensor.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
CHECK_AGAINST = "moekit-reference float32 on the dequantized weights"


def make_experts_module(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A transformers experts module of the given shape (NemotronH, Qwen3-MoE or gpt-oss class)."""
    from transformers import GptOssConfig, NemotronHConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    with torch.device(device):  # allocate straight on the device: Mixtral's experts are 1.4 B parameters
        if shape.act == "gpt_oss":
            module = GptOssExperts(
                GptOssConfig(
                    hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_local_experts=shape.num_experts
                )
            )
        elif shape.gated:
            module = Qwen3MoeExperts(
                Qwen3MoeConfig(
                    hidden_size=shape.hidden,
                    moe_intermediate_size=shape.intermediate,
                    num_experts=shape.num_experts,
                    hidden_act=shape.act,
                )
            )
        else:
            module = NemotronHExperts(
                NemotronHConfig(
                    hidden_size=shape.hidden,
                    moe_intermediate_size=shape.intermediate,
                    n_routed_experts=shape.num_experts,
                    mlp_hidden_act=shape.act,
                )
            )
    module.to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param.shape[-2] if getattr(module, "is_transposed", False) else param.shape[-1]
            std = fan_in**-0.5 if param.dim() == 3 else 0.02
            param.normal_(0.0, std, generator=generator)
    return module


def make_routing(shape: Shape, tokens: int, device: str, dtype: torch.dtype, seed: int = 1):
    """hidden [T, H], top-k ids [T, K] and softmax weights [T, K] from Gaussian router logits."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, shape.hidden, device=device, generator=generator).to(dtype)
    logits = torch.randn(tokens, shape.num_experts, device=device, generator=generator)
    values, index = logits.topk(shape.top_k, dim=-1)
    return hidden, index, values.softmax(-1).to(dtype)


def split_impl(impl: str) -> tuple[str, str]:
    """``"moekit-triton+nf4"`` -> ``("moekit-triton", "nf4")``; ``"grouped_mm"`` -> ``("grouped_mm", "none")``."""
    base, _, quant = impl.partition("+")
    return (base, quant) if quant in QUANTS[1:] else (impl, "none")


def engine_of(impl: str) -> str | None:
    """The ``OPTIONS.backend`` a moekit impl runs under ("" lets moekit choose); None for transformers' own."""
    impl = split_impl(impl)[0]
    if not impl.startswith("moekit"):
        return None
    return impl.split("-", 1)[1] if "-" in impl else ""


def _select(module: torch.nn.Module, impl: str) -> None:
    """Put ``module`` on ``impl``. A forced moekit engine is not set here: run its calls under
    ``moekit.options.override(backend=engine_of(impl))``, as ``make_step``'s steps do."""
    impl = split_impl(impl)[0]
    if impl.startswith("moekit"):
        import moekit

        moekit.enable(module)
    else:
        module.config._experts_implementation = impl


def _engine_scope(impl: str):
    """A context for one call of ``impl``: the moekit engine it forces, or nothing."""
    engine = engine_of(impl)
    return contextlib.nullcontext() if engine is None else override(backend=engine)


def _wrap_lora(module: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

        def forward(self, *args):
            return self.experts(*args)

    up = "experts.gate_up_proj" if module.has_gate else "experts.up_proj"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=[up, "experts.down_proj"])
    model = get_peft_model(Block(module), config)
    for name, param in model.named_parameters():  # non-zero B so the adapter is live
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return model


def _timer(device: str, back_to_back: bool = True) -> Callable[[Callable[[], object], int], list[float]]:
    """``measure(fn, repeats)``: the time of each of ``repeats`` calls of ``fn``, in ms.

    On CUDA every call sits between two events. ``back_to_back`` (default) queues the calls with no sync between
    them, as triton's ``do_bench`` does and as training runs: the host may work ahead of the GPU, so a call's time
    is what the GPU spends on it, plus any wait for the host when the host is the slower one. Otherwise the host
    waits for the GPU after every call, and each call also pays the latency of its own first launches.
    """
    if device.startswith("cuda"):

        def measure(fn, repeats: int) -> list[float]:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
            ]
            for start, end in events:
                start.record()
                fn()
                end.record()
                if not back_to_back:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]

        return measure

    def measure_cpu(fn, repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
        return times

    return measure_cpu


def run_case(shape: Shape, impl: str, mode: str, tokens: int, device: str = "cuda", **options) -> dict:
    """Time one configuration (see ``_time_case`` for the options); returns a JSON-ready record."""
    try:
        return _time_case(shape, impl, mode, tokens, device, **options)
    finally:
        gc.collect()  # the case's tensors are unreachable now: give their memory back before the next one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def add_case_arguments(parser: argparse.ArgumentParser, preset: str = "nemotron3-nano", mode: str = "full") -> None:
    """--preset, --tokens, --mode and --lora-rank of one benchmark case (``make_step``), for the GPU tools."""
    parser.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--mode", choices=MODES, default=mode)
    parser.add_argument("--lora-rank", type=int, default=16)


@dataclass
class Case:
    """One configuration, built once: its experts module, the model called (the module, or PEFT around it),
    routing and upstream gradient. ``step()`` is one benchmark step, ``values()`` one step's results."""

    impl: str
    mode: str
    module: torch.nn.Module
    model: torch.nn.Module
    hidden: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor
    upstream: torch.Tensor

    def step(self) -> None:
        """A forward, or a forward + backward that clears the gradients; a moekit impl's engine is set for it."""
        with _engine_scope(self.impl):
            if self.mode == "fwd":
                with torch.no_grad():
                    self.model(self.hidden, self.index, self.weights)
            else:
                out = self.model(self.hidden, self.index, self.weights)
                out.backward(self.upstream)
                self._clear_grads()

    def values(self) -> dict[str, torch.Tensor]:
        """One step's output and gradients (of the hidden states, the routing weights and every LoRA factor)."""
        with _engine_scope(self.impl):
            if self.mode == "fwd":
                with torch.no_grad():
                    return {"output": self.model(self.hidden, self.index, self.weights).detach()}
            out = self.model(self.hidden, self.index, self.weights)
            out.backward(self.upstream)
        found = {"output": out.detach(), "d hidden": self.hidden.grad, "d routing weights": self.weights.grad}
        for module in self.model.modules():  # PEFT's ParamWrappers: "d lora_A[default] gate_up_proj", ...
            for factor in ("lora_A", "lora_B"):
                for adapter, layer in (getattr(module, factor, None) or {}).items():
                    name = f"d {factor}[{adapter}] {getattr(module, 'parameter_name', '?')}"
                    found[name] = layer.weight.grad
        self._clear_grads()
        return {name: value for name, value in found.items() if value is not None}

    def _clear_grads(self) -> None:
        self.hidden.grad = self.weights.grad = None
        for param in self.model.parameters():
            param.grad = None


def build_case(
    shape: Shape, impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype, lora_rank: int = 16
) -> Case:
    """A configuration's ``Case``; an impl ending in ``+nf4`` (``+nf4-dq``) runs on NF4 expert weights (quantized
    before PEFT; double-quantized scales)."""
    module = make_experts_module(shape, device, dtype)
    quant = split_impl(impl)[1]
    if quant != "none":
        quantize_module(module, **tool_quant_options(quant))
    _select(module, impl)
    model = module
    if mode == "lora":
        model = _wrap_lora(module, lora_rank)
    else:
        module.requires_grad_(mode == "full")
    hidden, index, weights = make_routing(shape, tokens, device, dtype)
    if mode != "fwd":
        hidden.requires_grad_(True)
        weights.requires_grad_(True)
    upstream = torch.randn_like(hidden)
    return Case(impl, mode, module, model, hidden, index, weights, upstream)


def make_step(
    shape: Shape, impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype, lora_rank: int = 16
) -> Callable[[], None]:
    """One benchmark step of a configuration (a forward, or a forward + backward that clears the gradients),
    with its module, routing and upstream gradient built once; a moekit impl's engine is set for each step."""
    return build_case(shape, impl, mode, tokens, device, dtype, lora_rank).step


def expert_weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes the experts module's up and down weights take as held, bytes they would take dense in their dtype);
    an NF4 weight holds its codes (half a byte an element) and its scales (``held_bytes``)."""
    held = dense = 0
    for name in expert_weight_names(module):
        weight = getattr(module, name)
        dense += weight.numel() * weight.element_size()
        held += held_bytes(weight)
    return held, dense


def _dense_reference(case: Case, lora_rank: int) -> Case:
    """The same configuration in float32 on moekit's reference engine, on a dense module holding the NF4 weights'
    ``dequantize()`` (and the same biases, LoRA factors, routing and upstream gradient)."""
    module = copy.deepcopy(case.module)
    for name in expert_weight_names(module):
        weight = getattr(module, name)
        if isinstance(weight, NF4Tensor):
            setattr(module, name, torch.nn.Parameter(weight.dequantize().float(), requires_grad=False))
    module.float()
    _select(module, "moekit")
    model = module
    if case.mode == "lora":
        model = _wrap_lora(module, lora_rank)
        lora = {name: value for name, value in case.model.state_dict().items() if "lora_" in name}
        loaded = model.load_state_dict(lora, strict=False)
        missing = [name for name in loaded.missing_keys if "lora_" in name]
        if loaded.unexpected_keys or missing or not lora:
            raise RuntimeError(f"the dense reference did not take the LoRA factors: {loaded}")
    else:
        module.requires_grad_(False)
    grad = case.mode != "fwd"
    hidden = case.hidden.detach().float().requires_grad_(grad)
    weights = case.weights.detach().float().requires_grad_(grad)
    return Case("moekit-reference", case.mode, module, model, hidden, case.index, weights, case.upstream.float())


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in float64); NaN anywhere is an infinite error."""
    got, want = got.detach().double(), want.detach().double()
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def check_values(case: Case, lora_rank: int, dtype: torch.dtype) -> dict:
    """The value check of an NF4 case: its output and gradients against ``_dense_reference``; a JSON-ready dict
    with the largest relative error, the tolerance for ``dtype``, ok, and the error of every compared tensor."""
    tolerance = CHECK_TOLERANCE.get(dtype, 3e-2)
    try:
        got = case.values()
        reference = _dense_reference(case, lora_rank)
        want = reference.values()
        del reference
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:200], "tolerance": tolerance,
                "against": CHECK_AGAINST}  # fmt: skip
    if got.keys() != want.keys():
        missing = sorted(set(got) ^ set(want))
        return {"ok": False, "error": f"different results: {', '.join(missing)}", "tolerance": tolerance,
                "against": CHECK_AGAINST}  # fmt: skip
    errors = {name: _rel_err(got[name], want[name]) for name in want}
    worst = max(errors.values(), default=0.0)
    return {"ok": worst <= tolerance, "max_rel_err": worst, "tolerance": tolerance, "errors": errors,
            "against": CHECK_AGAINST}  # fmt: skip


def _time_case(
    shape: Shape,
    impl: str,
    mode: str,
    tokens: int,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    lora_rank: int = 16,
    warmup: int = 3,
    repeats: int = 10,
    card: str | None = None,
) -> dict:
    case = build_case(shape, impl, mode, tokens, device, dtype, lora_rank)
    step = case.step
    for _ in range(warmup):
        step()
    resident = float("nan")
    gc.collect()  # garbage of the warm-up steps (e.g. kernel tuning) is not part of a step's memory
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30  # weights, adapters and inputs
    ms = statistics.median(_timer(device)(step, repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    ms_synced = statistics.median(_timer(device, back_to_back=False)(step, repeats))
    flops = shape.forward_flops(tokens) * {"fwd": 1, "full": 3, "lora": 2, "frozen": 2}[mode]
    record = {
        "card": card or (torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
        "shape": shape.name,
        "shape_dims": asdict(shape),
        "impl": impl,
        "mode": mode,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_rank": lora_rank if mode == "lora" else None,
        "ms": ms,
        "ms_synced": ms_synced,  # the host waiting for the GPU after every step (on the CPU: ms again)
        "tflops": flops / (ms * 1e-3) / 1e12,
        "peak_gib": peak,
        # What one step allocates on top of the resident weights and inputs: activations, transients, gradients.
        "step_gib": peak - resident,
        "quant": split_impl(impl)[1],
    }
    record["expert_weight_bytes"], record["expert_weight_bytes_dense"] = expert_weight_bytes(case.module)
    if record["quant"] != "none":
        record["check"] = check_values(case, lora_rank, dtype)  # after the timing: no part of its memory
    return record


def dense_matmul_tflops(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's measured dense GEMM rate, the ceiling every other number is read against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = statistics.median(_timer(device)(lambda: a @ b, 10))
    return 2 * size**3 / (ms * 1e-3) / 1e12


# --- the `moekit bench` command -------------------------------------------------------------------------------

CPU_PRESET = "tiny"
DEFAULT_MODES = ("fwd", "full")
DEFAULT_NF4_MODES = ("fwd", "lora")
PEERS = ("liger",)  # other projects' kernels, run when installed
# How each device's steps are timed, for the table's caption.
TIMING = {
    "cuda": "median step, steps queued back to back (CUDA events)",
    "cpu": "median step, one after another (wall clock, time.perf_counter)",
}


def _peer_available(impl: str) -> str | None:
    """None when a peer implementation can run, else why it is skipped."""
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        return "Liger-Kernel's fused MoE has no transformers-experts adapter in moekit yet"
    return None


CUSTOM_FLAGS = ("hidden", "intermediate", "experts", "top_k")


def _custom_shape(args) -> Shape:
    missing = [flag for flag in CUSTOM_FLAGS if getattr(args, flag) is None]
    if missing:
        raise ValueError("a custom shape needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    act = args.act or ("silu" if args.gated else "relu2")
    if not args.gated and act == "gpt_oss":
        raise ValueError("--act gpt_oss is a gated activation: add --gated")
    return Shape("custom", args.hidden, args.intermediate, args.experts, args.top_k, gated=args.gated, act=act)


def _unknown(flag: str, what: str, given: list[str], valid) -> str | None:
    unknown = [item for item in given if item not in valid]
    if not unknown:
        return None
    return f"{flag}: unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(valid)}"


def _shapes(args, on_cpu: bool) -> list[Shape]:
    """The shapes to run; raises ``ValueError`` with one line naming the argument that is wrong."""
    custom = any(getattr(args, flag) is not None for flag in CUSTOM_FLAGS) or args.gated or args.act
    if custom:
        if args.preset:
            raise ValueError("give --preset or a custom shape (--hidden, --intermediate, --experts, --top-k), not both")
        return [_custom_shape(args)]
    problem = _unknown("--preset", "preset", args.preset or [], list(PRESETS))
    if problem:
        raise ValueError(problem)
    names = args.preset or ([CPU_PRESET] if on_cpu else ["nemotron3-nano", "qwen3-30b-a3b"])
    return [PRESETS[name] for name in names]


def _argument_problem(args, device: str) -> str | None:
    """One line naming the argument that is wrong and what it may be, or None; nothing is measured before."""
    for problem in (
        _unknown("--modes", "mode", args.modes, MODES),
        _unknown("--impls", "impl", args.impls, IMPLS + PEERS),
    ):
        if problem:
            return problem
    if args.quant != "none":
        if not any(mode in NF4_MODES for mode in args.modes):
            return (
                f"--quant {args.quant} times the {' and '.join(NF4_MODES)} modes only (full fine-tuning is impossible on a "
                f"frozen NF4 base), and --modes {','.join(args.modes)} has neither"
            )
        if not any(split_impl(impl)[0].startswith("moekit") for impl in args.impls):
            return (
                f"--quant {args.quant} times moekit on NF4 experts, and --impls {','.join(args.impls)} names none of moekit, "
                "moekit-reference, moekit-triton"
            )
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            return f"{flag} {path!r}: the directory {folder!r} does not exist"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib (pip install matplotlib, or moekit[bench])"
    try:
        _shapes(args, on_cpu=not device.startswith("cuda"))
    except ValueError as error:
        return str(error)
    return None


def _case_key(record: dict) -> tuple:
    """What makes two records the same case for every impl: shape, tokens, mode, LoRA rank."""
    return record["shape"], record["tokens"], record["mode"], record.get("lora_rank")


def _rate(tflops: float) -> str:
    """A FLOP rate to three significant figures: a CPU's rate is a small fraction of a TFLOP/s."""
    return f"{tflops:.1f}" if tflops >= 100 else f"{tflops:.3g}"


def _table(records: list[dict], dense: float | None, device: str = "cuda") -> rich.table.Table:  # noqa: F821
    from rich.table import Table

    timing = TIMING["cuda" if device.startswith("cuda") else "cpu"]
    quantized = any(r.get("quant", "none") != "none" for r in records)
    caption = f"ms: {timing}"
    if quantized:
        caption += (
            f"; +nf4: on NF4 expert weights; ÷ dense: its ms over the same impl's on the dense weights; values: "
            f"max rel. error against {CHECK_AGAINST}"
        )
    table = Table(title="expert layer benchmark", caption=caption)
    # "÷ frozen": a LoRA step over the same impl's frozen-base step (same shape and tokens), when both ran
    frozen = {(r["shape"], r["tokens"], r["impl"]): r["ms"] for r in records if r["mode"] == "frozen" and "ms" in r}
    columns = ["shape", "tokens", "mode", "impl", "ms", "TFLOP/s", "% dense", "peak GiB", "step GiB", "× grouped_mm"]
    columns += ["÷ frozen"] if frozen else []
    columns += ["÷ dense", "weights MiB", "values"] if quantized else []
    for column in columns:  # a terminal too narrow folds values, never cuts them
        table.add_column(column, justify="left" if column in ("shape", "mode", "impl") else "right", overflow="fold")
    baselines = {_case_key(r): r["ms"] for r in records if r["impl"] == "grouped_mm" and "ms" in r}
    # "÷ dense": an NF4 row over the same moekit impl's row on the dense weights (same case)
    dense_ms = {(*_case_key(r), r["impl"]): r["ms"] for r in records if "ms" in r}
    for r in records:
        mode = f"lora r={r['lora_rank']}" if r.get("lora_rank") else r["mode"]
        if "ms" not in r:
            table.add_row(r["shape"], str(r["tokens"]), mode, r["impl"], f"[yellow]{r['skipped']}[/]")
            continue
        baseline = baselines.get(_case_key(r))
        frozen_ms = frozen.get((r["shape"], r["tokens"], r["impl"])) if r["mode"] == "lora" else None
        cells = [
            r["shape"], str(r["tokens"]), mode, r["impl"], f"{r['ms']:.3f}", _rate(r["tflops"]),
            f"{100 * r['tflops'] / dense:.0f}%" if dense else "-",
            "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}",
            "-" if r["step_gib"] != r["step_gib"] else f"{r['step_gib']:.2f}",
            f"{baseline / r['ms']:.2f}" if baseline else "-",
        ]  # fmt: skip
        if frozen:
            cells.append(f"{r['ms'] / frozen_ms:.2f}" if frozen_ms else "-")
        if quantized:
            cells.extend(_quant_cells(r, dense_ms))
        table.add_row(*cells)
    return table


def _mib(count: float) -> str:
    mib = count / 2**20
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.3f}"


def _quant_cells(record: dict, dense_ms: dict) -> list[str]:
    """The "÷ dense", "weights MiB" and "values" cells of a row in a run with NF4 rows."""
    held = record.get("expert_weight_bytes")
    if record.get("quant", "none") == "none":
        return ["-", _mib(held) if held else "-", "-"]
    base = split_impl(record["impl"])[0]
    over = dense_ms.get((*_case_key(record), base))
    weights = "-"
    if held:
        weights = f"{_mib(held)} ({held / record['expert_weight_bytes_dense']:.2f}× of {record.get('dtype', 'dense')})"
    check = record.get("check") or {}
    if "max_rel_err" in check:
        verdict = "[green]ok[/]" if check["ok"] else "[bold red]WRONG[/]"
        values = f"{verdict} {check['max_rel_err']:.1e} (tol {check['tolerance']:.0e})"
    elif check:
        values = f"[bold red]FAILED[/] {check.get('error', '')}"
    else:
        values = "-"
    return [f"{record['ms'] / over:.2f}" if over else "-", weights, values]


def plot(records: list[dict], path: str) -> None:
    """Grouped bar chart of TFLOP/s: one panel per shape, one group per (tokens, mode), one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "ms" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    width = 0.8 / max(len(impls), 1)
    groups_per_shape = max(
        (len({(r["tokens"], r["mode"]) for r in timed if r["shape"] == s}) for s in shapes), default=1
    )
    figure, axes_list = plt.subplots(
        len(shapes), 1, figsize=(max(6.0, 1.3 * groups_per_shape + 2), 2.6 * max(len(shapes), 1)), squeeze=False
    )
    for shape, axes in zip(shapes, axes_list[:, 0]):
        rows = [r for r in timed if r["shape"] == shape]
        groups = list(dict.fromkeys((r["tokens"], r["mode"]) for r in rows))
        for i, impl in enumerate(impls):
            values = [
                next((r["tflops"] for r in rows if (r["tokens"], r["mode"]) == g and r["impl"] == impl), 0.0)
                for g in groups
            ]
            axes.bar([j + i * width for j in range(len(groups))], values, width, label=impl)
        axes.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        axes.set_xticklabels([f"T={t} {m}" for t, m in groups], fontsize=8)
        axes.set_ylabel("TFLOP/s")
        axes.set_title(shape, fontsize=10)
    axes_list[0, 0].legend(fontsize=8, ncol=len(impls))
    card = timed[0]["card"] if timed else "?"
    figure.suptitle(f"moekit expert-layer benchmark ({card}, bf16)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _impls(args, mode: str) -> list[str]:
    """The impls of one mode's cases: ``--impls``, and with ``--quant nf4`` (fwd and lora) each moekit impl's NF4
    twin right after it."""
    quant = getattr(args, "quant", "none")
    impls = []
    for impl in args.impls:
        impls.append(impl)
        if quant != "none" and mode in NF4_MODES and impl.startswith("moekit"):
            impls.append(f"{impl}+{quant}")
    return impls


def _cases(args, shapes: list[Shape], tokens: list[int]) -> list[tuple]:
    return [
        (shape, count, mode, rank, impl)
        for shape in shapes
        for count in tokens
        for mode in args.modes
        for rank in (args.lora_rank if mode == "lora" else [None])
        for impl in _impls(args, mode)
    ]


def _run_one(case: tuple, device: str, dtype: torch.dtype, card: str) -> dict:
    """The record of one case: timed, or the reason it was skipped."""
    shape, count, mode, rank, impl = case
    on_cpu = not device.startswith("cuda")
    skipped = _peer_available(impl)
    if impl == "eager" and not on_cpu and count > 8192:
        skipped = "eager loops over experts in Python; skipped above T=8192"
    if skipped is None:
        try:
            return run_case(
                shape, impl, mode, count, device=device, dtype=dtype, lora_rank=rank or 16,
                warmup=1 if on_cpu else 3, repeats=3 if on_cpu else 10, card=card,
            )  # fmt: skip
        except (RuntimeError, ValueError, NotImplementedError) as error:
            skipped = f"{type(error).__name__}: {error}"[:120]
    return {"card": card, "shape": shape.name, "impl": impl, "mode": mode, "tokens": count, "lora_rank": rank,
            "skipped": skipped}  # fmt: skip


def _describe(case: tuple) -> str:
    shape, count, mode, rank, impl = case
    return f"{shape.name} T={count} {f'lora r={rank}' if rank else mode} {impl}"


def _run_cases(console, cases: list[tuple], device: str, dtype: torch.dtype, card: str, dense: float) -> list[dict]:
    """Every case's record, with progress: a rich progress bar on a terminal, a line per case elsewhere."""
    from rich.progress import Progress

    records = []

    def write(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    plain = None if console.is_terminal else PlainProgress(len(cases), "benchmarked", write=write)
    with Progress(console=console, transient=True, disable=plain is not None) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for case in cases:
            progress.update(task, description=_describe(case))
            record = _run_one(case, device, dtype, card)
            record["dense_tflops"] = dense
            records.append(record)
            progress.advance(task)
            if plain is not None:
                result = f"{record['ms']:.3f} ms" if "ms" in record else f"skipped ({record['skipped']})"
                plain.update(f"{_describe(case)}: {result}")
    return records


def _default_modes(args) -> None:
    """``--modes`` left out: fwd,full; fwd,lora with ``--quant nf4`` (what NF4 experts can run)."""
    if args.modes is None:
        args.modes = list(DEFAULT_NF4_MODES if getattr(args, "quant", "none") != "none" else DEFAULT_MODES)


def run_bench(args) -> int:
    console = make_console()
    _default_modes(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = _argument_problem(args, device)
    if problem:
        console.print(f"moekit bench: {problem}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    on_cpu = not device.startswith("cuda")
    shapes = _shapes(args, on_cpu)
    if args.quant != "none" and any(mode not in NF4_MODES for mode in args.modes):
        console.print(
            f"--quant {args.quant}: NF4 rows for the {' and '.join(NF4_MODES)} modes only (full fine-tuning is "
            f"impossible on a frozen NF4 base)", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    if on_cpu:
        console.print(
            "[bold yellow]Running on the CPU: these numbers say nothing about GPU speed; they only show the "
            "benchmark works. Use --device cuda on a GPU machine.[/]"
        )
    tokens = args.tokens or ([256] if on_cpu else [8192])
    dtype = torch.float32 if on_cpu else torch.bfloat16
    dense = dense_matmul_tflops(device, size=1024 if on_cpu else 8192, dtype=dtype)
    card = torch.cuda.get_device_name() if not on_cpu else "cpu"
    console.print(f"card: {card}; measured dense {str(dtype).removeprefix('torch.')} matmul: {_rate(dense)} TFLOP/s")
    cases = _cases(args, shapes, tokens)
    records = _run_cases(console, cases, device, dtype, card, dense)
    console.print(_table(records, dense, device))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
        console.print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        plot(records, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _csv(kind, what: str):
    """An argparse type: a comma-separated list of ``kind`` (a ValueError from ``kind`` is a bad item)."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            if items:
                return [kind(item) for item in items]
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated {what}")

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_arg(text: str) -> int:
    try:
        return _positive(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="time the expert layer: transformers' backends against moekit",
        description="Time one MoE expert layer (forward, forward+backward, LoRA) for model-shaped presets or "
        "an explicit shape, against transformers' eager and grouped_mm backends.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    positive = _csv(_positive, "positive integers")
    add("--preset", type=_csv(str, "preset names"),
        help=f"comma-separated presets: {', '.join(PRESETS)} (default: nemotron3-nano,qwen3-30b-a3b; {CPU_PRESET} on cpu)")  # fmt: skip
    for flag, what in (("--hidden", "hidden size"), ("--intermediate", "expert intermediate size"),
                       ("--experts", "number of experts"), ("--top-k", "experts per token")):  # fmt: skip
        add(flag, type=_positive_arg, help=f"custom shape: {what} (no default: a custom shape needs all four)")
    add("--gated", action="store_true", help="custom shape: gated experts (act(gate)·up); non-gated act(up) without")
    add("--act", choices=["relu2", "relu", "silu", "gelu", "gpt_oss"],
        help="custom shape: the activation (default: silu with --gated, relu2 without)")  # fmt: skip
    add("--tokens", type=positive, help="comma-separated token counts (default: 8192; 256 on cpu)")
    add("--modes", type=_csv(str, "modes"),
        help=f"comma-separated modes: {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)}) — "
        f"{','.join(DEFAULT_NF4_MODES)} with --quant nf4")  # fmt: skip
    add("--lora-rank", type=positive, default="16", help="comma-separated LoRA ranks (lora mode)")
    add("--impls", type=_csv(str, "impls"), default="grouped_mm,moekit",
        help=f"comma-separated implementations: {', '.join(IMPLS + PEERS)}")  # fmt: skip
    add("--quant", choices=QUANTS, default="none",
        help="nf4: also time each moekit impl on NF4 expert weights (QLoRA: frozen base, quantized with "
        "moekit.quant; rows 'IMPL+nf4', fwd and lora modes) beside the dense rows, with the expert weights' bytes "
        "(nf4-dq: with double-quantized scales, rows 'IMPL+nf4-dq') "
        f"and a value check against {CHECK_AGAINST}")  # fmt: skip
    add("--device", choices=["cpu", "cuda"], help="device (default: cuda when available, else cpu)")
    add("--json", metavar="PATH", help="write the records to this JSON file (default: not written)")
    add("--plot", metavar="PATH", help="draw a grouped bar chart to this PNG (default: not drawn)")
    parser.set_defaults(func=run_bench)
    return parser
