"""LoRA on expert weights, read straight from PEFT's ``target_parameters`` wrappers — ΔW is never built.

PEFT wraps the experts module in one ``ParamWrapper`` per targeted parameter (nested). Its stock forward
re-parametrises the parameter to W + ΔW for all E experts before every call. For experts running on moekit
the wrapper instead passes straight through and hands itself down the call in the keyword argument
``moekit_lora_wrappers`` (a ``LoraWrappers``; nested wrappers append themselves, outermost first); the moekit
backend receives it, reads the small factors of every active adapter and applies ``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ``
per expert. An argument, not shared state: it is exact per call and per thread, and torch.compile traces it
without a graph break (it cannot trace a ``contextvars.ContextVar``, which this used to be).

PEFT layout for a parameter of E experts and rank r (in/out are the true input/output features; PEFT swaps
them for transposed parameters so this holds for gpt-oss too):
    lora_A.weight [r*E, in]   expert e owns rows e*r:(e+1)*r
    lora_B.weight [out, r*E]  expert e owns columns e::E
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor

BACKEND_NAME = "moekit"
UP_PARAMS = ("gate_up_proj", "up_proj")
DOWN_PARAMS = ("down_proj",)

# The keyword argument that carries the wrappers on the call path down to the experts module.
WRAPPERS_KWARG = "moekit_lora_wrappers"


class LoraWrappers:
    """The PEFT wrappers on one experts call's path, outermost first.

    A plain holder, not a tuple: hooks that move or cast a call's arguments recurse into tuples and lists
    (accelerate's ``send_to_device`` would call ``.to()`` on the wrapper modules themselves) and leave other objects
    alone.
    """

    def __init__(self, wrappers: tuple = ()):
        self.wrappers = wrappers

    def plus(self, wrapper: torch.nn.Module) -> LoraWrappers:
        return LoraWrappers(self.wrappers + (wrapper,))


NO_WRAPPERS = LoraWrappers()


def runs_on_moekit(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) == BACKEND_NAME and hasattr(module, "has_gate")


def _passthrough_forward(original_forward):
    """ParamWrapper.forward that skips W + ΔW for experts on moekit; identical to PEFT's otherwise."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        if not runs_on_moekit(base) or self.disable_adapters or self.merged or "adapter_names" in kwargs:
            # An outer wrapper's argument, if any, travels on inside kwargs through PEFT's forward to the experts.
            return original_forward(self, x, *args, **kwargs)
        outer = kwargs.pop(WRAPPERS_KWARG, NO_WRAPPERS)
        self._check_forward_args(x, *args, **kwargs)
        return self.base_layer(x, *args, **kwargs, **{WRAPPERS_KWARG: outer.plus(self)})

    forward._moekit_original = original_forward
    return forward


_PEFT_LAYER = "peft.tuners.lora.layer"  # where ParamWrapper lives


def install_peft_hook() -> bool:
    """Install the pass-through on PEFT's ParamWrapper (idempotent). Returns False when PEFT is absent."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if not hasattr(ParamWrapper.forward, "_moekit_original"):
        ParamWrapper.forward = _passthrough_forward(ParamWrapper.forward)
    return True


class _HookOnPeftImport(importlib.abc.MetaPathFinder):
    """Installs the pass-through right after PEFT's LoRA layers are imported, so ``import moekit`` does not import
    PEFT (seconds of import time) for users who never use it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PEFT_LAYER:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_hook(module):
                exec_module(module)
                install_peft_hook()

            spec.loader.exec_module = exec_then_hook
        return spec


def hook_peft_when_imported() -> None:
    """``install_peft_hook`` now if PEFT's LoRA layers are loaded, else as soon as they are."""
    if _PEFT_LAYER in sys.modules:
        install_peft_hook()
    elif not any(isinstance(finder, _HookOnPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookOnPeftImport())


class LoraFactors(NamedTuple):
    """One projection's LoRA, ``y += scale · (x A[e]ᵀ) B[e]ᵀ`` for expert e.

    ``a`` [E, R, in] and ``b`` [E, out, R] may be views of PEFT's parameters in their own dtype and strides
    (B's experts are strided by 1 in PEFT's layout): each engine makes the small operand copies it needs inside
    its own autograd Function, so the step pays no per-factor autograd ops.
    """

    a: Tensor
    b: Tensor
    scale: float = 1.0

    def folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A, scale·B) in ``dtype`` through autograd ops, B contiguous (grouped_mm's stride rules): the reference
        engine's operands."""
        factor_b = self.b if self.scale == 1.0 else self.b * self.scale
        return self.a.to(dtype), factor_b.to(dtype).contiguous()


def _adapter_factors(wrapper, adapter: str, num_experts: int) -> LoraFactors:
    """Views of one adapter's parameters: A [E, r, in] and B [E, out, r] (no copy), and its scaling."""
    weight_a = wrapper.lora_A[adapter].weight  # [r*E, in]
    weight_b = wrapper.lora_B[adapter].weight  # [out, r*E]
    if wrapper.num_experts != num_experts or weight_a.shape[0] % num_experts:
        raise ValueError(
            f"LoRA adapter '{adapter}' on '{wrapper.parameter_name}' was built for {wrapper.num_experts} experts "
            f"(lora_A.weight {tuple(weight_a.shape)}), but the experts module has {num_experts}"
        )
    rank = weight_a.shape[0] // num_experts
    factor_a = weight_a.view(num_experts, rank, -1)
    factor_b = weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1)
    return LoraFactors(factor_a, factor_b, float(wrapper.scaling[adapter]))


def _concatenated(adapters: list[LoraFactors]) -> LoraFactors:
    """Several adapters as one LoRA of the summed rank (scalings folded into the B copies)."""
    dtype = adapters[0].a.dtype
    return LoraFactors(
        torch.cat([f.a.to(dtype) for f in adapters], dim=1),
        torch.cat([(f.b * f.scale).to(dtype) for f in adapters], dim=2),
    )


def collect_lora(module: torch.nn.Module, wrappers: LoraWrappers | None = None) -> dict[str, LoraFactors]:
    """LoRA factors of the active adapters on ``module``'s expert weights, keyed by "up"/"down", from the PEFT
    ``wrappers`` of this call (the ``moekit_lora_wrappers`` argument; None: no LoRA).

    One adapter: views of its parameters and its scaling. Several: concatenated along the rank (their sum is
    one LoRA of the summed rank). Raises for LoRA that moekit cannot apply exactly, rather than dropping it.
    """
    per_projection: dict[str, list[LoraFactors]] = {}
    num_experts = _up_weight(module).shape[0]
    for wrapper in wrappers.wrappers if wrappers is not None else ():
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
            per_projection.setdefault(projection, []).append(_adapter_factors(wrapper, adapter, num_experts))
    return {
        projection: _concatenated(adapters) if len(adapters) > 1 else adapters[0]
        for projection, adapters in per_projection.items()
    }


def _up_weight(module: torch.nn.Module) -> Tensor:
    return module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
