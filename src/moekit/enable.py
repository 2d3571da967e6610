"""``moekit.enable(model)``: the one call users need."""

from __future__ import annotations

import torch

from .layout import experts_layout
from .lora import BACKEND_NAME


def is_experts_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an experts module decorated by transformers' @use_experts_implementation."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "config")


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every experts module in ``model`` that goes through transformers' experts interface."""
    return [m for m in model.modules() if is_experts_module(m)]


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Run every experts module of ``model`` on moekit, LoRA on expert weights included.

    Works on a transformers model or a PEFT model, before or after ``peft.get_peft_model``: PEFT LoRA on
    ``target_parameters`` is then applied from its factors, never as W + ΔW. Idempotent; returns ``model``.
    """
    modules = experts_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no experts module decorated with transformers' "
            "@use_experts_implementation, so there is nothing for moekit to run"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_experts_implementation"):
        base.set_experts_implementation(BACKEND_NAME)
    for module in modules:
        # Sub-configs the model-level switch did not reach (or a bare experts module).
        if module.config._experts_implementation != BACKEND_NAME:
            module.config._experts_implementation = BACKEND_NAME
        experts_layout(module)  # resolve layout and activation now, so unsupported modules fail here
    return model
