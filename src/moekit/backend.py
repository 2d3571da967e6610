"""The function registered in transformers' experts interface under the name "moekit".

    fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]

Everything is derived from the module's flags (``has_gate``, ``is_transposed``, ``is_concatenated``,
``has_bias``), its ``_apply_gate`` and its ``act_fn``; routing stays in the model's own code.
"""

from __future__ import annotations

import os

import torch

from .activations import Activation, resolve_activation
from .lora import collect_lora
from .plan import build_plan
from .reference import ExpertsLayout, experts_reference

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


def _check_inputs(module: torch.nn.Module, hidden: Tensor, index: Tensor, weights: Tensor, layout: ExpertsLayout):
    up_weight, up_bias, down_weight, down_bias = _projection_params(module)
    num_experts = up_weight.shape[0]
    if layout.transposed:
        hidden_size, up_width = up_weight.shape[1:]
        inner, down_out = down_weight.shape[1:]
    else:
        up_width, hidden_size = up_weight.shape[1:]
        down_out, inner = down_weight.shape[1:]
    expected_inner = up_width // 2 if layout.activation.gated else up_width
    if down_weight.shape[0] != num_experts or inner != expected_inner or down_out != hidden_size:
        raise ValueError(
            f"down_proj has shape {tuple(down_weight.shape)}, inconsistent with the up projection "
            f"{tuple(up_weight.shape)} (expected {num_experts} experts, {expected_inner} intermediate, "
            f"{hidden_size} hidden, transposed={layout.transposed})"
        )
    if hidden.dim() != 2 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [num_tokens, {hidden_size}], got {tuple(hidden.shape)}")
    if index.shape != (hidden.shape[0], index.shape[-1]) or index.dim() != 2:
        raise ValueError(
            f"top_k_index must have shape [num_tokens={hidden.shape[0]}, top_k], got {tuple(index.shape)}"
        )
    if weights.shape != index.shape:
        raise ValueError(f"top_k_weights must have the shape of top_k_index {tuple(index.shape)}, got {tuple(weights.shape)}")
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


def _triton_blocker(hidden: Tensor, layout: ExpertsLayout, has_lora: bool) -> str | None:
    """Why the Triton engine cannot run this call, or None when it can."""
    if hidden.device.type != "cuda":
        return f"hidden_states is on {hidden.device.type}, the Triton engine needs a CUDA device"
    try:
        from .triton_engine import triton_available
    except ImportError as error:
        return f"Triton is not importable ({error})"
    if not triton_available(hidden.device):
        return "Triton cannot compile for this device"
    if layout.activation.custom is not None:
        return "the experts' activation is not in moekit's activation table (it runs through autograd)"
    return None


def select_engine(hidden: Tensor, layout: ExpertsLayout, has_lora: bool) -> str:
    """"triton" on CUDA where the kernels cover the call, "reference" elsewhere; MOEKIT_BACKEND forces one."""
    forced = os.environ.get("MOEKIT_BACKEND", "").strip().lower()
    if forced and forced not in ENGINES:
        raise ValueError(f"MOEKIT_BACKEND must be one of {ENGINES} (or unset), got {forced!r}")
    if forced == "reference":
        return "reference"
    blocker = _triton_blocker(hidden, layout, has_lora)
    if forced == "triton" and blocker is not None:
        raise RuntimeError(f"MOEKIT_BACKEND=triton, but the Triton engine cannot run here: {blocker}")
    return "reference" if blocker is not None else "triton"


def moekit_experts_forward(
    self: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """moekit's experts backend: validated inputs -> dispatch plan -> engine."""
    layout = experts_layout(self)
    up_weight, up_bias, down_weight, down_bias = _projection_params(self)
    if torch.is_autocast_enabled(hidden_states.device.type) and hidden_states.dtype != up_weight.dtype:
        # Same rule as transformers' grouped_mm: under autocast the GEMM runs in the weights' dtype.
        hidden_states = hidden_states.to(up_weight.dtype)
    _check_inputs(self, hidden_states, top_k_index, top_k_weights, layout)
    plan = build_plan(top_k_index, up_weight.shape[0])
    lora = collect_lora(self)
    if select_engine(hidden_states, layout, bool(lora)) == "triton":
        from .triton_engine import experts_triton

        return experts_triton(
            layout, plan, hidden_states, top_k_weights, up_weight, up_bias, down_weight, down_bias,
            up_lora=lora.get("up"), down_lora=lora.get("down"),
        )  # fmt: skip
    return experts_reference(
        layout, plan, hidden_states, top_k_weights, up_weight, up_bias, down_weight, down_bias,
        up_lora=lora.get("up"), down_lora=lora.get("down"),
    )  # fmt: skip
