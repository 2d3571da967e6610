"""Quantized expert weights: NF4 storage with bitsandbytes' numerics.

nf4.py      the format: quantize / dequantize, per-expert ranges, conversion to and from bitsandbytes
tensor.py   ``NF4Tensor``: the frozen expert parameter (dense shape and dtype outside, NF4 codes inside)
experts.py  ``quantize_experts(model, "nf4")``: every experts module in place
hf.py       ``MoekitQuantConfig``: from_pretrained quantizes expert weights as they load; save_pretrained / from_pretrained
            of the NF4 model itself
"""

from .experts import quantize_experts
from .hf import MoekitQuantConfig
from .nf4 import NF4Weight, dequantize_experts, dequantize_nf4, from_bitsandbytes, quantize_nf4, to_bitsandbytes
from .tensor import NF4Tensor

__all__ = [
    "MoekitQuantConfig",
    "NF4Tensor",
    "NF4Weight",
    "dequantize_experts",
    "dequantize_nf4",
    "from_bitsandbytes",
    "quantize_experts",
    "quantize_nf4",
    "to_bitsandbytes",
]
