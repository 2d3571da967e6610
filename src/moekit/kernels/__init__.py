"""Triton kernels of moekit's Triton engine (see ``moekit.engines.triton`` for the data path and memory plan).

One idea per module:
  activation.py   activation forward / derivative helpers switched on ``Activation.kernel_id``
  tiling.py       in-kernel tile map from ``plan.tokens_per_expert``, program swizzle, autotuning spaces
  up_proj.py      gather + grouped GEMM (+ fused LoRA u @ Bᵀ) + bias + activation epilogue (stores h and a)
  down_proj.py    grouped GEMM (+ fused LoRA) + bias + routing weight epilogue (also dX, and the LoRA low-rank
                  products u = rows @ A[e]ᵀ / rows @ B[e])
  lora_add.py     out += u @ L[e] in place: the LoRA term of a split LoRA GEMM (a row-tile sweep over the columns)
  combine.py      deterministic fp32 gather-sum over K through the inverse permutation
  act_grad.py     dA: gathered dOut @ W_down (+ LoRA), activation backward, routing-weight partials
  weight_grad.py  per-expert weight / bias / LoRA-factor gradients, rows gathered through the plan, no atomics;
                  the chunk table in one launch
  relayout.py     LoRA B copies between PEFT's [out, R*E] layout and a dense one (tiled transpose, scale, cast)
  launch.py       repeat launches straight to the compiled kernel (skips triton's per-call argument binding)
"""

from .act_grad import act_grad_backward
from .combine import combine
from .down_proj import grouped_gemm
from .lora_add import lora_add
from .up_proj import up_proj
from .weight_grad import weight_grad

__all__ = ["act_grad_backward", "combine", "grouped_gemm", "lora_add", "up_proj", "weight_grad"]
