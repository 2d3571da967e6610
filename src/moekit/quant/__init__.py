"""Quantized expert weights: NF4 storage with bitsandbytes' numerics (``nf4``)."""

from .nf4 import NF4Weight, dequantize_experts, dequantize_nf4, from_bitsandbytes, quantize_nf4, to_bitsandbytes

__all__ = ["NF4Weight", "dequantize_experts", "dequantize_nf4", "from_bitsandbytes", "quantize_nf4", "to_bitsandbytes"]
