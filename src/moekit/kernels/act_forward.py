"""The activation as a pass of its own: a [n, I] = act(h) for the routed rows of a stored pre-activation h [n, W].

    a[r, j] = act(h[r, j])                                   non-gated (W = I)
    a[r, j] = act(gate = h[r, j], up = h[r, I + j])          gated, concatenated
    a[r, j] = act(gate = h[r, 2j], up = h[r, 2j + 1])        gated, interleaved

For an up-projection whose GEMM ran without the activation epilogue of ``up_proj`` (the Hopper NF4 kernel of
``kernels.nf4_hopper``): h is already rounded to its dtype, so a is what ``up_proj`` computes from the same h.
Memory-bound: one read of h and one write of a. Rows past the routed ones (sum of ``counts``) are not touched.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activation import act_fn, gated_forward
from .numerics import new_output, to_dtype
from .tiling import block_e, cdiv

BLOCK_M = 8
BLOCK_N = 256


def gate_up_columns(activation, inner: int) -> tuple[int, int]:
    """(column stride, offset of the up column) of h's gate columns: (2, 1) interleaved, else (1, I) (non-gated: the
    offset is never read)."""
    return (2, 1) if activation.gated and not activation.concatenated else (1, inner)


@triton.jit
def _act_forward_kernel(
    h_ptr, a_ptr, counts_ptr, E, I, stride_hm, stride_am, up_off, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, COL_STRIDE: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_e = tl.arange(0, BLOCK_E)
    routed = tl.sum(tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), 0)
    first = tl.program_id(0) * BLOCK_M
    if first >= routed:
        return
    rows = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < routed)[:, None] & (offs_n < I)[None, :]
    h_rows = h_ptr + rows[:, None] * stride_hm
    col_g = offs_n * COL_STRIDE  # the gate column (or the only one)
    gate = tl.load(h_rows + col_g[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_rows + (col_g + up_off)[None, :], mask=mask, other=0.0).to(tl.float32)
        a = gated_forward(gate, up, alpha, limit, ACT)
    else:
        a = act_fn(gate, ACT)
    tl.store(a_ptr + rows[:, None] * stride_am + offs_n[None, :], to_dtype(a, a_ptr.dtype.element_ty), mask=mask)


def act_forward(h, counts, activation):
    """a [n, I] from h [n, W] (plan rows; ``counts``: rows per expert) under ``activation``
    (``moekit.activations.Activation``)."""
    n, width = h.shape
    inner = width // 2 if activation.gated else width
    a = new_output(n, inner, dtype=h.dtype, device=h.device)
    if n == 0:
        return a
    col_stride, up_off = gate_up_columns(activation, inner)
    grid = (cdiv(n, BLOCK_M), cdiv(inner, BLOCK_N))
    _act_forward_kernel[grid](
        h, a, counts, counts.shape[0], inner, h.stride(0), a.stride(0), up_off, float(activation.alpha),
        float(activation.limit), ACT=activation.kernel_id, GATED=activation.gated, COL_STRIDE=col_stride,
        BLOCK_E=block_e(counts.shape[0]), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )  # fmt: skip
    return a
