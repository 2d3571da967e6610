"""Triton kernels of moekit's Triton engine (see ``moekit.engines.triton`` for the data path and memory plan).

One idea per module:
  numerics.py      how kernels compute: dot precision, fp32 accumulation loops (``mma``, ``dot_loop``), rounding,
                   output buffers (NaN-poisoned under ``OPTIONS.poison_outputs``), ``interpreting()``
  tiling.py        the tile map: each program's expert, rows and columns from ``plan.tokens_per_expert``, swizzle,
                   operand rows gathered or not; host sizes of grids and tiles
  tuning.py        autotuning: each kernel family's config spaces per GPU generation, the ``Autotuned`` tuner
  tuning_cache.py  tuned configs persisted on disk, shared between processes
  launch.py        repeat launches straight to the compiled kernel (skips triton's per-call argument binding)
  activation.py    activation forward / derivative helpers switched on ``Activation.kernel_id``
  act_forward.py   a = act(h) as a pass of its own (after an up-projection GEMM without the activation epilogue)
  nf4.py           NF4 weights as a GEMM operand: a weight tile dequantized in the main loop's loads (``W_NF4``)
  nf4_hopper.py    the NF4 grouped GEMMs on Hopper in gluon: each MMA overlaps the next tile's dequantization,
                   the tile in shared memory or, for byte pairs along K at 256-row tiles, in the MMA's registers
                   (``grouped_gemm``'s contract; the NF4 calls of ``grouped_gemm`` and ``up_proj`` take them there)
  up_proj.py       gather + grouped GEMM (+ fused LoRA u @ Bᵀ) + bias + activation epilogue (stores h and a);
                   dense or NF4 W_up
  grouped_gemm.py  the grouped GEMM (+ fused LoRA) + bias + routing weight epilogue: the forward down-projection,
                   dX, dA's GEMM (dense or NF4 weights) and the LoRA low-rank products u = rows @ A[e]ᵀ / rows @ B[e]
  lora_add.py      out += u @ L[e] in place: the LoRA term of a split LoRA GEMM (a row-tile sweep over the columns)
  combine.py       deterministic fp32 gather-sum over K through the inverse permutation
  act_grad.py      dA: gathered dOut @ W_down (+ LoRA) on ``grouped_gemm``, then a row pass: activation backward,
                   routing-weight partials
  weight_grad.py   per-expert weight / bias / LoRA-factor gradients, rows gathered through the plan, no atomics;
                   the chunk table in one launch
  relayout.py      LoRA B copies between PEFT's [out, R*E] layout and a dense one (tiled transpose, scale, cast)
"""

from .act_grad import act_grad_backward
from .combine import combine
from .grouped_gemm import grouped_gemm
from .lora_add import lora_add
from .numerics import new_output, new_output_like
from .relayout import scaled_copy
from .tuning import wgrad_block_k
from .up_proj import up_proj
from .weight_grad import chunk_table, weight_grad

__all__ = [
    "act_grad_backward",
    "chunk_table",
    "combine",
    "grouped_gemm",
    "lora_add",
    "new_output",
    "new_output_like",
    "scaled_copy",
    "up_proj",
    "weight_grad",
    "wgrad_block_k",
]
