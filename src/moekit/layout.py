"""What an engine is told about one experts call: the module's static layout and, per projection, its weight, bias
and LoRA factors in one shape.

    ExpertsLayout   the activation (from the module's own ``act_fn`` / ``_apply_gate``) and whether the weights are
                    stored transposed; resolved once per module (``experts_layout``)
    Projection      weight as stored ([E, out, in], or [E, in, out] when transposed), bias [E, out] or None,
                    ``LoraFactors`` or None
    ExpertsCall     layout + up projection + down projection: built once per call by the backend; each engine
                    is ``run(call, plan, x, routing_weights) -> [T, H]``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .activations import Activation, resolve_activation
from .lora import LoraFactors

Tensor = torch.Tensor


@dataclass(frozen=True)
class ExpertsLayout:
    """Static facts the engines need about an experts module."""

    activation: Activation
    transposed: bool  # weights stored [E, in, out] (gpt-oss) instead of [E, out, in]


def in_out(weight: Tensor, transposed: bool) -> Tensor:
    """A stored expert weight viewed [E, in, out] (no copy)."""
    return weight if transposed else weight.transpose(1, 2)


def out_in(weight: Tensor, transposed: bool) -> Tensor:
    """A stored expert weight viewed [E, out, in] (no copy)."""
    return weight.transpose(1, 2) if transposed else weight


class Projection(NamedTuple):
    """One projection of the experts: ``y = x W[e]ᵀ (+ b[e]) (+ scale (x A[e]ᵀ) B[e]ᵀ)`` per expert e."""

    weight: Tensor  # as stored: [E, out, in], or [E, in, out] for a transposed layout
    bias: Tensor | None = None  # [E, out]
    lora: LoraFactors | None = None

    def in_out(self, transposed: bool) -> Tensor:
        return in_out(self.weight, transposed)


class ExpertsCall(NamedTuple):
    """Everything of one experts call but the routed inputs: what ``engine.run(call, plan, x, weights)`` takes."""

    layout: ExpertsLayout
    up: Projection  # hidden -> 2I (gated) or I
    down: Projection  # I -> hidden

    @property
    def num_experts(self) -> int:
        return self.up.weight.shape[0]


def projections(module: torch.nn.Module) -> tuple[Projection, Projection]:
    """(up, down) as stored on a transformers experts module, without LoRA."""
    has_gate, has_bias = getattr(module, "has_gate", True), getattr(module, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up_bias = getattr(module, f"{up_name}_bias") if has_bias else None
    down_bias = module.down_proj_bias if has_bias else None
    return Projection(getattr(module, up_name), up_bias), Projection(module.down_proj, down_bias)


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
    up_weight = projections(module)[0].weight
    transposed = bool(getattr(module, "is_transposed", False))
    up_width = up_weight.shape[-1] if transposed else up_weight.shape[-2]
    layout = ExpertsLayout(activation=resolve_activation(module, up_width), transposed=transposed)
    module.__dict__["_moekit_layout"] = layout
    return layout


def check_inputs(
    up: Projection, down: Projection, gated: bool, transposed: bool, hidden: Tensor, index: Tensor, weights: Tensor
) -> None:
    """Clear errors for shapes, dtypes and devices the engines cannot take (never a wrong answer or a kernel crash)."""
    num_experts = up.weight.shape[0]
    hidden_size, up_width = up.in_out(transposed).shape[1:]
    inner, down_out = down.in_out(transposed).shape[1:]
    expected_inner = up_width // 2 if gated else up_width
    if down.weight.shape[0] != num_experts or inner != expected_inner or down_out != hidden_size:
        raise ValueError(
            f"down_proj has shape {tuple(down.weight.shape)}, inconsistent with the up projection "
            f"{tuple(up.weight.shape)} (expected {num_experts} experts, {expected_inner} intermediate, "
            f"{hidden_size} hidden, transposed={transposed})"
        )
    if hidden.dim() != 2 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, {hidden_size}], got {tuple(hidden.shape)}")
    if index.dim() != 2 or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"top_k_index must have shape [num_tokens={hidden.shape[0]}, top_k], got {tuple(index.shape)}")
    if weights.shape != index.shape:
        raise ValueError(
            f"top_k_weights must have the shape of top_k_index {tuple(index.shape)}, got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"top_k_weights must be a floating-point tensor, got dtype {weights.dtype}")
    params = (("up", up.weight), ("up bias", up.bias), ("down", down.weight), ("down bias", down.bias))
    for name, param in params:
        if param is not None and param.dtype != hidden.dtype:
            raise TypeError(
                f"hidden_states dtype {hidden.dtype} does not match the {name} expert weights' dtype {param.dtype}"
            )
        if param is not None and param.device != hidden.device:
            raise ValueError(f"hidden_states is on {hidden.device} but the {name} expert weights are on {param.device}")
