"""``moekit.quantize_experts(model, "nf4")``: every decorated experts module's weights to NF4, in place."""

from __future__ import annotations

import torch

from ..enable import enable, experts_modules
from .tensor import NF4Tensor

METHODS = ("nf4",)
TOOL_QUANTS = ("none", "nf4", "nf4-dq")  # the tools' --quant: dense, NF4, NF4 with double-quantized scales


def tool_quant_options(quant: str) -> dict:
    """A tool's ``--quant`` (other than "none") as ``quantize_module`` / ``quantize_experts`` keywords."""
    if quant not in TOOL_QUANTS[1:]:
        raise ValueError(f"quant must be one of {', '.join(TOOL_QUANTS)}, got {quant!r}")
    return {"double_quant": quant == "nf4-dq"}


def expert_weight_names(module: torch.nn.Module) -> tuple[str, str]:
    """(up, down) parameter names of a transformers experts module."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def quantize_module(
    module: torch.nn.Module, dtype: torch.dtype | None = None, double_quant: bool = False, device=None
) -> None:
    """An experts module's up and down weights to frozen ``NF4Tensor`` parameters on ``device`` (default: their
    own), each dense weight freed as soon as it is replaced; biases stay as they are. Already quantized weights are
    left alone. ``double_quant``: their scales in 8 bits (``NF4Tensor.quantize``)."""
    for name in expert_weight_names(module):
        weight = getattr(module, name)
        if isinstance(getattr(weight, "_local_tensor", weight), NF4Tensor):  # a DTensor's shard too (FSDP2, EP)
            continue
        if hasattr(weight, "_local_tensor"):
            raise ValueError(
                f"{type(module).__name__}.{name} is a DTensor of dense weights (the model was sharded before its "
                "experts were quantized): quantize first (moekit.quantize_experts before fully_shard), or load "
                "with from_pretrained(..., quantization_config=moekit.quant.MoekitQuantConfig())"
            )
        if weight.device.type == "meta":
            raise ValueError(
                f"{type(module).__name__}.{name} is on the meta device (not loaded yet): quantize after loading, or "
                "load with from_pretrained(..., quantization_config=moekit.quant.MoekitQuantConfig())"
            )
        quantized = NF4Tensor.quantize(weight.detach(), dtype, device, double_quant)
        setattr(module, name, torch.nn.Parameter(quantized, requires_grad=False))


def quantize_experts(
    model: torch.nn.Module, method: str = "nf4", dtype: torch.dtype | None = None, double_quant: bool = False
) -> torch.nn.Module:
    """Quantize every decorated experts module of ``model`` in place and run them on moekit; returns ``model``.

    ``method``: "nf4" (bitsandbytes' NF4 numerics, blocks of 64, fp32 absmax). ``dtype``: the compute dtype the
    quantized weights stand for (default: each weight's own). ``double_quant``: the absmax in 8 bits as
    bitsandbytes' double quantization holds it (4.13 bits an element instead of 4.5; under FSDP2 each rank's
    experts must hold whole blocks of 256 scales).
    Everything outside the experts (attention, router, shared experts, embeddings) and the expert biases are
    untouched. Quantized experts only run on moekit, so this
    also does ``moekit.enable(model)``. The quantized weights are frozen: train LoRA adapters on them (PEFT
    ``target_parameters``); the adapters PEFT saves apply to the original bf16 model. A transformers model is then
    marked quantized as a ``MoekitQuantConfig`` load marks it: ``save_pretrained`` writes the NF4 experts, which
    ``from_pretrained`` loads back as they are, and ``model.dequantize()`` gives the dense model back.
    """
    if method not in METHODS:
        raise ValueError(f"quantize_experts: method must be one of {METHODS}, got {method!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_experts: double_quant must be True or False, got {double_quant!r}")
    modules = experts_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no experts module decorated with transformers' "
            "@use_experts_implementation, so there is nothing for moekit to quantize"
        )
    for module in modules:
        quantize_module(module, dtype, double_quant)
    from .hf import mark_quantized  # hf.py builds on this module

    mark_quantized(model, dtype, double_quant)
    return enable(model)
