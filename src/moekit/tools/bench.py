"""Expert-layer benchmark: transformers' backends against moekit's engines on real model shapes.

One record per (shape, impl, mode, tokens): median ms over timed repeats (CUDA events on GPU, steps queued back
to back; ``ms_synced`` with the host waiting for the GPU after every step), TFLOP/s with
the FLOP counts of ``performance-anchors.md`` (gated fwd 6·T·K·H·I, non-gated 4·T·K·H·I; full = 3× fwd,
LoRA = 2× fwd) and the peak memory allocated during the timed step.

Modes: "fwd" (no grad), "full" (forward + backward, trainable expert weights), "lora" (PEFT LoRA on both expert
weights, base frozen; one case per ``--lora-rank``), "frozen" (forward + backward with the base frozen and no
LoRA: input and routing-weight gradients only; the cost LoRA is measured against, issue #4).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


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


def _select(module: torch.nn.Module, impl: str) -> None:
    if impl.startswith("moekit"):
        import moekit

        moekit.enable(module)
        os.environ["MOEKIT_BACKEND"] = impl.split("-", 1)[1] if "-" in impl else ""
    else:
        module.config._experts_implementation = impl


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
        os.environ.pop("MOEKIT_BACKEND", None)
        gc.collect()  # the case's tensors are unreachable now: give their memory back before the next one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def add_case_arguments(parser: argparse.ArgumentParser, preset: str = "nemotron3-nano", mode: str = "full") -> None:
    """--preset, --tokens, --mode and --lora-rank of one benchmark case (``make_step``), for the GPU scripts."""
    parser.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--mode", choices=MODES, default=mode)
    parser.add_argument("--lora-rank", type=int, default=16)


def make_step(
    shape: Shape, impl: str, mode: str, tokens: int, device: str, dtype: torch.dtype, lora_rank: int = 16
) -> Callable[[], None]:
    """One benchmark step of a configuration (a forward, or a forward + backward that clears the gradients),
    with its module, routing and upstream gradient built once."""
    module = make_experts_module(shape, device, dtype)
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

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(hidden, index, weights)
        else:
            out = model(hidden, index, weights)
            out.backward(upstream)
            hidden.grad = weights.grad = None
            for param in model.parameters():
                param.grad = None

    return step


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
    step = make_step(shape, impl, mode, tokens, device, dtype, lora_rank)
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
        "ms_synced": ms_synced,  # the host waiting for the GPU after every step (the timing of runs 1-5)
        "tflops": flops / (ms * 1e-3) / 1e12,
        "peak_gib": peak,
        # What one step allocates on top of the resident weights and inputs: activations, transients, gradients.
        "step_gib": peak - resident,
    }
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


def _peer_available(impl: str) -> str | None:
    """None when a peer implementation can run, else why it is skipped."""
    if impl == "liger":
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        return "Liger-Kernel's fused MoE has no transformers-experts adapter in moekit yet"
    return None


def _custom_shape(args) -> Shape:
    missing = [flag for flag in ("hidden", "intermediate", "experts", "top_k") if getattr(args, flag) is None]
    if missing:
        raise ValueError("a custom shape needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    act = args.act or ("silu" if args.gated else "relu2")
    if not args.gated and act == "gpt_oss":
        raise ValueError("--act gpt_oss is a gated activation: add --gated")
    return Shape("custom", args.hidden, args.intermediate, args.experts, args.top_k, gated=args.gated, act=act)


def _case_key(record: dict) -> tuple:
    """What makes two records the same case for every impl: shape, tokens, mode, LoRA rank."""
    return record["shape"], record["tokens"], record["mode"], record.get("lora_rank")


def _table(records: list[dict], dense: float | None) -> rich.table.Table:  # noqa: F821
    from rich.table import Table

    table = Table(title="expert layer benchmark", caption="ms: median step, steps queued back to back (CUDA events)")
    # "÷ frozen": a LoRA step over the same impl's frozen-base step (same shape and tokens), when both ran
    frozen = {(r["shape"], r["tokens"], r["impl"]): r["ms"] for r in records if r["mode"] == "frozen" and "ms" in r}
    columns = ["shape", "tokens", "mode", "impl", "ms", "TFLOP/s", "% dense", "peak GiB", "step GiB", "× grouped_mm"]
    for column in columns + (["÷ frozen"] if frozen else []):
        table.add_column(column, justify="left" if column in ("shape", "mode", "impl") else "right")
    baselines = {_case_key(r): r["ms"] for r in records if r["impl"] == "grouped_mm" and "ms" in r}
    for r in records:
        mode = f"lora r={r['lora_rank']}" if r.get("lora_rank") else r["mode"]
        if "ms" not in r:
            table.add_row(r["shape"], str(r["tokens"]), mode, r["impl"], f"[yellow]{r['skipped']}[/]")
            continue
        baseline = baselines.get(_case_key(r))
        frozen_ms = frozen.get((r["shape"], r["tokens"], r["impl"])) if r["mode"] == "lora" else None
        table.add_row(
            r["shape"], str(r["tokens"]), mode, r["impl"], f"{r['ms']:.3f}", f"{r['tflops']:.1f}",
            f"{100 * r['tflops'] / dense:.0f}%" if dense else "-",
            "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}",
            "-" if r["step_gib"] != r["step_gib"] else f"{r['step_gib']:.2f}",
            f"{baseline / r['ms']:.2f}" if baseline else "-",
            *([f"{r['ms'] / frozen_ms:.2f}" if frozen_ms else "-"] if frozen else []),
        )  # fmt: skip
    return table


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


def run_bench(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[red]--device cuda requested but no CUDA device is available[/]")
        return 2
    on_cpu = not device.startswith("cuda")
    try:
        if args.hidden is not None or args.intermediate is not None or args.experts is not None:
            shapes = [_custom_shape(args)]
        else:
            names = args.preset or ([CPU_PRESET] if on_cpu else ["nemotron3-nano", "qwen3-30b-a3b"])
            unknown = [n for n in names if n not in PRESETS]
            if unknown:
                raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
            shapes = [PRESETS[n] for n in names]
    except ValueError as error:
        console.print(f"[red]moekit bench: {error}[/]")
        return 2
    if on_cpu:
        console.print(
            "[bold yellow]Running on the CPU: these numbers say nothing about GPU speed; they only show the "
            "benchmark works. Use --device cuda on a GPU machine.[/]"
        )
    tokens = args.tokens or ([256] if on_cpu else [8192])
    dtype = torch.float32 if on_cpu else torch.bfloat16
    dense = dense_matmul_tflops(device, size=1024 if on_cpu else 8192, dtype=dtype)
    card = torch.cuda.get_device_name() if not on_cpu else "cpu"
    console.print(f"card: {card}; measured dense {str(dtype).removeprefix('torch.')} matmul: {dense:.1f} TFLOP/s")
    cases = [
        (s, t, m, rank, i)
        for s in shapes
        for t in tokens
        for m in args.modes
        for rank in (args.lora_rank if m == "lora" else [None])
        for i in args.impls
    ]
    records = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for shape, count, mode, rank, impl in cases:
            progress.update(task, description=f"{shape.name} T={count} {mode} {impl}")
            skipped = _peer_available(impl)
            if impl == "eager" and not on_cpu and count > 8192:
                skipped = "eager loops over experts in Python; skipped above T=8192"
            if skipped is None:
                try:
                    record = run_case(
                        shape, impl, mode, count, device=device, dtype=dtype, lora_rank=rank or 16,
                        warmup=1 if on_cpu else 3, repeats=3 if on_cpu else 10, card=card,
                    )  # fmt: skip
                except (RuntimeError, ValueError, NotImplementedError) as error:
                    skipped = f"{type(error).__name__}: {error}"[:120]
            if skipped is not None:
                record = {"card": card, "shape": shape.name, "impl": impl, "mode": mode, "tokens": count,
                          "lora_rank": rank, "skipped": skipped}  # fmt: skip
            record["dense_tflops"] = dense
            records.append(record)
            progress.advance(task)
    console.print(_table(records, dense))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
        console.print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        plot(records, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _csv(kind):
    def parse(text: str):
        return [kind(item) for item in text.split(",") if item]

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="time the expert layer: transformers' backends against moekit",
        description="Time one MoE expert layer (forward, forward+backward, LoRA) for model-shaped presets or "
        "an explicit shape, against transformers' eager and grouped_mm backends.",
    )
    parser.add_argument("--preset", type=_csv(str), help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--gated", action="store_true", help="gated experts (act(gate)·up); default non-gated")
    parser.add_argument("--act", choices=["relu2", "relu", "silu", "gelu", "gpt_oss"])
    parser.add_argument("--tokens", type=_csv(int), help="comma-separated token counts (default 8192; CPU 256)")
    parser.add_argument("--modes", type=_csv(str), default=["fwd", "full"], help="fwd,full,lora,frozen")
    parser.add_argument("--lora-rank", type=_csv(int), default=[16], help="comma-separated LoRA ranks (lora mode)")
    parser.add_argument("--impls", type=_csv(str), default=["grouped_mm", "moekit"], help=", ".join(IMPLS + ("liger",)))
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--plot", help="draw a grouped bar chart to this PNG")
    parser.set_defaults(func=_checked_run)
    return parser


def _checked_run(args) -> int:
    bad_modes = [m for m in args.modes if m not in MODES]
    bad_impls = [i for i in args.impls if i not in IMPLS + ("liger",)]
    if bad_modes or bad_impls:
        print(f"moekit bench: unknown mode(s) {bad_modes} / impl(s) {bad_impls}; modes: {MODES}, impls: {IMPLS}")
        return 2
    return run_bench(args)
