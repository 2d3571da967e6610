"""``NF4Tensor``: a frozen expert weight held in NF4, seen by everything around it as the dense weight it stands for.

The experts module keeps its parameter names (``gate_up_proj`` / ``up_proj``, ``down_proj``); each becomes an
``NF4Tensor`` parameter whose shape, strides and dtype are the dense weight's (the dtype is the compute dtype the
engines run in), while its storage is two inner tensors (``moekit.quant.nf4`` numerics, over the weight as stored):

    packed  uint8 [E, P / 2]   two codes a byte, high nibble first          (P = the elements of one expert)
    absmax  fp32  [E, P / 64]  one scale per block of 64 consecutive elements

So PEFT sizes its adapters from it as from the dense weight, ``.to()`` moves (or re-types) it, ``state_dict`` holds
it, ``load_state_dict`` of a dense weight quantizes into it, and a transposed view is metadata only: element
(e, i, j) of any view sits at the flat offset ``e·stride(0) + i·stride(1) + j·stride(2)`` of the weight as
stored, which is how the kernels address its codes. Anything else raises, naming the op, rather than computing on
bytes. One expert (``weight[e]``) dequantizes, so code that loops over experts (transformers' eager) still works.
"""

from __future__ import annotations

import torch

from .nf4 import BLOCKSIZE, NF4Weight, dequantize_experts, quantize_nf4

Tensor = torch.Tensor
aten = torch.ops.aten

QUANTIZE_CHUNK = 1 << 24  # elements quantized at a time (their fp32 copy and int64 codes are the temporaries)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class NF4Tensor(Tensor):
    """A 3-D expert weight [E, a, b] in NF4 (see the module docstring). Build it with ``NF4Tensor.quantize``."""

    packed: Tensor
    absmax: Tensor

    @staticmethod
    def __new__(cls, packed: Tensor, absmax: Tensor, shape, dtype: torch.dtype, strides=None):
        strides = tuple(strides) if strides is not None else _contiguous_strides(shape)
        return Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), strides=strides, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(self, packed: Tensor, absmax: Tensor, shape, dtype: torch.dtype, strides=None):
        self.packed, self.absmax = packed, absmax

    __torch_function__ = torch._C._disabled_torch_function_impl

    # ------------------------------------------------------------------------------------ building and reading
    @classmethod
    def quantize(
        cls, weight: Tensor, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> NF4Tensor:
        """An experts weight [E, a, b] (as stored, floating point, finite; a·b a multiple of 64) in NF4 on
        ``device`` (default: the weight's); ``dtype``: the compute dtype it stands for (default: the weight's).
        A few experts at a time are moved to ``device`` and quantized there, so a weight held elsewhere is never
        whole on ``device``, and the temporaries (an fp32 copy, int64 codes) stay bounded."""
        if weight.dim() != 3:
            raise ValueError(f"NF4 expert weights are 3-D [num_experts, a, b]; got shape {tuple(weight.shape)}")
        per_expert = weight.shape[1] * weight.shape[2]
        if per_expert % BLOCKSIZE:
            raise ValueError(
                f"an expert of shape {tuple(weight.shape[1:])} holds {per_expert} elements, not a multiple of the "
                f"NF4 block size {BLOCKSIZE}, so its blocks would straddle experts"
            )
        device = weight.device if device is None else torch.device(device)
        num_experts = weight.shape[0]
        packed = torch.empty(num_experts, per_expert // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(num_experts, per_expert // BLOCKSIZE, dtype=torch.float32, device=device)
        step = max(1, QUANTIZE_CHUNK // per_expert)  # experts per chunk
        for first in range(0, num_experts, step):
            chunk = quantize_nf4(weight[first : first + step].to(device).contiguous())
            packed[first : first + step] = chunk.packed.view(-1, per_expert // 2)
            absmax[first : first + step] = chunk.absmax.view(-1, per_expert // BLOCKSIZE)
        return cls(packed, absmax, weight.shape, dtype or weight.dtype)

    @property
    def stored_shape(self) -> torch.Size:
        """The shape of the weight as stored (the view's shape with its last two dimensions in storage order)."""
        return self.shape if not self.is_transposed_view else torch.Size((self.shape[0], self.shape[2], self.shape[1]))

    @property
    def is_transposed_view(self) -> bool:
        return self.stride(1) < self.stride(2)

    def nf4_weight(self) -> NF4Weight:
        """The flat ``NF4Weight`` of the weight as stored (what ``moekit.quant.nf4`` and bitsandbytes read)."""
        return NF4Weight(self.packed.reshape(-1), self.absmax.reshape(-1), self.stored_shape, self.dtype)

    def dequantize_experts(self, first: int, last: int, dtype: torch.dtype | None = None) -> Tensor:
        """Experts [first, last) dense, in this view's orientation: [last - first, *shape[1:]]."""
        dense = dequantize_experts(self.nf4_weight(), first, last, dtype or self.dtype)
        return dense.transpose(1, 2) if self.is_transposed_view else dense

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole dense weight (all experts at once: for tests and tools, never the engines' path)."""
        return self.dequantize_experts(0, self.shape[0], dtype)

    def requires_grad_(self, requires_grad: bool = True) -> NF4Tensor:
        if requires_grad:
            raise RuntimeError(FROZEN_MESSAGE)
        return self

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"stored={tuple(self.stored_shape)})"
        )

    # ------------------------------------------------------------------------ what torch.compile and FSDP see
    def __tensor_flatten__(self):
        return ["packed", "absmax"], (tuple(self.shape), self.dtype, tuple(self.stride()))

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, dtype, strides = meta
        return NF4Tensor(inner["packed"], inner["absmax"], shape, dtype, strides)

    def _like(self, packed: Tensor | None = None, absmax: Tensor | None = None, **meta) -> NF4Tensor:
        return NF4Tensor(
            self.packed if packed is None else packed,
            self.absmax if absmax is None else absmax,
            meta.get("shape", self.shape),
            meta.get("dtype", self.dtype),
            meta.get("strides", self.stride()),
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"{func} is not defined on NF4 expert weights (moekit.quant.NF4Tensor): they are frozen NF4 codes "
                "that only moekit's engines compute with. Run the experts on moekit (moekit.enable(model) or "
                "experts_implementation='moekit'), or take tensor.dequantize() for a dense copy."
            )
        return handler(func, *args, **kwargs)


def held_bytes(weight: Tensor) -> int:
    """The bytes a weight takes as held: an NF4 weight's codes and scales (half a byte an element, one fp32 per 64
    elements), a dense weight's elements."""
    if isinstance(weight, NF4Tensor):
        return weight.packed.nbytes + weight.absmax.nbytes
    return weight.numel() * weight.element_size()


FROZEN_MESSAGE = (
    "NF4 expert weights are a frozen base (QLoRA): they cannot require a gradient. Train LoRA adapters on them "
    "(peft LoraConfig(target_parameters=[...])), or train the bf16 model instead."
)

_HANDLERS = {}


def _handles(*ops):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


@_handles(aten.detach.default, aten.alias.default)
def _detach(func, t: NF4Tensor):
    return t._like()


@_handles(aten.clone.default)
def _clone(func, t: NF4Tensor, memory_format=None):
    return t._like(t.packed.clone(), t.absmax.clone())


@_handles(aten._to_copy.default)
def _to_copy(func, t: NF4Tensor, dtype=None, device=None, non_blocking=False, **ignored):
    """``.to(device)`` moves the codes; ``.to(dtype)`` changes the compute dtype the weight stands for (the codes
    stay: ``model.to(torch.bfloat16)`` keeps a quantized model quantized)."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"NF4 expert weights stand for a floating-point weight; cannot cast to {dtype}")
    packed = t.packed.to(device=device, non_blocking=non_blocking) if device is not None else t.packed
    absmax = t.absmax.to(device=device, non_blocking=non_blocking) if device is not None else t.absmax
    return t._like(packed, absmax, dtype=dtype or t.dtype)


@_handles(aten.transpose.int)
def _transpose(func, t: NF4Tensor, dim0: int, dim1: int):
    dims = sorted(d % 3 for d in (dim0, dim1))
    if dims == [dim0 % 3] * 2:
        return t._like()
    if dims != [1, 2]:
        raise NotImplementedError("NF4 expert weights transpose only their last two dimensions (per-expert matrices)")
    shape, strides = list(t.shape), list(t.stride())
    shape[1], shape[2], strides[1], strides[2] = shape[2], shape[1], strides[2], strides[1]
    return t._like(shape=shape, strides=strides)


@_handles(aten.select.int)
def _select(func, t: NF4Tensor, dim: int, index: int):
    """``weight[e]``: one expert, dense (transformers' eager loop over experts reads its weights this way)."""
    if dim % 3 != 0:
        raise NotImplementedError("NF4 expert weights select whole experts only (dimension 0)")
    index = index % t.shape[0]
    return t.dequantize_experts(index, index + 1)[0]


@_handles(aten.copy_.default)
def _copy(func, dst, src, non_blocking=False):
    """``dst.copy_(src)``: NF4 from NF4 copies the codes; a dense source is quantized into ``dst`` (how
    ``load_state_dict`` of a bf16 checkpoint fills a quantized model)."""
    if not isinstance(dst, NF4Tensor):
        raise NotImplementedError(
            "copying NF4 expert weights into a dense tensor: take src.dequantize() to get the dense weight"
        )
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"cannot copy a tensor of shape {tuple(src.shape)} into NF4 weights of shape {tuple(dst.shape)}"
        )
    if not isinstance(src, NF4Tensor):
        stored = src.transpose(1, 2) if dst.is_transposed_view else src
        src = NF4Tensor.quantize(stored.to(dst.packed.device))
    elif src.is_transposed_view != dst.is_transposed_view:
        raise ValueError("cannot copy NF4 weights between views of different orientation")
    dst.packed.copy_(src.packed, non_blocking=non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking=non_blocking)
    return dst


@_handles(aten.is_same_size.default)
def _is_same_size(func, t, other):
    return tuple(t.shape) == tuple(other.shape)
