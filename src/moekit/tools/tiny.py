"""Tiny random Hugging Face MoE models, built from configs (nothing is downloaded).

Used by ``moekit check --tiny MODEL_TYPE`` and by the test suite. Every builder returns a causal LM with 2-3
layers, hidden size 64, 8 routed experts, top-k 2-3 and a vocabulary of 128, whose parameters are all
re-initialised with fresh random values (nonzero biases, nonzero routing correction biases, norm weights
around 1) so that no term is zero and the experts' outputs matter.

    build(model_type, dtype=torch.float32, experts_implementation="eager", seed=0) -> model (eval mode)
    MODEL_TYPES                                   every registered model type
    lora_target_parameters(model)                 PEFT ``target_parameters`` for the model's expert weights
    add_lora(model)                               PEFT LoRA on the expert weights with random (live) factors
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..enable import experts_modules

VOCAB = 128
HIDDEN = 64
NUM_EXPERTS = 8

# Attention-side settings shared by most configs.
_ATTN = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# Token ids: keep them inside the tiny vocabulary.
_TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def _nemotron_h() -> dict:
    return dict(
        layers_block_type=["moe", "full_attention", "moe"],
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        intermediate_size=48,
        hidden_size=HIDDEN,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=8,
        routed_scaling_factor=2.5,
        use_mamba_kernels=False,
        # no KV cache: these models train and never generate, and transformers 5.25's NemotronH cache fails when
        # layer 0 is not attention (DummyLayer has no get_seq_length)
        use_cache=False,
        **_TOKENS,
    )


def _nemotron_h_latent() -> dict:
    return dict(_nemotron_h(), moe_latent_size=24, n_group=2, topk_group=1)


def _qwen2_moe() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        **_ATTN,
        **_TOKENS,
    )


def _qwen3_moe() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        head_dim=16,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        **_ATTN,
        **_TOKENS,
    )


def _qwen3_next() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        **_ATTN,
        **_TOKENS,
    )


def _mixtral() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        **_ATTN,
        **_TOKENS,
    )


def _deepseek_v3() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        n_shared_experts=1,
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        **_TOKENS,
    )


def _glm4_moe() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        n_shared_experts=1,
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        routed_scaling_factor=1.5,
        use_qk_norm=True,
        **_ATTN,
        **_TOKENS,
    )


def _minimax_m2() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        **_ATTN,
        **_TOKENS,
    )


def _gpt_oss() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **_ATTN,
        **_TOKENS,
    )


def _olmoe() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        **_ATTN,
        **_TOKENS,
    )


def _granitemoe() -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=2.0,
        **_ATTN,
        **_TOKENS,
    )


# registry name -> (HF model_type, config kwargs)
_REGISTRY: dict[str, tuple[str, Callable[[], dict]]] = {
    "nemotron_h": ("nemotron_h", _nemotron_h),
    "nemotron_h_latent": ("nemotron_h", _nemotron_h_latent),
    "qwen2_moe": ("qwen2_moe", _qwen2_moe),
    "qwen3_moe": ("qwen3_moe", _qwen3_moe),
    "qwen3_next": ("qwen3_next", _qwen3_next),
    "mixtral": ("mixtral", _mixtral),
    "deepseek_v3": ("deepseek_v3", _deepseek_v3),
    "glm4_moe": ("glm4_moe", _glm4_moe),
    "minimax_m2": ("minimax_m2", _minimax_m2),
    "gpt_oss": ("gpt_oss", _gpt_oss),
    "olmoe": ("olmoe", _olmoe),
    "granitemoe": ("granitemoe", _granitemoe),
}

MODEL_TYPES: list[str] = list(_REGISTRY)

# gpt-oss clamps its SwiGLU at ``limit`` (7.0 in the checkpoints). Tiny random activations never get near 7, so
# the tiny model lowers the limit on its experts modules to exercise both clamp branches (the backends read
# ``module.limit``; transformers 5.17 hard-codes it in __init__, so it is set on the instance, not the config).
# bf16 comparisons keep the real 7.0: a clamp decided on the other side of the limit by one bf16 rounding is a
# discontinuity, like a flipped top-k choice, and says nothing about the backend.
GPT_OSS_TEST_LIMIT = 1.0


def make_config(model_type: str, experts_implementation: str | None = "eager", **overrides):
    """The tiny config of ``model_type`` (a registry name)."""
    hf_type, kwargs = _REGISTRY[model_type]
    kwargs = dict(kwargs(), **overrides)
    config = AutoConfig.for_model(hf_type, **kwargs)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    # Eager attention everywhere: deterministic and identical on both sides of every comparison.
    config._attn_implementation = "eager"
    return config


def lora_target_parameters(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_parameters`` covering both projections of every experts module, from the ``has_gate`` flag."""
    names: list[str] = []
    for module in experts_modules(model):
        up = "gate_up_proj" if module.has_gate else "up_proj"
        for name in (f"experts.{up}", "experts.down_proj"):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no experts module")
    return names


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Give every parameter (and routing-correction buffer) fresh nonzero random values, deterministically."""
    generator = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.dim() == 1 and ("norm" in name or leaf == "weight"):
            # Norm scales: around 1 (RMSNorm / LayerNorm / gated norms).
            value = 1.0 + 0.1 * randn(param.shape)
        elif leaf == "A_log":
            # Mamba decay: A = -exp(A_log) in a sensible range.
            value = torch.log(torch.rand(param.shape, generator=generator) * 8.0 + 1.0)
        elif leaf == "dt_bias":
            value = -2.0 + 0.5 * randn(param.shape)
        elif leaf == "D":
            value = 1.0 + 0.1 * randn(param.shape)
        elif param.dim() == 1 or "bias" in leaf:
            value = 0.05 * randn(param.shape)
        elif ".gate.weight" in name or ".router.weight" in name:
            # Routers: spread the logits so that no near-ties decide the top-k.
            value = 0.3 * randn(param.shape)
        else:
            value = std * randn(param.shape)
        param.copy_(value.to(param.dtype))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_((0.1 * randn(buffer.shape)).to(buffer.dtype))
    return model


def build(
    model_type: str,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = "eager",
    seed: int = 0,
    gpt_oss_limit: float | None = GPT_OSS_TEST_LIMIT,
    **config_overrides,
) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` in ``dtype``, in eval mode (no dropout), weights from ``seed``.

    ``gpt_oss_limit``: the SwiGLU clamp set on gpt-oss experts (None keeps the model's own 7.0).
    """
    config = make_config(model_type, experts_implementation=experts_implementation, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "gpt_oss" and gpt_oss_limit is not None:
        for module in experts_modules(model):
            module.limit = gpt_oss_limit
    reinit_(model, seed=seed)
    model.to(dtype)
    model.eval()
    return model


def sample_batch(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, seq] (no special tokens)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def add_lora(model: torch.nn.Module, seed: int = 0, r: int = 4, alpha: int = 8):
    """``peft.get_peft_model`` with LoRA on both expert projections; A and B re-initialised to random values."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=lora_target_parameters(model))
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                value = 0.1 * torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(value.to(param.dtype))
    return peft_model
