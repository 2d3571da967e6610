"""PEFT LoRA on the expert weights: the Triton engine against the reference engine, both against float64, at
real sizes. Factors in PEFT's own layout and dtype (fp32 ``lora_A`` [R·E, in], ``lora_B`` [out, R·E]), non-zero;
frozen and trainable base, several active adapters, ranks 16 and 64, both ways of running the big GEMMs that
carry a LoRA term (``lora_gemm``: fused in one Triton kernel, or split: grouped_mm plus an in-place add). Output
and every gradient (hidden states, routing weights, every factor, the base when it trains), bf16 (and fp32 at
T <= 512), every Triton output NaN-poisoned. The rule is ``gpu_cases.problems``."""

from __future__ import annotations

import pytest
import torch
from gpu_cases import LoraCase, build_lora_model, check, cpu_mode, routed_inputs

pytestmark = pytest.mark.gpu

SHAPES = {
    "nemotron3-nano": ("nemotron_h", 2688, 1856, 128, 6),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8),
    "gpt-oss-20b": ("gpt_oss", 2880, 2880, 32, 4),
}


def _case(shape: str, tokens: int, tag: str = "", **kw) -> LoraCase:
    family, hidden, inter, experts, top_k = SHAPES[shape]
    name = f"{shape}-T{tokens}" + (f"-{tag}" if tag else "")
    return LoraCase(name, family, tokens, hidden, inter, experts, top_k, **kw)


def gpu_cases() -> list[LoraCase]:
    """Nemotron-3-Nano and Qwen3-30B-A3B at r = 16 up to 8k tokens, r = 64 at 8k, a trainable base, three adapters
    (r = 8 + 16 + 64); gpt-oss (K = 2880: split under auto) with a trainable base; each shape with the LoRA GEMMs
    forced fused and forced split. Grouped by shape: the suite keeps the last two shapes' weights."""
    cases = []
    for shape in SHAPES:
        if shape != "gpt-oss-20b":
            cases += [_case(shape, tokens, "r16") for tokens in (512, 2048, 8192)]
            cases.append(_case(shape, 8192, "r64", ranks=(64,)))
            cases.append(_case(shape, 2048, "r16-base", trainable_base=True))
            cases.append(_case(shape, 512, "r8+16+64", ranks=(8, 16, 64)))
        else:
            cases.append(_case(shape, 512, "r16-base", trainable_base=True))
        cases += [_case(shape, 512, f"r16-{mode}", lora_gemm=mode) for mode in ("fused", "split")]
    return cases


def cpu_cases() -> list[LoraCase]:
    tiny = {"tokens": 9, "hidden": 32, "intermediate": 24, "experts": 6, "top_k": 2, "ranks": (4,)}
    return [
        LoraCase("relu2", "nemotron_h", **tiny),
        LoraCase("relu2-2-adapters-split", "nemotron_h", **{**tiny, "ranks": (2, 3)}, lora_gemm="split"),
        LoraCase("swiglu-base", "qwen3_moe", **tiny, trainable_base=True),
        LoraCase("swiglu-split", "qwen3_moe", **tiny, lora_gemm="split"),
        LoraCase("gpt-oss-fused", "gpt_oss", **tiny, lora_gemm="fused"),
        LoraCase("gpt-oss-split-base", "gpt_oss", **tiny, lora_gemm="split", trainable_base=True),
        LoraCase("swiglu-sentinels", "qwen3_moe", **tiny, sentinels=0.3),
    ]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = cpu_cases() if cpu_mode(metafunc.config) else gpu_cases()
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lora_matches_reference(case, dtype, device):
    if dtype == torch.float32 and case.tokens > 512:
        pytest.skip("fp32 runs at T <= 512")
    model = build_lora_model(case, dtype, device)
    check(model, routed_inputs(case, dtype, device), dtype, lora_gemm=case.lora_gemm)
