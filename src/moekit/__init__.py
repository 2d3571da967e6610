"""moekit: fast, correct Mixture-of-Experts expert layers for Hugging Face transformers.

``import moekit`` registers the experts backend "moekit" in transformers' experts interface and hooks PEFT's
parameter-LoRA wrapper (a no-op for modules not on moekit) when PEFT is imported, without importing it. ``moekit.enable(model)`` selects it everywhere;
``moekit.quantize_experts(model, "nf4")`` holds the expert weights in NF4 (QLoRA; ``moekit.quant``).
"""

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .backend import moekit_experts_forward
from .enable import enable, experts_modules
from .lora import BACKEND_NAME, hook_peft_when_imported
from .plan import raise_pending_routing_errors
from .quant import quantize_experts

__version__ = "0.1.0"
__all__ = [
    "BACKEND_NAME",
    "__version__",
    "enable",
    "experts_modules",
    "moekit_experts_forward",
    "quantize_experts",
    "raise_pending_routing_errors",
]

ALL_EXPERTS_FUNCTIONS.register(BACKEND_NAME, moekit_experts_forward)
hook_peft_when_imported()
