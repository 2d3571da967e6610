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

NF4 expert weights (``moekit.quant.NF4Tensor``, a frozen base) travel as their inner tensors, the packed codes and
the absmax scales (under torch.compile dynamo already holds a subclass parameter as those two graph inputs, from
its ``__tensor_flatten__``), plus their view's metadata as plain arguments: the compute dtype and (shape, strides).
The implementation rebuilds the identical ``NF4Tensor`` (``nf4_weight``) and runs the engines on it exactly as
eagerly; the fake implementations read no data. The codes and scales never get a gradient (the backend refuses a
quantized base that requires one before any op runs), so the backward op recomputes through them as constants.

Not covered: custom activations (``Activation.custom``, a Python callable, cannot be an op argument; under compile
the backend runs those calls eagerly outside the graph, one graph break each) and double backward through the op.
"""

from __future__ import annotations

import functools

import torch

from .activations import ELEMENTWISE, Activation
from .layout import ExpertsCall, ExpertsLayout, Projection
from .lora import LoraFactors
from .quant.nf4 import dequantize_absmax
from .quant.tensor import NF4Tensor

Tensor = torch.Tensor

# The op's tensor inputs, in order, and the ones that may need a gradient (all but top_k_index and an NF4 weight's
# codes and scales). A projection's weight is either dense (``*_weight``) or NF4 (``*_packed``, ``*_absmax``, with
# ``nf4_dtype`` and its ``*_nf4`` view metadata among the scalars); the other slots hold None.
TENSOR_INPUTS = (
    "x", "top_k_index", "top_k_weights", "up_weight", "up_bias", "down_weight", "down_bias",
    "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b", "up_packed", "up_absmax", "down_packed", "down_absmax",
)  # fmt: skip
FROZEN = ("top_k_index", "up_packed", "up_absmax", "down_packed", "down_absmax")
DIFFERENTIABLE = tuple(i for i, name in enumerate(TENSOR_INPUTS) if name not in FROZEN)


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


def weight_args(weight: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, list[int]]:
    """One projection's weight as op arguments: (dense weight, packed codes, absmax scales, NF4 view metadata
    ``[*shape, *strides]``); a dense weight gives ``(weight, None, None, [])``, an ``NF4Tensor`` its inner tensors
    and metadata (the dense slot None). Under torch.compile ``.packed`` / ``.absmax`` are graph inputs and the
    metadata constants (dynamo guards them). Double-quantized scales enter as their fp32 dequantization, traced from
    their inner tensors (``nf4.dequantize_absmax``)."""
    if not isinstance(weight, NF4Tensor):
        return weight, None, None, []
    if weight.double_quantized:  # traced here: the property's fresh tensor would enter dynamo's guards as an input
        scales = dequantize_absmax(weight.scales).view(weight.packed.shape[0], -1)
    else:
        scales = weight.absmax
    return None, weight.packed, scales, [*weight.shape, *weight.stride()]


def nf4_weight(packed: Tensor, absmax: Tensor, meta: list[int], dtype: torch.dtype) -> NF4Tensor:
    """Inverse of ``weight_args`` for an NF4 weight: the identical ``NF4Tensor`` over the same codes and scales."""
    dims = len(meta) // 2
    return NF4Tensor(packed, absmax, tuple(meta[:dims]), dtype, tuple(meta[dims:]))


def _weight(dense: Tensor | None, packed: Tensor | None, absmax: Tensor | None, meta: list[int], dtype) -> Tensor:
    return dense if packed is None else nf4_weight(packed, absmax, meta, dtype)


def _lora(a: Tensor | None, b: Tensor | None, scale: float) -> LoraFactors | None:
    return None if a is None else LoraFactors(a, b, scale)


def _run(tensors: tuple, up_scale: float, down_scale: float, layout: ExpertsLayout, nf4: tuple) -> Tensor:
    """backend.run_engine on the op's tensor inputs: the eager path, unchanged (NF4 weights rebuilt as they were).
    ``nf4``: (nf4_dtype, up_nf4, down_nf4)."""
    from .backend import run_engine

    (x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias, up_a, up_b, down_a, down_b,
     up_packed, up_absmax, down_packed, down_absmax) = tensors  # fmt: skip
    nf4_dtype, up_nf4, down_nf4 = nf4
    up_weight = _weight(up_weight, up_packed, up_absmax, up_nf4, nf4_dtype)
    down_weight = _weight(down_weight, down_packed, down_absmax, down_nf4, nf4_dtype)
    up = Projection(up_weight, up_bias, _lora(up_a, up_b, up_scale))
    down = Projection(down_weight, down_bias, _lora(down_a, down_b, down_scale))
    return run_engine(ExpertsCall(layout, up, down), x, top_k_index, top_k_weights)


# ------------------------------------------------------------------------------------------------------ forward
@torch.library.custom_op("moekit::experts", mutates_args=())
def _experts_op(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    up_weight: Tensor | None,
    up_bias: Tensor | None,
    down_weight: Tensor | None,
    down_bias: Tensor | None,
    up_lora_a: Tensor | None,
    up_lora_b: Tensor | None,
    down_lora_a: Tensor | None,
    down_lora_b: Tensor | None,
    up_packed: Tensor | None,
    up_absmax: Tensor | None,
    down_packed: Tensor | None,
    down_absmax: Tensor | None,
    up_scale: float,
    down_scale: float,
    kind: str,
    act: str,
    concatenated: bool,
    alpha: float,
    limit: float,
    transposed: bool,
    nf4_dtype: torch.dtype | None,
    up_nf4: list[int],
    down_nf4: list[int],
) -> Tensor:
    """out [T, H] in x's dtype (the weights' dtype). ``up_weight`` / ``down_weight`` None: that projection's weight
    is NF4, its codes, scales and ``*_nf4`` metadata given instead (``weight_args``), standing for ``nf4_dtype``."""
    tensors = (x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias,
               up_lora_a, up_lora_b, down_lora_a, down_lora_b,
               up_packed, up_absmax, down_packed, down_absmax)  # fmt: skip
    layout = layout_from_args(kind, act, concatenated, alpha, limit, transposed)
    return _run(tensors, up_scale, down_scale, layout, (nf4_dtype, up_nf4, down_nf4)).contiguous()


@_experts_op.register_fake
def _experts_fake(x, *args):
    return x.new_empty(x.shape)  # [T, H]: the experts map the hidden width back to itself


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[: len(TENSOR_INPUTS)])
    ctx.scalars = inputs[len(TENSOR_INPUTS) :]  # up_scale, down_scale, the layout, then the NF4 metadata


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
    up_weight: Tensor | None,
    up_bias: Tensor | None,
    down_weight: Tensor | None,
    down_bias: Tensor | None,
    up_lora_a: Tensor | None,
    up_lora_b: Tensor | None,
    down_lora_a: Tensor | None,
    down_lora_b: Tensor | None,
    up_packed: Tensor | None,
    up_absmax: Tensor | None,
    down_packed: Tensor | None,
    down_absmax: Tensor | None,
    up_scale: float,
    down_scale: float,
    kind: str,
    act: str,
    concatenated: bool,
    alpha: float,
    limit: float,
    transposed: bool,
    nf4_dtype: torch.dtype | None,
    up_nf4: list[int],
    down_nf4: list[int],
    needs: list[bool],
) -> list[Tensor]:
    """Gradients of the inputs ``needs`` flags (one per DIFFERENTIABLE input), in that order, each contiguous:
    the forward recomputed under autograd on detached inputs, then ``torch.autograd.grad`` (an NF4 weight's codes
    and scales enter the recompute as they are: constants)."""
    tensors = [x, top_k_index, top_k_weights, up_weight, up_bias, down_weight, down_bias,
               up_lora_a, up_lora_b, down_lora_a, down_lora_b,
               up_packed, up_absmax, down_packed, down_absmax]  # fmt: skip
    layout = layout_from_args(kind, act, concatenated, alpha, limit, transposed)
    wanted = []
    with _autograd_dispatch(), torch.enable_grad():
        for index, need in zip(DIFFERENTIABLE, needs):
            if tensors[index] is not None:
                tensors[index] = tensors[index].detach().requires_grad_(need)
                if need:
                    wanted.append(tensors[index])
        out = _run(tuple(tensors), up_scale, down_scale, layout, (nf4_dtype, up_nf4, down_nf4))
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
    """``backend.run_engine`` as the custom op: out [T, H] in x's dtype. ``op_layout``: ``layout_args(layout)``.
    A weight may be dense or an ``NF4Tensor`` (passed as its codes, scales and metadata: ``weight_args``)."""
    up_a, up_b, up_scale = up.lora if up.lora is not None else (None, None, 1.0)
    down_a, down_b, down_scale = down.lora if down.lora is not None else (None, None, 1.0)
    up_weight, up_packed, up_absmax, up_nf4 = weight_args(up.weight)
    down_weight, down_packed, down_absmax, down_nf4 = weight_args(down.weight)
    quantized = [w for w in (up.weight, down.weight) if isinstance(w, NF4Tensor)]
    nf4_dtype = quantized[0].dtype if quantized else None  # check_inputs: both weights have x's dtype
    return torch.ops.moekit.experts(
        x, top_k_index, top_k_weights, up_weight, up.bias, down_weight, down.bias,
        up_a, up_b, down_a, down_b, up_packed, up_absmax, down_packed, down_absmax,
        float(up_scale), float(down_scale), *op_layout, nf4_dtype, up_nf4, down_nf4,
    )  # fmt: skip
