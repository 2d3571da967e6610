"""The Triton engine: ``run(call, plan, x, routing_weights)`` with the reference engine's semantics, fused kernels.

Data path (S = T*K rows plan-sorted by expert, the routed ones first; kernels in ``moekit.kernels``). The host
never learns how many rows are routed (the plan makes no host sync): every row buffer below has S rows and the
kernels take each expert's rows from the counts on the device; rows past the routed ones (expert-parallel
sentinels) are never computed, and nothing reads them (the combines skip sentinel slots, grouped_mm ignores rows
past ``offsets[-1]``, the routing-weight gradient masks them).

    forward
      up_proj      x --gather in the operand loads--> GEMM W_up[e] (+b_up) --epilogue--> h [S, W] (kept), a [S, I]
      grouped_gemm a @ W_down[e] (+b_down) * routing weight (fp32) --> yw [S, H]          (transient)
      combine      out[t] = sum_k yw[row_of_slot[t, k]] in fp32, slot order, sentinels skipped --> [T, H]
                   Where torch's grouped_mm runs, the GEMM is plain instead: y = a @ W_down[e] on grouped_mm
                   (+= u_down @ (s B_down[e])ᵀ in place with LoRA, where split), and the combine adds b_down[e]
                   and multiplies by the routing weight, in fp32
    backward
      act_grad     dOut rows gathered in the loads @ W_down[e]ᵀ --> ga; recompute a from h, write w * a [S, I]
                   (for dW_down), dL/dh [S, W] = act'(h) * w * ga over h, and per-row partials of <ga, a> for the
                   routing-weight gradient (<dOut, y> without y, + <dOut, b_down> on the host): the GEMM writes
                   ga [S, I] (transient, rounded to the dtype as the reference does; by grouped_mm from the dOut
                   row copy when dW_down makes one) and a memory-bound pass does the rest
      weight_grad  dW_down[e] = Σ_r dOut[tok_r]ᵀ (w_r a_r), db_down fused (per output tile, one flat loop over the
                   row chunks of a group of experts, a store at each expert's end: no atomics). The token rows
                   dOut[tok], x[tok] are copied in plan order just before (transient [S, H], one at a time;
                   gathering them in the kernel's loop was measured slower); the LoRA factor gradients gather
      grouped_gemm dh @ W_up[e]ᵀ --> dxs [S, H] (transient);  combine --> dX [T, H]
      weight_grad  dW_up[e] = Σ_r dhᵀ_r x[tok_r], db_up fused (after dX, so dxs is gone before it is allocated)
    The GEMMs with neither a gather nor an epilogue (the forward's down-projection, dW_down and dW_up from the row
    copies, dxs, dA's GEMM from the dOut row copy) go to torch's grouped_mm where it runs (CUTLASS, faster than
    the Triton GEMM at every measured shape); the bias sums then run alone in the weight-gradient kernel. A LoRA
    term on such a GEMM is added afterwards, in place, by the Triton kernel where the product's reduction is long
    (``lora_gemm_split``); otherwise the Triton GEMM computes both. ``gemm`` and ``base_weight_grad`` below are
    that one decision.

LoRA (optional per projection; A [E, R, in], B [E, out, R] and a scale s, adapters concatenated along R;
typically views of PEFT's fp32 parameters, see ``moekit.lora.LoraFactors``). The engine makes the kernels'
operands itself, outside autograd: s·B in x's dtype, contiguous (one small copy, none when it already is; PEFT's
B layout is transposed by ``kernels.relayout``), and in the forward A in x's dtype (the low-rank GEMMs' main-loop
operand, read again by every row tile of its expert). The backward reads A as it is: there it only enters LoRA
terms, and the kernels round each tile to x's dtype as they load it (the values a copy would hold, without the
copy's memory). The backward returns the factor
gradients in the parameters' dtype and strides (dB times s in the kernel's store; written dense, then moved when
the parameter is PEFT's strided B), so LoRA adds no autograd op of its own to the step. No ΔW and no copy of W:
the low-rank intermediates are small grouped GEMMs (``grouped_gemm(..., lowrank=True)``, BLOCK_N fitted to R) and
the big GEMMs take them through a short second reduction loop over R into the same fp32 accumulator, before their
epilogues (``lora=`` of up_proj / grouped_gemm), or, for the GEMMs that run on grouped_mm (split,
above), through ``lora_add(product, u, L)`` after it (one more read and write of the product):

    forward    u_up = x[tok] A_upᵀ [S, R];  h = x[tok] W_up + u_up B_upᵀ (+b)          (up_proj, fused)
               u_down = a A_downᵀ [S, R];   yw = w (a W_down + u_down B_downᵀ (+b))     (grouped_gemm, fused)
    backward   v_down = dOut[tok] B_down [S, R];  ga = dOut[tok] W_downᵀ + v_down A_down (dA's GEMM, fused), so
               dh and the routing-weight gradient <ga, a> include the LoRA part of y
               dB_down[e] = Σ dOut[tok]ᵀ (w u_down),  dA_down[e] = Σ v_downᵀ (w a)
               v_up = dh B_up [S, R];  dxs = dh W_upᵀ + v_up A_up                       (grouped_gemm, fused)
               dB_up[e] = Σ dhᵀ u_up,  dA_up[e] = Σ v_upᵀ x[tok]
Factor gradients use the per-expert weight-gradient kernel (no atomics, exact zeros for experts without rows);
u_up and u_down [S, R] are saved for backward; the operand copies are not (E·R·(in + out) per projection, which
summed over a model's layers is GBs at r=64): the backward makes s·B again from the saved parameter views, each
projection's just before its first use, and drops each after its last (the forward too): s·B_down after the down
projection's gradients, s·B_up after v_up. A frozen base costs no base weight-gradient kernel.

NF4 weights (``moekit.quant.NF4Tensor``, a frozen base as in QLoRA): packed 4-bit codes with one fp32 scale per 64
elements of the weight as stored; ``in_out`` / ``out_in`` are metadata-only transposes of them. Every GEMM that
reads such a weight (up_proj, the forward down-projection, dA's GEMM, dX) runs on the Triton kernels, never on
grouped_mm (which cannot read codes): the main loop dequantizes each [BLOCK_K, BLOCK_N] weight tile as it loads it
(codebook value × block scale in fp32, rounded to the operand dtype as the reference's dequantization rounds;
``kernels.nf4``), so no dequantized copy of any expert weight exists, not even of one expert, and the weights are
read at a quarter of bf16's bytes. On Hopper, with bf16 / fp16 activations and the codes' byte pairs along a tile
axis (every benchmark shape), those GEMMs run on the gluon kernels of ``kernels.nf4_hopper``, which overlap each
tile's dequantization with the previous tile's MMA (the up-projection there as its plain product, then the
activation pass ``kernels.act_forward``). No weight gradient is asked for (frozen); bias and LoRA-factor gradients
are those of a dense base.

Memory plan. Forward saves x, the routing weights, the weights/biases (parameters, no copy), the plan (with
its inverse permutation row_of_slot, S int64) and the pre-activation h [S, W] in the input dtype: nothing
T·K·H-sized is cached. The dA kernel writes dh over h (in place: each element of h is read by the program that
then writes it), so the backward never holds h and dh side by side, and its peak (dh beside dxs or the x rows) holds
one [S, W] buffer (a second backward over the same graph, retain_graph=True, is refused: h is gone).
Forward transients: a [S, I] and yw (or y) [S, H] (freed on return). Backward transients: ga [S, I] (the dA pass
writes w * a over it, kept only when dW_down or dA_down needs it), partials [S, 1] fp32 (only when the routing
weights need a gradient), the chunk table (~S/64 + E int32), one plan-ordered row copy [S, H] at a time for the
weight gradients: dOut rows (made before dA,
whose GEMM then runs on grouped_mm, and kept until dW_down); then dxs [S, H] (only when x needs a gradient; freed
by dX's combine), and only then x rows and the up-projection's weight and LoRA-factor gradients, so those
gradients are never allocated beside dxs.
Each gradient is computed only when autograd asks for it (``Needs``; frozen weights cost no weight-gradient kernel).
The backward runs per projection, down then up, as the reference engine's two Functions do.

Numerics: operands in the input dtype, fp32 accumulation; fp32 inputs use the exact (ieee) dot, never tf32;
the K-way sums and routing-weight products are fp32; every reduction has a fixed order (deterministic). A split
LoRA GEMM rounds its base product to the dtype before the LoRA term is added (in fp32, rounded again), as the
reference engine, which adds the two as separate tensors, does too.

What the kernels cover is listed once, in ``moekit.backend.triton_blocker``; ``experts_triton`` (the checked entry)
raises with its reason, and ``moekit.backend.select_engine`` sends such calls to the reference engine unless
MOEKIT_BACKEND=triton forces this one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..grouped import grouped_matmul, grouped_matmul_runs, grouped_outer, grouped_outer_runs
from ..layout import ExpertsCall, ExpertsLayout, in_out, out_in
from ..lora import LoraFactors
from ..options import OPTIONS
from ..plan import DispatchPlan
from ..quant.tensor import NF4Tensor

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------ the GEMM dispatcher
# Split pays where the product's reduction is long: the in-place add is one more pass over the [S, N] output
# whatever K is, while CUTLASS's gain over the Triton GEMM grows with K (measured on an H200: split is faster
# for Mixtral's and gpt-oss's LoRA steps, even or slower for Nemotron's and Qwen3's, whose K is below this).
SPLIT_LORA_MIN_K = 2048


def lora_gemm_split(k_dim: int) -> bool:
    """Whether a big GEMM with a LoRA term, of reduction size ``k_dim``, runs split (base product on grouped_mm,
    then the LoRA term added in place by Triton) rather than fused (one Triton kernel): ``OPTIONS.lora_gemm``,
    "auto" splitting when ``k_dim >= SPLIT_LORA_MIN_K``."""
    mode = OPTIONS.lora_gemm
    return k_dim >= SPLIT_LORA_MIN_K if mode == "auto" else mode == "split"


def _on_grouped_mm(left: Tensor, right: Tensor, plan: DispatchPlan, runs) -> bool:
    return OPTIONS.plain_gemm == "torch" and plan.num_rows > 0 and runs(left, right)


def gemm(
    rows: Tensor,
    weight_in_out: Tensor,
    plan: DispatchPlan,
    lora: tuple[Tensor, Tensor] | None = None,
    gather: Tensor | None = None,
    row_copy: Tensor | None = None,
    **epilogue,
) -> tuple[Tensor, bool]:
    """(rows [S, K] (or rows[gather]) @ weight[e] [K, N] (+ u @ L[e], ``lora=(u [S, R], L [E, R, N])``) -> [S, N],
    whether torch's grouped_mm ran it). ``row_copy``: rows[gather] already copied in plan order.

    grouped_mm takes the plain products: plan-ordered rows (no gather), no epilogue, and a LoRA term only where it
    is split (``lora_gemm_split``), of a dense weight. The caller then applies ``epilogue`` (the Triton kernel's
    bias / routing_weights / sorted_rows) itself. Everything else is the Triton ``grouped_gemm``, LoRA in its loop;
    an NF4 weight always (grouped_mm cannot read its codes)."""
    from ..kernels import grouped_gemm, lora_add

    plain = None if isinstance(weight_in_out, NF4Tensor) else (rows if gather is None else row_copy)
    split = lora is None or lora_gemm_split(rows.shape[1])
    if plain is not None and split and _on_grouped_mm(plain, weight_in_out, plan, grouped_matmul_runs):
        out = grouped_matmul(plain, weight_in_out, plan)
        if lora is not None:
            lora_add(out, lora[0], lora[1], plan.tokens_per_expert, plan.num_rows)
        return out, True
    counts, n = plan.tokens_per_expert, plan.num_rows
    return grouped_gemm(rows, weight_in_out, counts, n, gather=gather, lora=lora, **epilogue), False


def base_weight_grad(
    left: Tensor,
    right: Tensor,
    plan: DispatchPlan,
    shape: tuple[int, int],
    transposed: bool,
    dtype: torch.dtype,
    chunks: Tensor,
    need_weight: bool,
    bias_dtype: torch.dtype | None,
    **rows,
) -> tuple[Tensor | None, Tensor | None]:
    """(dW[e] = Σ over the expert's rows of leftᵀ right, [E, *shape] or transposed as stored; the bias gradient
    Σ left in ``bias_dtype``, or None for None). dW on grouped_mm where it runs (the bias sum then runs alone in
    the Triton kernel), else both in one pass of the Triton kernel. ``rows``: its left_index / right_index
    (rows gathered through the plan) and routing_weights / sorted_rows (a row weight on the bias sum)."""
    from ..kernels import weight_grad

    grad_w = None
    first, second = (right, left) if transposed else (left, right)
    if need_weight and _on_grouped_mm(first, second, plan, grouped_outer_runs):
        grad_w = grouped_outer(first, second, plan).to(dtype)
    grad_b = None
    if (need_weight and grad_w is None) or bias_dtype is not None:
        kernel_w, grad_b = weight_grad(
            left, right if need_weight else left, plan.tokens_per_expert, plan.num_rows, plan.num_experts, shape,
            dtype, transposed, compute_w=need_weight and grad_w is None, bias_dtype=bias_dtype, chunks=chunks, **rows,
        )  # fmt: skip
        grad_w = grad_w if grad_w is not None else kernel_w
    return grad_w, grad_b


# --------------------------------------------------------------------------------------- LoRA operands
def _kernel_factors(lora: LoraFactors, dtype: torch.dtype, copy_a: bool) -> tuple[Tensor, Tensor]:
    """The LoRA operands the kernels read: A [E, R, in], in ``dtype`` when ``copy_a`` (the forward: A is the
    low-rank GEMM's main-loop operand, re-read by every row tile of its expert, so a copy in the 2-byte dtype
    halves those reads) or as it is (the backward: A only enters LoRA terms, one tile per output tile, which the
    kernels round to ``dtype`` as they load it; no copy), and scale·B [E, out, R] in ``dtype``, contiguous (PEFT's
    B has its experts at stride 1; the kernels want its rows dense). Made inside the Function, so no autograd op
    is recorded for them."""
    from ..kernels import scaled_copy

    factor_a, factor_b, scale = lora
    if copy_a and factor_a.dtype != dtype:
        factor_a = factor_a.to(dtype)
    if factor_b.dtype != dtype or scale != 1.0 or not factor_b.is_contiguous():
        factor_b = scaled_copy(factor_b, torch.empty(factor_b.shape, dtype=dtype, device=factor_b.device), scale)
    return factor_a, factor_b


def _factor_grad(
    left: Tensor, right: Tensor, plan: DispatchPlan, param: Tensor, chunks: Tensor, transposed: bool = False, **options
) -> Tensor:
    """A LoRA factor's gradient Σ over each expert's rows of leftᵀ right, in ``param``'s dtype and strides. The
    kernel writes a dense buffer, moved into the parameter's strides when they differ (PEFT's B): storing straight
    into B's strides costs one 32-byte sector per element, several times the dense store's time."""
    from ..kernels import new_output, new_output_like, scaled_copy, weight_grad

    buffer = new_output(*param.shape, dtype=param.dtype, device=param.device)
    # the product's [P, Q]; a transposed factor is stored [E, Q, P]
    shape = param.shape[2:0:-1] if transposed else param.shape[1:]
    buffer, _ = weight_grad(
        left, right, plan.tokens_per_expert, plan.num_rows, plan.num_experts, tuple(shape), param.dtype, transposed,
        chunks=chunks, lowrank=True, out=buffer, **options,
    )  # fmt: skip
    return buffer if buffer.stride() == param.stride() else scaled_copy(buffer, new_output_like(param))


# ------------------------------------------------------------------------------------ the autograd Function
class Needs(NamedTuple):
    """Which inputs of ``ExpertsTritonFunction`` need a gradient, by name."""

    x: bool
    routing_weights: bool
    up_weight: bool
    up_bias: bool
    up_a: bool
    up_b: bool
    down_weight: bool
    down_bias: bool
    down_a: bool
    down_b: bool

    @property
    def dh(self) -> bool:  # dL/dh [S, W]: everything of the up projection's backward starts from it
        return self.x or self.up_weight or self.up_bias or self.up_a or self.up_b

    @property
    def weighted_a(self) -> bool:  # w * a [S, I]: right operand of dW_down, left operand of dA_down
        return self.down_weight or self.down_a

    @property
    def weights(self) -> bool:  # any per-expert weight, bias or factor gradient (they share the chunk table)
        return any(self[2:])


class Saved(NamedTuple):
    """What the forward keeps for the backward, all through ``save_for_backward`` (the plan's tensors follow these):
    activation checkpointing and other saved-tensor hooks see every tensor, the pre-activation h included."""

    x: Tensor
    routing_weights: Tensor
    up_weight: Tensor
    up_bias: Tensor | None
    up_a: Tensor | None  # the LoRA parameters' views, as given (the kernels' operands are made again)
    up_b: Tensor | None
    down_weight: Tensor
    down_bias: Tensor | None
    down_a: Tensor | None
    down_b: Tensor | None
    u_up: Tensor | None  # x[tok] A_upᵀ [S, R]
    u_down: Tensor | None  # a A_downᵀ [S, R]
    pre_activation: Tensor  # h [S, W], which the backward consumes: dA writes dh over it


_STATIC_INPUTS = 3  # layout, plan, the LoRA scales; then the tensors of ``Needs``, in its order


class ExpertsTritonFunction(torch.autograd.Function):
    """Forward and backward of the expert layer over one dispatch plan, on the Triton kernels; the backward per
    projection, down then up. LoRA factors' gradients come back in the factors' own dtype and strides."""

    @staticmethod
    def forward(ctx, layout, plan, scales, x, routing_weights, *params) -> Tensor:
        from ..kernels import combine

        up_weight, up_bias, up_a, up_b, down_weight, down_bias, down_a, down_b = params
        up_lora = LoraFactors(up_a, up_b, scales[0]) if up_a is not None else None
        down_lora = LoraFactors(down_a, down_b, scales[1]) if down_a is not None else None
        h, a, u_up = _up_forward(layout, plan, x, up_weight, up_bias, up_lora)
        y, u_down, epilogue = _down_product(layout, plan, a, routing_weights, down_weight, down_bias, down_lora)
        del a  # before the combine: the forward's peak holds y, not y and a
        out = combine(y, plan.row_of_slot.reshape(-1), plan.num_tokens, plan.top_k, x.dtype, **epilogue)

        ctx.layout, ctx.scales = layout, scales
        ctx.plan_host, plan_tensors = plan.for_backward()
        # h and the plan saved like the rest, so a checkpointed layer keeps none of them; the backward consumes h
        # (dA writes dh over it: its peak holds one [S, W] buffer, not two; memory plan above)
        ctx.save_for_backward(x, routing_weights, *params, u_up, u_down, h, *plan_tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        need = Needs(*ctx.needs_input_grad[_STATIC_INPUTS:])
        if not any(need):
            return (None,) * len(ctx.needs_input_grad)
        from ..kernels import chunk_table, wgrad_block_k

        if getattr(ctx, "consumed_h", False):  # the kernels wrote dh over h without autograd seeing it
            raise RuntimeError(
                "moekit's Triton expert backward ran twice over one graph (backward with retain_graph=True): its "
                "first run wrote dL/dh over the saved pre-activation. Run the forward again, or use "
                "MOEKIT_BACKEND=reference."
            )
        ctx.consumed_h = True
        tensors = ctx.saved_tensors
        saved = Saved(*tensors[: len(Saved._fields)])
        plan = DispatchPlan.restore(ctx.plan_host, tensors[len(Saved._fields) :])
        grad_out = grad_out.to(saved.x.dtype)
        chunks = None  # rows cut in chunks per expert, shared by every weight-gradient kernel
        if need.weights:
            chunks = chunk_table(plan.tokens_per_expert, plan.num_rows, wgrad_block_k(saved.x.dtype))
        grad_rw, down_grads, dh = _down_backward(ctx, plan, saved, grad_out, need, chunks)
        grad_x, up_grads = _up_backward(ctx, plan, saved, dh, need, chunks)
        return (None,) * _STATIC_INPUTS + (grad_x, grad_rw, *up_grads, *down_grads)


# ------------------------------------------------------------------------------------------------- forward
def _up_forward(layout: ExpertsLayout, plan: DispatchPlan, x: Tensor, weight, bias, lora: LoraFactors | None):
    """(h [S, W] kept for the backward, a [S, I], u_up [S, R] or None): the gathered up-projection GEMM with the
    activation in its epilogue; with LoRA, u_up = x[tok] A_upᵀ first and h += u_up (s B_up)ᵀ in its loop."""
    from ..kernels import grouped_gemm, up_proj

    counts, n, tok = plan.tokens_per_expert, plan.num_rows, plan.token_of_row
    u_up = kernel_lora = None
    if lora is not None:
        factor_a, factor_b = _kernel_factors(lora, x.dtype, copy_a=True)
        u_up = grouped_gemm(x, factor_a.transpose(1, 2), counts, n, gather=tok, lowrank=True)
        kernel_lora = (u_up, factor_b.transpose(1, 2))
    h, a = up_proj(x, tok, in_out(weight, layout.transposed), bias, counts, n, layout.activation, lora=kernel_lora)
    return h, a, u_up


def _down_product(layout, plan, a: Tensor, routing_weights: Tensor, weight, bias, lora: LoraFactors | None):
    """(y [S, H], u_down [S, R] or None, the combine's epilogue): a @ W_down[e] (+ u_down (s B_down)ᵀ), with the
    bias and routing weight applied by the Triton GEMM, or by the combine (``epilogue``) after grouped_mm."""
    from ..kernels import grouped_gemm

    u_down = kernel_lora = None
    if lora is not None:
        factor_a, factor_b = _kernel_factors(lora, a.dtype, copy_a=True)
        u_down = grouped_gemm(a, factor_a.transpose(1, 2), plan.tokens_per_expert, plan.num_rows, lowrank=True)
        kernel_lora = (u_down, factor_b.transpose(1, 2))
    epilogue = {"bias": bias, "routing_weights": routing_weights.reshape(-1), "sorted_rows": plan.sorted_rows}
    y, on_torch = gemm(a, in_out(weight, layout.transposed), plan, kernel_lora, **epilogue)
    if not on_torch:  # the Triton GEMM applied bias and routing weight
        return y, u_down, {}
    return y, u_down, {"slot_weights": routing_weights, "bias": bias, "expert_of_row": plan.expert_of_row}


# ------------------------------------------------------------------------------------------------ backward
def _down_backward(ctx, plan: DispatchPlan, saved: Saved, grad_out: Tensor, need: Needs, chunks):
    """Through the combine, the routing weight, the down projection and the activation: (the routing weights'
    gradient, (dW_down, db_down, dA_down, dB_down), dh [S, W] or None). Consumes the pre-activation h."""
    from ..kernels import grouped_gemm

    layout, h = ctx.layout, saved.pre_activation
    lora = None  # the kernels' operands (A as it is, s·B_down): made again rather than kept from the forward
    if saved.down_a is not None:
        lora = _kernel_factors(LoraFactors(saved.down_a, saved.down_b, ctx.scales[1]), grad_out.dtype, copy_a=False)
    # The dOut row copy is made for dW_down (compute-bound), and dA's GEMM then runs on grouped_mm from it too
    rows_out = grad_out.index_select(0, plan.token_of_row) if need.down_weight else None  # [S, H]
    run_da = need.dh or need.routing_weights or need.weighted_a
    v_down = None  # dOut[tok] (s B_down[e]) [S, R]: the LoRA part of dL/da is v_down A_down[e]
    if lora is not None and (run_da or need.down_a):
        v_down = grouped_gemm(grad_out, lora[1], plan.tokens_per_expert, plan.num_rows, gather=plan.token_of_row,
                              lowrank=True)  # fmt: skip
    weighted_a = dh = part = None
    if run_da:
        da_lora = (v_down, lora[0]) if lora is not None and (need.dh or need.routing_weights) else None
        weighted_a, dh, part = _activation_backward(layout, plan, grad_out, rows_out, saved, h, da_lora, need)
    del h  # its last use here; dh, when computed, lives in its storage
    grad_rw = _routing_weight_grad(plan, part, grad_out, saved) if need.routing_weights else None
    del part
    left, left_index = (rows_out, None) if rows_out is not None else (grad_out, plan.token_of_row)
    del rows_out
    grad_wd, grad_bd, grad_down_b = _down_weight_grads(layout, plan, saved, left, left_index, weighted_a, need,
                                                       chunks, ctx.scales[1])  # fmt: skip
    del left  # the dOut row copy is gone before dA_down, dX and the up projection's gradients
    grad_down_a = None
    if need.down_a:  # dA_down[e] = Σ v_downᵀ (w a)   [E, R, I]
        grad_down_a = _factor_grad(weighted_a, v_down, plan, saved.down_a, chunks, transposed=True)
    return grad_rw, (grad_wd, grad_bd, grad_down_a, grad_down_b), dh


def _activation_backward(layout, plan, grad_out, rows_out, saved: Saved, h, lora, need: Needs):
    """dA: ga = dOut[tok] W_down[e]ᵀ (+ v_down A_down[e]), then (w * a, dh written over h, per-row <ga, a>)."""
    from ..kernels import act_grad_backward

    weight_out_in = out_in(saved.down_weight, layout.transposed)  # [E, H, I]
    ga, _ = gemm(grad_out, weight_out_in, plan, lora, gather=plan.token_of_row, row_copy=rows_out)  # [S, I]
    return act_grad_backward(
        grad_out, plan.token_of_row, plan.sorted_rows, saved.routing_weights.reshape(-1), weight_out_in, h,
        plan.tokens_per_expert, plan.num_rows, layout.activation, ga=ga, in_place=True,
        store_a=need.weighted_a, store_dh=need.dh, store_part=need.routing_weights,
    )  # fmt: skip


def _routing_weight_grad(plan: DispatchPlan, part: Tensor, grad_out: Tensor, saved: Saved) -> Tensor:
    """dL/dw per slot: <dOut[t], y_row> = <ga, a> (the dA pass's partials) + <dOut[t], b_down[e]>."""
    per_row = part.sum(1)  # [S]; sentinel rows were never written
    expert_of_row, num_experts = plan.expert_of_row, plan.num_experts
    if saved.down_bias is not None and plan.num_rows:
        bias_dot = grad_out.float() @ saved.down_bias.float().t()  # [T, E]
        per_row = per_row + bias_dot[plan.token_of_row, expert_of_row.clamp(max=num_experts - 1)]
    per_row = torch.where(expert_of_row < num_experts, per_row, 0.0)
    grad_rw = torch.empty(plan.num_rows, device=grad_out.device, dtype=torch.float32)
    grad_rw[plan.sorted_rows] = per_row
    return grad_rw.view_as(saved.routing_weights).to(saved.routing_weights.dtype)


def _down_weight_grads(layout, plan, saved: Saved, left, left_index, weighted_a, need: Needs, chunks, scale):
    """(dW_down[e] = Σ dOut[tok]ᵀ (w a), db_down[e] = Σ w dOut[tok], dB_down[e] = s Σ dOut[tok]ᵀ (w u_down));
    ``left`` is the dOut row copy, or dOut with ``left_index`` the rows' tokens."""
    rows = {"left_index": left_index, "routing_weights": saved.routing_weights.reshape(-1),
            "sorted_rows": plan.sorted_rows}  # fmt: skip
    grad_wd = grad_bd = grad_down_b = None
    if need.down_weight or need.down_bias:
        weight = saved.down_weight
        shape = tuple(out_in(weight, layout.transposed).shape[1:])
        bias_dtype = saved.down_bias.dtype if need.down_bias else None
        grad_wd, grad_bd = base_weight_grad(left, weighted_a, plan, shape, layout.transposed, weight.dtype, chunks,
                                            need.down_weight, bias_dtype, **rows)  # fmt: skip
    if need.down_b:  # the routing weight is applied to u_down in the kernel's loop
        grad_down_b = _factor_grad(left, saved.u_down, plan, saved.down_b, chunks, scale_right=True, alpha=scale,
                                   **rows)  # fmt: skip
    return grad_wd, grad_bd, grad_down_b


def _up_backward(ctx, plan: DispatchPlan, saved: Saved, dh: Tensor | None, need: Needs, chunks):
    """Through the up projection: (dX [T, H] or None, (dW_up, db_up, dA_up, dB_up)). dX first: its per-row
    partials dxs [S, H] are freed before the x-row copy and the weight gradients are allocated."""
    layout = ctx.layout
    grad_x = grad_wu = grad_bu = grad_up_a = grad_up_b = None
    v_up = factor_a = None  # dh (s B_up[e]) [S, R]: the LoRA part of dL/dx[tok] is v_up A_up[e]
    if saved.up_a is not None and (need.x or need.up_a):
        from ..kernels import grouped_gemm

        factor_a, factor_b = _kernel_factors(LoraFactors(saved.up_a, saved.up_b, ctx.scales[0]), dh.dtype, False)
        v_up = grouped_gemm(dh, factor_b, plan.tokens_per_expert, plan.num_rows, lowrank=True)
        del factor_b
    if need.x:
        grad_x = _input_grad(layout, plan, dh, saved, (v_up, factor_a) if v_up is not None else None)
    del factor_a
    if need.up_b:  # dB_up[e] = s Σ dhᵀ u_up   [E, W, R]
        grad_up_b = _factor_grad(dh, saved.u_up, plan, saved.up_b, chunks, alpha=ctx.scales[0])
    if need.up_weight or need.up_bias or need.up_a:
        # x rows copied in plan order for dW_up (compute-bound); the factor gradient gathers them otherwise
        x, tok = saved.x, plan.token_of_row
        right, right_index = (x.index_select(0, tok), None) if need.up_weight else (x, tok)
        if need.up_weight or need.up_bias:
            weight = saved.up_weight
            shape = tuple(out_in(weight, layout.transposed).shape[1:])
            bias_dtype = saved.up_bias.dtype if need.up_bias else None
            grad_wu, grad_bu = base_weight_grad(dh, right, plan, shape, layout.transposed, weight.dtype, chunks,
                                                need.up_weight, bias_dtype, right_index=right_index)  # fmt: skip
        if need.up_a:  # dA_up[e] = Σ v_upᵀ x[tok]   [E, R, H]
            grad_up_a = _factor_grad(right, v_up, plan, saved.up_a, chunks, transposed=True, left_index=right_index)
    return grad_x, (grad_wu, grad_bu, grad_up_a, grad_up_b)


def _input_grad(layout, plan: DispatchPlan, dh: Tensor, saved: Saved, lora) -> Tensor:
    """dX = combine over K of dxs = dh W_up[e]ᵀ (+ v_up A_up[e]) [S, H] (transient)."""
    from ..kernels import combine

    dxs, _ = gemm(dh, out_in(saved.up_weight, layout.transposed), plan, lora)
    return combine(dxs, plan.row_of_slot.reshape(-1), plan.num_tokens, plan.top_k, saved.x.dtype)


# ---------------------------------------------------------------------------------------------- entry points
def run(call: ExpertsCall, plan: DispatchPlan, x: Tensor, routing_weights: Tensor) -> Tensor:
    """The engine on a call ``backend.select_engine`` has found it covers (no second check on the hot path)."""
    layout, up, down = call
    up_a, up_b, up_scale = up.lora if up.lora is not None else (None, None, 1.0)
    down_a, down_b, down_scale = down.lora if down.lora is not None else (None, None, 1.0)
    return ExpertsTritonFunction.apply(
        layout, plan, (float(up_scale), float(down_scale)), x, routing_weights,
        up.weight, up.bias, up_a, up_b, down.weight, down.bias, down_a, down_b,
    )  # fmt: skip


def experts_triton(call: ExpertsCall, plan: DispatchPlan, x: Tensor, routing_weights: Tensor) -> Tensor:
    """``run`` after the check of what the kernels cover: never a silent fallback, an error naming why."""
    from ..backend import triton_blocker

    blocker = triton_blocker(x, call.layout, call.up.lora, call.down.lora)
    if blocker is not None:
        raise RuntimeError(f"the Triton engine cannot run this call: {blocker}")
    return run(call, plan, x, routing_weights)
