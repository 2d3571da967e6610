"""Expert-layer benchmark: transformers' backends against moekit's engines on real model shapes.

One record per (shape, impl, mode, tokens): median ms over timed repeats (CUDA events on GPU), TFLOP/s with
the FLOP counts of ``performance-anchors.md`` (gated fwd 6·T·K·H·I, non-gated 4·T·K·H·I; full = 3× fwd,
LoRA = 2× fwd) and the peak memory allocated during the timed step.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    gated: bool
    act: str  # "relu2", "silu", "gpt_oss"

    def forward_flops(self, tokens: int) -> float:
        return (6 if self.gated else 4) * tokens * self.top_k * self.hidden * self.intermediate


PRESETS = {
    shape.name: shape
    for shape in (
        Shape("nemotron3-nano", 2688, 1856, 128, 6, gated=False, act="relu2"),
        Shape("qwen3-30b-a3b", 2048, 768, 128, 8, gated=True, act="silu"),
        Shape("gpt-oss-20b", 2880, 2880, 32, 4, gated=True, act="gpt_oss"),
        Shape("mixtral-8x7b", 4096, 14336, 8, 2, gated=True, act="silu"),
        Shape("deepseek-v3", 7168, 2048, 256, 8, gated=True, act="silu"),
        # NemotronH with a latent MoE: experts run in a 1024-wide latent space.
        Shape("nemotron-latent", 1024, 2688, 512, 22, gated=False, act="relu2"),
        Shape("tiny", 256, 128, 16, 4, gated=True, act="silu"),
    )
}

IMPLS = ("eager", "grouped_mm", "moekit", "moekit-reference", "moekit-triton")
MODES = ("fwd", "full", "lora")


def make_experts_module(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A transformers experts module of the given shape (NemotronH, Qwen3-MoE or gpt-oss class)."""
    from transformers import GptOssConfig, NemotronHConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    if shape.act == "gpt_oss":
        module = GptOssExperts(
            GptOssConfig(
                hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_local_experts=shape.num_experts
            )
        )
    elif shape.gated:
        module = Qwen3MoeExperts(
            Qwen3MoeConfig(
                hidden_size=shape.hidden,
                moe_intermediate_size=shape.intermediate,
                num_experts=shape.num_experts,
                hidden_act=shape.act,
            )
        )
    else:
        module = NemotronHExperts(
            NemotronHConfig(
                hidden_size=shape.hidden,
                moe_intermediate_size=shape.intermediate,
                n_routed_experts=shape.num_experts,
                mlp_hidden_act=shape.act,
            )
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param.shape[-1] if not getattr(module, "is_transposed", False) else param.shape[-2]
            std = fan_in**-0.5 if param.dim() == 3 else 0.02
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module.to(device=device, dtype=dtype)


def make_routing(shape: Shape, tokens: int, device: str, dtype: torch.dtype, seed: int = 1):
    """hidden [T, H], top-k ids [T, K] and softmax weights [T, K] from Gaussian router logits."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, shape.hidden, device=device, generator=generator).to(dtype)
    logits = torch.randn(tokens, shape.num_experts, device=device, generator=generator)
    values, index = logits.topk(shape.top_k, dim=-1)
    return hidden, index, values.softmax(-1).to(dtype)


def _select(module: torch.nn.Module, impl: str) -> None:
    if impl.startswith("moekit"):
        import moekit

        moekit.enable(module)
        os.environ["MOEKIT_BACKEND"] = impl.split("-", 1)[1] if "-" in impl else ""
    else:
        module.config._experts_implementation = impl


def _wrap_lora(module: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

        def forward(self, *args):
            return self.experts(*args)

    up = "experts.gate_up_proj" if module.has_gate else "experts.up_proj"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=[up, "experts.down_proj"])
    model = get_peft_model(Block(module), config)
    for name, param in model.named_parameters():  # non-zero B so the adapter is live
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return model


def _timer(device: str):
    if device.startswith("cuda"):

        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return measure

    def measure_cpu(fn) -> float:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    return measure_cpu


def run_case(
    shape: Shape,
    impl: str,
    mode: str,
    tokens: int,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    lora_rank: int = 16,
    warmup: int = 3,
    repeats: int = 10,
    card: str | None = None,
) -> dict:
    """Time one configuration; returns a JSON-ready record."""
    module = make_experts_module(shape, device, dtype)
    _select(module, impl)
    model = module
    if mode == "lora":
        model = _wrap_lora(module, lora_rank)
    else:
        module.requires_grad_(mode == "full")
    hidden, index, weights = make_routing(shape, tokens, device, dtype)
    if mode != "fwd":
        hidden.requires_grad_(True)
        weights.requires_grad_(True)
    upstream = torch.randn_like(hidden)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(hidden, index, weights)
        else:
            out = model(hidden, index, weights)
            out.backward(upstream)
            hidden.grad = weights.grad = None
            for param in model.parameters():
                param.grad = None

    measure = _timer(device)
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [measure(step) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    ms = statistics.median(times)
    flops = shape.forward_flops(tokens) * {"fwd": 1, "full": 3, "lora": 2}[mode]
    record = {
        "card": card or (torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
        "shape": shape.name,
        "shape_dims": asdict(shape),
        "impl": impl,
        "mode": mode,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_rank": lora_rank if mode == "lora" else None,
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "peak_gib": peak,
    }
    del model, module, hidden, index, weights, upstream
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    os.environ.pop("MOEKIT_BACKEND", None)
    return record


def dense_matmul_tflops(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's measured dense GEMM rate, the ceiling every other number is read against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    measure = _timer(device)
    for _ in range(3):
        a @ b
    ms = statistics.median(measure(lambda: a @ b) for _ in range(10))
    return 2 * size**3 / (ms * 1e-3) / 1e12
