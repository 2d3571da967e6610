"""Stand-alone HF experts modules with fresh random weights, for engine-level tests.

Three families cover every layout moekit must honour:
  nemotron_h: non-gated relu², [E, out, in]
  qwen3_moe:  gated SwiGLU, concatenated, [E, out, in]
  gpt_oss:    clamped gate, interleaved, transposed [E, in, out], biases
"""

from __future__ import annotations

import functools

import torch
import transformers
from transformers import GptOssConfig, NemotronHConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from moekit.backend import triton_blocker
from moekit.layout import ExpertsCall, Projection
from moekit.lora import LoraFactors

FAMILIES = ("nemotron_h", "qwen3_moe", "gpt_oss")


@functools.cache
def eager_takes_sentinels() -> bool:
    """Whether transformers' eager Qwen3-MoE experts accept expert-parallel sentinel ids (id == num_experts), the
    oracle of the sentinel tests; 5.17's one-hot over num_experts rejects them (the tests then skip that oracle)."""
    module = make_experts("qwen3_moe", hidden=8, intermediate=4, num_experts=2)
    try:
        module(torch.randn(2, 8), torch.tensor([[0, 2], [2, 1]]), torch.ones(2, 2))
    except RuntimeError:
        return False
    return True


SENTINELS_SKIP = f"transformers {transformers.__version__}'s eager experts take no sentinel ids (one-hot over E)"


def make_experts(
    family: str,
    hidden: int = 32,
    intermediate: int = 24,
    num_experts: int = 6,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    implementation: str = "eager",
) -> torch.nn.Module:
    if family == "nemotron_h":
        config = NemotronHConfig(
            hidden_size=hidden, moe_intermediate_size=intermediate, n_routed_experts=num_experts, mlp_hidden_act="relu2"
        )
        module = NemotronHExperts(config)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=num_experts)
        module = Qwen3MoeExperts(config)
    elif family == "gpt_oss":
        config = GptOssConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num_experts)
        module = GptOssExperts(config)
    else:
        raise ValueError(family)
    config._experts_implementation = implementation
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            # Large enough that gpt-oss's clamp at 7 is hit by some activations.
            scale = 0.5 if param.dim() == 3 else 1.0
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module.to(dtype)


def make_inputs(
    num_tokens: int,
    hidden: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype = torch.float32,
    weights_dtype: torch.dtype | None = None,
    seed: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden states, distinct top-k expert ids per token, softmax routing weights."""
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    top_values, top_index = logits.topk(top_k, dim=-1)
    weights = top_values.softmax(-1).to(weights_dtype or dtype)
    return hidden_states, top_index, weights


def run_experts(module: torch.nn.Module, implementation: str, hidden_states, top_k_index, top_k_weights):
    """Forward + backward through ``implementation``; returns output and grads of inputs and parameters."""
    module.config._experts_implementation = implementation
    x = hidden_states.detach().clone().requires_grad_(True)
    w = top_k_weights.detach().clone().requires_grad_(True)
    for param in module.parameters():
        param.grad = None
    out = module(x, top_k_index, w)
    generator = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.shape, generator=generator).to(out.dtype)
    (out.float() * upstream.float()).sum().backward()
    grads = {"x": x.grad, "routing_weights": w.grad}
    grads.update({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
    return out.detach(), grads


class Block(torch.nn.Module):
    """The smallest model PEFT can wrap: a parent holding ``experts``."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.experts(hidden_states, top_k_index, top_k_weights)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def _factors(lora) -> LoraFactors | None:
    """LoRA given to the test harnesses as None, (A, B), (A, B, scale) or ``LoraFactors``."""
    return None if lora is None else LoraFactors(*lora)


def call_engine(
    engine, layout, plan, x, routing_weights, up_weight, up_bias, down_weight, down_bias, up_lora=None, down_lora=None
):
    """``engine(call, plan, x, routing_weights)`` (an engine's ``run`` or checked entry) on loose tensors."""
    call = ExpertsCall(
        layout,
        Projection(up_weight, up_bias, _factors(up_lora)),
        Projection(down_weight, down_bias, _factors(down_lora)),
    )
    return engine(call, plan, x, routing_weights)


def supported(layout, x, up_lora=None, down_lora=None) -> bool:
    """Whether the Triton engine covers this call (``moekit.backend.triton_blocker``)."""
    return triton_blocker(x, layout, _factors(up_lora), _factors(down_lora)) is None
