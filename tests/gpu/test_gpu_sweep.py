"""The Triton engine against the reference engine, both against float64: the four benchmark model shapes, a
seeded random sweep of odd shapes, every activation, both weight orientations, biases, sentinel slots, zero
tokens, and (on the GPU) a call whose T·K·H exceeds 2³¹ (int64 offsets). Forward output and every gradient, in
bf16 and fp32, every Triton output NaN-poisoned. The rule is ``gpu_cases.problems``."""

from __future__ import annotations

import random

import pytest
import torch
from gpu_cases import ACTS, Case, build_experts, check, cpu_mode, problems, routed_inputs, run, truth_model, with_tokens

pytestmark = pytest.mark.gpu

MODEL_SHAPES = [
    Case("nemotron3-nano", "nemotron_h", 512, 2688, 1856, 128, 6),
    Case("qwen3-30b-a3b", "qwen3_moe", 512, 2048, 768, 128, 8),
    # expert parallelism: half the slots are sentinels (another rank's experts)
    Case("qwen3-30b-a3b-ep", "qwen3_moe", 512, 2048, 768, 128, 8, sentinels=0.5),
    Case("gpt-oss-20b", "gpt_oss", 512, 2880, 2880, 32, 4),
    Case("mixtral-8x7b", "qwen3_moe", 512, 4096, 14336, 8, 2),
]
# (family, act): every activation moekit's kernels implement, on the family whose layout carries it.
SPECS = [("nemotron_h", act) for act in ACTS] + [("qwen3_moe", act) for act in ("silu", "gelu", "gelu_tanh")]
SPECS.append(("gpt_oss", None))


def random_cases(count: int = 12, seed: int = 1234) -> list[Case]:
    """Odd shapes, drawn once from a fixed seed (the same cases on every run); at most 2²⁶ weights a module."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        experts = rng.choice([1, 2, 3, 8, 17, 64, 128, 512])
        hidden, inter = rng.choice([24, 64, 96, 200, 576, 1000]), rng.choice([20, 32, 100, 256, 768, 1856])
        family, act = rng.choice(SPECS)
        tokens, top_k = rng.choice([1, 3, 50, 257, 1000]), rng.randint(1, min(experts, 22))
        transposed, bias, sentinels = rng.random() < 0.5, rng.random() < 0.5, rng.choice([0.0, 0.0, 0.3])
        if experts * hidden * inter * (2 if family != "nemotron_h" else 1) > 1 << 26:
            continue
        name = f"random{len(cases)}-{family}-{act or 'clamped'}"
        cases.append(Case(name, family, tokens, hidden, inter, experts, top_k, act, transposed, bias, sentinels,
                          seed=len(cases) + 10))  # fmt: skip
    return cases


def gpu_cases() -> list[Case]:
    return [*MODEL_SHAPES, *random_cases(), Case("zero-tokens", "qwen3_moe", 0, 256, 128, 8, 2, bias=True)]


def cpu_cases() -> list[Case]:
    """The same code paths at interpreter sizes: each activation, both orientations, biases, sentinels, E = 1,
    K = E, one token, zero tokens."""
    tiny = {"tokens": 9, "hidden": 32, "intermediate": 24, "experts": 6, "top_k": 2}
    return [
        Case("relu2", "nemotron_h", **tiny, act="relu2"),
        Case("relu-transposed-bias", "nemotron_h", **tiny, act="relu", transposed=True, bias=True),
        Case("silu-sentinels", "nemotron_h", **tiny, act="silu", sentinels=0.3),
        Case("gelu-bias", "nemotron_h", **tiny, act="gelu", bias=True),
        Case("gelu_tanh-transposed", "nemotron_h", **tiny, act="gelu_tanh", transposed=True),
        Case("swiglu-bias", "qwen3_moe", **tiny, bias=True),
        Case("geglu-transposed-sentinels", "qwen3_moe", **tiny, act="gelu", transposed=True, sentinels=0.3),
        Case("geglu_tanh", "qwen3_moe", **tiny, act="gelu_tanh"),
        Case("gpt-oss-sentinels", "gpt_oss", **{**tiny, "tokens": 7}, sentinels=0.3),
        Case("gpt-oss-untransposed", "gpt_oss", **tiny, transposed=True),
        Case("one-expert", "nemotron_h", 5, 32, 24, 1, 1, act="relu2"),
        Case("every-expert-one-token", "qwen3_moe", 1, 32, 24, 3, 3),
        Case("zero-tokens", "qwen3_moe", 0, 32, 24, 4, 2, bias=True),
    ]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = cpu_cases() if cpu_mode(metafunc.config) else gpu_cases()
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matches_reference(case, dtype, device):
    if dtype == torch.float32:
        case = with_tokens(case, min(case.tokens, 256))
    module = build_experts(case, dtype, device)
    check(module, routed_inputs(case, dtype, device), dtype)


def test_int64_offsets(device):
    """T·K·H > 2³¹: row offsets overflow int32. bf16; the truth is the reference engine in fp32 (fp64 does not
    fit beside it), each run's tensors parked on the host. GPU only (about 30 GB)."""
    if device == "cpu":
        pytest.skip("needs a GPU's memory")
    case = Case("int64-offsets", "nemotron_h", 66000, 4096, 64, 16, 8, act="relu2", bias=True)
    assert case.tokens * case.top_k * case.hidden > 2**31
    module = build_experts(case, torch.bfloat16, device)
    inputs = routed_inputs(case, torch.bfloat16, device)
    ours = run(module, "triton", inputs, to_host=True, poison_outputs=True)
    torch.cuda.empty_cache()
    ref = run(module, "reference", inputs, to_host=True)
    torch.cuda.empty_cache()
    truth = run(truth_model(module, torch.float32), "reference", inputs, torch.float32, to_host=True)
    found = problems(ours, ref, truth, torch.bfloat16)
    assert not found, "Triton engine off the reference:\n  " + "\n  ".join(found)
