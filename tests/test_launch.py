"""``kernels.launch.FastKernel``: repeat launches call the compiled kernel, never one compiled for other argument
properties. The cache logic runs on the CPU against a stand-in jit function (the interpreter compiles nothing);
on a GPU the real kernels go through it, checked against torch with aligned and misaligned operands."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels.launch import FastKernel, argument_key


def test_argument_key_separates_what_triton_specialises_on():
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert argument_key((base,)) == argument_key((torch.ones(64, dtype=torch.bfloat16),))
    assert argument_key((base,)) != argument_key((base[1:],))  # 2 bytes off: not 16-byte aligned
    assert argument_key((base,)) == argument_key((base[8:],))  # 16 bytes off: aligned
    assert argument_key((base,)) != argument_key((base.float(),))
    same = {argument_key((v,)) for v in (16, 32, 2**31 - 16)}  # divisible by 16, i32
    assert len(same) == 1
    others = [argument_key((v,)) for v in (17, 1, 2**31, 2**31 + 1, 2**63)]  # not divisible, 1, i64, u64
    assert len(set(others) | same) == 6
    assert argument_key((0.5,)) == argument_key((2.0,))  # floats are not specialised by value
    assert argument_key((None,)) != argument_key((True,))


class _Compiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class _JitStandIn:
    """What FastKernel uses of a triton JITFunction: arg_names, signature, [grid](...) returning the kernel."""

    def __init__(self):
        self.calls = []

        def kernel(x_ptr, n, scale, BLOCK: int, FLAG: bool = False):
            pass

        self.__name__ = "kernel"
        self.signature = inspect.signature(kernel)
        self.arg_names = list(self.signature.parameters)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _Compiled(self.calls)

        return run


@pytest.fixture
def stand_in(monkeypatch):
    jit = _JitStandIn()
    fast = FastKernel(jit)
    fast.native = True
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return jit, fast


def test_repeat_launch_calls_the_compiled_kernel(stand_in):
    jit, fast = stand_in
    x = torch.zeros(32)
    seen = []

    def grid(meta):
        seen.append(dict(meta))
        return (meta["BLOCK"] * 2,)

    fast[grid](x, 64, 0.5, BLOCK=4, num_warps=4)
    fast[grid](x + 1, 128, 2.0, BLOCK=4, num_warps=4)
    assert [c[0] for c in jit.calls] == ["jit", "compiled"]
    _, grid3, args = jit.calls[1]
    assert grid3 == (8, 1, 1)
    assert args[1:] == (128, 2.0, 4, False)  # runtime args of this call, then BLOCK and FLAG's default
    assert seen == [{"BLOCK": 4, "FLAG": False}]  # the grid sees constexprs, never stale runtime arguments


@pytest.mark.parametrize(
    "change",
    ["misaligned", "dtype", "int_not_16", "int_one", "int64", "constexpr", "option"],
)
def test_other_specialisation_goes_through_triton(stand_in, change):
    jit, fast = stand_in
    x = torch.zeros(32)
    fast[(1,)](x, 64, 0.5, BLOCK=4, num_warps=4)
    args, kwargs = [x, 64, 0.5], {"BLOCK": 4, "num_warps": 4}
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.double()
    elif change == "int_not_16":
        args[1] = 65
    elif change == "int_one":
        args[1] = 1
    elif change == "int64":
        args[1] = 2**33
    elif change == "constexpr":
        kwargs["BLOCK"] = 8
    else:
        kwargs["num_warps"] = 8
    fast[(1,)](*args, **kwargs)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    fast[(1,)](*args, **kwargs)  # and that specialisation is cached in turn
    assert [c[0] for c in jit.calls] == ["jit", "jit", "compiled"]


def test_interpreted_always_goes_through_triton(stand_in):
    """The interpreter's launches return no compiled kernel: every launch is the jit function's own."""
    jit, fast = stand_in
    x = torch.zeros(32)
    fast.native = False
    for _ in range(3):
        fast[(1,)](x, 64, 0.5, BLOCK=4)
    assert [c[0] for c in jit.calls] == ["jit"] * 3
    assert not fast.compiled


class _NoKernelStandIn(_JitStandIn):
    """A jit function whose launches return no compiled kernel (as the interpreter's do)."""

    def __getitem__(self, grid):
        run = super().__getitem__(grid)
        return lambda *args, **kwargs: run(*args, **kwargs) and None


def test_a_launch_that_returns_no_kernel_is_not_cached(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    jit = _NoKernelStandIn()
    fast = FastKernel(jit)
    fast.native = True
    x = torch.zeros(32)
    for _ in range(2):
        fast[(1,)](x, 64, 0.5, BLOCK=4)
    assert [c[0] for c in jit.calls] == ["jit", "jit"]
    assert not fast.compiled


def test_interpreted_kernels_are_not_native():
    """Under TRITON_INTERPRET=1 a FastKernel never takes the compiled path (on a GPU run it always does)."""
    from moekit.kernels.numerics import interpreting

    fast = FastKernel(_JitStandIn())
    assert fast.native is not interpreting()


def test_autotuned_launches_follow_a_changed_pinned_config(monkeypatch):
    """``Autotuned`` keeps its choices for one ``OPTIONS.pinned_config``: a launch under another value chooses
    again (read at call time), an unchanged one reuses the choice."""
    from moekit.kernels import tuning
    from moekit.options import OPTIONS

    monkeypatch.setattr(tuning.Autotuned, "registry", [])
    monkeypatch.setattr(tuning, "_generation", lambda: "hopper")  # a space of several configs
    monkeypatch.setattr(OPTIONS, "pinned_config", None)
    space = tuning.configs("gemm")
    assert len(space) > 2
    monkeypatch.setattr(OPTIONS, "pinned_config", 0)
    jit = _JitStandIn()
    kernel = tuning.Autotuned(jit, "gemm", key=["n"])
    kernel.fast.native = False  # every launch is the stand-in's own call, with the chosen config's keywords
    x = torch.zeros(32)

    def launch():
        kernel.get(torch.bfloat16)[(1,)](x, 64, 0.5, BLOCK=4)
        _, _, _, kwargs = jit.calls[-1]
        return {name: kwargs[name] for name in space[0]}

    assert launch() == space[0]
    monkeypatch.setattr(OPTIONS, "pinned_config", 1)
    assert launch() == space[1]
    monkeypatch.setattr(OPTIONS, "pinned_config", 99)  # clamped to the last
    assert launch() == space[-1]
    monkeypatch.setattr(tuning.Autotuned, "_choose", lambda *a: pytest.fail("chosen again"))
    assert launch() == space[-1]


@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the interpreter compiles no kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_repeat_launches_are_right_for_aligned_and_misaligned_rows(dtype):
    """The combine kernel launched again and again through its FastKernel: first launch of a specialisation via
    triton, repeats via the compiled kernel, a misaligned view a specialisation of its own; every result
    matches torch."""
    from moekit.kernels import combine
    from moekit.kernels.combine import _COMBINE

    g = torch.Generator(device="cuda").manual_seed(0)
    num_tokens, top_k, hidden = 64, 2, 96
    inv = torch.randperm(num_tokens * top_k, device="cuda", generator=g)
    storage = torch.randn(num_tokens * top_k + 1, hidden + 8, device="cuda", dtype=dtype, generator=g)
    before = len(_COMBINE.compiled)
    for view in (storage[:-1, :hidden], storage[1:, :hidden], storage[:-1, 1 : hidden + 1]):
        for repeat in range(3):
            rows = view * (repeat + 1)  # fresh values, same layout (dense copy) ...
            rows = view if repeat == 2 else rows  # ... and the strided (possibly misaligned) view itself
            ours = combine(rows, inv, num_tokens, top_k, dtype)
            expected = rows.double()[inv].view(num_tokens, top_k, hidden).sum(1)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert (ours.double() - expected).abs().max() <= tol * expected.abs().max()
    assert len(_COMBINE.compiled) > before
