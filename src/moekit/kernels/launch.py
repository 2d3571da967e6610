"""Kernel launches that skip triton's per-call argument binding once a kernel is compiled.

``jit_fn[grid](*args)`` binds and specialises every argument and rebuilds the cache key on each call: 30-65 µs of
host time per launch on an H100 machine's host, against 10-18 µs for calling the compiled kernel. A LoRA step
makes about 20 launches, and at 8k tokens the host's launch time, not the GPU, set the step's time.

``FastKernel(jit_fn)[grid](*args, **constexprs_and_options)`` launches like the jit function. The first launch of
each specialisation goes through triton (which compiles when it must) and keeps the compiled kernel it returns;
later launches with an equal key call that kernel directly. The key holds everything triton specialises a
kernel on, or more: each tensor's dtype and 16-byte alignment; each integer's divisibility by 16, whether it is
1, and its width (i32 / i64 / u64); the type of floats; the value of anything else; every keyword argument
(constexprs and launch options); and the device. So a launch never reuses a kernel compiled under other
assumptions. Runtime arguments are passed positionally and constexprs by keyword (every call site here does):
the grid function sees the constexprs only.

Under the interpreter (whose launches return no compiled kernel) every launch goes through triton as usual.
"""

from __future__ import annotations

import torch

from .numerics import interpreting

_INT32 = (-(2**31), 2**31 - 1)


def argument_key(args: tuple) -> tuple:
    """What triton's specialisation can depend on, per runtime argument (see the module docstring)."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() & 15 == 0))
        elif type(arg) is int:
            key.append((arg & 15 == 0, arg == 1, _INT32[0] <= arg <= _INT32[1], arg < 2**63))
        elif type(arg) is float:
            key.append(float)
        else:
            key.append(arg)
    return tuple(key)


def _grid3(grid) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


class FastKernel:
    """A jit function whose repeat launches call the compiled kernel directly (module docstring)."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.native = not interpreting()  # the interpreter's functions return no compiled kernel
        self.names = tuple(jit_fn.arg_names)
        # key -> (compiled kernel, the values of the parameters after the positional ones, the grid's meta dict)
        self.compiled: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict) -> None:
        if not self.native:
            self.jit_fn[grid](*args, **kwargs)
            return
        key = (torch.cuda.current_device(), argument_key(args), tuple(kwargs.items()))
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.jit_fn[grid](*args, **kwargs)
            if compiled is not None:
                self.compiled[key] = self._entry(compiled, args, kwargs)
            return
        compiled, tail, meta = entry
        compiled[_grid3(grid(meta) if callable(grid) else grid)](*args, *tail)

    def _entry(self, compiled, args: tuple, kwargs: dict) -> tuple:
        """The compiled kernel with the parameter values that follow ``args`` (keywords, else defaults)."""
        params = self.jit_fn.signature.parameters
        tail = []
        for name in self.names[len(args) :]:
            if name in kwargs:
                tail.append(kwargs[name])
            elif params[name].default is not params[name].empty:
                tail.append(params[name].default)
            else:
                raise TypeError(f"{self.jit_fn.__name__}: parameter {name} was not given")
        return compiled, tuple(tail), dict(zip(self.names[len(args) :], tail))
