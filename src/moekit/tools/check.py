"""``moekit check``: the correctness guard for an MoE model (and its LoRA adapter) on moekit.

It runs one batch through the model twice — experts on moekit, then on transformers' default backend — and
compares, per MoE layer, the experts' outputs and the gradients of the experts' trainable weights (the LoRA
factors with an adapter, the expert weights without). With an adapter it also checks the failures that make
MoE fine-tunes silently useless:

- the experts are not adapted at all (``target_parameters`` does not name the expert weights);
- the adapter's trainable parameters are fewer than its config implies (frozen or missing expert adapters);
- an expert that received tokens gets no gradient in its adapter.

NF4 experts (``moekit.quantize_experts(model, "nf4")``, or ``--quant nf4``): transformers' backends cannot run on
NF4 codes, so the default-backend pass runs on the same model with each NF4 expert weight swapped for a frozen dense
parameter holding ``weight.dequantize()`` (put back afterwards); moekit runs on the NF4 weights. The NF4 base is
frozen, so besides the LoRA factors' gradients the check compares the gradients that reach each experts module's
inputs (hidden states, routing weights) where they require one.

Exit status 0 when everything holds, 1 with a plain-language explanation when not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..enable import enable, experts_modules
from ..layout import projections
from ..lora import DOWN_PARAMS, UP_PARAMS
from ..quant.experts import TOOL_QUANTS, expert_weight_names, quantize_experts, tool_quant_options
from ..quant.tensor import NF4Tensor
from .cli import HelpFormatter, positive_int
from .cli import console as make_console

Tensor = torch.Tensor
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class LayerReport:
    name: str
    rows_routed: int = 0
    output_error: float = 0.0
    grad_error: float = 0.0


@dataclass
class CheckReport:
    layers: list[LayerReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    diff = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _expert_names(module: torch.nn.Module) -> list[str]:
    """The parameter names a LoRA on this experts module's weights must target."""
    return [UP_PARAMS[0] if module.has_gate else UP_PARAMS[1], DOWN_PARAMS[0]]


def _expert_wrappers(model: torch.nn.Module) -> dict[int, list]:
    """PEFT ParamWrappers whose base layer is an experts module, keyed by id(experts module)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return {}
    wrappers: dict[int, list] = {}
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            wrappers.setdefault(id(module.get_base_layer()), []).append(module)
    return wrappers


def _lora_parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable LoRA parameters, LoRA parameters the adapter config implies) over every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    trainable = implied = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            rank = module.r[adapter]
            experts = getattr(module, "num_experts", 1)
            implied += rank * experts * (module.in_features + module.out_features)
            for param in (*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()):
                trainable += param.numel() if param.requires_grad else 0
    return trainable, implied


def diagnose_adapter(model: torch.nn.Module, report: CheckReport) -> None:
    """Static checks on a PEFT model: are the experts adapted, and is everything the config implies trainable?"""
    modules = experts_modules(model)
    wrappers = _expert_wrappers(model)
    unadapted = [m for m in modules if not wrappers.get(id(m))]
    if unadapted:
        config = next(iter(model.peft_config.values())) if hasattr(model, "peft_config") else None
        named = sorted(getattr(config, "target_parameters", None) or [])
        wanted = " / ".join(f"experts.{n}" for n in _expert_names(unadapted[0]))
        report.problems.append(
            f"experts are not adapted: {len(unadapted)} of {len(modules)} experts modules have no LoRA — "
            f"target_parameters does not name {wanted} (it names {named or 'nothing'})"
        )
    trainable, implied = _lora_parameter_counts(model)
    if trainable != implied:
        report.problems.append(
            f"the adapter has {trainable:,} trainable LoRA parameters but its config implies {implied:,}: "
            "some adapters are frozen (requires_grad=False) or were not created"
        )


def _nf4_weights(modules: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    """(experts module, parameter name) of every NF4 expert weight."""
    return [(m, n) for m in modules for n in expert_weight_names(m) if isinstance(getattr(m, n, None), NF4Tensor)]


@contextlib.contextmanager
def dequantized(modules: list[torch.nn.Module]):
    """Within the context, every NF4 expert weight of ``modules`` is a frozen dense parameter holding its
    ``dequantize()``, on which transformers' backends run; the NF4 parameters are put back afterwards."""
    swapped = []
    try:
        for module, name in _nf4_weights(modules):
            weight = getattr(module, name)
            swapped.append((module, name, weight))
            setattr(module, name, torch.nn.Parameter(weight.dequantize(), requires_grad=False))
        yield
    finally:
        for module, name, weight in reversed(swapped):
            setattr(module, name, weight)


def _run(
    model: torch.nn.Module,
    input_ids: Tensor,
    implementation: str,
    modules: list[torch.nn.Module],
    input_grads: dict[int, dict[str, Tensor]] | None = None,
):
    """Forward + backward with ``implementation``; per experts module: (output, routed ids, grads of its params).
    ``input_grads``: also collect, per experts module, the gradients of its hidden-state and routing-weight inputs
    (those that require one), as ``{"d hidden": ..., "d routing weights": ...}``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if implementation == "moekit":
        enable(model)
    else:
        base.set_experts_implementation(implementation)
    outputs: dict[int, Tensor] = {}
    routes: dict[int, Tensor] = {}

    def keep(number, name, grad):
        input_grads.setdefault(number, {})[name] = grad.detach().float().clone()

    def record(number, module, args, result):
        outputs[number] = result.detach().float().clone()
        routes[number] = args[1].detach().clone()
        if input_grads is not None:
            for name, tensor in (("d hidden", args[0]), ("d routing weights", args[2])):
                if tensor.requires_grad:
                    tensor.register_hook(functools.partial(keep, number, name))

    handles = [m.register_forward_hook(functools.partial(record, i)) for i, m in enumerate(modules)]
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return outputs, routes


def _layer_grads(model: torch.nn.Module, module: torch.nn.Module) -> dict[str, Tensor]:
    """Gradients of the trainable weights that belong to one experts module (its LoRA factors or weights)."""
    grads = {f"base.{n}": p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}
    for wrapper in _expert_wrappers(model).get(id(module), []):
        for name, param in wrapper.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and param.grad is not None:
                grads[f"{wrapper.parameter_name}.{name}"] = param.grad.detach().float().clone()
    return grads


def _num_experts(module: torch.nn.Module) -> int:
    return projections(module)[0].weight.shape[0]


def _silent_experts(model, module: torch.nn.Module, routes: Tensor) -> list[str]:
    """Adapters of experts that received tokens but whose LoRA factors got an all-zero gradient."""
    problems = []
    num_experts = _num_experts(module)
    counts = torch.bincount(routes.flatten().cpu(), minlength=num_experts + 1)[:num_experts]
    for wrapper in _expert_wrappers(model).get(id(module), []):
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            grad_a, grad_b = wrapper.lora_A[adapter].weight.grad, wrapper.lora_B[adapter].weight.grad
            rank = wrapper.r[adapter]
            per_expert = torch.zeros(num_experts)
            if grad_a is not None:
                per_expert += grad_a.detach().float().view(num_experts, rank, -1).abs().sum(dim=(1, 2)).cpu()
            if grad_b is not None:
                per_expert += grad_b.detach().float().view(-1, rank, num_experts).abs().sum(dim=(0, 1)).cpu()
            silent = [e for e in range(num_experts) if counts[e] > 0 and per_expert[e] == 0]
            if silent:
                problems.append(
                    f"adapter '{adapter}' on {wrapper.parameter_name}: experts {silent} received tokens but their "
                    "LoRA factors got no gradient"
                )
    return problems


def run_check(model: torch.nn.Module, *, tokens: int = 64, batch: int = 2, seed: int = 0) -> CheckReport:
    """Compare moekit with transformers' default experts backend on one batch; see the module docstring."""
    report = CheckReport()
    is_peft = hasattr(model, "peft_config")
    modules = experts_modules(model)
    quantized = bool(_nf4_weights(modules))
    if is_peft:
        diagnose_adapter(model, report)
    else:
        for module in modules:  # full fine-tune: compare the expert weights' gradients (NF4 ones are frozen)
            for param in module.parameters():
                if not isinstance(param, NF4Tensor):
                    param.requires_grad_(True)
    base = model.get_base_model() if is_peft else model
    default = base.config._experts_implementation
    if default in (None, "moekit"):
        default = "grouped_mm"
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, base.config.vocab_size, (batch, tokens), generator=generator).to(device)

    their_inputs: dict[int, dict[str, Tensor]] | None = {} if quantized else None
    our_inputs: dict[int, dict[str, Tensor]] | None = {} if quantized else None
    with dequantized(modules):  # NF4 experts: transformers' backend runs on their dequantized weights
        theirs, _ = _run(model, input_ids, default, modules, their_inputs)
        their_grads = [_layer_grads(model, m) for m in modules]
    ours, routes = _run(model, input_ids, "moekit", modules, our_inputs)
    our_grads = [_layer_grads(model, m) for m in modules]
    if quantized:
        for number in range(len(modules)):
            their_grads[number].update(their_inputs.get(number, {}))
            our_grads[number].update(our_inputs.get(number, {}))
    dtype = next(modules[0].parameters()).dtype if modules else torch.float32
    tolerance = TOLERANCE.get(dtype, 3e-2)
    against = f"experts_implementation={default!r}"
    if quantized:
        count = len(_nf4_weights(modules))
        against += f" on the {count} NF4 expert weights dequantized (moekit on the NF4 codes)"
    report.notes.append(f"compared against {against}; tolerance {tolerance:g} ({dtype})")

    names = {id(m): n.removeprefix("base_model.model.").replace(".base_layer", "") for n, m in model.named_modules()}
    for number, module in enumerate(modules):
        layer = LayerReport(names.get(id(module), str(number)))
        if number in ours and number in theirs:
            layer.rows_routed = int((routes[number] < _num_experts(module)).sum())
            layer.output_error = _rel_err(ours[number], theirs[number])
        layer.grad_error = max(
            (_rel_err(our_grads[number][k], their_grads[number][k]) for k in their_grads[number]), default=0.0
        )
        if our_grads[number].keys() != their_grads[number].keys():
            report.problems.append(f"{layer.name}: moekit and {default} produced gradients for different weights")
        if layer.output_error > tolerance:
            report.problems.append(
                f"{layer.name}: experts output differs from {default} by {layer.output_error:.2e} (> {tolerance:g})"
            )
        if layer.grad_error > tolerance:
            report.problems.append(
                f"{layer.name}: expert gradients differ from {default} by {layer.grad_error:.2e} (> {tolerance:g})"
            )
        if is_peft and number in routes:
            report.problems.extend(f"{layer.name}: {p}" for p in _silent_experts(model, module, routes[number]))
        report.layers.append(layer)
    return report


# --- the `moekit check` command -------------------------------------------------------------------------------


def _load(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.tiny:
        from .tiny import build

        model = build(args.tiny, dtype=dtype, experts_implementation="grouped_mm")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    model.to(args.device)
    if getattr(args, "quant", "none") != "none":
        try:
            # before any adapter: LoRA on the frozen NF4 base (QLoRA)
            quantize_experts(model, "nf4", **tool_quant_options(args.quant))
        except ValueError as error:
            raise ValueError(f"--quant {args.quant}: {error}") from None
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    elif args.lora:
        from .tiny import add_lora

        model = add_lora(model)
    return model


def _argument_problem(args) -> str | None:
    """One line naming the argument that is wrong and what was expected, or None."""
    if bool(args.tiny) == bool(args.model_dir):
        got = f" (got MODEL_DIR {args.model_dir!r} and --tiny {args.tiny!r})" if args.tiny else ""
        return f"give exactly one of MODEL_DIR or --tiny MODEL_TYPE{got}"
    if args.tiny:
        from .tiny import MODEL_TYPES

        if args.tiny not in MODEL_TYPES:
            return f"--tiny {args.tiny!r} is not a tiny model type; choose from {', '.join(MODEL_TYPES)}"
    if args.adapter and args.lora:
        return "--adapter loads a saved adapter and --lora adds a fresh one: give one of them"
    for name, path, what in (("MODEL_DIR", args.model_dir, "model"), ("--adapter", args.adapter, "PEFT adapter")):
        if path and not os.path.isdir(path):
            return f"{name} {path!r} is not a directory (expected a saved {what})"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
    return None


def _phase(console, text: str):
    """A context for a phase that may take long: a spinner on a terminal, one plain line elsewhere."""
    if console.is_terminal:
        return console.status(text)
    console.print(text, markup=False, highlight=False)
    return contextlib.nullcontext()


def _print_report(console, report: CheckReport, live_adapters: bool) -> int:
    """The per-layer table and the verdict; the exit status."""
    from rich.table import Table

    table = Table(title="moekit check: moekit against transformers, per MoE layer")
    for column in ("layer", "rows", "output rel. err", "grad rel. err"):
        table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")
    for layer in report.layers:
        table.add_row(layer.name, str(layer.rows_routed), f"{layer.output_error:.2e}", f"{layer.grad_error:.2e}")
    console.print(table)
    for note in report.notes:
        console.print(note, style="dim", markup=False, highlight=False)
    if report.ok:
        adapted = " and the adapters are live" if live_adapters else ""
        console.print(f"[green]OK[/]: {len(report.layers)} MoE layers match{adapted}.")
        return 0
    console.print(f"[red]FAILED[/]: {len(report.problems)} problem(s):")
    for problem in report.problems:
        console.print(f"  - {problem}", markup=False, highlight=False)
    return 1


def command(args) -> int:
    console = make_console()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/PEFT deprecation chatter
    problem = _argument_problem(args)
    if problem:
        console.print(f"moekit check: {problem}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    try:
        with _phase(console, f"moekit check: loading {args.model_dir or f'a tiny {args.tiny}'} ..."):
            model = _load(args)
    except (OSError, ValueError, KeyError) as error:
        console.print(f"moekit check: could not load the model: {error}", style="red", markup=False, soft_wrap=True)
        return 2
    with _phase(console, "moekit check: one batch on transformers' default experts backend, then on moekit ..."):
        report = run_check(model, tokens=args.tokens)
    return _print_report(console, report, live_adapters=bool(args.adapter or args.lora))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="check a model (and LoRA adapter) on moekit against transformers",
        description="Run a batch with moekit and with transformers' default experts backend and compare, per MoE "
        "layer, outputs and gradients; with an adapter, check that the experts are adapted and get gradients.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("model_dir", nargs="?", help="a saved Hugging Face model directory (no default: give it or --tiny)")
    add("--adapter", help="a saved PEFT adapter directory to load on the model (default: none)")
    add("--tiny", metavar="MODEL_TYPE", help="build a tiny random model of this type instead (default: none)")
    add("--lora", action="store_true", help="add a fresh LoRA on the expert weights")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
        help="device (cuda when available)")  # fmt: skip
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    add("--tokens", type=positive_int, default=64, help="tokens per sequence (batch of 2)")
    add("--quant", default="none", choices=TOOL_QUANTS,
        help="nf4: quantize the model's expert weights to frozen NF4 (moekit.quantize_experts) before any adapter, "
        "and check moekit on them against transformers on their dequantized values; a model whose experts are "
        "NF4 already is checked that way with none too; nf4-dq: the same with double-quantized scales")  # fmt: skip
    parser.set_defaults(func=command)
    return parser
