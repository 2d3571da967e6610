"""What the GPU suite builds and how it judges a result.

Every engine runs through the user's path: a transformers experts module (``tests/experts_factory.py``) on the
"moekit" experts implementation, called as ``module(hidden_states, top_k_index, top_k_weights)`` (PEFT-wrapped for
LoRA), with the engine forced by ``moekit.options.override(backend=...)``. A forced engine that cannot run a call
raises, so a Triton case can never pass on the reference engine.

The rule (``problems``): the Triton engine's output and every gradient are compared with a truth (the reference
engine in float64, or float32 where float64 does not fit), and so is the reference engine in the same dtype as
the Triton run. bf16 passes when the Triton error is at most ``BF16_SLACK`` x the reference's + ``BF16_FLOOR``;
fp32 when it is at most ``FP32_TOL``. err = max|a - b| / max|truth|; a NaN or Inf where the truth is finite is an
infinite error, which catches the elements no kernel wrote (Triton outputs start as NaN: ``poison_outputs``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import torch
from experts_factory import Block, make_experts, make_inputs
from transformers.activations import ACT2FN

import moekit  # noqa: F401  (registers the "moekit" experts implementation)
from moekit.options import override

BF16_SLACK = 1.5
BF16_FLOOR = 6e-3
FP32_TOL = 1e-4

# Activation name -> transformers' ACT2FN key (moekit resolves the kernel's activation from the act_fn's class).
ACTS = {"relu2": "relu2", "relu": "relu", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One experts module and its routed inputs.

    family: nemotron_h (non-gated), qwen3_moe (gated SwiGLU, concatenated), gpt_oss (clamped gate, interleaved,
    stored transposed, biases). ``act`` replaces the module's activation (not gpt_oss); ``transposed`` stores the
    weights the other way round from the family's own layout; ``bias`` adds biases to a family without them;
    ``sentinels``: that fraction of the (token, slot) pairs is routed to the sentinel id E (expert parallelism).
    """

    name: str
    family: str
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    act: str | None = None
    transposed: bool = False
    bias: bool = False
    sentinels: float = 0.0
    seed: int = 0

    @property
    def id(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class LoraCase(Case):
    """PEFT LoRA on both expert projections (one adapter per rank, all active), non-zero random factors;
    ``trainable_base``: the expert weights train too; ``lora_gemm``: the option of that name (auto/split/fused)."""

    ranks: tuple[int, ...] = (16,)
    trainable_base: bool = False
    lora_gemm: str = "auto"


def cpu_mode(config) -> bool:
    """Whether pytest runs the suite on the CPU (``--gpu-suite-cpu``, an option of tests/gpu/conftest.py)."""
    return bool(config.getoption("--gpu-suite-cpu", default=False))


def with_tokens(case: Case, tokens: int) -> Case:
    return dataclasses.replace(case, tokens=tokens)


# --------------------------------------------------------------------------------------------------- modules
@functools.lru_cache(maxsize=2)
def _base_module(family: str, hidden: int, intermediate: int, experts: int, seed: int) -> torch.nn.Module:
    """fp32 module on the CPU, weights ~ N(0, 2.5² / fan_in) (pre-activations of std ~2.5: gpt-oss's clamp at 7
    is hit). Cached: random weights for a model-size module take seconds on the host, and cases share shapes."""
    module = make_experts(family, hidden, intermediate, experts, torch.float32, seed, "moekit")
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 3:  # make_experts draws N(0, 0.25)
                fan_in = param.shape[-2] if module.is_transposed else param.shape[-1]
                param.mul_(5.0 / math.sqrt(fan_in))
    return module


def _transpose_weights(module: torch.nn.Module) -> None:
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    for name in (up_name, "down_proj"):
        weight = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(weight.detach().transpose(1, 2).contiguous()))
    module.is_transposed = not module.is_transposed


def _add_biases(module: torch.nn.Module, seed: int) -> None:
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    generator = torch.Generator().manual_seed(seed + 17)
    up, down = getattr(module, up_name), module.down_proj
    up_width = up.shape[-1] if module.is_transposed else up.shape[-2]
    hidden = down.shape[-1] if module.is_transposed else down.shape[-2]
    experts = up.shape[0]
    setattr(module, f"{up_name}_bias", torch.nn.Parameter(torch.randn(experts, up_width, generator=generator) * 0.5))
    module.down_proj_bias = torch.nn.Parameter(torch.randn(experts, hidden, generator=generator) * 0.5)
    module.has_bias = True


def build_experts(case: Case, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A fresh experts module of ``case`` on ``device`` in ``dtype`` (its layout is resolved at its first call)."""
    module = copy.deepcopy(_base_module(case.family, case.hidden, case.intermediate, case.experts, case.seed))
    if case.act is not None:
        assert case.family != "gpt_oss", "gpt-oss's gate is its own _apply_gate"
        module.act_fn = ACT2FN[ACTS[case.act]]
    if case.transposed:
        _transpose_weights(module)
    if case.bias and not module.has_bias:
        _add_biases(module, case.seed)
    if case.family == "gpt_oss" and dtype == torch.float32 and case.hidden >= 1024:
        # fp32 at model width: a pre-activation within rounding of the clamp edge (±limit) takes the other side of
        # the clamp in the engine and in the fp64 truth, which moves a whole row of dX and dW_up (seen on the H200 with
        # both engines, old code and new alike, one element in millions). The clamp is checked in fp32 at
        # small widths (tests/test_triton_engine.py, tests/test_nonfinite.py) and here in bf16.
        module.limit = 1e4
    return module.to(device=device, dtype=dtype)


def build_lora_model(case: LoraCase, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """``Block(experts)`` under PEFT LoRA (fp32 factors, PEFT's layout), one adapter per rank, every one active;
    A ~ N(0, 1/in), B ~ N(0, 1/r), alpha = 2r: the LoRA term is about as large as the base term, so a wrong
    factor cannot hide under the tolerance."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    experts = build_experts(case, dtype, "cpu")
    up_name = "experts.gate_up_proj" if experts.has_gate else "experts.up_proj"
    configs = [
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=[up_name, "experts.down_proj"])
        for r in case.ranks
    ]
    model = get_peft_model(Block(experts), configs[0])
    names = ["default"] + [f"extra{i}" for i in range(1, len(configs))]
    for name, config in zip(names[1:], configs[1:]):
        model.add_adapter(name, config)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    generator = torch.Generator().manual_seed(case.seed + 101)
    with torch.no_grad():
        for wrapper in (m for m in model.modules() if isinstance(m, ParamWrapper)):
            for name in names:
                factor_a, factor_b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
                rank = wrapper.r[name]
                factor_a.copy_(torch.randn(factor_a.shape, generator=generator) * factor_a.shape[1] ** -0.5)
                factor_b.copy_(torch.randn(factor_b.shape, generator=generator) * rank**-0.5)
    experts.requires_grad_(case.trainable_base)  # after PEFT, which freezes the base
    return model.to(device)


# --------------------------------------------------------------------------------------------------- running
def routed_inputs(case: Case, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """hidden [T, H], top-k ids [T, K] (``sentinels`` of them = E), routing weights [T, K], upstream grad [T, H]."""
    hidden, index, weights = make_inputs(
        case.tokens, case.hidden, case.experts, case.top_k, torch.float32, seed=case.seed + 1
    )
    generator = torch.Generator().manual_seed(case.seed + 2)
    if case.sentinels:
        drop = torch.rand(index.shape, generator=generator) < case.sentinels
        index = torch.where(drop, torch.full_like(index, case.experts), index)
    upstream = torch.randn(case.tokens, case.hidden, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in
                 (hidden, index, weights, upstream))  # fmt: skip


def run(
    model: torch.nn.Module, engine: str, inputs, dtype: torch.dtype | None = None, to_host: bool = False, **options
) -> dict[str, torch.Tensor]:
    """Output and every gradient (hidden states, routing weights, each trainable parameter) of one forward +
    backward on ``engine``, the inputs cast to ``dtype`` when given; ``options``: more ``override`` fields."""
    hidden, index, weights, upstream = inputs
    if dtype is not None:
        hidden, weights, upstream = hidden.to(dtype), weights.to(dtype), upstream.to(dtype)
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with override(backend=engine, **options):
        out = model(hidden, index, weights)
        out.backward(upstream.to(out.dtype))
    results = {"out": out.detach(), "hidden_states": hidden.grad, "routing_weights": weights.grad}
    results.update({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    if to_host:
        results = {k: None if v is None else v.cpu() for k, v in results.items()}
    return results


def truth_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


# --------------------------------------------------------------------------------------------------- the rule
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64; inf where actual is not finite and expected is."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    if not torch.equal(torch.isfinite(actual), torch.isfinite(expected)):
        return math.inf
    finite = torch.isfinite(expected)
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    return (actual - expected)[finite].abs().max().item() / (scale if scale > 0 else 1e-30) if finite.any() else 0.0


def problems(ours: dict, ref: dict, truth: dict, dtype: torch.dtype) -> list[str]:
    """What breaks the rule (module docstring), tensor by tensor; empty when the Triton run passes."""
    found = []
    for name, expected in truth.items():
        mine, theirs = ours.get(name), ref.get(name)
        if expected is None or mine is None or theirs is None:
            if not (expected is None and mine is None and theirs is None):
                found.append(f"{name}: gradient present for triton {mine is not None}, reference {theirs is not None}")
            continue
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            found.append(
                f"{name}: triton {tuple(mine.shape)} {mine.dtype}, reference {tuple(theirs.shape)} {theirs.dtype}"
            )
            continue
        err, ref_err = rel_err(mine, expected), rel_err(theirs, expected)
        limit = FP32_TOL if dtype == torch.float32 else BF16_SLACK * ref_err + BF16_FLOOR
        if not err <= limit:
            found.append(f"{name}: err {err:.3g} > {limit:.3g} (reference engine {ref_err:.3g})")
    return found


def check(model: torch.nn.Module, inputs, dtype: torch.dtype, truth_dtype=torch.float64, **options) -> None:
    """The Triton engine (poisoned outputs) and the reference engine on ``model``, both against the reference engine
    in ``truth_dtype`` on a copy of it; assert the rule."""
    ours = run(model, "triton", inputs, poison_outputs=True, **options)
    ref = run(model, "reference", inputs, **options)
    truth = run(truth_model(model, truth_dtype), "reference", inputs, truth_dtype)
    found = problems(ours, ref, truth, dtype)
    assert not found, "Triton engine off the reference:\n  " + "\n  ".join(found)
