"""Helpers the model-level tests share, on top of ``moekit.tools.tiny`` (the tiny random models themselves).

``rel_err`` (max|a-b| / max|b|), ``forward_backward``, ``RoutingRecorder`` (top-k choices of every experts call)
and ``torch_threads``; the model registry (``build``, ``MODEL_TYPES``, ``add_lora``, ...) is re-exported.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from moekit.enable import experts_modules
from moekit.tools.tiny import (  # noqa: F401  (re-exported for the tests)
    GPT_OSS_TEST_LIMIT,
    HIDDEN,
    MODEL_TYPES,
    NUM_EXPERTS,
    VOCAB,
    add_lora,
    build,
    lora_target_parameters,
    make_config,
    reinit_,
    sample_batch,
)

# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers shared by the parity and training tests.
# ---------------------------------------------------------------------------------------------------------------

FP32_TOL = 2e-5
BF16_TOL = 3e-2


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max|b| (absolute error when ``expected`` is all zeros)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch {tuple(actual.shape)} vs {tuple(expected.shape)}")
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): "ce" is the model's own causal-LM loss with labels=input_ids, "sumsq" is sum(logits²)."""
    if loss == "ce":
        out = model(input_ids=input_ids, labels=input_ids)
        return out.loss, out.logits
    if loss == "sumsq":
        logits = model(input_ids=input_ids).logits
        return logits.float().square().sum(), logits
    raise ValueError(loss)


def forward_backward(
    model: torch.nn.Module, input_ids: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Run one forward and backward; returns (logits, {trainable parameter name: grad})."""
    model.zero_grad(set_to_none=True)
    value, logits = lm_loss(model, input_ids, loss)
    value.backward()
    grads = {name: (p.grad.detach().clone() if p.grad is not None else None)
             for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    return logits.detach(), grads


class RoutingRecorder:
    """Records the top-k expert choice (sorted per token) of every experts-module call, via forward pre-hooks.

    Use as a context manager around a forward (and backward); ``calls`` is then one (experts module number,
    [T, K] routing) per experts call, in call order (a gradient-checkpointing recompute adds calls).
    """

    def __init__(self, model: torch.nn.Module):
        self.modules = experts_modules(model)
        self.calls: list[tuple[int, torch.Tensor]] = []
        self._handles = []

    def _hook(self, number, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        self.calls.append((number, torch.sort(index.detach(), dim=-1).values.clone()))

    def __enter__(self):
        self.calls = []
        self._handles = [
            m.register_forward_pre_hook(functools.partial(self._hook, number), with_kwargs=True)
            for number, m in enumerate(self.modules)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def same_as(self, other: RoutingRecorder) -> bool:
        return len(self.calls) == len(other.calls) and all(
            n == m and torch.equal(a, b) for (n, a), (m, b) in zip(self.calls, other.calls)
        )

    def per_module(self) -> dict[int, list[torch.Tensor]]:
        routes: dict[int, list[torch.Tensor]] = {}
        for number, route in self.calls:
            routes.setdefault(number, []).append(route)
        return routes


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Run torch on ``count`` intra-op threads inside the block (restored after).

    These models are so small that one thread is as fast as two, and on a busy 2-core machine OpenMP threads
    waiting on each other made the suite 3-20x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
