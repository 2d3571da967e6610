"""PEFT LoRA on expert weights (``target_parameters``) through moekit: exact, and never builds ΔW."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from experts_factory import FAMILIES, Block, make_experts, make_inputs, rel_err
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

import moekit
import moekit.engines.reference


def _targets(experts: torch.nn.Module, which: str = "both") -> list[str]:
    up = "experts.gate_up_proj" if experts.has_gate else "experts.up_proj"
    return {"both": [up, "experts.down_proj"], "up": [up], "down": ["experts.down_proj"]}[which]


def _lora_model(family, dtype=torch.float32, rank=4, which="both", use_rslora=False, seed=0):
    experts = make_experts(family, dtype=dtype, seed=seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank + 1, target_modules=[], target_parameters=_targets(experts, which),
        use_rslora=use_rslora, init_lora_weights=False,  # random, non-zero B: the adapter changes the output
    )  # fmt: skip
    model = get_peft_model(Block(experts), config)
    return model, experts


def _forward_backward(model, experts, implementation, inputs):
    experts.config._experts_implementation = implementation
    model.zero_grad(set_to_none=True)
    x, index, weights = inputs
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = model(x, index, weights)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    (out.float() * upstream.float()).sum().backward()
    grads = {"x": x.grad, "routing_weights": weights.grad}
    grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


@contextlib.contextmanager
def _no_delta_weight():
    """Fail if PEFT is asked for ΔW (or its factors) while moekit runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("ΔW was requested on the moekit path")

    with (
        mock.patch.object(ParamWrapper, "get_delta_weight", refuse),
        mock.patch.object(ParamWrapper, "get_delta_factors", refuse),
    ):
        yield


def _compare(model, experts, inputs, tol):
    """moekit (with ΔW forbidden) against PEFT + eager on the same model."""
    theirs = _forward_backward(model, experts, "eager", inputs)
    with _no_delta_weight():
        ours = _forward_backward(model, experts, "moekit", inputs)
    assert rel_err(ours[0], theirs[0]) <= tol
    assert ours[1].keys() == theirs[1].keys()
    for name in theirs[1]:
        assert rel_err(ours[1][name], theirs[1][name]) <= tol, name
    return ours


@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_matches_peft_and_builds_no_delta_weight(family, rank, monkeypatch):
    model, experts = _lora_model(family, rank=rank)
    inputs = make_inputs(30, 32, 6, 2)
    theirs = _forward_backward(model, experts, "eager", inputs)
    weight_grad_calls = []
    original = moekit.engines.reference._weight_grad
    monkeypatch.setattr(
        moekit.engines.reference, "_weight_grad", lambda *a: weight_grad_calls.append(1) or original(*a)
    )
    with _no_delta_weight():
        ours = _forward_backward(model, experts, "moekit", inputs)
    assert rel_err(ours[0], theirs[0]) <= 2e-5
    assert ours[1].keys() == theirs[1].keys()
    assert any("lora_A" in name for name in ours[1]) and any("lora_B" in name for name in ours[1])
    for name in theirs[1]:
        assert rel_err(ours[1][name], theirs[1][name]) <= 2e-5, name
    assert not weight_grad_calls, "a frozen base must get no weight-gradient work"
    assert all(p.grad is None for p in experts.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_bf16(family):
    """bf16 moekit against the exact answer: PEFT + eager in fp32 on the same (bf16-representable) weights.

    PEFT's own bf16 path rounds W + ΔW to bf16 before the GEMM; on gpt-oss that flips clamp decisions and
    puts it 0.14 off the exact gradient, while moekit (base and low-rank products kept apart) stays < 0.01.
    """
    model, experts = _lora_model(family, dtype=torch.bfloat16)
    if family == "gpt_oss":
        # A clamp decided on the other side of the limit by one bf16 rounding is a discontinuity (like a flipped
        # top-k choice) and says nothing about the engine; the clamp itself is covered by the fp32 tests.
        experts.limit = 1e4
    inputs = make_inputs(30, 32, 6, 2, dtype=torch.bfloat16)
    with _no_delta_weight():
        ours = _forward_backward(model, experts, "moekit", inputs)
    model.float()
    exact = _forward_backward(model, experts, "eager", tuple(t.float() if t.is_floating_point() else t for t in inputs))
    assert rel_err(ours[0], exact[0]) <= 3e-2
    for name in exact[1]:
        assert rel_err(ours[1][name], exact[1][name]) <= 3e-2, name


@pytest.mark.parametrize("which", ["up", "down"])
def test_lora_on_one_projection(which):
    model, experts = _lora_model("qwen3_moe", which=which)
    _compare(model, experts, make_inputs(30, 32, 6, 2), 2e-5)


def test_rslora():
    model, experts = _lora_model("nemotron_h", rank=4, use_rslora=True)
    wrapper = next(m for m in model.modules() if isinstance(m, ParamWrapper))
    assert wrapper.scaling["default"] == pytest.approx(9 / 2)  # alpha / sqrt(r)
    _compare(model, experts, make_inputs(30, 32, 6, 2), 2e-5)


def test_several_active_adapters_sum():
    model, experts = _lora_model("gpt_oss", rank=2)
    second = LoraConfig(
        r=3, lora_alpha=5, target_modules=[], target_parameters=_targets(experts), init_lora_weights=False
    )
    model.add_adapter("second", second)
    model.base_model.set_adapter(["default", "second"])
    ours = _compare(model, experts, make_inputs(30, 32, 6, 2), 2e-5)
    assert any("second" in name for name in ours[1]) and any("default" in name for name in ours[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_base_plus_lora(family):
    model, experts = _lora_model(family)
    experts.requires_grad_(True)
    _compare(model, experts, make_inputs(30, 32, 6, 2), 2e-5)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in experts.parameters())


def test_every_expert_with_tokens_gets_adapter_gradients():
    model, experts = _lora_model("nemotron_h", rank=2)
    x, index, weights = make_inputs(20, 32, 6, 2)
    index = index % 4  # experts 4 and 5 get nothing
    index[:, 1] = (index[:, 0] + 1) % 4
    _, grads = _forward_backward(model, experts, "moekit", (x, index, weights))
    for name, grad in grads.items():
        if "lora_A" in name:
            per_expert = grad.view(6, 2, -1).abs().amax(dim=(1, 2))  # rows e*r:(e+1)*r
        elif "lora_B" in name:
            per_expert = grad.view(grad.shape[0], 2, 6).abs().amax(dim=(0, 1))  # columns e::E
        else:
            continue
        assert (per_expert[:4] > 0).all(), name
        assert (per_expert[4:] == 0).all(), name


def test_enable_before_get_peft_model():
    experts = make_experts("qwen3_moe")
    block = Block(experts)
    experts.config._experts_implementation = "moekit"
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=_targets(experts), init_lora_weights=False
    )
    model = get_peft_model(block, config)
    calls = []
    original = moekit.engines.reference.run

    def spy(*args, **kwargs):
        calls.append(args[0].up.lora is not None and args[0].down.lora is not None)
        return original(*args, **kwargs)

    moekit.engines.reference.run = spy
    try:
        model(*make_inputs(10, 32, 6, 2))
    finally:
        moekit.engines.reference.run = original
    assert calls == [True]


def test_disabled_and_merged_adapters_follow_peft():
    model, experts = _lora_model("qwen3_moe")
    inputs = make_inputs(10, 32, 6, 2)
    with model.disable_adapter():
        base_out = _forward_backward(model, experts, "moekit", inputs)[0]
        eager_base = _forward_backward(model, experts, "eager", inputs)[0]
    assert rel_err(base_out, eager_base) <= 2e-5
    lora_out = _forward_backward(model, experts, "moekit", inputs)[0]
    assert rel_err(lora_out, base_out) > 1e-3  # the adapter matters
    model.merge_adapter()
    merged_out = _forward_backward(model, experts, "moekit", inputs)[0]
    assert rel_err(merged_out, lora_out) <= 2e-5


def test_lora_on_an_unsupported_expert_parameter_is_refused():
    experts = make_experts("gpt_oss")
    config = LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj_bias"])
    model = get_peft_model(Block(experts), config)
    experts.config._experts_implementation = "moekit"
    with pytest.raises(ValueError, match="cannot apply LoRA to expert parameter 'down_proj_bias'"):
        model(*make_inputs(10, 32, 6, 2))


def test_peft_is_imported_only_when_used():
    """``import moekit`` does not import PEFT; PEFT's ParamWrapper is hooked as soon as PEFT is imported later."""
    import subprocess
    import sys

    code = (
        "import sys, moekit\n"
        "assert 'peft' not in sys.modules, 'import moekit imported peft'\n"
        "from peft.tuners.lora.layer import ParamWrapper\n"
        "assert hasattr(ParamWrapper.forward, '_moekit_original'), 'ParamWrapper not hooked'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ expert parallelism
class _FakeMesh:
    """What ``moekit.lora._expert_offset`` reads of a ``DeviceMesh``: dimension names, sizes, this rank's place."""

    def __init__(self, names, sizes, ranks):
        self.mesh_dim_names, self._sizes, self._ranks = names, sizes, ranks
        self.ndim = len(sizes)

    def size(self, dim):
        return self._sizes[dim]

    def get_local_rank(self, dim):
        return self._ranks[dim]


def _tagged(param, mesh, placements):
    """``param`` (the whole [E, ...] weight) posing as a DTensor of ``mesh``, ``placements``."""
    param.device_mesh, param.placements = mesh, placements
    return param


def test_expert_offset_reads_the_expert_parallel_shard():
    from torch.distributed.tensor import Replicate, Shard

    from moekit.lora import _expert_offset

    def offset(mesh=None, placements=()):
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.zeros(8, 3, 2))
        if mesh is not None:
            _tagged(module.w, mesh, placements)
        return _expert_offset(module, "w")

    assert offset() is None  # a plain weight holds every expert
    assert offset(_FakeMesh(("ep",), (2,), (0,)), (Shard(0),)) == 0  # transformers 5.24: the "ep" dimension
    assert offset(_FakeMesh(("ep",), (4,), (3,)), (Shard(0),)) == 6
    # FSDP2 on top ("efsdp", "ep"): only the "ep" shard decides which experts the forward sees
    assert offset(_FakeMesh(("efsdp", "ep"), (2, 2), (1, 1)), (Shard(0), Shard(0))) == 4
    assert offset(_FakeMesh(None, (2,), (1,)), (Shard(0),)) == 4  # 5.17: an unnamed 1-D mesh
    assert offset(_FakeMesh(("ep",), (1,), (0,)), (Shard(0),)) is None  # one rank: every expert
    assert offset(_FakeMesh(("ep",), (2,), (1,)), (Replicate(),)) is None
    assert offset(_FakeMesh(("tp",), (2,), (1,)), (Shard(0),)) is None  # not expert parallelism
    assert offset(_FakeMesh(None, (2,), (1,)), (Shard(1),)) is None  # tensor parallelism within the experts


@contextlib.contextmanager
def _as_expert_parallel_rank(experts, rank, ranks=2):
    """``experts`` as rank ``rank`` of ``ranks`` under transformers 5.24's expert parallelism, in one process.

    Its [E, ...] parameters pose as DTensors ``Shard(0)`` on an "ep" mesh dimension, and its forward is replaced on
    the instance by one that, like transformers' ``ep_forward``, takes no keyword argument and runs the class's
    forward on this rank's experts as local tensors (``AllReduceEP``'s way: the other ranks' routes become
    sentinels of weight 0; the ranks' outputs add up to the whole).
    """
    from torch.distributed.tensor import Shard

    whole = dict(experts._parameters)
    num_experts = experts.gate_up_proj.shape[0] if experts.has_gate else experts.up_proj.shape[0]
    local = num_experts // ranks
    first = rank * local
    for param in whole.values():
        _tagged(param, _FakeMesh(("ep",), (ranks,), (rank,)), (Shard(0),))

    def ep_forward(hidden_states, top_k_index, top_k_weights):
        ids = top_k_index - first
        elsewhere = (ids < 0) | (ids >= local)
        experts._parameters.update({name: param[first : first + local] for name, param in whole.items()})
        try:
            return type(experts).forward(
                experts, hidden_states, ids.masked_fill(elsewhere, local), top_k_weights.masked_fill(elsewhere, 0.0)
            )
        finally:
            experts._parameters.update(whole)

    experts.forward = ep_forward
    try:
        yield
    finally:
        del experts.forward
        for param in whole.values():
            del param.device_mesh, param.placements


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_under_expert_parallelism(family):
    """PEFT's all-experts LoRA through a kwarg-less expert-parallel forward: each rank applies its own experts'
    rows and fills only those rows of the gradient; the ranks' outputs and gradients add up to one process's."""
    model, experts = _lora_model(family)
    inputs = make_inputs(30, 32, 6, 2)
    want = _forward_backward(model, experts, "moekit", inputs)
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}

    experts.config._experts_implementation = "moekit"
    model.zero_grad(set_to_none=True)
    x, index, weights = inputs
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    outs = []
    with _no_delta_weight():
        for rank in (0, 1):
            with _as_expert_parallel_rank(experts, rank):
                outs.append(model(x, index, weights))
    out = outs[0] + outs[1]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (outs[1] * upstream).sum().backward(retain_graph=True)
    for name, param in lora.items():  # rank 1 alone: its experts' rows only (experts 3-5 of 6; PEFT's layout)
        grad = param.grad.abs()
        per_expert = grad.view(6, -1).amax(1) if "lora_A" in name else grad.view(grad.shape[0], -1, 6).amax((0, 1))
        assert (per_expert[:3] == 0).all() and (per_expert[3:] > 0).all(), name
    (outs[0] * upstream).sum().backward()
    assert rel_err(out.detach(), want[0]) <= 2e-5
    got = {"x": x.grad, "routing_weights": weights.grad} | {name: p.grad for name, p in lora.items()}
    assert got.keys() == want[1].keys()
    for name, grad in got.items():
        assert rel_err(grad, want[1][name]) <= 2e-5, name


def test_lora_for_all_experts_on_a_module_holding_fewer_is_refused_without_expert_parallelism():
    model, experts = _lora_model("qwen3_moe")
    experts.config._experts_implementation = "moekit"
    experts._parameters.update({name: param[:3] for name, param in experts._parameters.items()})
    with pytest.raises(ValueError, match="built for 6 experts .* but the experts module has 3"):
        model(*make_inputs(10, 32, 3, 2))


def test_a_replaced_forward_that_skips_moekit_does_not_drop_the_lora():
    model, experts = _lora_model("qwen3_moe")
    experts.config._experts_implementation = "moekit"
    experts.forward = lambda hidden_states, top_k_index, top_k_weights: hidden_states  # never runs the experts
    with pytest.raises(RuntimeError, match="LoRA on the expert weights would have been dropped"):
        model(*make_inputs(10, 32, 6, 2))
