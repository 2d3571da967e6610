"""Triton engine vs reference engine: the comparison both Triton test files (base and LoRA) assert with."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in fp64 (0 for empty tensors; an all-zero b makes any difference huge)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if b.numel() else 0.0


def assert_matches(ours: list, ref: list, truth: list | None, names: tuple[str, ...], tol: float, truth_factor):
    """Output and gradients (None where absent) of the Triton engine against the reference in the same dtype
    (rel. error <= tol), or, with ``truth_factor``, both against an fp64 reference: the Triton error must be
    <= truth_factor x the reference's + tol. Same presence, shape and dtype everywhere; no NaN (poisoned,
    unwritten elements)."""
    for i, name in enumerate(names):
        o, r = ours[i], ref[i]
        assert (o is None) == (r is None), f"{name}: grad presence differs (triton {o is not None})"
        if o is None:
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, f"{name}: {o.shape}/{o.dtype} vs {r.shape}/{r.dtype}"
        assert not torch.isnan(o).any(), f"{name}: NaN (unwritten element)"
        if truth_factor:
            ours_err, ref_err = rel_err(o, truth[i]), rel_err(r, truth[i])
            assert ours_err <= truth_factor * ref_err + tol, f"{name}: err {ours_err:.3g} vs reference {ref_err:.3g}"
        else:
            err = rel_err(o, r)
            assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"
