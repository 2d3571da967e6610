"""Activation forward and derivative as @triton.jit helpers, switched on the constexpr ``Activation.kernel_id``.

The ids are the contract of ``moekit.activations`` (never renumber): 0 relu2, 1 relu, 2 silu, 3 gelu (erf),
4 gelu_tanh; for gated ("glu") layouts the same ids apply to the gate; 100 is gpt-oss's clamped gate with
``alpha`` / ``limit``. Everything is evaluated in fp32 on fp32 inputs.

    plain:        a = f(h)                      dh = g * f'(h)
    glu:          a = f(gate) * up              dgate = (g * up) * f'(gate),  dup = g * f(gate)
    clamped glu:  gc = min(gate, limit), uc = clamp(up, -limit, limit), s = sigmoid(alpha * gc)
                  a = (uc + 1) * gc * s         dgate = g * (uc + 1) * s * (1 + alpha * gc * (1 - s))  if gate <= limit
                                                dup = g * gc * s                                if -limit <= up <= limit
                                                (each 0 otherwise)

NaN and Inf come out as in torch's eager autograd (``moekit.activations``, which the tests hold both engines to):
min/max propagate NaN (triton's default drops it: relu(NaN) would be 0, a NaN gate clamped to the limit), and
relu's and the clamps' derivatives are selects, not products: 0 where the input is dead or out of bounds (NaN
included) even for a NaN or Inf gradient, the gradient itself where relu's input is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

CLAMPED_GLU = 100

# Globals read inside @triton.jit code must be constexpr (the interpreter does not check this; the compiler does).
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument (no overflow): tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def act_fn(x, ACT: tl.constexpr):
    """f(x) of elementwise activation ``ACT`` (fp32)."""
    if ACT == 0:
        r = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        out = r * r
    elif ACT == 1:
        out = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        out = x * _sigmoid(x)
    elif ACT == 3:
        out = 0.5 * x * (1.0 + tl.erf(x * _INV_SQRT_2))
    else:
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        out = 0.5 * x * (1.0 + _tanh(inner))
    return out


@triton.jit
def act_backward(x, g, ACT: tl.constexpr):
    """dL/dx = g * f'(x) of elementwise activation ``ACT`` (fp32); relu's as a select (torch's threshold_backward)."""
    if ACT == 0:
        out = tl.where(x <= 0, 0.0, g * (2.0 * x))
    elif ACT == 1:
        out = tl.where(x <= 0, 0.0, g)
    elif ACT == 2:
        s = _sigmoid(x)
        out = g * (s * (1.0 + x * (1.0 - s)))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(x * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        out = g * (cdf + x * pdf)
    else:
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = _tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        out = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)
    return out


@triton.jit
def _clamp_gate_up(gate, up, limit):
    """(min(gate, limit), clamp(up, -limit, limit)), NaN kept as torch.clamp keeps it."""
    gc = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up_lo = tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL)
    uc = tl.minimum(up_lo, limit, propagate_nan=tl.PropagateNan.ALL)
    return gc, uc


@triton.jit
def gated_forward(gate, up, alpha, limit, ACT: tl.constexpr):
    """a from the gate and up halves (fp32)."""
    if ACT == 100:
        gc, uc = _clamp_gate_up(gate, up, limit)
        out = (uc + 1.0) * gc * _sigmoid(alpha * gc)
    else:
        out = act_fn(gate, ACT) * up
    return out


@triton.jit
def gated_backward(gate, up, g, alpha, limit, ACT: tl.constexpr):
    """(a, dgate, dup) from the gate and up halves and dL/da ``g`` (fp32)."""
    if ACT == 100:
        gc, uc = _clamp_gate_up(gate, up, limit)
        s = _sigmoid(alpha * gc)
        glu = gc * s
        a = (uc + 1.0) * glu
        d_glu = s * (1.0 + alpha * gc * (1.0 - s))
        d_gate = tl.where(gate <= limit, g * (uc + 1.0) * d_glu, 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), g * glu, 0.0)
    else:
        f = act_fn(gate, ACT)
        a = f * up
        d_gate = act_backward(gate, g * up, ACT)
        d_up = g * f
    return a, d_gate, d_up
