"""``NF4Tensor``: a frozen expert weight held in NF4, seen by everything around it as the dense weight it stands for.

The experts module keeps its parameter names (``gate_up_proj`` / ``up_proj``, ``down_proj``); each becomes an
``NF4Tensor`` parameter whose shape, strides and dtype are the dense weight's (the dtype is the compute dtype the
engines run in), while its storage is two inner tensors (``moekit.quant.nf4`` numerics, over the weight as stored):

    packed  uint8 [E, P / 2]   two codes a byte, high nibble first          (P = the elements of one expert)
    absmax  fp32  [E, P / 64]  one scale per block of 64 consecutive elements

or, double-quantized (``quantize(..., double_quant=True)``), the scales in 8 bits over the whole weight as stored
(``nf4.double_quantize``): ``absmax_codes`` uint8 [E, P / 64], ``absmax_scales`` fp32 [ceil(E·P / 64 / 256)],
``absmax_offset`` fp32 [1]; ``absmax`` is then their fp32 dequantization, made when read (the engines read it once
per GEMM: a transient of one weight's scales, 1/16 of its elements). A range of experts of a double-quantized weight
is again one (its codes, ``absmax_scales`` cut at its blocks of 256, the weight's offset), so it must start and end on
a whole block: where a cut would split one (FSDP2 sharding into too few experts a rank), an error says so.

So PEFT sizes its adapters from it as from the dense weight, ``.to()`` moves (or re-types) it, ``state_dict`` holds
it, ``load_state_dict`` of a dense weight quantizes into it, and a transposed view is metadata only: element
(e, i, j) of any view sits at the flat offset ``e·stride(0) + i·stride(1) + j·stride(2)`` of the weight as
stored, which is how the kernels address its codes. Anything else raises, naming the op, rather than computing on
bytes. One expert (``weight[e]``) dequantizes, so code that loops over experts (transformers' eager) still works.

FSDP2 (``fully_shard``, FSDP-QLoRA) shards it along the experts (dim 0): each rank holds whole experts, i.e. rows of
``packed`` and ``absmax`` (or of ``absmax_codes``, with their blocks of ``absmax_scales`` and the weight's offset);
the ops FSDP2 shards with (split / new_zeros / slice / copy_ / view(-1) / as_strided) act on those rows, new_empty(0)
is a rank's empty shard, and ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` all-gather the codes and scales as
they are into an ``NF4Tensor`` of every expert, which the engines read (no dense copy is made; the weight is frozen,
so no gradient is reduce-scattered). The number of experts must be a multiple of the FSDP world size: a padded
shard's all-gather inputs must have the dense shard's padded shape, which codes and scales cannot have.
``view(-1)`` gives the flat 1-D NF4Tensor FSDP2 keeps of a shard, held only (every other op on it raises).
"""

from __future__ import annotations

import math

import torch

from .nf4 import (
    ABSMAX_BLOCKSIZE,
    BLOCKSIZE,
    DoubleQuant,
    NF4Weight,
    dequantize_absmax,
    dequantize_nf4,
    double_quantize,
    quantize_nf4,
)

Tensor = torch.Tensor
aten = torch.ops.aten

QUANTIZE_CHUNK = 1 << 24  # elements quantized at a time (their fp32 copy and int64 codes are the temporaries)


def _double_quantized(absmax: Tensor) -> DoubleQuant:
    """fp32 scales [E, P / 64] double-quantized over the whole weight, the codes in the same shape."""
    held = double_quantize(absmax)
    return DoubleQuant(held.codes.view(absmax.shape), held.scales, held.offset)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


Scales = Tensor | DoubleQuant  # an NF4Tensor's scales as held: fp32 [E, P / 64], or double-quantized
_DOUBLE_QUANT_NAMES = ("absmax_codes", "absmax_scales", "absmax_offset")  # its inner tensors, DoubleQuant's order
SERIALIZED_PARTS = ("packed", "absmax", *_DOUBLE_QUANT_NAMES)  # what ``serialized`` may give, by part
_PER_EXPERT_PARTS = ("packed", "absmax", "absmax_codes")  # the inner tensors with a row per expert


class NF4Tensor(Tensor):
    """A 3-D expert weight [E, a, b] in NF4 (see the module docstring). Build it with ``NF4Tensor.quantize``.
    Under FSDP2 each rank holds a shard of whole experts; ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` gather
    them back into one of all experts."""

    packed: Tensor

    @staticmethod
    def __new__(cls, packed: Tensor, scales: Scales, shape, dtype: torch.dtype, strides=None):
        strides = tuple(strides) if strides is not None else _contiguous_strides(shape)
        return Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), strides=strides, dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(self, packed: Tensor, scales: Scales, shape, dtype: torch.dtype, strides=None):
        self.packed = packed
        if isinstance(scales, DoubleQuant):
            self.absmax_codes, self.absmax_scales, self.absmax_offset = scales
        else:
            self._absmax = scales

    @property
    def double_quantized(self) -> bool:
        return not hasattr(self, "_absmax")

    @property
    def scales(self) -> Scales:
        """The scales as held: fp32 [E, P / 64], or a ``DoubleQuant`` (codes [E, P / 64])."""
        if self.double_quantized:
            return DoubleQuant(self.absmax_codes, self.absmax_scales, self.absmax_offset)
        return self._absmax

    @property
    def absmax(self) -> Tensor:
        """fp32 [E, P / 64]: one scale per block of 64 (dequantized here when held double-quantized)."""
        if not self.double_quantized:
            return self._absmax
        return self.block_scales(0, self.packed.shape[0])

    def block_scales(self, first: int, last: int) -> Tensor:
        """The fp32 scales of experts [first, last): [last - first, P / 64]."""
        if not self.double_quantized:
            return self._absmax[first:last]
        per_expert = self.absmax_codes.shape[1]
        return dequantize_absmax(self.scales, first * per_expert, last * per_expert).view(last - first, per_expert)

    __torch_function__ = torch._C._disabled_torch_function_impl

    # ------------------------------------------------------------------------------------ building and reading
    @classmethod
    def quantize(
        cls,
        weight: Tensor,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        double_quant: bool = False,
    ) -> NF4Tensor:
        """An experts weight [E, a, b] (as stored, floating point, finite; a·b a multiple of 64) in NF4 on
        ``device`` (default: the weight's); ``dtype``: the compute dtype it stands for (default: the weight's);
        ``double_quant``: hold the scales in 8 bits (``nf4.double_quantize`` over the whole weight's scales).
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
        scales = _double_quantized(absmax) if double_quant else absmax
        return cls(packed, scales, weight.shape, dtype or weight.dtype)

    @property
    def stored_shape(self) -> torch.Size:
        """The shape of the weight as stored (the view's shape with its last two dimensions in storage order)."""
        return self.shape if not self.is_transposed_view else torch.Size((self.shape[0], self.shape[2], self.shape[1]))

    @property
    def is_transposed_view(self) -> bool:
        return self.dim() == 3 and self.stride(1) < self.stride(2)

    def nf4_weight(self) -> NF4Weight:
        """The flat ``NF4Weight`` of the weight as stored (what ``moekit.quant.nf4`` and bitsandbytes read), with
        its double-quantized scales as held, if so."""
        held = self.scales._replace(codes=self.absmax_codes.reshape(-1)) if self.double_quantized else None
        return NF4Weight(self.packed.reshape(-1), self.absmax.reshape(-1), self.stored_shape, self.dtype, held)

    def dequantize_experts(self, first: int, last: int, dtype: torch.dtype | None = None) -> Tensor:
        """Experts [first, last) dense, in this view's orientation: [last - first, *shape[1:]]."""
        if not 0 <= first <= last <= self.shape[0]:
            raise IndexError(f"experts [{first}, {last}) out of range for {self.shape[0]} experts")
        stored = self.stored_shape
        chunk = NF4Weight(self.packed[first:last].reshape(-1), self.block_scales(first, last).reshape(-1),
                          torch.Size((last - first, *stored[1:])), self.dtype)  # fmt: skip
        dense = dequantize_nf4(chunk, dtype or self.dtype)
        return dense.transpose(1, 2) if self.is_transposed_view else dense

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole dense weight (all experts at once: for tests and tools, never the engines' path)."""
        return self.dequantize_experts(0, self.shape[0], dtype)

    # ------------------------------------------------------------------------------------ in a checkpoint
    def serialized(self) -> dict[str, Tensor]:
        """The tensors a checkpoint holds for this weight, by part: ``packed`` and the scales as held (``absmax``,
        or ``absmax_codes``, ``absmax_scales`` and ``absmax_offset``). The per-expert parts are 3-D, [E, 1, n], like
        the weight, so that a loader which shards the weight along its experts cuts them the same way. The dense
        shape and dtype are the model's."""
        if self.is_transposed_view:
            raise ValueError("a transposed view of NF4 expert weights cannot be saved: save the weight itself")
        parts = {name.lstrip("_"): getattr(self, name) for name in self.__tensor_flatten__()[0]}
        return {part: t.unsqueeze(1) if part in _PER_EXPERT_PARTS else t for part, t in parts.items()}

    @classmethod
    def deserialized(cls, parts: dict[str, Tensor], shape, dtype: torch.dtype, name: str = "weight") -> NF4Tensor:
        """The weight of dense ``shape`` [E, a, b] and compute ``dtype`` from the tensors ``serialized`` gave; a
        missing, extra or misshapen part raises, naming ``name`` (its parameter) and what was expected."""
        num_experts, per_expert = shape[0], shape[1] * shape[2]
        expected = {"packed": (torch.uint8, (num_experts, 1, per_expert // 2))}
        scales = (num_experts, 1, per_expert // BLOCKSIZE)
        if "absmax" in parts:
            expected["absmax"] = (torch.float32, scales)
        else:
            blocks = -(-num_experts * scales[2] // ABSMAX_BLOCKSIZE)
            expected.update(absmax_codes=(torch.uint8, scales), absmax_scales=(torch.float32, (blocks,)),
                            absmax_offset=(torch.float32, (1,)))  # fmt: skip
        if set(parts) != set(expected):
            raise ValueError(
                f"NF4 expert weights {name} of shape {tuple(shape)}: the checkpoint holds the parts {sorted(parts)}, "
                f"expected {sorted(expected)}"
            )
        for part, (part_dtype, part_shape) in expected.items():
            tensor = parts[part]
            if tensor.dtype != part_dtype or tuple(tensor.shape) != part_shape:
                raise ValueError(
                    f"NF4 expert weights {name} of shape {tuple(shape)}: {part} is {tensor.dtype} "
                    f"{tuple(tensor.shape)} in the checkpoint, expected {part_dtype} {part_shape}"
                )
        parts = {part: t.squeeze(1) if part in _PER_EXPERT_PARTS else t for part, t in parts.items()}
        held = parts["absmax"] if "absmax" in parts else DoubleQuant(*(parts[n] for n in _DOUBLE_QUANT_NAMES))
        return cls(parts["packed"], held, shape, dtype)

    def requires_grad_(self, requires_grad: bool = True) -> NF4Tensor:
        if requires_grad:
            raise RuntimeError(FROZEN_MESSAGE)
        return self

    def __repr__(self) -> str:
        double = ", double_quant=True" if self.double_quantized else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"stored={tuple(self.stored_shape)}{double})"
        )

    # ------------------------------------------------------------------------ what torch.compile and FSDP see
    def __tensor_flatten__(self):
        scales = list(_DOUBLE_QUANT_NAMES) if self.double_quantized else ["_absmax"]
        return ["packed", *scales], (tuple(self.shape), self.dtype, tuple(self.stride()))

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, dtype, strides = meta
        if "_absmax" in inner:
            scales = inner["_absmax"]
        else:
            scales = DoubleQuant(*(inner[name] for name in _DOUBLE_QUANT_NAMES))
        return NF4Tensor(inner["packed"], scales, shape, dtype, strides)

    def _like(self, packed: Tensor | None = None, scales: Scales | None = None, **meta) -> NF4Tensor:
        return NF4Tensor(
            self.packed if packed is None else packed,
            self.scales if scales is None else scales,
            meta.get("shape", self.shape),
            meta.get("dtype", self.dtype),
            meta.get("strides", self.stride()),
        )

    def _inner_tensors(self) -> tuple[Tensor, ...]:
        """packed, then the scales as held, in ``__tensor_flatten__``'s order."""
        return tuple(getattr(self, name) for name in self.__tensor_flatten__()[0])

    def _experts(self, first: int, last: int) -> NF4Tensor:
        """Experts [first, last) as a view (writing into it writes into this weight). Double-quantized, the range
        holds its blocks of ``absmax_scales`` and the weight's offset, so both ends must fall on a block of 256
        scales (or at the last expert)."""
        if not self.double_quantized:
            scales = self._absmax[first:last]
        else:
            per_expert = self.absmax_codes.shape[1]
            for cut in (first, last) if last > first else ():
                if cut != self.shape[0] and cut * per_expert % ABSMAX_BLOCKSIZE:
                    every = ABSMAX_BLOCKSIZE // math.gcd(per_expert, ABSMAX_BLOCKSIZE)
                    raise NotImplementedError(
                        f"experts [{first}, {last}) of double-quantized NF4 expert weights {tuple(self.shape)}: each "
                        f"expert holds {per_expert} scales, quantized in blocks of {ABSMAX_BLOCKSIZE} over the whole "
                        f"weight, so a range of experts must start and end at a multiple of {every} experts (or at "
                        f"the last); {cut} is not. Shard over fewer ranks (whole blocks a rank), or quantize with "
                        "double_quant=False"
                    )
            blocks = slice(first * per_expert // ABSMAX_BLOCKSIZE, -(-last * per_expert // ABSMAX_BLOCKSIZE))
            scales = DoubleQuant(self.absmax_codes[first:last], self.absmax_scales[blocks], self.absmax_offset)
        return self._like(self.packed[first:last], scales, shape=(last - first, *self.shape[1:]))

    def _map_scales(self, fn) -> Scales:
        """``fn`` applied to each tensor of the scales as held (the same kind back)."""
        scales = self.scales
        return DoubleQuant(*map(fn, scales)) if isinstance(scales, DoubleQuant) else fn(scales)

    # --------------------------------------------------------------------------- FSDP2's all-gather extension
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's experts to all-gather: (packed, absmax) rows as held, and the per-expert layout
        (``post`` rebuilds the weight from it). ``outer_size``: the whole weight's shape (FSDP2 calls this
        five-argument form). An uneven number of experts raises here on every rank alike: FSDP2's own check of a
        padded shard would fail on the padded rank only, leaving the others waiting in the all-gather."""
        if outer_size[0] % mesh.size():
            raise ValueError(
                f"FSDP2 cannot shard {_param_name(module, self)} (NF4 expert weights [{outer_size[0]}, ...]) over "
                f"{mesh.size()} ranks: NF4 weights are sharded along experts, so the number of experts must be a "
                f"multiple of the FSDP world size ({outer_size[0]} experts over {mesh.size()} ranks would need "
                "FSDP2's padding, which does not apply to NF4 codes)"
            )
        inner = self._inner_tensors()  # packed, then the scales as held (fp32 absmax, or codes, scales, offset)
        # gathered: packed and the per-expert scales; a double-quantized weight's offset (one for the whole weight,
        # the same on every rank) stays as metadata. FSDP2 copies a world of one's first all-gather input only: the
        # scales (the whole weight's) all go along as metadata, kept as they are.
        gathered = 1 if mesh.size() == 1 else 3 if self.double_quantized else 2
        return inner[:gathered], (tuple(self.shape[1:]), tuple(self.stride()), inner[gathered:])

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """Every expert's codes and scales, gathered: the whole ``NF4Tensor`` over them (standing for
        ``param_dtype``, the compute dtype of FSDP2's mixed precision), with the shard's per-expert shape and
        strides. ``out``: the weight built by the first gather, which already views FSDP2's reused buffers."""
        expert_shape, strides, kept = metadata
        packed, *scales = (*all_gather_outputs, *kept)
        if out is not None:
            out = getattr(out, "_local_tensor", out)  # a DTensor's (expert parallelism's mesh under FSDP2's)
            if [t.untyped_storage().data_ptr() for t in out._inner_tensors()[: len(all_gather_outputs)]] != [
                t.untyped_storage().data_ptr() for t in all_gather_outputs
            ]:
                raise RuntimeError("fsdp_post_all_gather: out does not view the all-gather outputs of NF4 weights")
            return None
        scales = scales[0] if len(scales) == 1 else DoubleQuant(*scales)
        gathered = NF4Tensor(packed, scales, (packed.shape[0], *expert_shape), param_dtype, strides)
        return gathered, tuple(all_gather_outputs)  # what FSDP2 frees after use: never the scales it did not gather

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            if func._schema.is_mutable:  # e.g. PEFT's merge_adapter / merge_and_unload: weight.data += ΔW
                raise NotImplementedError(IN_PLACE_MESSAGE.format(func=func))
            raise NotImplementedError(
                f"{func} is not defined on NF4 expert weights (moekit.quant.NF4Tensor): they are frozen NF4 codes "
                "that only moekit's engines compute with. Run the experts on moekit (moekit.enable(model) or "
                "experts_implementation='moekit'), or take tensor.dequantize() for a dense copy."
            )
        return handler(func, *args, **kwargs)


# torch.load's default (weights_only=True) may rebuild a state dict holding NF4 weights.
torch.serialization.add_safe_globals([NF4Tensor])


def _param_name(module: torch.nn.Module, weight: NF4Tensor) -> str:
    """``Module.name`` of ``weight`` (FSDP2 registers it wrapped in a DTensor) on ``module``, for error messages."""
    for name, param in module.named_parameters(recurse=False):
        if getattr(param, "_local_tensor", param) is weight:
            return f"{type(module).__name__}.{name}"
    return f"a parameter of {type(module).__name__}"


def held_bytes(weight: Tensor) -> int:
    """The bytes a weight takes as held: an NF4 weight's codes and scales (half a byte an element, one fp32 per 64
    elements, or double-quantized one byte per 64 and one fp32 per 64·256), a dense weight's elements."""
    if isinstance(weight, NF4Tensor):
        return sum(t.nbytes for t in weight._inner_tensors())
    return weight.numel() * weight.element_size()


FROZEN_MESSAGE = (
    "NF4 expert weights are a frozen base (QLoRA): they cannot require a gradient. Train LoRA adapters on them "
    "(peft LoraConfig(target_parameters=[...])), or train the bf16 model instead."
)

IN_PLACE_MESSAGE = (
    "{func} would change NF4 expert weights (moekit.quant.NF4Tensor) in place: they are frozen NF4 codes, and a "
    "LoRA update merged into them would be rounded away. To merge adapters, merge on a dense model: apply the "
    "saved adapter to the original bf16 model (PeftModel.from_pretrained(dense, path).merge_and_unload()), or "
    "dequantize first (model.dequantize() on the transformers model, then merge_and_unload())."
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
    return t._like(t.packed.clone(), t._map_scales(torch.clone))


@_handles(aten._to_copy.default)
def _to_copy(func, t: NF4Tensor, dtype=None, device=None, non_blocking=False, **ignored):
    """``.to(device)`` moves the codes; ``.to(dtype)`` changes the compute dtype the weight stands for (the codes
    stay: ``model.to(torch.bfloat16)`` keeps a quantized model quantized)."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"NF4 expert weights stand for a floating-point weight; cannot cast to {dtype}")
    if device is None:
        return t._like(dtype=dtype or t.dtype)
    packed = t.packed.to(device=device, non_blocking=non_blocking)
    scales = t._map_scales(lambda inner: inner.to(device=device, non_blocking=non_blocking))
    return t._like(packed, scales, dtype=dtype or t.dtype)


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
        src = NF4Tensor.quantize(stored.to(dst.packed.device), double_quant=dst.double_quantized)
    elif src.is_transposed_view != dst.is_transposed_view:
        raise ValueError("cannot copy NF4 weights between views of different orientation")
    dst.packed.copy_(src.packed, non_blocking=non_blocking)
    if not dst.double_quantized:  # the scales in fp32, dequantized if the source holds them in 8 bits
        dst._absmax.copy_(src.absmax, non_blocking=non_blocking)
        return dst
    held = src.scales if src.double_quantized else _double_quantized(src.absmax.to(dst.packed.device))
    codes = dst.absmax_codes
    if codes.numel() < codes.untyped_storage().nbytes() and not torch.equal(held.offset, dst.absmax_offset):
        raise NotImplementedError(
            f"copying into {tuple(dst.shape)}, experts of a larger double-quantized NF4 weight, from a weight whose "
            "scales have another offset: the offset is the whole weight's, so the copy would change the experts "
            "outside the range. Copy whole weights (or quantize with double_quant=False)"
        )
    for mine, theirs in zip(dst.scales, held):
        mine.copy_(theirs, non_blocking=non_blocking)
    return dst


@_handles(aten.is_same_size.default)
def _is_same_size(func, t, other):
    return tuple(t.shape) == tuple(other.shape)


# ----------------------------------------------- the ops FSDP2 shards with: whole experts, i.e. rows of the codes
def _experts_only(func, t: NF4Tensor, dim: int = 0) -> None:
    if t.dim() != 3 or dim % 3 != 0:
        raise NotImplementedError(
            f"{func} on NF4 expert weights {tuple(t.shape)} takes whole experts (dim 0 of [E, a, b]), not dim {dim}: "
            "shard them along experts"
        )


@_handles(aten.split.Tensor)
def _split(func, t: NF4Tensor, split_size: int, dim: int = 0):
    _experts_only(func, t, dim)
    return [t._experts(first, min(first + split_size, t.shape[0])) for first in range(0, t.shape[0], split_size)]


@_handles(aten.slice.Tensor)
def _slice(func, t: NF4Tensor, dim: int = 0, start=None, end=None, step: int = 1):
    """Experts [start, end) as a view (``narrow`` is this): writing into it writes into ``t``."""
    _experts_only(func, t, dim)
    if step != 1:
        raise NotImplementedError(f"{func} on NF4 expert weights takes a contiguous range of experts, not step {step}")
    first, last, _ = slice(start, end).indices(t.shape[0])
    return t._experts(first, max(first, last))


@_handles(aten.new_zeros.default)
def _new_zeros(func, t: NF4Tensor, size, dtype=None, layout=None, device=None, pin_memory=None):
    """Experts [n, *t.shape[1:]] of zero codes and zero scales (a double-quantized weight's with its offset), contiguous:
    FSDP2's buffer for one rank's shard."""
    _experts_only(func, t)
    size = tuple(size)
    if size[1:] != tuple(t.shape[1:]):
        raise NotImplementedError(
            f"{func} of NF4 expert weights {tuple(t.shape)} makes whole experts [n, {', '.join(map(str, t.shape[1:]))}]"
            f", not {size}"
        )
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{func}: NF4 expert weights stand for a floating-point weight, not {dtype}")
    device = t.device if device is None else device
    packed = torch.zeros(size[0], t.packed.shape[1], dtype=torch.uint8, device=device)
    if not t.double_quantized:
        scales = torch.zeros(size[0], t._absmax.shape[1], dtype=torch.float32, device=device)
    else:
        per_expert = t.absmax_codes.shape[1]
        codes = torch.zeros(size[0], per_expert, dtype=torch.uint8, device=device)
        blocks = torch.zeros(-(-size[0] * per_expert // ABSMAX_BLOCKSIZE), dtype=torch.float32, device=device)
        scales = DoubleQuant(codes, blocks, t.absmax_offset.to(device, copy=True))
    return NF4Tensor(packed, scales, size, dtype or t.dtype)


@_handles(aten.new_empty.default)
def _new_empty(func, t: NF4Tensor, size, dtype=None, layout=None, device=None, pin_memory=None):
    """``new_empty(0)`` only: FSDP2's placeholder shard for a rank left without experts (fewer experts than ranks),
    as zero experts, so sharding reaches ``fsdp_pre_all_gather`` and its error naming the weight."""
    if tuple(size) != (0,):
        raise NotImplementedError(f"{func} of NF4 expert weights {tuple(t.shape)}: only new_empty(0) is defined")
    return _new_zeros(aten.new_zeros.default, t, (0, *t.shape[1:]), dtype, layout, device, pin_memory)


@_handles(aten.view.default)
def _view(func, t: NF4Tensor, size):
    """``view`` as its own shape (``DTensor.to_local`` views so), or ``view(-1)`` of a contiguous weight (FSDP2
    keeps its shard so): the same codes, the flat one held only, never computed with."""
    size = list(size)
    if size == list(t.shape):
        return t._like()
    if size not in ([-1], [t.numel()]) or not t.is_contiguous():
        raise NotImplementedError(
            f"{func} of NF4 expert weights {tuple(t.shape)} (strides {t.stride()}) to {size}: only their own shape "
            "or a contiguous weight's view(-1) is defined"
        )
    return t._like(shape=(t.numel(),), strides=(1,))


@_handles(aten.as_strided.default)
def _as_strided(func, t: NF4Tensor, size, stride, storage_offset=None):
    """The identity only (FSDP2 takes its gathered weight so); any other layout is not expressible over codes."""
    if (tuple(size), tuple(stride), storage_offset or 0) != (tuple(t.shape), t.stride(), 0):
        raise NotImplementedError(
            f"{func} of NF4 expert weights {tuple(t.shape)} (strides {t.stride()}) to size {tuple(size)}, stride "
            f"{tuple(stride)}, offset {storage_offset}: only their own shape and strides are defined"
        )
    return t._like()
