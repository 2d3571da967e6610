"""QLoRA at real size: a full-width MoE model from its config, NF4 experts, one LoRA training step on one GPU.

    python tools/qlora_real_size.py --model qwen3-30b-a3b [--layers 48] [--tokens 2048] [--rank 16] --out R.json

The model is built on the meta device and materialized one decoder layer at a time on the GPU with random
weights (std 0.02); each layer's experts are quantized to NF4 (``moekit.quant.experts.quantize_module``) right
after it is materialized, so no bf16 copy of more than one layer's experts ever exists. Then PEFT LoRA on every
expert weight (``target_parameters``, rank ``--rank``), gradient checkpointing, and steps of one sequence of
``--tokens`` tokens: forward, backward and a (fused, on the GPU) AdamW step on the adapters (``--adapter-dtype``: PEFT's fp32 factors
or bf16 ones). The loss (``--loss``) is the model's own (``labels=``: fp32 logits over the whole vocabulary, and
their copies in the loss) or the same next-token cross-entropy from the decoder's output in chunks of
``--loss-chunk`` tokens,
each chunk's lm_head and loss recomputed in backward (``chunked_loss``). Reported: the GPU's peak during the build, during the steps and during the first forward and
backward, before the optimizer's states exist (``torch.cuda.max_memory_allocated``), the resident weights, the adapters' parameter
bytes, tokens/s of the last steps, and the bf16 model's footprint (its parameter count x 2 bytes, computed, not
built) beside it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, NemotronHConfig, Qwen3MoeConfig

import moekit
from moekit.enable import experts_modules
from moekit.quant.experts import expert_weight_names, quantize_module
from moekit.quant.tensor import NF4Tensor, held_bytes

GIB = 1 << 30


def qwen3_30b_a3b(layers: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip


def small(layers: int) -> Qwen3MoeConfig:
    """A narrow stand-in for a quick run of this script on the CPU (``--model small --device cpu``)."""
    return Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )  # fmt: skip


def _hybrid_pattern(layers: int, attention_every: int = 8) -> list[str]:
    """Mamba-2 and MoE layers alternating, a full-attention layer in place of every ``attention_every``-th (52
    layers: 23 Mamba-2, 23 MoE and 6 attention, the counts of Nemotron-3-Nano-30B-A3B's model card; its exact
    order is not reproduced: it changes no layer's size)."""
    pattern = []
    for i in range(layers):
        others = len(pattern) - pattern.count("attention")
        pattern.append("attention" if i % attention_every == attention_every - 1 else ("mamba", "moe")[others % 2])
    return pattern


def nemotron3_nano(layers: int) -> NemotronHConfig:
    """Nemotron-3-Nano-30B-A3B's widths (relu² experts, sigmoid routing with the correction bias, a shared expert),
    the Mamba-2 layers on transformers' torch path (no mamba-ssm kernels)."""
    return NemotronHConfig(
        vocab_size=131072, hidden_size=2688, layers_block_type=_hybrid_pattern(layers), num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
        conv_kernel=4, expand=2, chunk_size=128, n_routed_experts=128, num_experts_per_tok=6,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5,
        tie_word_embeddings=False,
    )  # fmt: skip


def small_nemotron(layers: int) -> NemotronHConfig:
    """A narrow NemotronH for a quick run of this script on the CPU (``--model small-nemotron --device cpu``)."""
    return NemotronHConfig(
        vocab_size=512, hidden_size=128, layers_block_type=_hybrid_pattern(layers, attention_every=3),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32,
        ssm_state_size=16, n_groups=2, chunk_size=32, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, moe_shared_expert_intermediate_size=96, tie_word_embeddings=False,
    )  # fmt: skip


MODELS = {
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "nemotron3-nano": nemotron3_nano,
    "small": small,
    "small-nemotron": small_nemotron,
}


@torch.no_grad()
def _materialize(module: torch.nn.Module, device: torch.device, generator: torch.Generator) -> None:
    """Real storage on ``device`` for a meta module's own parameters, random: norms 1, the rest N(0, 0.02²)."""
    module.to_empty(device=device, recurse=False)
    for name, param in module.named_parameters(recurse=False):
        if "norm" in type(module).__name__.lower() or name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def build_quantized(config, device: torch.device, dtype: torch.dtype, double_quant: bool = False) -> torch.nn.Module:
    """The model with NF4 experts (``double_quant``: their scales in 8 bits), built layer by layer on ``device`` (see
    the module docstring)."""
    config._experts_implementation = moekit.BACKEND_NAME
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    experts = set(experts_modules(model))
    for module in model.modules():
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            _materialize(module, device, generator)
        if module in experts:
            quantize_module(module, double_quant=double_quant)  # this layer's bf16 experts are freed here
    rotary = getattr(model.model, "rotary_emb", None)  # buffers computed in __init__: rebuild them on the device
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    assert not any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    return moekit.enable(model)


def chunked_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The causal LM loss of ``model(input_ids=input_ids, labels=input_ids).loss`` (mean next-token cross-entropy)
    with the logits of ``chunk`` tokens at a time: the lm_head and the fp32 loss of each chunk run under
    checkpointing, so backward holds one chunk's logits, not [T, vocab] in fp32 with its copies."""
    from torch.utils.checkpoint import checkpoint

    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=input_ids).last_hidden_state[:, :-1]  # position t predicts token t + 1
    targets = input_ids[:, 1:]

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = causal_lm.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    total = sum(
        checkpoint(chunk_loss, hidden[:, i : i + chunk], targets[:, i : i + chunk], use_reentrant=False)
        for i in range(0, targets.shape[1], chunk)
    )
    return total / targets.numel()


def bf16_footprint_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) * 2 / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--adapter-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the LoRA factors' dtype (fp32: PEFT's default, autocast_adapter_dtype)",
    )
    parser.add_argument(
        "--loss",
        choices=("chunked", "model"),
        default="chunked",
        help="chunked: the cross-entropy in chunks of --loss-chunk tokens (chunked_loss); model: labels=",
    )
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument(
        "--mamba-chunk",
        type=int,
        default=None,
        help="NemotronH: the Mamba-2 scan's chunk (the model's 128 by default; the scan's result does not depend on it)",
    )
    parser.add_argument("--double-quant", action="store_true", help="the experts' NF4 scales in 8 bits")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    device, dtype = torch.device(args.device), torch.bfloat16
    cuda = device.type == "cuda"
    reset_peak = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated() / GIB) if cuda else (lambda: float("nan"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reset_peak()
    start = time.perf_counter()
    config = MODELS[args.model](args.layers)
    if args.mamba_chunk:
        config.chunk_size = args.mamba_chunk  # the scan's result does not depend on it
    model = build_quantized(config, device, dtype, args.double_quant)
    build_s = time.perf_counter() - start
    build_peak = peak()
    bf16_model = bf16_footprint_gib(model)
    nf4_bytes = sum(held_bytes(p) for p in model.parameters() if isinstance(p, NF4Tensor))
    expert_bf16_bytes = sum(p.numel() * 2 for p in model.parameters() if isinstance(p, NF4Tensor))

    experts = set(experts_modules(model))  # every expert weight of every layer (names as in named_parameters)
    names = sorted({f"{name.rsplit('.', 1)[-1]}.{weight}" for name, module in model.named_modules() if module in experts
                    for weight in expert_weight_names(module)})  # fmt: skip
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[], target_parameters=names)
    model = get_peft_model(model, lora, autocast_adapter_dtype=args.adapter_dtype == "fp32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    adapters = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.nbytes for p in adapters)
    resident = torch.cuda.memory_allocated() / GIB if cuda else float("nan")
    optimizer = torch.optim.AdamW(adapters, lr=1e-4, fused=cuda)  # fused: no temporaries the size of all adapters
    generator = torch.Generator(device=device).manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device, generator=generator)
    reset_peak()
    times, losses, backward_peak = [], [], 0.0
    for _ in range(args.steps):
        sync()
        begin = time.perf_counter()
        if args.loss == "chunked":
            loss = chunked_loss(model, input_ids, args.loss_chunk)
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if not times:  # the first forward + backward: before the optimizer's states exist
            backward_peak = peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
    step_peak = peak()
    timed = times[1:] or times  # after the first step, which compiles and tunes
    step_s = sum(timed) / len(timed)
    result = {
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model, "layers": args.layers, "tokens": args.tokens, "rank": args.rank,
        "double_quant": args.double_quant,
        "mamba_chunk": getattr(config, "chunk_size", None),  # NemotronH's Mamba-2 scan (None: no Mamba layers)
        "build_s": round(build_s, 1), "build_peak_gib": round(build_peak, 2),
        "resident_gib": round(resident, 2), "step_peak_gib": round(step_peak, 2),
        "first_backward_peak_gib": round(backward_peak, 2), "adapter_dtype": args.adapter_dtype, "loss": args.loss,
        "loss_chunk": args.loss_chunk if args.loss == "chunked" else None,
        "nf4_expert_gib": round(nf4_bytes / GIB, 2), "bf16_expert_gib": round(expert_bf16_bytes / GIB, 2),
        "adapter_gib": round(adapter_bytes / GIB, 2), "bf16_model_gib": round(bf16_model, 2),
        "step_s": round(step_s, 3), "tokens_per_s": round(args.tokens / step_s, 1), "losses": losses,
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }  # fmt: skip
    for key, value in result.items():
        print(f"{key:>16}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
