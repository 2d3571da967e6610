"""The reference engine against transformers' own experts (eager and grouped_mm), edge cases and errors."""

from __future__ import annotations

import os
from collections import deque

import pytest
import torch
from experts_factory import FAMILIES, make_experts, make_inputs, rel_err, run_experts

import moekit
from moekit import plan as plan_module
from moekit.options import OPTIONS
from moekit.plan import RoutingCheck, build_plan, raise_pending_routing_errors

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _assert_close(ours, theirs, tol, what=""):
    out_ours, grads_ours = ours
    out_theirs, grads_theirs = theirs
    assert out_ours.dtype == out_theirs.dtype
    assert rel_err(out_ours, out_theirs) <= tol, f"{what} output"
    assert grads_ours.keys() == grads_theirs.keys()
    for name in grads_theirs:
        assert grads_ours[name].dtype == grads_theirs[name].dtype, name
        assert rel_err(grads_ours[name], grads_theirs[name]) <= tol, f"{what} grad {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("baseline", ["eager", "grouped_mm"])
def test_matches_transformers_backends(family, dtype, baseline):
    module = make_experts(family, dtype=dtype)
    inputs = make_inputs(40, 32, 6, 2, dtype=dtype)
    _assert_close(run_experts(module, "moekit", *inputs), run_experts(module, baseline, *inputs), TOL[dtype], family)


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_routing_weights_dtype_and_output_dtype(weights_dtype):
    module = make_experts("qwen3_moe", dtype=torch.bfloat16)
    inputs = make_inputs(20, 32, 6, 3, dtype=torch.bfloat16, weights_dtype=weights_dtype)
    out, grads = run_experts(module, "moekit", *inputs)
    assert out.dtype == torch.bfloat16
    assert grads["routing_weights"].dtype == weights_dtype
    _assert_close((out, grads), run_experts(module, "grouped_mm", *inputs), 3e-2)


@pytest.mark.parametrize(
    "case",
    ["zero_tokens", "one_token", "all_on_one_expert", "idle_experts", "top_k_equals_experts", "odd_sizes"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_edge_cases(family, case):
    hidden, intermediate, num_experts, num_tokens, top_k = 32, 24, 6, 17, 2
    if case == "odd_sizes":
        hidden, intermediate = 20, 13
    module = make_experts(family, hidden=hidden, intermediate=intermediate, num_experts=num_experts)
    if case == "zero_tokens":
        num_tokens = 0
    if case == "one_token":
        num_tokens = 1
    if case == "top_k_equals_experts":
        top_k = num_experts
    x, index, weights = make_inputs(num_tokens, hidden, num_experts, top_k)
    if case == "all_on_one_expert":
        index = torch.full_like(index[:, :1], 3)
        weights = weights[:, :1]
    if case == "idle_experts":
        index = index % 2  # only experts 0 and 1 get tokens
        index[:, 1] = 1 - index[:, 0]
    ours = run_experts(module, "moekit", x, index, weights)
    assert torch.isfinite(ours[0]).all()
    if case == "zero_tokens":  # transformers' eager returns a tensor with no graph here; check directly
        assert ours[0].shape == (0, hidden)
        assert all(grad.abs().sum() == 0 for grad in ours[1].values())
        return
    _assert_close(ours, run_experts(module, "eager", x, index, weights), 2e-5, case)
    if case == "idle_experts":
        grad_down = ours[1]["down_proj"]
        assert grad_down[2:].abs().max() == 0 and grad_down[:2].abs().min() >= 0
        assert grad_down[:2].abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_parallel_sentinels_contribute_nothing(family):
    num_experts = 6
    module = make_experts(family, num_experts=num_experts)
    x, index, weights = make_inputs(12, 32, num_experts, 3)
    sentinel = torch.zeros_like(index, dtype=torch.bool)
    sentinel[::2, 0] = True
    sentinel[5, :] = True  # a token with no local expert at all
    index = index.masked_fill(sentinel, num_experts)
    weights = weights.masked_fill(sentinel, 0.0)
    out, grads = run_experts(module, "moekit", x, index, weights)
    # Same computation with sentinel slots pointed at expert 0 and a zero weight, minus that expert's bias term:
    # instead compare with transformers' grouped_mm in expert-parallel mode, which skips sentinels too.
    module._is_expert_parallel = True
    expected = run_experts(module, "grouped_mm", x, index, weights)
    module._is_expert_parallel = False
    _assert_close((out, grads), expected, 2e-5, "sentinels")
    assert out[5].abs().max() == 0
    assert grads["x"][5].abs().max() == 0
    assert grads["routing_weights"][sentinel].abs().max() == 0


def test_sentinel_with_nonzero_weight_is_still_skipped():
    module = make_experts("nemotron_h")
    x, index, weights = make_inputs(8, 32, 6, 2)
    index[:, 1] = 6
    out_with, _ = run_experts(module, "moekit", x, index, weights)
    out_without, _ = run_experts(module, "moekit", x, index[:, :1], weights[:, :1])
    torch.testing.assert_close(out_with, out_without, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    module = make_experts("qwen3_moe", dtype=dtype)
    inputs = make_inputs(64, 32, 6, 3, dtype=dtype)
    first, second = run_experts(module, "moekit", *inputs), run_experts(module, "moekit", *inputs)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_plan_orders_rows_by_expert_and_skips_sentinels():
    index = torch.tensor([[2, 0], [4, 2], [1, 4]])
    plan = build_plan(index, num_experts=4)  # 4 is the sentinel
    assert plan.num_rows == 6 and plan.num_routed == 4
    assert plan.row_of_slot.tolist() == [[2, 0], [-1, 3], [1, -1]]  # -1: sentinel slot
    assert plan.tokens_per_expert.tolist() == [1, 1, 2, 0]
    assert plan.offsets.tolist() == [1, 2, 4, 4]
    assert plan.expert_of_row.tolist() == [0, 1, 2, 2, 4, 4]
    assert plan.token_of_row[:4].tolist() == [0, 2, 0, 1]
    assert plan.sorted_rows[:4].tolist() == [1, 4, 0, 3]


# ---------------------------------------------------------------------------------------------- bad input
def _call(module, x, index, weights):
    module.config._experts_implementation = "moekit"
    return module(x, index, weights)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda x, i, w: (x[:, :-1], i, w), ValueError, r"hidden_states must have shape \[num_tokens, 32\]"),
        (lambda x, i, w: (x[None], i, w), ValueError, "hidden_states must have shape"),
        (lambda x, i, w: (x, i[:-1], w), ValueError, "top_k_index must have shape"),
        (lambda x, i, w: (x, i, w[:, :1]), ValueError, "top_k_weights must have the shape of top_k_index"),
        (lambda x, i, w: (x, i.float(), w), TypeError, "top_k_index must be an integer tensor"),
        (lambda x, i, w: (x, i, w.long()), TypeError, "top_k_weights must be a floating-point tensor"),
        (lambda x, i, w: (x.double(), i, w), TypeError, "hidden_states dtype torch.float64 does not match"),
        (lambda x, i, w: (x, i.masked_fill(i == i[0, 0], 7), w), ValueError, r"expert id 7, outside \[0, 6\]"),
        (lambda x, i, w: (x, i.masked_fill(i == i[0, 0], -1), w), ValueError, r"expert id -1, outside \[0, 6\]"),
    ],
)
def test_bad_input_gets_a_clear_error(mutate, error, match):
    module = make_experts("qwen3_moe")
    x, index, weights = mutate(*make_inputs(5, 32, 6, 2))
    with pytest.raises(error, match=match):
        _call(module, x, index, weights)


class _Event:
    """Stands in for a CUDA event: ``finished`` says whether the GPU has run past it."""

    def __init__(self, finished: bool):
        self.finished = finished

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True


def _pending_check(low: int, high: int, finished: bool) -> RoutingCheck:
    return RoutingCheck(torch.tensor([low, high]), _Event(finished), num_experts=6, shape=(5, 2))


def test_gpu_range_check_is_reported_by_a_later_call(monkeypatch):
    """On a GPU the id range is read back without a sync: finished checks raise, unfinished ones wait their turn
    (until MAX_PENDING_CHECKS are queued, then the oldest is waited for), and waiting raises them all."""
    pending = deque()
    monkeypatch.setattr(plan_module, "_pending", pending)
    pending.extend([_pending_check(0, 6, True), _pending_check(0, 9, False)])
    raise_pending_routing_errors(wait=False)  # the finished check was fine; the bad one is still running
    assert len(pending) == 1
    with pytest.raises(ValueError, match=r"expert id 9, outside \[0, 6\] .* earlier moekit call .*\[5, 2\]"):
        raise_pending_routing_errors(wait=True)
    assert not pending

    pending.extend(_pending_check(-2, 5, False) for _ in range(plan_module.MAX_PENDING_CHECKS + 1))
    with pytest.raises(ValueError, match="expert id -2"):  # one over the limit: the oldest is waited for
        raise_pending_routing_errors(wait=False)
    assert not pending  # the error clears the queue: one report per failure, not one per later call


@pytest.mark.triton  # with the native GPU tests (tools/gpu_session.sh native runs ``-m triton`` on the device)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred range check runs on CUDA tensors only")
def test_gpu_range_check_end_to_end():
    index = torch.tensor([[2, 0], [9, 1]], device="cuda")
    with pytest.raises(ValueError, match=r"expert id 9, outside \[0, 4\]"):
        build_plan(index, num_experts=4)
        raise_pending_routing_errors()
    build_plan(index.clamp(max=4), num_experts=4)
    raise_pending_routing_errors()  # a good call after a reported bad one raises nothing


def test_inconsistent_expert_weights_are_rejected():
    module = make_experts("qwen3_moe")
    module.down_proj = torch.nn.Parameter(torch.randn(6, 32, 23))
    with pytest.raises(ValueError, match="down_proj has shape"):
        _call(module, *make_inputs(5, 32, 6, 2))


def test_enable_rejects_models_without_experts():
    with pytest.raises(ValueError, match="no experts module"):
        moekit.enable(torch.nn.Linear(3, 3))


def test_unknown_activation_falls_back_to_the_modules_own_function():
    module = make_experts("qwen3_moe")
    module.act_fn = torch.nn.Softplus()  # not in the table: must still be exact, via autograd through it
    module.__dict__.pop("_moekit_layout", None)
    inputs = make_inputs(16, 32, 6, 2)
    _assert_close(run_experts(module, "moekit", *inputs), run_experts(module, "eager", *inputs), 2e-5)
    assert moekit.backend.experts_layout(module).activation.custom is not None


# ---------------------------------------------------------------------------------------------- memory
def _saved_activation_bytes(module, implementation, inputs) -> int:
    """Bytes of non-parameter tensors autograd keeps for backward (unique storages): the expert layer's
    training memory beyond its weights, measured the same way for every backend on the CPU."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    module.config._experts_implementation = implementation
    x, index, weights = inputs
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, index, weights.clone().requires_grad_(True)).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_saves_less_for_backward_than_grouped_mm(family):
    module = make_experts(family, hidden=64, intermediate=48, num_experts=8)
    inputs = make_inputs(256, 64, 8, 4)
    ours = _saved_activation_bytes(module, "moekit", inputs)
    theirs = _saved_activation_bytes(module, "grouped_mm", inputs)
    # x [T, H] + h [T*K, 2I|I] + the plan, against grouped_mm's gathered input, pre- and post-activation, ...
    assert ours < 0.6 * theirs, (ours, theirs)


# ---------------------------------------------------------------------------------------------- dispatch
def test_engine_selection(monkeypatch):
    from moekit.backend import experts_layout, select_engine

    module = make_experts("qwen3_moe")
    layout = experts_layout(module)
    x = torch.randn(2, 32)
    monkeypatch.setattr(OPTIONS, "backend", "")
    assert select_engine(x, layout) == "reference"  # CPU
    monkeypatch.setattr(OPTIONS, "backend", "triton")
    if os.environ.get("TRITON_INTERPRET", "0") != "0":  # forced, the interpreter runs the kernels on the CPU
        assert select_engine(x, layout) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="MOEKIT_BACKEND=triton, but the Triton engine cannot run here"):
        select_engine(x, layout)
    monkeypatch.setattr(OPTIONS, "backend", "reference")
    assert select_engine(x, layout) == "reference"


@pytest.mark.parametrize("family", FAMILIES)
def test_row_chunked_activation_math_is_exact(family, monkeypatch):
    """The fp32 activation math runs in row chunks to bound temporaries; chunking must not change the result
    (beyond the last ulp: vectorised fp32 math may take another code path for a ragged chunk)."""
    import moekit.activations

    module = make_experts(family)
    inputs = make_inputs(40, 32, 6, 2)
    whole = run_experts(module, "moekit", *inputs)
    monkeypatch.setattr(moekit.activations, "_CHUNK_ELEMENTS", 7 * 48)  # 7-row chunks, a ragged last one
    chunked = run_experts(module, "moekit", *inputs)
    assert rel_err(chunked[0], whole[0]) <= 1e-6
    for name in whole[1]:
        assert rel_err(chunked[1][name], whole[1][name]) <= 1e-6, name
