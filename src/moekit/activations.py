"""The one activation table shared by the reference engine and the Triton kernels.

An expert's "activation" maps the up-projection output ``h`` to the down-projection input ``a``:

- non-gated (``has_gate=False``, NemotronH):  h [S, I]  -> a = act(h)            [S, I]
- gated (``has_gate=True``):                  h [S, 2I] -> a = act(gate) * up    [S, I]
  where gate/up are the two halves of h (``is_concatenated``) or its even/odd columns (interleaved, gpt-oss).
- gpt-oss's clamped gate (its own ``_apply_gate``):
  a = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = clamp(gate, max=limit)

Each entry has a closed-form derivative so backward recomputes ``a`` from the cached pre-activation ``h``
instead of storing it; it gives NaN and Inf where torch's autograd through the module gives them (relu's and the
clamps' derivatives are selects: exactly 0 where the input is dead or out of bounds, even for a NaN gradient).
Kernels refer to entries by ``Activation.kernel_id``.

Which entry applies is derived from the experts module (``act_fn`` class, ``_apply_gate``, ``alpha``/``limit``)
and then *verified* once per module against the module's own code on a random probe: if our formula does not
reproduce the module, moekit falls back to differentiating the module's own function (still correct, not fused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


# Backward rules: (x, g) -> dL/dx = g * f'(x), evaluated as torch's autograd evaluates the eager function, so NaN
# and Inf come out where eager's do. relu's backward is torch's own select (threshold_backward), not a product:
# where x <= 0 it gives exactly 0 even for a NaN or Inf g, and it passes g where x is NaN (NaN <= 0 is false).
def _relu2_backward(x: Tensor, g: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(g * (2.0 * x), x, 0)


def _relu_backward(x: Tensor, g: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(g, x, 0)


def _silu_backward(x: Tensor, g: Tensor) -> Tensor:
    sig = torch.sigmoid(x)
    return g * (sig * (1.0 + x * (1.0 - sig)))


def _gelu_backward(x: Tensor, g: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return g * (cdf + x * pdf)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_backward(x: Tensor, g: Tensor) -> Tensor:
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    t = torch.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype moekit's sums and activation math run in: fp32, or the input's own when wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


# Elements one row chunk may hold: bounds the fp32 temporaries of the activation math to ~16 MiB each (32 MiB in
# float64) instead of several [rows, 2I] fp32 copies (Mixtral-size experts: GBs).
_CHUNK_ELEMENTS = 1 << 22


def map_rows(fn: Callable[..., Tensor], out_width: int, out_dtype: torch.dtype, *tensors: Tensor) -> Tensor:
    """fn over row chunks of tensors [n, *] (all with n rows) -> [n, out_width] in out_dtype.

    fn may compute in a wider dtype (``accumulation_dtype``); only one chunk's temporaries are alive at a time.
    """
    n = tensors[0].shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(max(t.shape[-1] for t in tensors), 1))
    if n <= rows:
        return fn(*tensors).to(out_dtype)
    out = tensors[0].new_empty(n, out_width, dtype=out_dtype)
    for start in range(0, n, rows):
        out[start : start + rows] = fn(*(t[start : start + rows] for t in tensors))
    return out


@dataclass(frozen=True)
class ElementwiseAct:
    """A scalar activation f and its backward (x, g) -> g * f'(x), both in the accumulation dtype."""

    name: str
    kernel_id: int
    fn: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]


# name -> activation. The kernel ids are part of the kernels' contract: never renumber.
ELEMENTWISE: dict[str, ElementwiseAct] = {
    act.name: act
    for act in (
        ElementwiseAct("relu2", 0, _relu2, _relu2_backward),
        ElementwiseAct("relu", 1, F.relu, _relu_backward),
        ElementwiseAct("silu", 2, F.silu, _silu_backward),
        ElementwiseAct("gelu", 3, F.gelu, _gelu_backward),
        ElementwiseAct("gelu_tanh", 4, _gelu_tanh, _gelu_tanh_backward),
    )
}

# transformers activation class name -> table name (ACT2FN hands out instances of these classes).
_HF_CLASS_TO_ACT = {
    "ReLUSquaredActivation": "relu2",
    "ReLU": "relu",
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
}


@dataclass(frozen=True)
class Activation:
    """How the experts turn the up-projection output h into the down-projection input a.

    ``kind`` is "plain" (non-gated), "glu" (act(gate) * up) or "clamped_glu" (gpt-oss).
    ``custom`` is set when no table entry reproduces the module: then forward/backward use autograd through it.
    """

    kind: str
    act: ElementwiseAct | None
    concatenated: bool = True
    alpha: float = 1.0
    limit: float = float("inf")
    custom: Callable[[Tensor], Tensor] | None = None

    @property
    def gated(self) -> bool:
        return self.kind != "plain"

    @property
    def kernel_id(self) -> int:
        """Id the kernels switch on: elementwise id for plain/glu, 100 for the clamped gate, -1 for custom."""
        if self.custom is not None:
            return -1
        if self.kind == "clamped_glu":
            return 100
        return self.act.kernel_id

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h [S, 2I] -> gate [S, I], up [S, I] in this layout."""
        if self.concatenated:
            half = h.shape[-1] // 2
            return h[..., :half], h[..., half:]
        return h[..., 0::2], h[..., 1::2]

    def merge(self, d_gate: Tensor, d_up: Tensor) -> Tensor:
        """Inverse of ``split`` for gradients: [S, I] x 2 -> [S, 2I]."""
        if self.concatenated:
            return torch.cat([d_gate, d_up], dim=-1)
        return torch.stack([d_gate, d_up], dim=-1).flatten(-2)

    def forward(self, h: Tensor) -> Tensor:
        """h [S, I or 2I] -> a [S, I], computed in the accumulation dtype (fp32, or float64 for float64 h; row
        chunk by row chunk) and returned in h's dtype."""
        if self.custom is not None:
            return self.custom(h)
        width = h.shape[-1] // 2 if self.gated else h.shape[-1]
        return map_rows(self._forward, width, h.dtype, h)

    def _forward(self, h: Tensor) -> Tensor:
        hf = h.to(accumulation_dtype(h.dtype))
        if self.kind == "plain":
            return self.act.fn(hf).to(h.dtype)
        gate, up = self.split(hf)
        if self.kind == "glu":
            return (self.act.fn(gate) * up).to(h.dtype)
        gate_c = gate.clamp(max=self.limit)
        up_c = up.clamp(-self.limit, self.limit)
        return ((up_c + 1.0) * gate_c * torch.sigmoid(self.alpha * gate_c)).to(h.dtype)

    def backward(self, h: Tensor, grad_a: Tensor) -> Tensor:
        """dL/dh [S, I or 2I] from the pre-activation h and dL/da [S, I]; accumulation-dtype math, h's dtype out."""
        if self.custom is not None:
            with torch.enable_grad():
                h_ = h.detach().requires_grad_(True)
                (grad_h,) = torch.autograd.grad(self.custom(h_), h_, grad_a)
            return grad_h
        return map_rows(self._backward, h.shape[-1], h.dtype, h, grad_a)

    def _backward(self, h: Tensor, grad_a: Tensor) -> Tensor:
        acc = accumulation_dtype(h.dtype)
        hf, gf = h.to(acc), grad_a.to(acc)
        if self.kind == "plain":
            return self.act.backward(hf, gf).to(h.dtype)
        gate, up = self.split(hf)
        if self.kind == "glu":
            d_gate = self.act.backward(gate, gf * up)
            d_up = gf * self.act.fn(gate)
            return self.merge(d_gate, d_up).to(h.dtype)
        # clamped gate: clamp passes the gradient where the bound is not exceeded and gives exactly 0 elsewhere
        # (torch.clamp's backward is a select: 0 for a NaN or out-of-bound input, whatever the gradient holds).
        gate_c = gate.clamp(max=self.limit)
        up_c = up.clamp(-self.limit, self.limit)
        sig = torch.sigmoid(self.alpha * gate_c)
        glu = gate_c * sig
        d_glu = sig * (1.0 + self.alpha * gate_c * (1.0 - sig))
        d_gate = torch.where(gate <= self.limit, gf * (up_c + 1.0) * d_glu, 0.0)
        d_up = torch.where((up >= -self.limit) & (up <= self.limit), gf * glu, 0.0)
        return self.merge(d_gate, d_up).to(h.dtype)


def _default_apply_gate_of_transformers() -> Callable | None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - older transformers
        return None
    return _default_apply_gate


def _candidate(module: torch.nn.Module) -> Activation | None:
    """The table entry the module's flags and attributes point at (unverified)."""
    has_gate = bool(getattr(module, "has_gate", True))
    concatenated = bool(getattr(module, "is_concatenated", True))
    custom_gate = has_gate and type(module)._apply_gate is not _default_apply_gate_of_transformers()
    if custom_gate:
        alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
        if alpha is None or limit is None:
            return None
        return Activation("clamped_glu", None, concatenated, alpha=float(alpha), limit=float(limit))
    act_name = _HF_CLASS_TO_ACT.get(type(getattr(module, "act_fn", None)).__name__)
    if act_name is None:
        return None
    return Activation("glu" if has_gate else "plain", ELEMENTWISE[act_name], concatenated)


def _module_function(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The module's own h -> a, exactly as transformers' backends call it."""
    if getattr(module, "has_gate", True):
        return module._apply_gate
    return module.act_fn


def resolve_activation(module: torch.nn.Module, width: int) -> Activation:
    """Derive the activation of an experts module and check it reproduces the module on a random probe.

    ``width`` is the up-projection output width (2I gated, I non-gated).
    """
    module_fn = _module_function(module)
    candidate = _candidate(module)
    if candidate is not None:
        generator = torch.Generator().manual_seed(0)
        # Spread over the clamp limit so the clamped branches are exercised.
        probe = torch.randn(64, width, generator=generator) * 4.0
        with torch.no_grad():
            expected = module_fn(probe)
            ours = candidate.forward(probe)
        if expected.shape == ours.shape and torch.allclose(expected, ours, rtol=1e-5, atol=1e-5):
            return candidate
    concatenated = bool(getattr(module, "is_concatenated", True))
    kind = "glu" if getattr(module, "has_gate", True) else "plain"
    return Activation(kind, None, concatenated, custom=module_fn)
