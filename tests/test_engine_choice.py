"""Which engine runs a call (``moekit.backend.select_engine``, the one place that decides), and the output dtype
under autocast.

- MOEKIT_BACKEND unset: the reference engine on the CPU (even with TRITON_INTERPRET=1), and for every call the
  kernels do not cover.
- MOEKIT_BACKEND=triton with TRITON_INTERPRET=1 runs the Triton engine on the CPU through the normal model path.
- A forced Triton engine that cannot run a call raises, naming why; it never falls back to the reference engine.
- Under autocast, the output dtype is that of the hidden states, as in transformers' grouped_mm.
"""

from __future__ import annotations

import re

import pytest
import torch
from experts_factory import Block, call_engine, make_experts, make_inputs, rel_err, run_experts, supported

import moekit
import moekit.backend
import moekit.engines.triton
import moekit.options
from moekit.backend import experts_layout, select_engine
from moekit.lora import LoraFactors
from moekit.options import OPTIONS
from moekit.plan import build_plan

INTERPRETER = moekit.backend.triton_available("cpu")
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not INTERPRETER, reason="the Triton interpreter on the CPU (TRITON_INTERPRET=1)"
)


@pytest.fixture
def triton_calls(monkeypatch) -> list[int]:
    """One entry per call that reached the Triton engine through the backend."""
    calls: list[int] = []
    original = moekit.engines.triton.run

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moekit.engines.triton, "run", spy)
    return calls


def _softplus_experts(dtype=torch.float32):
    module = make_experts("qwen3_moe", dtype=dtype)
    module.act_fn = torch.nn.Softplus()  # not in the table: a custom activation
    module.__dict__.pop("_moekit_layout", None)
    return module


# ---------------------------------------------------------------------------------------------- default
def test_default_on_the_cpu_is_the_reference_engine(monkeypatch, triton_calls):
    monkeypatch.setattr(OPTIONS, "backend", "")
    module = make_experts("nemotron_h")
    assert select_engine(torch.randn(2, 32), experts_layout(module)) == "reference"
    run_experts(module, "moekit", *make_inputs(12, 32, 6, 2))
    assert triton_calls == []


@pytest.mark.parametrize("case", ["float64", "custom_activation", "float64_lora"])
def test_unforced_uncovered_calls_go_to_the_reference_engine(monkeypatch, case):
    monkeypatch.setattr(OPTIONS, "backend", "")
    dtype = torch.float64 if case.startswith("float64") else torch.float32
    module = _softplus_experts(dtype) if case == "custom_activation" else make_experts("qwen3_moe", dtype=dtype)
    lora = LoraFactors(torch.randn(6, 2, 32, dtype=dtype), torch.randn(6, 48, 2, dtype=dtype), 0.5)
    up_lora = lora if case == "float64_lora" else None
    assert select_engine(torch.randn(2, 32, dtype=dtype), experts_layout(module), up_lora=up_lora) == "reference"
    ours = run_experts(module, "moekit", *make_inputs(12, 32, 6, 2, dtype=dtype))
    theirs = run_experts(module, "eager", *make_inputs(12, 32, 6, 2, dtype=dtype))
    assert rel_err(ours[0], theirs[0]) <= 1e-5


def test_bad_backend_name_is_refused(monkeypatch):
    """A bad MOEKIT_BACKEND does not break ``import moekit``; the first engine choice raises it, in one line."""
    monkeypatch.setenv("MOEKIT_BACKEND", "cuda")
    options, error = moekit.options._initial()  # what ``import moekit`` does with this environment
    assert options == moekit.options.Options() and isinstance(error, moekit.options.OptionsError)
    monkeypatch.setattr(moekit.options, "_ENV_ERROR", error)
    with pytest.raises(ValueError, match="^MOEKIT_BACKEND must be one of .*reference, triton; got 'cuda'$"):
        select_engine(torch.randn(2, 32), experts_layout(make_experts("qwen3_moe")))


# ---------------------------------------------------------------------------------------------- forced
@needs_interpreter
@pytest.mark.triton
@pytest.mark.parametrize("family", ["nemotron_h", "gpt_oss"])
def test_forced_triton_runs_on_the_cpu_through_the_model_path(monkeypatch, triton_calls, family):
    """A PEFT model (LoRA on both expert weights) through moekit.enable: the Triton engine runs under the
    interpreter, and its output and every gradient match the reference engine's."""
    from peft import LoraConfig, get_peft_model

    def run(backend):
        monkeypatch.setattr(OPTIONS, "backend", backend)
        module = make_experts(family, hidden=16, intermediate=8, num_experts=4)
        up = "gate_up_proj" if module.has_gate else "up_proj"
        targets = [f"experts.{up}", "experts.down_proj"]
        config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=targets, init_lora_weights=False)
        torch.manual_seed(0)  # the same random, non-zero LoRA factors on both sides
        model = moekit.enable(get_peft_model(Block(module), config))
        generator = torch.Generator().manual_seed(3)
        x, index, weights = make_inputs(7, 16, 4, 2)
        x.requires_grad_(True)
        out = model(x, index, weights)
        (out * torch.randn(out.shape, generator=generator)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.detach(), x.grad, grads

    ours = run("triton")
    assert len(triton_calls) == 1
    theirs = run("reference")
    assert len(triton_calls) == 1
    assert rel_err(ours[0], theirs[0]) <= 1e-5
    assert rel_err(ours[1], theirs[1]) <= 1e-5
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) == 4
    for name in theirs[2]:
        assert rel_err(ours[2][name], theirs[2][name]) <= 1e-5, name


def _forced_triton_error(module, dtype=torch.float32, up_lora=None):
    x, index, weights = make_inputs(6, 32, 6, 2, dtype=dtype)
    with pytest.raises(RuntimeError, match="MOEKIT_BACKEND=triton, but the Triton engine cannot run here") as error:
        select_engine(x, experts_layout(module), up_lora=up_lora)
    with pytest.raises(RuntimeError, match="MOEKIT_BACKEND=triton"):  # the model path, not a silent fallback
        module(x, index, weights)
    return str(error.value)


@needs_interpreter
@pytest.mark.parametrize(
    "case, reason",
    [
        ("float64", "hidden_states is torch.float64"),
        ("custom_activation", "activation is not in moekit's activation table"),
        ("lora_float64", "up projection's LoRA factor A is torch.float64"),
        ("lora_shape", "LoRA factors must be A \\[E, R, in\\] and B \\[E, out, R\\]"),
        ("no_interpreter", "the CPU with TRITON_INTERPRET=1"),
    ],
)
def test_forced_triton_that_cannot_run_raises_naming_why(monkeypatch, case, reason):
    monkeypatch.setattr(OPTIONS, "backend", "triton")
    dtype = torch.float64 if case == "float64" else torch.float32
    module = _softplus_experts() if case == "custom_activation" else make_experts("qwen3_moe", dtype=dtype)
    module.config._experts_implementation = "moekit"
    up_lora = None
    if case == "lora_float64":
        up_lora = LoraFactors(torch.randn(6, 2, 32, dtype=torch.float64), torch.randn(6, 48, 2), 0.5)
    if case == "lora_shape":
        up_lora = LoraFactors(torch.randn(6, 2, 32), torch.randn(6, 48, 3), 0.5)
    if case == "no_interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    if up_lora is None:
        message = _forced_triton_error(module, dtype)
    else:
        with pytest.raises(RuntimeError, match="MOEKIT_BACKEND=triton") as error:
            select_engine(torch.randn(6, 32), experts_layout(module), up_lora=up_lora)
        message = str(error.value)
    assert re.search(reason, message), message


@needs_interpreter
def test_experts_triton_called_directly_never_falls_back(triton_calls):
    """The engine entry point itself refuses what its kernels do not cover (it used to run the reference)."""
    module = make_experts("qwen3_moe", dtype=torch.float64)
    x, index, weights = make_inputs(6, 32, 6, 2, dtype=torch.float64)
    up, down = module.gate_up_proj, module.down_proj
    with pytest.raises(RuntimeError, match="the Triton engine cannot run this call: hidden_states is torch.float64"):
        call_engine(
            moekit.engines.triton.experts_triton,
            experts_layout(module),
            build_plan(index, 6),
            x,
            weights,
            up,
            None,
            down,
            None,
        )
    assert not supported(experts_layout(module), x)
    assert supported(experts_layout(module), x.float())


# ---------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_autocast_output_dtype_follows_grouped_mm(monkeypatch, family):
    """bf16 hidden states, fp32 weights, CPU autocast: like transformers' grouped_mm, the GEMMs run in the weights'
    dtype (fp32) and the output comes back in bf16; values and the hidden-state gradient match grouped_mm's."""
    monkeypatch.setattr(OPTIONS, "backend", "")
    module = make_experts(family, hidden=32, intermediate=24, num_experts=6)
    x, index, weights = make_inputs(20, 32, 6, 2, dtype=torch.bfloat16, weights_dtype=torch.float32)
    upstream = torch.randn(20, 32, generator=torch.Generator().manual_seed(5))

    def run(implementation):
        module.config._experts_implementation = implementation
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(leaf, index, weights)
        (out.float() * upstream).sum().backward()
        return out, leaf.grad

    (out, grad), (expected, expected_grad) = run("moekit"), run("grouped_mm")
    assert out.dtype == expected.dtype == torch.bfloat16
    assert grad.dtype == torch.bfloat16
    assert rel_err(out.float(), expected.float()) <= 1e-2
    assert rel_err(grad.float(), expected_grad.float()) <= 1e-2
    # The GEMMs ran in fp32: the output is the fp32 computation rounded once, not a bf16 computation.
    module.config._experts_implementation = "moekit"
    exact = module(x.float(), index, weights)
    assert rel_err(out.float(), exact) <= 2**-8
