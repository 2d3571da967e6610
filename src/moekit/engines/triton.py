"""The Triton engine: same signature and semantics as ``moekit.engines.reference.experts_reference``, fused kernels.

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
                   routing-weight gradient (<dOut, y> without y, + <dOut, b_down> on the host). Either fused in
                   the GEMM's epilogue (ga stays in registers) or split: the GEMM writes ga [S, I] (transient,
                   rounded to the dtype as the reference does; by grouped_mm from the dOut row copy when
                   dW_down makes one) and a memory-bound pass does the rest (``MOEKIT_TRITON_DA``; default split)
      weight_grad  dW_down[e] = Σ_r dOut[tok_r]ᵀ (w_r a_r), db_down fused (per output tile, one flat loop over the
                   row chunks of a group of experts, a store at each expert's end: no atomics). The token rows
                   dOut[tok], x[tok] are copied in plan order just before (transient [S, H], one at a time) or
                   gathered in the loop (MOEKIT_TRITON_WGRAD)
      grouped_gemm dh @ W_up[e]ᵀ --> dxs [S, H] (transient);  combine --> dX [T, H]
      weight_grad  dW_up[e] = Σ_r dhᵀ_r x[tok_r], db_up fused (after dX, so dxs is gone before it is allocated)
    The GEMMs with neither a gather nor an epilogue (the forward's down-projection, dW_down and dW_up from the row
    copies, dxs, dA's GEMM from the dOut row copy) go to torch's grouped_mm where it runs (CUTLASS: 1.3-1.5x our
    kernels at these shapes on an H100); the bias sums then run alone in the weight-gradient kernel
    (MOEKIT_TRITON_PLAIN_GEMM=triton keeps all on Triton). A LoRA term on such a GEMM is added afterwards, in
    place, by the Triton kernel where the product's reduction is long (``lora_gemm_split``); otherwise the Triton
    GEMM computes both.

LoRA (optional per projection; A [E, R, in], B [E, out, R] and a scale s, adapters concatenated along R;
typically views of PEFT's fp32 parameters, see ``moekit.lora.LoraFactors``). The engine makes the kernels'
operands itself, outside autograd: s·B in x's dtype, contiguous (one small copy, none when it already is; PEFT's
B layout is transposed by ``kernels.relayout``), and in the forward A in x's dtype (the low-rank GEMMs' main-loop
operand, read again by every row tile of its expert). The backward reads A as it is: there it only enters LoRA
terms, and the kernels round each tile to x's dtype as they load it (``kernels.tiling.as_operand``; the values a
copy would hold; 41 MiB less step memory at Nemotron 8k r=64, BENCHMARKS.md run 17). The backward returns the factor
gradients in the parameters' dtype and strides (dB times s in the kernel's store; written dense, then moved when
the parameter is PEFT's strided B), so LoRA adds no autograd op of its own to the step. No ΔW and no copy of W:
the low-rank intermediates are small grouped GEMMs (``grouped_gemm(..., lowrank=True)``, BLOCK_N fitted to R) and
the big GEMMs take them through a short second reduction loop over R into the same fp32 accumulator, before their
epilogues (``lora=`` of up_proj / grouped_gemm / act_grad), or, for the GEMMs that run on grouped_mm (split,
above), through ``lora_add(product, u, L)`` after it (one more read and write of the product):

    forward    u_up = x[tok] A_upᵀ [S, R];  h = x[tok] W_up + u_up B_upᵀ (+b)          (up_proj, fused)
               u_down = a A_downᵀ [S, R];   yw = w (a W_down + u_down B_downᵀ (+b))     (grouped_gemm, fused)
    backward   v_down = dOut[tok] B_down [S, R];  ga = dOut[tok] W_downᵀ + v_down A_down (dA kernel, fused), so
               dh and the routing-weight gradient <ga, a> include the LoRA part of y
               dB_down[e] = Σ dOut[tok]ᵀ (w u_down),  dA_down[e] = Σ v_downᵀ (w a)
               v_up = dh B_up [S, R];  dxs = dh W_upᵀ + v_up A_up                       (grouped_gemm, fused)
               dB_up[e] = Σ dhᵀ u_up,  dA_up[e] = Σ v_upᵀ x[tok]
Factor gradients use the per-expert weight-gradient kernel (no atomics, exact zeros for experts without rows);
u_up and u_down [S, R] are saved for backward; the operand copies are not (E·R·(in + out) per projection, which
summed over a model's layers is GBs at r=64): the backward makes s·B again from the saved parameter views, each
projection's just before its first use, and drops each after its last (the forward too): s·B_down after the down
projection's gradients, s·B_up after v_up. A frozen base costs no base weight-gradient kernel.

Memory plan. Forward saves x, the routing weights, the weights/biases (parameters, no copy), the plan (with
its inverse permutation row_of_slot, S int64) and the pre-activation h [S, W] in the input dtype: nothing
T·K·H-sized is cached. The dA kernel writes dh over h (in place: each element of h is read by the program that
then writes it), so the backward never holds h and dh side by side, and its peak (dh beside dxs or the x rows) holds
one [S, W] buffer (a second backward over the same graph, retain_graph=True, is refused: h is gone).
Forward transients: a [S, I] and yw (or y) [S, H] (freed on return). Backward transients: ga [S, I] (split dA;
the pass writes w * a over it, kept only when dW_down or dA_down needs it; fused dA writes w * a [S, I] instead),
partials [S, I/64 or 1] fp32 (only when the routing weights need a gradient), the chunk table (~S/64 + E int32),
one plan-ordered row copy [S, H] at a time for the weight gradients ("copy" mode): dOut rows (made before dA,
whose GEMM then runs on grouped_mm, and kept until dW_down); then dxs [S, H] (only when x needs a gradient; freed
by dX's combine), and only then x rows and the up-projection's weight and LoRA-factor gradients, so those
gradients are never allocated beside dxs.
Each gradient is computed only when ``ctx.needs_input_grad`` asks for it (frozen weights cost no
weight-gradient kernel).

Numerics: operands in the input dtype, fp32 accumulation; fp32 inputs use the exact (ieee) dot, never tf32;
the K-way sums and routing-weight products are fp32; every reduction has a fixed order (deterministic). A split
LoRA GEMM rounds its base product to the dtype before the LoRA term is added (in fp32, rounded again), as the
reference engine, which adds the two as separate tensors, does too.

Not handled here (``experts_triton`` raises, naming why; ``moekit.backend.select_engine`` sends such calls to the
reference engine unless MOEKIT_BACKEND=triton forces this one): custom activations (``kernel_id == -1``), dtypes
other than fp32/fp16/bf16, LoRA factors of any other dtype or on another device than x, devices where
``triton_available`` is False.
"""

from __future__ import annotations

import functools
import os

import torch

from ..grouped import grouped_matmul, grouped_matmul_runs, grouped_outer, grouped_outer_runs
from ..lora import LoraFactors, as_lora_factors
from ..plan import DispatchPlan
from .reference import ExpertsLayout, _in_out, experts_reference  # noqa: F401  (scripts/gpu_check.py spies on it)

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _capable(index: int) -> bool:
    """Compute capability >= 8.0 (asked once per GPU: every call checks, and the step's host time is short)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton engine can run on ``device``: a CUDA GPU of compute capability >= 8.0 with triton,
    or the CPU when ``TRITON_INTERPRET=1`` (slow; tests only)."""
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available() or torch.version.cuda is None:
            return False
        return _capable(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return False


def supported(layout: ExpertsLayout, x: Tensor, up_lora=None, down_lora=None) -> bool:
    """Whether this call can run on the Triton kernels (``moekit.backend._triton_blocker`` says why not)."""
    from ..backend import _triton_blocker

    return _triton_blocker(x, layout, as_lora_factors(up_lora), as_lora_factors(down_lora)) is None


def wgrad_mode() -> str:
    """How the Triton weight-gradient kernel reads token rows (``MOEKIT_TRITON_WGRAD``): "copy" (default) from
    plan-ordered row copies, or "gather" through the plan in its loop."""
    mode = os.environ.get("MOEKIT_TRITON_WGRAD", "copy")
    return mode if mode in ("copy", "gather") else "copy"


def plain_gemm_mode() -> str:
    """Who runs the grouped GEMMs that need no gather and no epilogue (``MOEKIT_TRITON_PLAIN_GEMM``): "torch"
    (default; torch's grouped_mm where it runs, measured 1.3-1.5x faster than the Triton kernels on an H100,
    BENCHMARKS.md) or "triton". They are the forward's a @ W_down[e] (the combine then applies bias and routing
    weight), the base weight gradients (from plan-ordered row copies), dX's per-row product dh @ W_up[e] and,
    when dW_down makes the dOut row copy, dA's GEMM; with a LoRA term only where ``lora_gemm_split`` says so."""
    return "triton" if os.environ.get("MOEKIT_TRITON_PLAIN_GEMM", "torch") == "triton" else "torch"


def _torch_outer(left: Tensor, right: Tensor, plan: DispatchPlan, transposed: bool, dtype) -> Tensor | None:
    """Σ over each expert's rows of leftᵀ right (plan-ordered [S, P], [S, Q]) -> [E, P, Q], or [E, Q, P] for a
    transposed stored weight, by torch grouped_mm; None when plain GEMMs stay on Triton or grouped_mm cannot
    take these operands."""
    if plain_gemm_mode() != "torch" or plan.num_rows == 0:
        return None
    first, second = (right, left) if transposed else (left, right)
    if not grouped_outer_runs(first, second):
        return None
    return grouped_outer(first, second, plan).to(dtype)


def _torch_matmul(rows: Tensor, weight_in_out: Tensor, plan: DispatchPlan) -> Tensor | None:
    """rows [S, K] (plan-ordered) @ weight[e] [K, N] -> [S, N] by torch grouped_mm, or None (as ``_torch_outer``)."""
    if plain_gemm_mode() != "torch" or plan.num_rows == 0 or not grouped_matmul_runs(rows, weight_in_out):
        return None
    return grouped_matmul(rows, weight_in_out, plan)


# Split pays where the product's reduction is long: the in-place add is one more pass over the [S, N] output
# whatever K is, while CUTLASS's gain over the Triton GEMM grows with K. LoRA steps on an H200 (BENCHMARKS.md
# run 16), split against fused: Mixtral (K = 14336, 28672) 12 % and gpt-oss (K = 2880) 5-6 % faster; Nemotron
# (K = 1856) even at 32k tokens, 4 % slower at 8k; Qwen3 (K = 768, 1536) 4 % slower at 32k.
SPLIT_LORA_MIN_K = 2048


def lora_gemm_split(k_dim: int) -> bool:
    """Whether a big GEMM with a LoRA term, of reduction size ``k_dim``, runs split (``MOEKIT_TRITON_LORA_GEMM``):
    "split" puts the base product on torch's grouped_mm, as without LoRA, and the Triton kernel then adds
    u @ L[e] to it in place (one more pass over the output); "fused" runs both in one Triton kernel, one
    accumulator; "auto" (default) splits when ``k_dim >= SPLIT_LORA_MIN_K``."""
    mode = os.environ.get("MOEKIT_TRITON_LORA_GEMM", "auto")
    if mode in ("split", "fused"):
        return mode == "split"
    return k_dim >= SPLIT_LORA_MIN_K


def _torch_matmul_lora(rows: Tensor, weight_in_out: Tensor, plan: DispatchPlan, lora) -> Tensor | None:
    """``_torch_matmul`` plus, with ``lora=(u [S, R], L [E, R, N])``, u @ L[e] added in place by the Triton
    kernel; None where the base product cannot go to grouped_mm or LoRA stays fused (``lora_gemm_split``)."""
    from ..kernels import lora_add

    if lora is not None and not lora_gemm_split(rows.shape[1]):
        return None
    out = _torch_matmul(rows, weight_in_out, plan)
    if out is not None and lora is not None:
        u, factor = lora
        lora_add(out, u, factor, plan.tokens_per_expert, plan.num_rows)
    return out


def _out_in(weight: Tensor, transposed: bool) -> Tensor:
    """Stored expert weight viewed as [E, out, in]."""
    return weight.transpose(1, 2) if transposed else weight


def _kernel_factors(
    factor_a: Tensor, factor_b: Tensor, scale: float, dtype: torch.dtype, copy_a: bool
) -> tuple[Tensor, Tensor]:
    """The LoRA operands the kernels read: A [E, R, in], in ``dtype`` when ``copy_a`` (the forward: A is the
    low-rank GEMM's main-loop operand, re-read by every row tile of its expert, so a copy in the 2-byte dtype
    halves those reads) or as it is (the backward: A only enters LoRA terms, one tile per output tile, which the
    kernels round to ``dtype`` as they load it, ``kernels.tiling.as_operand``; no copy), and scale·B [E, out, R]
    in ``dtype``, contiguous (PEFT's B has its experts at stride 1; the kernels want its rows dense). Made under
    the Function's forward, so no autograd op is recorded for them."""
    from ..kernels.relayout import scaled_copy

    if copy_a and factor_a.dtype != dtype:
        factor_a = factor_a.to(dtype)
    if factor_b.dtype != dtype or scale != 1.0 or not factor_b.is_contiguous():
        factor_b = scaled_copy(factor_b, torch.empty(factor_b.shape, dtype=dtype, device=factor_b.device), scale)
    return factor_a, factor_b


def _factor_grad_buffer(param: Tensor) -> Tensor:
    """Where the kernel writes a LoRA factor's gradient: a dense buffer of the parameter's shape and dtype, which
    ``_factor_grad`` moves into the parameter's strides when they differ. Stores straight into PEFT's B strides
    cost one 32-byte sector per element: 3.7x the dense store's time at r=64 on an H100 (``kernels.relayout``)."""
    from ..kernels.tiling import new_output

    return new_output(*param.shape, dtype=param.dtype, device=param.device)


def _factor_grad(buffer: Tensor, param: Tensor) -> Tensor:
    """The gradient of ``param`` from its ``_factor_grad_buffer``, in the parameter's dtype and strides (so the
    views back to PEFT's parameter cost autograd no copy)."""
    from ..kernels.relayout import scaled_copy
    from ..kernels.tiling import new_output_like

    if buffer.stride() == param.stride():
        return buffer
    return scaled_copy(buffer, new_output_like(param))


class ExpertsTritonFunction(torch.autograd.Function):
    """Forward and backward of the expert layer over one dispatch plan, on the Triton kernels.

    LoRA (optional, per projection): factors A [E, R, in], B [E, out, R] (any float dtype and strides) and the
    scale s of ``y += s·(x Aᵀ) Bᵀ``; their gradients come back in the factors' own dtype and strides.
    """

    @staticmethod
    def forward(
        ctx,
        layout: ExpertsLayout,
        plan: DispatchPlan,
        x: Tensor,
        routing_weights: Tensor,
        up_weight: Tensor,
        up_bias: Tensor | None,
        down_weight: Tensor,
        down_bias: Tensor | None,
        up_lora_a: Tensor | None = None,
        up_lora_b: Tensor | None = None,
        down_lora_a: Tensor | None = None,
        down_lora_b: Tensor | None = None,
        up_lora_scale: float = 1.0,
        down_lora_scale: float = 1.0,
    ) -> Tensor:
        from ..kernels import combine, grouped_gemm, up_proj

        n, transposed, act = plan.num_rows, layout.transposed, layout.activation
        counts, tok = plan.tokens_per_expert, plan.token_of_row
        rw_flat = routing_weights.reshape(-1)
        u_up = u_down = up_lora = down_lora = None
        up_a = up_b = down_a = down_b = None  # the kernels' LoRA operands (see _kernel_factors)
        if up_lora_a is not None:  # u_up = x[tok] @ A_up[e]ᵀ [S, R]; h += u_up @ (s B_up[e])ᵀ in up_proj's loop
            up_a, up_b = _kernel_factors(up_lora_a, up_lora_b, up_lora_scale, x.dtype, copy_a=True)
            u_up = grouped_gemm(x, up_a.transpose(1, 2), counts, n, gather=tok, lowrank=True)
            up_lora = (u_up, up_b.transpose(1, 2))
        h, a = up_proj(x, tok, _in_out(up_weight, transposed), up_bias, counts, n, act, lora=up_lora)
        up_a = up_b = up_lora = None  # the operand copies are not kept (the backward makes them again)
        if down_lora_a is not None:  # u_down = a @ A_down[e]ᵀ [S, R]; y += u_down @ (s B_down[e])ᵀ
            down_a, down_b = _kernel_factors(down_lora_a, down_lora_b, down_lora_scale, x.dtype, copy_a=True)
            u_down = grouped_gemm(a, down_a.transpose(1, 2), counts, n, lowrank=True)
            down_lora = (u_down, down_b.transpose(1, 2))
        inv = plan.row_of_slot.reshape(-1)
        # The down-projection's product goes to torch's grouped_mm where it runs (CUTLASS, faster than the Triton
        # kernel, BENCHMARKS.md), the LoRA term added after it where split, and the combine applies the routing
        # weight and bias; otherwise the Triton GEMM applies both in its epilogue (yw)
        y = _torch_matmul_lora(a, _in_out(down_weight, transposed), plan, down_lora)
        epilogue = {"slot_weights": routing_weights, "bias": down_bias, "expert_of_row": plan.expert_of_row}
        if y is None:
            y = grouped_gemm(
                a, _in_out(down_weight, transposed), counts, n,
                bias=down_bias, routing_weights=rw_flat, sorted_rows=plan.sorted_rows, lora=down_lora,
            )  # fmt: skip
            epilogue = {}
        del a
        down_a = down_b = down_lora = None
        out = combine(y, inv, plan.num_tokens, plan.top_k, x.dtype, **epilogue)

        ctx.layout, ctx.plan = layout, plan
        ctx.lora_scales = (up_lora_scale, down_lora_scale)
        # h is held outside save_for_backward so the backward can consume it: the dA kernel writes dh over it, so
        # the backward's peak holds one [S, W] buffer, not two (memory plan above)
        ctx.pre_activation = h
        ctx.save_for_backward(
            x, routing_weights, up_weight, up_bias, down_weight, down_bias,
            u_up, u_down, up_lora_a, up_lora_b, down_lora_a, down_lora_b,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from ..kernels import act_grad_backward, combine, grouped_gemm, weight_grad
        from ..kernels.tiling import new_output_like, wgrad_block_k
        from ..kernels.weight_grad import chunk_table

        layout, plan = ctx.layout, ctx.plan
        (x, routing_weights, w_up, b_up, w_down, b_down, u_up, u_down,
         up_param_a, up_param_b, down_param_a, down_param_b) = ctx.saved_tensors  # fmt: skip
        h, ctx.pre_activation = ctx.pre_activation, None
        if h is None:
            raise RuntimeError(
                "moekit's Triton expert backward ran twice over one graph (backward with retain_graph=True): its "
                "first run wrote dL/dh over the cached pre-activation. Run the forward again, or use "
                "MOEKIT_BACKEND=reference."
            )
        up_scale, down_scale = ctx.lora_scales
        num_inputs = len(ctx.needs_input_grad)  # 8 when called without the LoRA arguments
        needs = tuple(ctx.needs_input_grad) + (False,) * (14 - num_inputs)
        need_x, need_rw, need_wu, need_bu, need_wd, need_bd = needs[2:8]
        need_up_a, need_up_b, need_down_a, need_down_b = needs[8:12]
        up_lora, down_lora = up_param_a is not None, down_param_a is not None
        need_dh = need_x or need_wu or need_bu or need_up_a or need_up_b
        store_a = need_wd or need_down_a  # w * a: right operand of dW_down, left operand of dA_down
        if not (need_dh or need_rw or store_a or need_bd or need_down_b):
            return (None,) * num_inputs
        # The kernels' LoRA operands are made again rather than kept from the forward (E·R·(in + out) per
        # projection per layer), each projection's just before its first use and dropped after its last
        down_a = down_b = da_lora = None
        if down_lora:
            down_a, down_b = _kernel_factors(down_param_a, down_param_b, down_scale, x.dtype, copy_a=False)
        n, dtype, transposed, act = plan.num_rows, x.dtype, layout.transposed, layout.activation
        num_experts, counts = plan.num_experts, plan.tokens_per_expert
        tok, sorted_rows = plan.token_of_row, plan.sorted_rows
        hidden = x.shape[1]
        grad_out = grad_out.to(dtype)
        rw_flat = routing_weights.reshape(-1)

        # The weight-gradient kernel reads its token-side operand (dOut rows, x rows) either through the plan
        # inside its loop ("gather") or from a plan-ordered copy ("copy", default: the in-loop index loads cost
        # the pipeline more than the copy costs bandwidth). A copy is made only for the (compute-bound) base
        # weight gradient; the memory-bound LoRA factor gradients reuse it when it exists and gather otherwise.
        # The dOut copy is made before dA, so that dA's GEMM (split mode, no LoRA term) runs on grouped_mm too.
        copy_rows = wgrad_mode() == "copy" or plain_gemm_mode() == "torch"
        rows_out = grad_out.index_select(0, tok) if copy_rows and need_wd else None  # [S, H]

        # v_down = dOut[tok] @ B_down[e] [S, R]: the LoRA part of dL/da is v_down @ A_down[e]
        run_da = need_dh or need_rw or store_a
        v_down = None
        if down_lora and (run_da or need_down_a):
            v_down = grouped_gemm(grad_out, down_b, counts, n, gather=tok, lowrank=True)
        a = dh = part = None
        if run_da:
            # dh is written over h and (split) w * a over ga, so the pass allocates neither (memory plan above)
            da_lora = (v_down, down_a) if down_lora and (need_dh or need_rw) else None
            dA_args = (grad_out, tok, sorted_rows, rw_flat, _out_in(w_down, transposed), h, counts, n, act)
            dA_flags = {"store_a": store_a, "store_dh": need_dh, "store_part": need_rw, "in_place": True}
            ga = None
            if rows_out is not None:
                ga = _torch_matmul_lora(rows_out, _out_in(w_down, transposed), plan, da_lora)  # [S, I]
            a, dh, part = act_grad_backward(*dA_args, lora=da_lora if ga is None else None, ga=ga, **dA_flags)
            del ga
        inner, width = w_down.shape[1] if transposed else w_down.shape[2], h.shape[1]
        del h  # its last use; dh, when computed, lives in its storage (see forward)

        grad_rw = None
        if need_rw:
            per_row = part.sum(1)  # [S]; sentinel rows were never written
            expert_of_row = plan.expert_of_row
            if b_down is not None and n:
                bias_dot = grad_out.float() @ b_down.float().t()  # [T, E]
                per_row = per_row + bias_dot[tok, expert_of_row.clamp(max=num_experts - 1)]
            per_row = torch.where(expert_of_row < num_experts, per_row, 0.0)
            grad_rw = torch.empty(n, device=x.device, dtype=torch.float32)
            grad_rw[sorted_rows] = per_row
            grad_rw = grad_rw.view_as(routing_weights).to(routing_weights.dtype)
        del part

        chunks = None
        if need_wd or need_bd or need_wu or need_bu or need_up_a or need_up_b or need_down_a or need_down_b:
            chunks = chunk_table(counts, n, wgrad_block_k(dtype))  # rows cut in chunks per expert, shared by all

        # Row copies (see above) live one at a time, never beside dxs, so the backward peak does not grow
        grad_wd = grad_bd = grad_down_a = grad_down_b = None
        if need_wd or need_bd or need_down_b:
            left, left_index = (rows_out, None) if rows_out is not None else (grad_out, tok)
            del rows_out
            if need_wd:  # a was written scaled by the routing weight (w * a)
                grad_wd = _torch_outer(left, a, plan, transposed, w_down.dtype)
            if (need_wd and grad_wd is None) or need_bd:
                grad_wd_kernel, grad_bd = weight_grad(
                    left, a if need_wd else left, counts, n, num_experts, (hidden, inner), w_down.dtype,
                    transposed, left_index=left_index, routing_weights=rw_flat, sorted_rows=sorted_rows,
                    compute_w=need_wd and grad_wd is None, bias_dtype=b_down.dtype if need_bd else None,
                    chunks=chunks,
                )  # fmt: skip
                grad_wd = grad_wd if grad_wd is not None else grad_wd_kernel
            if need_down_b:  # dB_down[e] = s Σ dOut[tok]ᵀ (w u_down)   [E, H, R]  (w applied in the kernel's loop)
                buffer, _ = weight_grad(
                    left, u_down, counts, n, num_experts, (hidden, down_param_b.shape[2]), down_param_b.dtype, False,
                    left_index=left_index, routing_weights=rw_flat, sorted_rows=sorted_rows, scale_right=True,
                    chunks=chunks, lowrank=True, out=_factor_grad_buffer(down_param_b), alpha=down_scale,
                )  # fmt: skip
                grad_down_b = _factor_grad(buffer, down_param_b)
            del left
        if need_down_a:  # dA_down[e] = Σ v_downᵀ (w a)   [E, R, I]
            grad_down_a, _ = weight_grad(
                a, v_down, counts, n, num_experts, (inner, down_param_a.shape[1]), down_param_a.dtype, True,
                chunks=chunks, lowrank=True, out=new_output_like(down_param_a),
            )  # fmt: skip
        del a, v_down, down_a, down_b, da_lora

        # v_up = dh @ B_up[e] [S, R]: the LoRA part of dL/dx[tok] is v_up @ A_up[e]; s·B_up is not needed after it
        v_up = up_a = None
        if up_lora and (need_x or need_up_a):
            up_a, up_b = _kernel_factors(up_param_a, up_param_b, up_scale, x.dtype, copy_a=False)
            v_up = grouped_gemm(dh, up_b, counts, n, lowrank=True)
            del up_b
        # dX before the up-projection's weight and factor gradients: its per-row partials dxs [S, H] are freed
        # before those gradients are allocated (for a trainable W_up, the x-row copy that follows is dxs's size)
        grad_x = None
        if need_x:
            w_up_out_in = _out_in(w_up, transposed)
            dx_lora = (v_up, up_a) if up_lora else None
            dxs = _torch_matmul_lora(dh, w_up_out_in, plan, dx_lora)
            if dxs is None:
                dxs = grouped_gemm(dh, w_up_out_in, counts, n, lora=dx_lora)
            del dx_lora
            grad_x = combine(dxs, plan.row_of_slot.reshape(-1), plan.num_tokens, plan.top_k, dtype)
            del dxs
        del up_a  # the factor gradients below need only v_up and u_up
        grad_wu = grad_bu = grad_up_a = grad_up_b = None
        if need_up_b:  # dB_up[e] = s Σ dhᵀ u_up   [E, W, R]
            buffer, _ = weight_grad(
                dh, u_up, counts, n, num_experts, (width, up_param_b.shape[2]), up_param_b.dtype, False,
                chunks=chunks, lowrank=True, out=_factor_grad_buffer(up_param_b), alpha=up_scale,
            )  # fmt: skip
            grad_up_b = _factor_grad(buffer, up_param_b)
        if need_wu or need_bu or need_up_a:
            if copy_rows and need_wu:
                right, right_index = x.index_select(0, tok), None
            else:
                right, right_index = x, tok
            if need_wu:
                grad_wu = _torch_outer(dh, right, plan, transposed, w_up.dtype)
            if (need_wu and grad_wu is None) or need_bu:
                grad_wu_kernel, grad_bu = weight_grad(
                    dh, right, counts, n, num_experts, (width, hidden), w_up.dtype, transposed,
                    right_index=right_index, compute_w=need_wu and grad_wu is None,
                    bias_dtype=b_up.dtype if need_bu else None, chunks=chunks,
                )  # fmt: skip
                grad_wu = grad_wu if grad_wu is not None else grad_wu_kernel
            if need_up_a:  # dA_up[e] = Σ v_upᵀ x[tok]   [E, R, H]
                grad_up_a, _ = weight_grad(
                    right, v_up, counts, n, num_experts, (hidden, up_param_a.shape[1]), up_param_a.dtype, True,
                    left_index=right_index, chunks=chunks, lowrank=True, out=new_output_like(up_param_a),
                )  # fmt: skip
            del right

        return (
            None, None, grad_x, grad_rw, grad_wu, grad_bu, grad_wd, grad_bd,
            grad_up_a, grad_up_b, grad_down_a, grad_down_b, None, None,
        )[:num_inputs]  # fmt: skip


def run(
    layout: ExpertsLayout,
    plan: DispatchPlan,
    x: Tensor,
    routing_weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_lora: LoraFactors | None = None,
    down_lora: LoraFactors | None = None,
) -> Tensor:
    """The engine on a call ``backend.select_engine`` has found it covers (no second check on the hot path)."""
    no_lora = LoraFactors(None, None)
    up = up_lora or no_lora
    down = down_lora or no_lora
    return ExpertsTritonFunction.apply(
        layout, plan, x, routing_weights, up_weight, up_bias, down_weight, down_bias,
        up.a, up.b, down.a, down.b, up.scale, down.scale,
    )  # fmt: skip


def experts_triton(
    layout: ExpertsLayout,
    plan: DispatchPlan,
    x: Tensor,
    routing_weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_lora: tuple | None = None,
    down_lora: tuple | None = None,
) -> Tensor:
    """Expert layer output [T, H] in x's dtype; drop-in for ``experts_reference``. LoRA per projection:
    ``LoraFactors`` (A [E, R, in], B [E, out, R], scale), or an (A, B) pair with the scaling already in B."""
    from ..backend import _triton_blocker

    up_lora, down_lora = as_lora_factors(up_lora), as_lora_factors(down_lora)
    blocker = _triton_blocker(x, layout, up_lora, down_lora)
    if blocker is not None:  # never a silent fallback: backend.select_engine picks the reference engine instead
        raise RuntimeError(f"the Triton engine cannot run this call: {blocker}")
    return run(layout, plan, x, routing_weights, up_weight, up_bias, down_weight, down_bias, up_lora, down_lora)
