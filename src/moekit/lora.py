"""LoRA on expert weights, read straight from PEFT's ``target_parameters`` wrappers — ΔW is never built.

PEFT wraps the experts module in one ``ParamWrapper`` per targeted parameter (nested). Its stock forward
re-parametrises the parameter to W + ΔW for all E experts before every call. For experts running on moekit
the wrapper instead passes straight through and announces itself in a context variable; the moekit backend
then reads the small factors of every active adapter and applies ``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ`` per expert.

PEFT layout for a parameter of E experts and rank r (in/out are the true input/output features; PEFT swaps
them for transposed parameters so this holds for gpt-oss too):
    lora_A.weight [r*E, in]   expert e owns rows e*r:(e+1)*r
    lora_B.weight [out, r*E]  expert e owns columns e::E
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch

Tensor = torch.Tensor

BACKEND_NAME = "moekit"
UP_PARAMS = ("gate_up_proj", "up_proj")
DOWN_PARAMS = ("down_proj",)

# Wrappers whose forward is on the call stack, outermost first.
_ACTIVE_WRAPPERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("moekit_lora_wrappers", default=())


def runs_on_moekit(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) == BACKEND_NAME and hasattr(module, "has_gate")


def _passthrough_forward(original_forward):
    """ParamWrapper.forward that skips W + ΔW for experts on moekit; identical to PEFT's otherwise."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        if not runs_on_moekit(base) or self.disable_adapters or self.merged or "adapter_names" in kwargs:
            return original_forward(self, x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        token = _ACTIVE_WRAPPERS.set(_ACTIVE_WRAPPERS.get() + (self,))
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            _ACTIVE_WRAPPERS.reset(token)

    forward._moekit_original = original_forward
    return forward


def install_peft_hook() -> bool:
    """Install the pass-through on PEFT's ParamWrapper (idempotent). Returns False when PEFT is absent."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if not hasattr(ParamWrapper.forward, "_moekit_original"):
        ParamWrapper.forward = _passthrough_forward(ParamWrapper.forward)
    return True


def _adapter_factors(wrapper, adapter: str, num_experts: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A [E, r, in], s·B [E, out, r]) of one adapter: a view of A and a small copy of B."""
    weight_a = wrapper.lora_A[adapter].weight  # [r*E, in]
    weight_b = wrapper.lora_B[adapter].weight  # [out, r*E]
    if wrapper.num_experts != num_experts or weight_a.shape[0] % num_experts:
        raise ValueError(
            f"LoRA adapter '{adapter}' on '{wrapper.parameter_name}' was built for {wrapper.num_experts} experts "
            f"(lora_A.weight {tuple(weight_a.shape)}), but the experts module has {num_experts}"
        )
    rank = weight_a.shape[0] // num_experts
    factor_a = weight_a.view(num_experts, rank, -1)
    factor_b = weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1) * wrapper.scaling[adapter]
    return factor_a.to(dtype), factor_b.to(dtype).contiguous()


def collect_lora(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """LoRA factors of the active adapters on ``module``'s expert weights, keyed by "up"/"down".

    Several active adapters are concatenated along the rank (their sum is one LoRA of the summed rank).
    Raises for LoRA that moekit cannot apply exactly, rather than dropping it.
    """
    per_projection: dict[str, list[tuple[Tensor, Tensor]]] = {}
    num_experts = _up_weight(module).shape[0]
    for wrapper in _ACTIVE_WRAPPERS.get():
        if wrapper.get_base_layer() is not module:
            continue
        name = wrapper.parameter_name
        if name in UP_PARAMS:
            projection = "up"
        elif name in DOWN_PARAMS:
            projection = "down"
        else:
            raise ValueError(
                f"moekit cannot apply LoRA to expert parameter '{name}': only {UP_PARAMS + DOWN_PARAMS} are supported. "
                "Remove it from LoraConfig.target_parameters or use experts_implementation='grouped_mm'."
            )
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            if getattr(wrapper, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"moekit does not support lora_bias on expert parameter '{name}'")
            per_projection.setdefault(projection, []).append(_adapter_factors(wrapper, adapter, num_experts, dtype))
    return {
        projection: (torch.cat([a for a, _ in pairs], dim=1), torch.cat([b for _, b in pairs], dim=2))
        if len(pairs) > 1
        else pairs[0]
        for projection, pairs in per_projection.items()
    }


def _up_weight(module: torch.nn.Module) -> Tensor:
    return module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
