"""``kernels.act_forward`` (the activation pass after a plain up-projection GEMM) against ``Activation.forward``,
under the interpreter (or natively): every activation id and layout, fp32 and bf16, NaN / Inf in h, rows past the
routed ones untouched (they stay NaN-poisoned), I off the column tile, and no rows at all."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from moekit.activations import ELEMENTWISE, Activation
from moekit.backend import triton_available
from moekit.kernels.act_forward import act_forward
from moekit.options import OPTIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_available(DEVICE), reason="no GPU and TRITON_INTERPRET is not set"),
]
ACTIVATIONS = {
    **{name: Activation("plain", ELEMENTWISE[name]) for name in ELEMENTWISE},
    "silu_glu": Activation("glu", ELEMENTWISE["silu"], True),
    "gelu_tanh_glu_interleaved": Activation("glu", ELEMENTWISE["gelu_tanh"], False),
    "clamped_glu": Activation("clamped_glu", None, False, alpha=1.702, limit=0.7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_matches_the_activation_table(monkeypatch, name, dtype):
    monkeypatch.setattr(OPTIONS, "poison_outputs", True)
    activation = ACTIVATIONS[name]
    inner = 300  # two column tiles, the second partial
    g = torch.Generator().manual_seed(len(name))
    h = (2 * torch.randn(21, 2 * inner if activation.gated else inner, generator=g)).to(dtype)
    h[3, 5], h[5, 1] = float("nan"), -float("inf")
    if name != "gelu":  # torch's erf gelu of +Inf is NaN, the kernels' Inf (as up_proj's epilogue: the same act_fn)
        h[4, 7] = float("inf")
    counts = torch.tensor([6, 0, 11], dtype=torch.int64)  # 17 routed rows of 21
    a = act_forward(h.to(DEVICE), counts.to(DEVICE), activation).cpu()
    expected = activation.forward(h[:17])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a[:17], expected, rtol=tol, atol=tol, equal_nan=True)
    assert torch.isnan(a[17:]).all(), "a row past the routed ones was written"
    assert act_forward(h[:0].to(DEVICE), counts.to(DEVICE) * 0, activation).shape == (0, inner)
