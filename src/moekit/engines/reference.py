"""The reference engine: pure PyTorch, runs on every device, and is the oracle for the Triton kernels.

Data path (S = T*K routed rows, n of them to real experts, sorted by the plan):

    x [T, H] --gather--> xs [n, H] --up (+LoRA, +bias)--> h [n, 2I|I] --act--> a [n, I]
      --down (+LoRA, +bias)--> y [n, H] --* routing weight, fp32--> combine over K --> out [T, H]

Two autograd Functions share the plan: ``UpProjection`` (x -> h, keeps x) and ``DownProjection`` (h -> out,
keeps h and the routing weights). Memory plan: backward keeps x, the routing weights, the plan and h — and
autograd frees h once the down-projection's backward has run, before the up-projection's weight gradient is
allocated. It recomputes the gather xs, the activation a, and never needs y: the routing-weight gradient is <dOut[token], y> = <dOut[token] @ W_down, a>
(+ <dOut[token], b_down>), which reuses the dA GEMM backward does anyway.

LoRA: per projection the call holds ``LoraFactors`` (A [E, R, in], B [E, out, R], scale; several adapters
concatenated along R); the scale is folded into B in x's dtype, so y = x W_eᵀ + (x A_eᵀ) B_eᵀ and no ΔW is
ever formed.

Numerics: GEMMs in x's dtype; the combine, the routing-weight products and dot products, the bias sums and the
activation math in the accumulation dtype (``activations.accumulation_dtype``: fp32, float64 for float64 inputs,
so float64 passes gradcheck). NaN and Inf reach what they reach in transformers' eager experts
(tests/test_nonfinite.py; for Inf the NaN-or-Inf class can differ where the products above are ordered
differently from eager's, e.g. the routing-weight gradient).
"""

from __future__ import annotations

import torch

from ..activations import accumulation_dtype, map_rows
from ..grouped import grouped_matmul, grouped_outer, segment_sum
from ..layout import ExpertsCall
from ..layout import in_out as _in_out
from ..plan import DispatchPlan

Tensor = torch.Tensor


def _project(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    plan: DispatchPlan,
    transposed: bool,
) -> Tensor:
    """Per-expert linear on plan-sorted rows [n, in] -> [n, out]."""
    out = grouped_matmul(rows, _in_out(weight, transposed), plan)
    if lora_a is not None:
        low_rank = grouped_matmul(rows, lora_a.transpose(1, 2), plan)  # [n, R]
        out = out + grouped_matmul(low_rank, lora_b.transpose(1, 2), plan)
    if bias is not None:
        out.add_(bias[plan.expert_of_row[: plan.num_routed]])
    return out


def _weight_grad(grad_out_rows: Tensor, in_rows: Tensor, plan: DispatchPlan, transposed: bool) -> Tensor:
    """dW in the stored layout: [E, out, in], or [E, in, out] when transposed."""
    if transposed:
        return grouped_outer(in_rows, grad_out_rows, plan)
    return grouped_outer(grad_out_rows, in_rows, plan)


def _row_dot(left: Tensor, right: Tensor) -> Tensor:
    """[rows, d] x 2 -> [rows, 1] dot products in the accumulation dtype (fp32, float64 for float64)."""
    acc = accumulation_dtype(left.dtype)
    return (left.to(acc) * right.to(acc)).sum(-1, keepdim=True)


def _scale_rows(rows: Tensor, scale: Tensor) -> Tensor:
    """rows [r, d] * scale [r, 1] in the accumulation dtype (scale is already in it)."""
    return rows.to(scale.dtype) * scale


def combine(rows: Tensor, plan: DispatchPlan, slot_weights: Tensor | None = None) -> Tensor:
    """out[t] = Σ_k w[t, k] · rows[row_of_slot[t, k]] in the accumulation dtype (fp32, float64 for float64):
    plan-sorted rows [n, H] back to tokens [T, H].

    A gather per slot k, summed in slot order: deterministic (no atomics), and only [T, H]-sized temporaries
    (never a [T·K, H] buffer). Sentinel slots (row -1) contribute exactly 0, as in transformers' backends, which
    skip them: they read row 0 (a real row) and that product is zeroed, not multiplied by 0 (a NaN or Inf in
    row 0 or in the sentinel's routing weight would survive a product). ``slot_weights`` [T, K] are the routing
    weights (None: 1).
    """
    acc = accumulation_dtype(rows.dtype)
    out = rows.new_zeros(plan.num_tokens, rows.shape[-1], dtype=acc)
    if plan.num_routed == 0:
        return out
    has_sentinels = plan.num_routed < plan.num_rows  # host value: num_routed is read once per plan anyway
    for slot in range(plan.top_k):
        row = plan.row_of_slot[:, slot]  # [T]
        part = rows.index_select(0, row.clamp(min=0)).to(acc)
        if slot_weights is not None:
            part = part * slot_weights[:, slot].to(acc)[:, None]
        if has_sentinels:
            part = part.masked_fill_((row < 0)[:, None], 0.0)
        out += part
    return out


class UpProjection(torch.autograd.Function):
    """x [T, H] -> h [n, 2I|I]: gather through the plan, per-expert GEMM (+LoRA, +bias). Saves x and weights."""

    @staticmethod
    def forward(ctx, layout, plan, x, up_weight, up_bias, up_lora_a, up_lora_b) -> Tensor:
        xs = x[plan.token_of_row[: plan.num_routed]]  # [n, H]
        h = _project(xs, up_weight, up_bias, up_lora_a, up_lora_b, plan, layout.transposed)  # [n, 2I|I]
        ctx.layout, (ctx.plan_host, plan_tensors) = layout, plan.for_backward()
        ctx.save_for_backward(x, up_weight, up_lora_a, up_lora_b, *plan_tensors)
        ctx.bias_dtype = up_bias.dtype if up_bias is not None else None
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        layout, (x, w_up, a_up, b_up_lora, *plan_tensors) = ctx.layout, ctx.saved_tensors
        plan = DispatchPlan.restore(ctx.plan_host, plan_tensors)
        needs = ctx.needs_input_grad  # (layout, plan, x, weight, bias, lora_a, lora_b)
        n, dtype, transposed = plan.num_routed, x.dtype, layout.transposed
        grad_h = grad_h.to(dtype)
        grad_low_up = grouped_matmul(grad_h, b_up_lora, plan) if a_up is not None else None  # [n, R]

        # dX first, so its [n, H] rows are folded into [T, H] and freed before dW_up and the gather it needs.
        grad_x = None
        if needs[2]:
            grad_xs = grouped_matmul(grad_h, _in_out(w_up, transposed).transpose(1, 2), plan)  # [n, H]
            if a_up is not None:
                grad_xs = grad_xs + grouped_matmul(grad_low_up, a_up, plan)
            grad_x = combine(grad_xs, plan).to(dtype)  # sentinel slots get 0
            del grad_xs

        grad_b_up = segment_sum(grad_h, plan).to(ctx.bias_dtype) if needs[4] else None
        grad_w_up = grad_a_up = grad_b_up_lora = None
        if needs[3] or needs[5] or needs[6]:
            xs = x[plan.token_of_row[:n]]  # [n, H] recomputed gather, only now that the other temporaries are gone
            grad_w_up = _weight_grad(grad_h, xs, plan, transposed) if needs[3] else None
            if needs[6]:
                low = grouped_matmul(xs, a_up.transpose(1, 2), plan)  # [n, R]
                grad_b_up_lora = grouped_outer(grad_h, low, plan)  # [E, out, R]
            if needs[5]:
                grad_a_up = grouped_outer(grad_low_up, xs, plan)  # [E, R, H]
        return None, None, grad_x, grad_w_up, grad_b_up, grad_a_up, grad_b_up_lora


class DownProjection(torch.autograd.Function):
    """h [n, 2I|I] -> out [T, H]: activation, per-expert GEMM (+LoRA, +bias), routing weight, fp32 combine.

    Saves h, the routing weights and the weights; autograd frees h as soon as this backward has run, before
    the up-projection's weight gradient is allocated.
    """

    @staticmethod
    def forward(ctx, layout, plan, h, routing_weights, down_weight, down_bias, down_lora_a, down_lora_b) -> Tensor:
        a = layout.activation.forward(h)  # [n, I]
        y = _project(a, down_weight, down_bias, down_lora_a, down_lora_b, plan, layout.transposed)  # [n, H]
        del a
        out = combine(y, plan, routing_weights)  # [T, H] in the accumulation dtype
        ctx.layout, (ctx.plan_host, plan_tensors) = layout, plan.for_backward()
        ctx.save_for_backward(h, routing_weights, down_weight, down_bias, down_lora_a, down_lora_b, *plan_tensors)
        return out.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        layout, (h, routing_weights, w_down, b_down, a_down, b_down_lora, *plan_tensors) = ctx.layout, ctx.saved_tensors
        plan = DispatchPlan.restore(ctx.plan_host, plan_tensors)
        needs = ctx.needs_input_grad  # (layout, plan, h, routing_weights, weight, bias, lora_a, lora_b)
        n, dtype, transposed = plan.num_routed, h.dtype, layout.transposed
        acc = accumulation_dtype(dtype)  # fp32, float64 for float64
        expert_of_row = plan.expert_of_row[:n]
        a = layout.activation.forward(h)  # [n, I] recomputed activation
        grad_rows = grad_out[plan.token_of_row[:n]].to(dtype)  # [n, H] dOut of each row's token
        row_weights = routing_weights.reshape(-1)[plan.sorted_rows[:n]].to(acc)  # [n]

        # dL/da before the routing weight: dOut @ W_down(+LoRA)  [n, I]
        grad_a = grouped_matmul(grad_rows, _in_out(w_down, transposed).transpose(1, 2), plan)
        grad_low_down = None
        if a_down is not None:
            grad_low_down = grouped_matmul(grad_rows, b_down_lora, plan)  # [n, R]
            grad_a = grad_a + grouped_matmul(grad_low_down, a_down, plan)

        grad_routing = None
        if needs[3]:
            # <dOut, y> without y: <dOut @ W_downᵀ..., a> + <dOut, b_down>
            per_row = map_rows(_row_dot, 1, acc, grad_a, a).squeeze(-1)
            if b_down is not None:  # <dOut[t], b_down[e]> for every (t, e) is only [T, E]
                bias_dot = grad_out.to(acc) @ b_down.to(acc).t()
                per_row = per_row + bias_dot[plan.token_of_row[:n], expert_of_row]
            grad_routing = per_row.new_zeros(plan.num_tokens * plan.top_k)
            grad_routing.index_copy_(0, plan.sorted_rows[:n], per_row)
            grad_routing = grad_routing.view_as(routing_weights).to(routing_weights.dtype)

        # The routing weight scales the narrow operand of each product, never a [n, H] copy of dOut:
        # dW_down[e] = Σ dOutᵀ (w·a), dB_down_lora[e] = Σ dOutᵀ (w·(a A_downᵀ)).
        grad_a = map_rows(_scale_rows, grad_a.shape[-1], dtype, grad_a, row_weights[:, None])  # [n, I]
        grad_w_down = grad_b_down = None
        if needs[4]:
            weighted_a = map_rows(_scale_rows, a.shape[-1], dtype, a, row_weights[:, None])  # [n, I]
            grad_w_down = _weight_grad(grad_rows, weighted_a, plan, transposed)
            del weighted_a
        if needs[5]:
            grad_b_down = segment_sum(grad_rows.to(acc) * row_weights[:, None], plan).to(b_down.dtype)
        grad_a_down = grad_b_down_lora = None
        if a_down is not None:
            if needs[7]:
                low = grouped_matmul(a, a_down.transpose(1, 2), plan)  # [n, R]
                weighted_low = (low.to(acc) * row_weights[:, None]).to(dtype)
                grad_b_down_lora = grouped_outer(grad_rows, weighted_low, plan)  # [E, H, R]
            if needs[6]:
                grad_low = (grad_low_down.to(acc) * row_weights[:, None]).to(dtype)
                grad_a_down = grouped_outer(grad_low, a, plan)  # [E, R, I]
        del grad_rows, a

        grad_h = layout.activation.backward(h, grad_a) if needs[2] else None  # [n, 2I|I]
        return None, None, grad_h, grad_routing, grad_w_down, grad_b_down, grad_a_down, grad_b_down_lora


def run(call: ExpertsCall, plan: DispatchPlan, x: Tensor, routing_weights: Tensor) -> Tensor:
    """Expert layer output [T, H] in x's dtype: up-projection (+LoRA, +bias) -> activation -> down-projection
    (+LoRA, +bias) -> routing weight -> combine, as two autograd Functions over one plan."""
    layout, up, down = call
    up_a, up_b = up.lora.folded(x.dtype) if up.lora is not None else (None, None)
    down_a, down_b = down.lora.folded(x.dtype) if down.lora is not None else (None, None)
    h = UpProjection.apply(layout, plan, x, up.weight, up.bias, up_a, up_b)
    return DownProjection.apply(layout, plan, h, routing_weights, down.weight, down.bias, down_a, down_b)


experts_reference = run  # the oracle's name in tests and tools
