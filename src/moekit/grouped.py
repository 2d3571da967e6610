"""Grouped GEMMs over a dispatch plan: torch's grouped_mm where it runs, a per-expert loop elsewhere.

Both primitives take plan-sorted operands of n rows: n = num_routed (the reference engine) or n = S = T*K with
the sentinel rows at the tail (the Triton engine; grouped_mm ignores rows past ``offsets[-1]``). Expert e owns
rows ``offsets[e-1]:offsets[e]``; the per-expert loop (no grouped_mm) reads the counts on the host.

An NF4 weight (``moekit.quant.NF4Tensor``, frozen) takes the per-expert loop, each expert with rows dequantized
alone just before its product: never more than one expert's dense weight at a time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .activations import accumulation_dtype
from .plan import DispatchPlan
from .quant.tensor import NF4Tensor

Tensor = torch.Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _grouped_mm_works(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Probe grouped_mm once per device and dtype: support differs by torch version, device and GPU arch."""
    if _GROUPED_MM is None:
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        x = torch.ones(8, 16, device=device, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)
        offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
        out = _GROUPED_MM(x, w, offs=offs)
        wgrad = _GROUPED_MM(x.t(), x[:, :16], offs=offs)
        return bool((out == 16).all()) and tuple(wgrad.shape) == (2, 16, 16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _aligned(*tensors: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned base pointers, one unit stride, and 16-byte multiples for the others."""
    for t in tensors:
        unit, *others = sorted(t.stride())
        if t.data_ptr() % 16 or unit != 1 or any((stride * t.element_size()) % 16 for stride in others):
            return False
    return True


def _use_grouped_mm(*tensors: Tensor) -> bool:
    first = tensors[0]
    if any(isinstance(t, NF4Tensor) for t in tensors):
        return False
    if any(t.dtype != first.dtype for t in tensors) or not _aligned(*tensors):
        return False
    return _grouped_mm_works(first.device.type, first.device.index, first.dtype)


def grouped_matmul_runs(rows: Tensor, weight: Tensor) -> bool:
    """Whether ``grouped_matmul(rows, weight, plan)`` runs on grouped_mm (else it is a per-expert loop)."""
    return _use_grouped_mm(rows, weight)


def grouped_matmul(rows: Tensor, weight: Tensor, plan: DispatchPlan) -> Tensor:
    """rows [n, in] (plan-sorted) @ weight[e] [in, out] per expert -> [n, out] (rows past the routed ones: any value).

    ``weight`` is [E, in, out] and may be a transposed view of an [E, out, in] parameter.
    """
    n = rows.shape[0]
    out_features = weight.shape[-1]
    if n == 0:
        return rows.new_zeros(0, out_features)
    if _use_grouped_mm(rows, weight):
        return _GROUPED_MM(rows, weight, offs=plan.offsets)
    out = rows.new_empty(n, out_features)
    for expert, start, end in plan.expert_blocks():
        torch.mm(rows[start:end], weight[expert], out=out[start:end])  # an NF4 expert dequantizes here, alone
    return out


def grouped_outer_runs(left: Tensor, right: Tensor) -> bool:
    """Whether ``grouped_outer(left, right, plan)`` runs on grouped_mm (else it is a per-expert loop)."""
    return _use_grouped_mm(left.t(), right)


def grouped_outer(left: Tensor, right: Tensor, plan: DispatchPlan) -> Tensor:
    """Per-expert sum over its rows of left_rowᵀ right_row: left [n, p], right [n, q] -> [E, p, q].

    This is every weight gradient (dW_e = dYᵀ X over the expert's rows). Experts with no rows get zeros.
    """
    num_experts, p, q = plan.num_experts, left.shape[-1], right.shape[-1]
    if left.shape[0] == 0:
        return left.new_zeros(num_experts, p, q)
    left_t = left.t()
    if _use_grouped_mm(left_t, right):
        return _GROUPED_MM(left_t, right, offs=plan.offsets)
    out = left.new_zeros(num_experts, p, q)
    for expert, start, end in plan.expert_blocks():
        torch.mm(left_t[:, start:end], right[start:end], out=out[expert])
    return out


def segment_sum(rows: Tensor, plan: DispatchPlan) -> Tensor:
    """Per-expert sum of plan-sorted rows [n, d] -> [E, d] in the accumulation dtype (fp32, float64 for
    float64), deterministic (bias gradients)."""
    acc = accumulation_dtype(rows.dtype)
    if plan.num_routed == 0:
        return rows.new_zeros(plan.num_experts, rows.shape[-1], dtype=acc)
    return torch.segment_reduce(rows.to(acc), "sum", lengths=plan.tokens_per_expert, axis=0, unsafe=True)
