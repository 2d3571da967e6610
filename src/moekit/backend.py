"""The function registered in transformers' experts interface under the name "moekit".

    fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]

Everything is derived from the module's flags (``has_gate``, ``is_transposed``, ``is_concatenated``,
``has_bias``), its ``_apply_gate`` and its ``act_fn``; routing stays in the model's own code.

The data path: routing (the model's) -> ``ExpertsCall`` (``moekit.layout``) -> dispatch plan (``moekit.plan``) ->
engine (``select_engine``: ``moekit.engines.reference`` or ``moekit.engines.triton``). Eager calls run
``run_engine`` inline. Under torch.compile the call goes through the custom op of ``moekit.ops``
(opaque to the compiler, no graph break), whose implementation runs the same ``run_engine``; NF4 expert weights
included (the op takes their codes and scales). Only a custom activation runs outside the graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import ops
from .engines import reference
from .engines import triton as triton_engine
from .layout import ExpertsCall, ExpertsLayout, Projection, check_inputs, experts_layout, projections
from .lora import PENDING_WRAPPERS, LoraFactors, LoraWrappers, collect_lora
from .options import OPTIONS, check_environment
from .plan import build_plan
from .quant.tensor import FROZEN_MESSAGE, NF4Tensor

Tensor = torch.Tensor

# What the Triton kernels take; every other dtype runs on the reference engine.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ engine choice
@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _capable(index: int) -> bool:
    """Compute capability >= 8.0 (asked once per GPU: every call checks, and the step's host time is short)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton engine can run on ``device``: a CUDA GPU of compute capability >= 8.0 with triton,
    or the CPU when ``TRITON_INTERPRET=1`` (slow; tests only)."""
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available() or torch.version.cuda is None:
            return False
        return _capable(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        from .kernels.numerics import interpreting

        return interpreting()
    return False


def _lora_blocker(name: str, factors: LoraFactors | None, hidden: Tensor) -> str | None:
    """Why the Triton kernels cannot take this projection's LoRA factors, or None when they can."""
    if factors is None:
        return None
    factor_a, factor_b = factors.a, factors.b
    if factor_a.dim() != 3 or factor_b.dim() != 3 or factor_a.shape[1] != factor_b.shape[2]:
        return (
            f"the {name} projection's LoRA factors must be A [E, R, in] and B [E, out, R], got "
            f"{tuple(factor_a.shape)} and {tuple(factor_b.shape)}"
        )
    for label, factor in (("A", factor_a), ("B", factor_b)):
        if factor.dtype not in TRITON_DTYPES:
            return f"the {name} projection's LoRA factor {label} is {factor.dtype}; the kernels take {TRITON_DTYPES}"
        if factor.device != hidden.device:
            return (
                f"the {name} projection's LoRA factor {label} is on {factor.device}, hidden_states on {hidden.device}"
            )
    return None


def triton_blocker(
    hidden: Tensor, layout: ExpertsLayout, up_lora: LoraFactors | None = None, down_lora: LoraFactors | None = None
) -> str | None:
    """Why the Triton engine cannot run this call, or None when it can (the one list of what the kernels cover).
    Expert weights in NF4 (``moekit.quant.NF4Tensor``) are covered: the kernels dequantize each weight tile as they
    load it."""
    if not triton_available(hidden.device):
        return (
            f"hidden_states is on {hidden.device.type}; the Triton engine needs triton and a CUDA GPU of compute "
            "capability >= 8.0, or the CPU with TRITON_INTERPRET=1 (slow; for debugging and tests)"
        )
    if layout.activation.custom is not None:
        return "the experts' activation is not in moekit's activation table (it runs through autograd)"
    if hidden.dtype not in TRITON_DTYPES:
        return f"hidden_states is {hidden.dtype}; the kernels take {TRITON_DTYPES}"
    return _lora_blocker("up", up_lora, hidden) or _lora_blocker("down", down_lora, hidden)


def select_engine(
    hidden: Tensor, layout: ExpertsLayout, up_lora: LoraFactors | None = None, down_lora: LoraFactors | None = None
) -> str:
    """The engine for this call: "triton" where the kernels cover it on CUDA, "reference" elsewhere (the CPU
    included, even with TRITON_INTERPRET=1). ``MOEKIT_BACKEND=reference|triton`` (``OPTIONS.backend``) forces one;
    a forced Triton engine that cannot run the call raises, naming why, and never falls back."""
    check_environment()
    forced = OPTIONS.backend
    if forced == "reference":
        return "reference"
    blocker = triton_blocker(hidden, layout, up_lora, down_lora)
    if forced == "triton":
        if blocker is not None:
            raise RuntimeError(f"MOEKIT_BACKEND=triton, but the Triton engine cannot run here: {blocker}")
        return "triton"
    # Unforced: the interpreter is for debugging and tests only, so the CPU default stays the reference engine.
    return "triton" if blocker is None and hidden.device.type == "cuda" else "reference"


def run_engine(call: ExpertsCall, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Dispatch plan -> engine -> [T, H] in hidden_states' dtype (that of the weights). Eager, or inside the op."""
    plan = build_plan(top_k_index, call.num_experts)
    engine = select_engine(hidden_states, call.layout, call.up.lora, call.down.lora)
    device_type = hidden_states.device.type
    # Autocast off: the GEMMs run in the weights' dtype, as transformers' grouped_mm does (grouped_mm is not
    # autocast-enabled), and the same way eager, in the op and in the op's backward recompute.
    autocast = torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        run = triton_engine.run if engine == "triton" else reference.run
        return run(call, plan, hidden_states, top_k_weights)


# ---------------------------------------------------------------------------------------- the interface
def _layout_facts(layout: ExpertsLayout) -> tuple[bool, bool, tuple | None]:
    """(gated, transposed, the op's layout arguments or None for a custom activation): plain Python values, which
    dynamo guards by value, so one compiled graph serves every experts module of the same layout."""
    op_layout = None if layout.activation.custom is not None else ops.layout_args(layout)
    return layout.activation.gated, layout.transposed, op_layout


# dynamo takes a module argument of an assume_constant_result function from torch 2.13 on (2.11's refuses it:
# AsPythonConstantNotImplementedError); before, a module first called under compile resolves its layout outside the
# graph: one graph break per call, none once ``moekit.enable(model)`` ran before compiling.
RESOLVES_WHILE_TRACING = torch.__version__ >= (2, 13)


@torch.compiler.disable
def _resolve_outside_graph(module: torch.nn.Module) -> tuple[bool, bool, tuple | None]:
    """``_layout_facts`` of a module first called under torch.compile, where dynamo cannot bake them in."""
    return _layout_facts(experts_layout(module))


@torch.compiler.assume_constant_result
def _resolve_while_tracing(module: torch.nn.Module) -> tuple[bool, bool, tuple | None]:
    """``_layout_facts`` of a module whose first call is under torch.compile. Dynamo runs this function as it is at
    trace time and bakes its result into the graph, instead of tracing the activation probe (real tensors, a
    data-dependent comparison: graph breaks). The graph is then guarded on the module's identity: call
    ``moekit.enable(model)`` (or run once eagerly) before compiling to share one graph across layers."""
    return _layout_facts(experts_layout(module))


@torch.compiler.disable
def _run_outside_graph(module: torch.nn.Module, up: Projection, down: Projection, *inputs: Tensor) -> Tensor:
    """``run_engine`` for a custom activation under torch.compile: a Python callable cannot be an op argument, so
    the call runs eagerly outside the graph (one graph break per call; the engines' own kernels, autograd as in
    eager), NF4 weights or dense. Every other call, NF4 weights included, goes through ``ops.experts``."""
    return run_engine(ExpertsCall(experts_layout(module), up, down), *inputs)


def moekit_experts_forward(
    self: torch.nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    moekit_lora_wrappers: LoraWrappers | None = None,
) -> Tensor:
    """moekit's experts backend: validated inputs -> ExpertsCall -> dispatch plan -> engine.

    ``moekit_lora_wrappers``: the PEFT wrappers of this call (``moekit.lora``), passed down by PEFT's ParamWrapper;
    under transformers' expert parallelism, whose forward takes no keyword argument, left on the module instead.
    """
    compiling = torch.compiler.is_compiling()
    layout = self.__dict__.get("_moekit_layout")
    if layout is None and compiling:
        resolve = _resolve_while_tracing if RESOLVES_WHILE_TRACING else _resolve_outside_graph
        gated, transposed, op_layout = resolve(self)
    else:
        gated, transposed, op_layout = _layout_facts(layout if layout is not None else experts_layout(self))
    if moekit_lora_wrappers is None:  # handed over on the module (transformers' expert-parallel forward)
        moekit_lora_wrappers = self.__dict__.get(PENDING_WRAPPERS)
        if moekit_lora_wrappers is not None:
            moekit_lora_wrappers.taken = True
    lora = collect_lora(self, moekit_lora_wrappers)
    up, down = projections(self)
    up, down = up._replace(lora=lora.get("up")), down._replace(lora=lora.get("down"))
    out_dtype = hidden_states.dtype
    if torch.is_autocast_enabled(hidden_states.device.type) and hidden_states.dtype != up.weight.dtype:
        # transformers' grouped_mm rule: under autocast the GEMMs run in the weights' dtype, and the output comes
        # back in the hidden states' own dtype (below)
        hidden_states = hidden_states.to(up.weight.dtype)
    check_inputs(up, down, gated, transposed, hidden_states, top_k_index, top_k_weights)
    quantized = isinstance(up.weight, NF4Tensor) or isinstance(down.weight, NF4Tensor)
    if quantized and (up.weight.requires_grad or down.weight.requires_grad):
        raise RuntimeError(f"{type(self).__name__}: {FROZEN_MESSAGE}")
    inputs = (hidden_states, top_k_index, top_k_weights)
    if not compiling:
        out = run_engine(ExpertsCall(experts_layout(self), up, down), *inputs)
    elif op_layout is not None:
        # Under torch.compile the engines run inside one opaque custom op (their host reads would break the graph);
        # an NF4 weight enters it as its codes and scales, graph inputs (dynamo flattens the subclass parameter)
        out = ops.experts(op_layout, up, down, *inputs)
    else:  # a custom activation
        out = _run_outside_graph(self, up, down, *inputs)
    return out.to(out_dtype)
