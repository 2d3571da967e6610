"""torch.compile support: moekit's experts call as two ``torch.library`` custom ops, opaque to the compiler.

Under torch.compile the backend calls ``experts(...)`` below instead of running an engine inline. Dynamo and
AOTAutograd then see one op, ``moekit::experts``, in the forward graph and one, ``moekit::experts_backward``, in the
backward graph; their fake implementations give only shapes and dtypes. The engines read the host (the dispatch
plan's per-expert counts, the CPU range check, the reference engine's per-expert loops), which cannot be traced
without graph breaks; inside the ops they run eagerly, exactly as without compile: the implementation builds the
plan, picks the engine (``backend.select_engine``, at run time) and runs it. The range
check therefore keeps its behaviour (a ValueError at once on the CPU, reported by a later call on a GPU).

Cost: the forward op saves only its inputs (hidden states, routing, weights, LoRA factors) and no activation; the
backward op recomputes the forward under autograd on detached copies of them and differentiates it
(``torch.autograd.grad``), as activation checkpointing does: one more experts forward per training step, for less
saved memory. Eager calls (not compiling) keep the direct path, which saves the engine's activations instead.

Not covered: custom activations (``Activation.custom``, a Python callable, cannot be an op argument; under compile
the backend runs those calls eagerly outside the graph, one graph break each) and double backward through the op.
"""

from __future__ import annotations

import functools

import torch

from .activations import ELEMENTWISE, Activation
from .layout import ExpertsCall, ExpertsLayout, Projection
from .lora import LoraFactors

Tensor = torch.Tensor

# The op's tensor inputs, in order, and the ones that may need a gradient (all but top_k_index).
TENSOR_INPUTS = (
    "x", "top_k_index", "top_k_weights", "up_weight", "up_bias", "down_weight", "down_bias",
    "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b",
)  # fmt: skip
DIFFERENTIABLE = tuple(i for i, name in enumerate(TENSOR_INPUTS) if name != "top_k_index")


def layout_args(layout: ExpertsLayout) -> tuple[str, str, bool, float, float, bool]:
    """The layout as op arguments: (activation kind, elementwise activation name or "", concatenated, alpha,
    limit, transposed). Only table activations (``custom is None``) can be encoded."""
    activation = layout.activation
    if activation.custom is not None:
        raise ValueError("a custom activation (a Python callable) cannot be an argument of moekit's custom op")
    name = activation.act.name if activation.act is not None else ""
    return activation.kind, name, activation.concatenated, activation.alpha, activation.limit, layout.transposed


@functools.cache
def layout_from_args(kind: str, act: str, concatenated: bool, alpha: float, limit: float, transposed: bool):
    """Inverse of ``layout_args`` (one ExpertsLayout object per distinct layout)."""
    activation = Activation(kind, ELEMENTWISE[act] if act else None, concatenated, alpha=alpha, limit=limit)
    return ExpertsLayout(activation=activation, transposed=transposed)


def _lora(a: Tensor | None, b: Tensor | None, scale: float) -> LoraFactors | None:
    return None if a is None else LoraFactors(a, b, scale)


def _run(tensors: tuple, up_scale: float, down_scale: float, layout: ExpertsLayout) -> Tensor:
    """backend.run_engine on the op's tensor inputs: the eager path, unchanged."""
    from .backend import run_engine

    x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias, up_a, up_b, down_a, down_b = tensors
    up = Projection(up_weight, up_bias, _lora(up_a, up_b, up_scale))
    down = Projection(down_weight, down_bias, _lora(down_a, down_b, down_scale))
    return run_engine(ExpertsCall(layout, up, down), x, top_k_index, top_k_weights)


# ------------------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("moekit::experts", mutates_args=())
def _experts_op(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_lora_a: Tensor | None,
    up_lora_b: Tensor | None,
    down_lora_a: Tensor | None,
    down_lora_b: Tensor | None,
    up_scale: float,
    down_scale: float,
    kind: str,
    act: str,
    concatenated: bool,
    alpha: float,
    limit: float,
    transposed: bool,
) -> Tensor:
    """out [T, H] in x's dtype (the weights' dtype)."""
    tensors = (x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias,
               up_lora_a, up_lora_b, down_lora_a, down_lora_b)  # fmt: skip
    layout = layout_from_args(kind, act, concatenated, alpha, limit, transposed)
    return _run(tensors, up_scale, down_scale, layout).contiguous()


@_experts_op.register_fake
def _experts_fake(x, *args):
    return x.new_empty(x.shape)  # [T, H]: the experts map the hidden width back to itself


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[: len(TENSOR_INPUTS)])
    ctx.scalars = inputs[len(TENSOR_INPUTS) :]  # up_scale, down_scale, then the layout


def _backward(ctx, grad_out: Tensor):
    needs = [bool(ctx.needs_input_grad[i]) for i in DIFFERENTIABLE]
    grads = [None] * (len(TENSOR_INPUTS) + len(ctx.scalars))
    if any(needs):
        computed = iter(torch.ops.moekit.experts_backward(grad_out, *ctx.saved_tensors, *ctx.scalars, needs))
        for index, need in zip(DIFFERENTIABLE, needs):
            if need:
                grads[index] = next(computed)
    return tuple(grads)


_experts_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------- backward
def _autograd_dispatch():
    """Autograd back on inside an op implementation: custom ops run below the autograd dispatch keys (and compiled
    graphs call them with ADInplaceOrView excluded too), so the recompute would otherwise record no graph."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("moekit::experts_backward", mutates_args=())
def _experts_backward_op(
    grad_out: Tensor,
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_lora_a: Tensor | None,
    up_lora_b: Tensor | None,
    down_lora_a: Tensor | None,
    down_lora_b: Tensor | None,
    up_scale: float,
    down_scale: float,
    kind: str,
    act: str,
    concatenated: bool,
    alpha: float,
    limit: float,
    transposed: bool,
    needs: list[bool],
) -> list[Tensor]:
    """Gradients of the inputs ``needs`` flags (one per DIFFERENTIABLE input), in that order, each contiguous:
    the forward recomputed under autograd on detached inputs, then ``torch.autograd.grad``."""
    tensors = [x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias,
               up_lora_a, up_lora_b, down_lora_a, down_lora_b]  # fmt: skip
    layout = layout_from_args(kind, act, concatenated, alpha, limit, transposed)
    wanted = []
    with _autograd_dispatch(), torch.enable_grad():
        for index, need in zip(DIFFERENTIABLE, needs):
            if tensors[index] is not None:
                tensors[index] = tensors[index].detach().requires_grad_(need)
                if need:
                    wanted.append(tensors[index])
        out = _run(tuple(tensors), up_scale, down_scale, layout)
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    # An input that reaches no routed row (e.g. the LoRA factors of a call with zero tokens) gets zeros.
    return [t.new_zeros(t.shape) if g is None else g.contiguous() for t, g in zip(wanted, grads)]


@_experts_backward_op.register_fake
def _experts_backward_fake(grad_out, *args):
    tensors, needs = args[: len(TENSOR_INPUTS)], args[-1]
    return [tensors[i].new_empty(tensors[i].shape) for i, need in zip(DIFFERENTIABLE, needs) if need]


# ---------------------------------------------------------------------------------------------------- entry point
def experts(
    op_layout: tuple, up: Projection, down: Projection, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """``backend.run_engine`` as the custom op: out [T, H] in x's dtype. ``op_layout``: ``layout_args(layout)``."""
    up_a, up_b, up_scale = up.lora if up.lora is not None else (None, None, 1.0)
    down_a, down_b, down_scale = down.lora if down.lora is not None else (None, None, 1.0)
    return torch.ops.moekit.experts(
        x, top_k_index, top_k_weights, up.weight, up.bias, down.weight, down.bias,
        up_a, up_b, down_a, down_b, float(up_scale), float(down_scale), *op_layout,
    )  # fmt: skip
