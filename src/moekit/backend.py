"""The function registered in transformers' experts interface under the name "moekit".

    fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]

Everything is derived from the module's flags (``has_gate``, ``is_transposed``, ``is_concatenated``,
``has_bias``), its ``_apply_gate`` and its ``act_fn``; routing stays in the model's own code.

Eager calls run ``run_engine`` inline. Under torch.compile the call goes through the custom op of ``moekit.ops``
(opaque to the compiler, no graph break), whose implementation runs the same ``run_engine``.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import ops
from .activations import Activation, resolve_activation
from .engines.reference import ExpertsLayout, experts_reference
from .lora import LoraFactors, LoraWrappers, collect_lora
from .plan import build_plan

Tensor = torch.Tensor


def _projection_params(module: torch.nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(up weight, up bias, down weight, down bias) as stored on the module."""
    has_gate, has_bias = getattr(module, "has_gate", True), getattr(module, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up_weight, down_weight = getattr(module, up_name), module.down_proj
    up_bias = getattr(module, f"{up_name}_bias") if has_bias else None
    down_bias = module.down_proj_bias if has_bias else None
    return up_weight, up_bias, down_weight, down_bias


def experts_layout(module: torch.nn.Module) -> ExpertsLayout:
    """The module's static layout, resolved once and cached on the instance."""
    cached = module.__dict__.get("_moekit_layout")
    if cached is not None:
        return cached
    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(
            f"{type(module).__name__} applies a norm after each expert (has_post_expert_norm=True), which moekit "
            "does not implement yet; use experts_implementation='grouped_mm' for this model"
        )
    up_weight = _projection_params(module)[0]
    transposed = bool(getattr(module, "is_transposed", False))
    up_width = up_weight.shape[-1] if transposed else up_weight.shape[-2]
    activation: Activation = resolve_activation(module, up_width)
    layout = ExpertsLayout(activation=activation, transposed=transposed)
    module.__dict__["_moekit_layout"] = layout
    return layout


def _layout_facts(layout: ExpertsLayout) -> tuple[bool, bool, tuple | None]:
    """(gated, transposed, the op's layout arguments or None for a custom activation): plain Python values, which
    dynamo guards by value, so one compiled graph serves every experts module of the same layout."""
    op_layout = None if layout.activation.custom is not None else ops.layout_args(layout)
    return layout.activation.gated, layout.transposed, op_layout


# dynamo takes a module argument of an assume_constant_result function from torch 2.13 on (2.11's refuses it:
# AsPythonConstantNotImplementedError, seen on the GPU machine); before, a module first called under compile resolves
# its layout outside the graph: one graph break per call, none once ``moekit.enable(model)`` ran before compiling.
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


def _check_inputs(
    module: torch.nn.Module, hidden: Tensor, index: Tensor, weights: Tensor, gated: bool, transposed: bool
) -> None:
    up_weight, up_bias, down_weight, down_bias = _projection_params(module)
    num_experts = up_weight.shape[0]
    if transposed:
        hidden_size, up_width = up_weight.shape[1:]
        inner, down_out = down_weight.shape[1:]
    else:
        up_width, hidden_size = up_weight.shape[1:]
        down_out, inner = down_weight.shape[1:]
    expected_inner = up_width // 2 if gated else up_width
    if down_weight.shape[0] != num_experts or inner != expected_inner or down_out != hidden_size:
        raise ValueError(
            f"down_proj has shape {tuple(down_weight.shape)}, inconsistent with the up projection "
            f"{tuple(up_weight.shape)} (expected {num_experts} experts, {expected_inner} intermediate, "
            f"{hidden_size} hidden, transposed={transposed})"
        )
    if hidden.dim() != 2 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, {hidden_size}], got {tuple(hidden.shape)}")
    if index.shape != (hidden.shape[0], index.shape[-1]) or index.dim() != 2:
        raise ValueError(f"top_k_index must have shape [num_tokens={hidden.shape[0]}, top_k], got {tuple(index.shape)}")
    if weights.shape != index.shape:
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(index.shape)}, got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got dtype {weights.dtype}")
    for name, param in (("up", up_weight), ("up bias", up_bias), ("down", down_weight), ("down bias", down_bias)):
        if param is not None and param.dtype != hidden.dtype:
            raise TypeError(
                f"hidden_states dtype {hidden.dtype} does not match the {name} expert weights' dtype {param.dtype}"
            )
        if param is not None and param.device != hidden.device:
            raise ValueError(f"hidden_states is on {hidden.device} but the {name} expert weights are on {param.device}")


ENGINES = ("reference", "triton")


def _lora_blocker(name: str, factors: LoraFactors | None, hidden: Tensor, dtypes: tuple) -> str | None:
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
        if factor.dtype not in dtypes:
            return f"the {name} projection's LoRA factor {label} is {factor.dtype}; the kernels take {dtypes}"
        if factor.device != hidden.device:
            return (
                f"the {name} projection's LoRA factor {label} is on {factor.device}, hidden_states on {hidden.device}"
            )
    return None


def _triton_blocker(
    hidden: Tensor, layout: ExpertsLayout, up_lora: LoraFactors | None = None, down_lora: LoraFactors | None = None
) -> str | None:
    """Why the Triton engine cannot run this call, or None when it can (the one list of what the kernels cover)."""
    try:
        from .engines.triton import _DTYPES, triton_available
    except ImportError as error:
        return f"the Triton engine is not importable ({error})"
    if not triton_available(hidden.device):
        return (
            f"hidden_states is on {hidden.device.type}; the Triton engine needs triton and a CUDA GPU of compute "
            "capability >= 8.0, or the CPU with TRITON_INTERPRET=1 (slow; for debugging and tests)"
        )
    if layout.activation.custom is not None:
        return "the experts' activation is not in moekit's activation table (it runs through autograd)"
    if hidden.dtype not in _DTYPES:
        return f"hidden_states is {hidden.dtype}; the kernels take {_DTYPES}"
    return _lora_blocker("up", up_lora, hidden, _DTYPES) or _lora_blocker("down", down_lora, hidden, _DTYPES)


def select_engine(
    hidden: Tensor,
    layout: ExpertsLayout,
    up_lora: LoraFactors | None = None,
    down_lora: LoraFactors | None = None,
) -> str:
    """The engine for this call: "triton" where the kernels cover it on CUDA, "reference" elsewhere (the CPU
    included, even with TRITON_INTERPRET=1). ``MOEKIT_BACKEND=reference|triton`` forces one; a forced Triton engine
    that cannot run the call raises, naming why, and never falls back. LoRA factors, when given, are checked too.
    """
    forced = os.environ.get("MOEKIT_BACKEND", "").strip().lower()
    if forced and forced not in ENGINES:
        raise ValueError(f"MOEKIT_BACKEND must be one of {ENGINES} (or unset), got {forced!r}")
    if forced == "reference":
        return "reference"
    blocker = _triton_blocker(hidden, layout, up_lora, down_lora)
    if forced == "triton":
        if blocker is not None:
            raise RuntimeError(f"MOEKIT_BACKEND=triton, but the Triton engine cannot run here: {blocker}")
        return "triton"
    # Unforced: the interpreter is for debugging and tests only, so the CPU default stays the reference engine.
    return "triton" if blocker is None and hidden.device.type == "cuda" else "reference"


def run_engine(
    layout: ExpertsLayout,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_lora: LoraFactors | None,
    down_lora: LoraFactors | None,
) -> Tensor:
    """Dispatch plan -> engine -> [T, H] in hidden_states' dtype (that of the weights). Eager, or inside the op."""
    plan = build_plan(top_k_index, up_weight.shape[0])
    engine = select_engine(hidden_states, layout, up_lora=up_lora, down_lora=down_lora)
    device_type = hidden_states.device.type
    # Autocast off: the GEMMs run in the weights' dtype, as transformers' grouped_mm does (grouped_mm is not
    # autocast-enabled), and the same way eager, in the op and in the op's backward recompute.
    autocast = torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if engine == "triton":  # select_engine has checked that the kernels cover the call
            from . import triton_engine

            return triton_engine.run(
                layout, plan, hidden_states, top_k_weights, up_weight, up_bias, down_weight, down_bias,
                up_lora=up_lora, down_lora=down_lora,
            )  # fmt: skip
        return experts_reference(
            layout, plan, hidden_states, top_k_weights, up_weight, up_bias, down_weight, down_bias,
            up_lora=up_lora, down_lora=down_lora,
        )  # fmt: skip


@torch.compiler.disable
def _run_outside_graph(module: torch.nn.Module, *args) -> Tensor:
    """``run_engine`` for a custom activation under torch.compile: a Python callable cannot be an op argument, so the
    call runs eagerly outside the graph (one graph break per call; eager's kernels, autograd as in eager)."""
    return run_engine(experts_layout(module), *args)


def moekit_experts_forward(
    self: torch.nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    moekit_lora_wrappers: LoraWrappers | None = None,
) -> Tensor:
    """moekit's experts backend: validated inputs -> dispatch plan -> engine.

    ``moekit_lora_wrappers``: the PEFT wrappers of this call (``moekit.lora``), passed down by PEFT's ParamWrapper.
    """
    compiling = torch.compiler.is_compiling()
    layout = self.__dict__.get("_moekit_layout")
    if layout is None and compiling:
        resolve = _resolve_while_tracing if RESOLVES_WHILE_TRACING else _resolve_outside_graph
        gated, transposed, op_layout = resolve(self)
    else:
        gated, transposed, op_layout = _layout_facts(layout if layout is not None else experts_layout(self))
    up_weight, up_bias, down_weight, down_bias = _projection_params(self)
    out_dtype = hidden_states.dtype
    if torch.is_autocast_enabled(hidden_states.device.type) and hidden_states.dtype != up_weight.dtype:
        # transformers' grouped_mm rule: under autocast the GEMMs run in the weights' dtype, and the output comes
        # back in the hidden states' own dtype (below)
        hidden_states = hidden_states.to(up_weight.dtype)
    _check_inputs(self, hidden_states, top_k_index, top_k_weights, gated, transposed)
    lora = collect_lora(self, moekit_lora_wrappers)
    args = (hidden_states, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias)
    if not compiling:
        out = run_engine(experts_layout(self), *args, lora.get("up"), lora.get("down"))
    elif op_layout is not None:
        # Under torch.compile the engines run inside one opaque custom op (their host reads would break the graph)
        out = ops.experts(op_layout, *args, lora.get("up"), lora.get("down"))
    else:
        out = _run_outside_graph(self, *args, lora.get("up"), lora.get("down"))
    return out.to(out_dtype)
