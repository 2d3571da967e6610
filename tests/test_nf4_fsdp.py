"""``NF4Tensor`` under FSDP2, in one process: the sharding ops and the all-gather hooks, on their own.

FSDP2 shards a parameter along dim 0 with chunk / new_zeros / narrow / copy_ / view(-1), and all-gathers it through
``fsdp_pre_all_gather`` (each rank's inner tensors) and ``fsdp_post_all_gather`` (the whole tensor from the
gathered ones). Here every rank's shard is cut in one process and the all-gather is a concatenation of the ranks'
rows (what FSDP2's all-gather output is): the gathered weight is an ``NF4Tensor`` over the gathered buffers
themselves, with the original codes and scales bit for bit, its shape and strides (a transposed view too), and
the same dequantized weight. An uneven number of experts (3 on 2 ranks) is a clear error naming the parameter.
The real thing, two processes training LoRA on NF4 experts under ``fully_shard``, is in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from moekit.quant import NF4Tensor


class Mesh:
    """The one thing the hooks ask of FSDP2's device mesh: its size (the FSDP world size)."""

    def __init__(self, world: int):
        self.world = world

    def size(self) -> int:
        return self.world


def _weight(num_experts: int = 4, transposed: bool = False) -> NF4Tensor:
    dense = torch.randn(num_experts, 8, 16, generator=torch.Generator().manual_seed(0))
    weight = NF4Tensor.quantize(dense)
    return weight.transpose(1, 2) if transposed else weight


def _shards(weight: NF4Tensor, world: int) -> list[NF4Tensor]:
    """Each rank's shard, as FSDP2 makes it: its chunk of experts copied into a zeroed buffer of the padded
    shard size (chunk 0's), then narrowed back to the chunk. FSDP2 takes contiguous parameters only (new_zeros is
    contiguous), so a transposed view's shards are its chunks."""
    chunks = torch.chunk(weight, world, dim=0)
    if not weight.is_contiguous():
        return list(chunks)
    shards = []
    for chunk in chunks:
        padded = chunk.new_zeros(chunks[0].shape)
        padded.narrow(0, 0, chunk.shape[0]).copy_(chunk)
        shards.append(padded.narrow(0, 0, chunk.shape[0]))
    return shards


def _module(shard: NF4Tensor) -> torch.nn.Module:
    """A module holding ``shard`` as its parameter ``weight`` (the hooks name it in errors)."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(shard, requires_grad=False)
    return module


def _all_gather(weight: NF4Tensor, world: int, param_dtype: torch.dtype | None = None):
    """(gathered weight, its inner tensors, the gathered buffers): pre-all-gather on every rank's shard, the ranks'
    inputs concatenated row-wise, post-all-gather on rank 0's shard."""
    mesh, policy = Mesh(world), MixedPrecisionPolicy()
    modules = [_module(shard) for shard in _shards(weight, world)]
    inputs = [
        module.weight.fsdp_pre_all_gather(mesh, weight.shape, weight.stride(), module, policy) for module in modules
    ]
    (_, metadata), local = inputs[0], modules[0].weight
    outputs = tuple(torch.cat([tensors[i] for tensors, _ in inputs]) for i in range(len(inputs[0][0])))
    gathered, inner = local.fsdp_post_all_gather(outputs, metadata, param_dtype or weight.dtype)
    return gathered, inner, outputs, (local, metadata)


@pytest.mark.parametrize("transposed", [False, True], ids=["stored", "transposed_view"])
@pytest.mark.parametrize("world", [2, 4])
def test_shard_then_gather_is_the_weight(world, transposed):
    weight = _weight(transposed=transposed)
    shards = _shards(weight, world)
    rows = weight.shape[0] // world
    for rank, shard in enumerate(shards):  # whole experts: rows of the codes and of the scales
        assert type(shard) is NF4Tensor and shard.stride() == weight.stride()
        assert torch.equal(shard.packed, weight.packed[rank * rows : (rank + 1) * rows])
        assert torch.equal(shard.absmax, weight.absmax[rank * rows : (rank + 1) * rows])
        assert torch.equal(shard.dequantize(), weight.dequantize_experts(rank * rows, (rank + 1) * rows))

    gathered, inner, outputs, _ = _all_gather(weight, world)
    assert type(gathered) is NF4Tensor
    assert (gathered.shape, gathered.stride(), gathered.dtype) == (weight.shape, weight.stride(), weight.dtype)
    assert gathered.is_transposed_view == transposed
    assert torch.equal(gathered.packed, weight.packed) and torch.equal(gathered.absmax, weight.absmax)
    assert torch.equal(gathered.dequantize(), weight.dequantize())
    # no copy: the weight and the inner tensors FSDP2 frees and re-allocates are the gathered buffers
    assert gathered.packed is outputs[0] and gathered.absmax is outputs[1]
    assert inner == outputs


def test_world_of_one_gathers_the_codes_and_keeps_the_scales():
    """FSDP2 with one rank copies only the first all-gather input: the codes go through it, the scales along as
    metadata, and what FSDP2 frees after use is the copied codes only, never the parameter's own scales."""
    weight = _weight()
    module = _module(weight)
    inputs, metadata = weight.fsdp_pre_all_gather(
        Mesh(1), weight.shape, weight.stride(), module, MixedPrecisionPolicy()
    )
    assert len(inputs) == 1 and inputs[0] is weight.packed
    copied = (inputs[0].clone(),)  # FSDP2's copy-out at world size 1
    gathered, inner = weight.fsdp_post_all_gather(copied, metadata, weight.dtype)
    assert inner == copied and gathered.absmax is weight.absmax and gathered.packed is copied[0]
    assert torch.equal(gathered.dequantize(), weight.dequantize())
    assert weight.fsdp_post_all_gather(copied, metadata, weight.dtype, out=gathered) is None


def test_regather_reuses_the_weight():
    weight = _weight()
    gathered, _, outputs, (local, metadata) = _all_gather(weight, 2)
    # later gathers land in the same buffers, which the weight built by the first one already views
    assert local.fsdp_post_all_gather(outputs, metadata, weight.dtype, out=gathered) is None
    elsewhere = tuple(t.clone() for t in outputs)
    with pytest.raises(RuntimeError, match="does not view the all-gather outputs"):
        local.fsdp_post_all_gather(elsewhere, metadata, weight.dtype, out=gathered)


def test_gathered_weight_stands_for_param_dtype():
    gathered, *_ = _all_gather(_weight(), 2, param_dtype=torch.bfloat16)
    assert gathered.dtype == torch.bfloat16
    assert torch.equal(gathered.dequantize(), _weight().dequantize(torch.bfloat16))


def test_uneven_experts_are_a_clear_error():
    weight = _weight(num_experts=3)
    shards = _shards(weight, 2)  # FSDP2's padding: rank 1 holds expert 2 in a buffer of 2 experts
    assert [tuple(s.shape) for s in shards] == [(2, 8, 16), (1, 8, 16)]
    assert torch.equal(shards[1].packed, weight.packed[2:])
    module = _module(shards[1])
    match = r"Module\.weight \(NF4 expert weights \[3, \.\.\.\]\) over 2 ranks.*multiple of the FSDP world size"
    with pytest.raises(ValueError, match=match):
        module.weight.fsdp_pre_all_gather(Mesh(2), weight.shape, weight.stride(), module, MixedPrecisionPolicy())


def test_flat_and_identity_views():
    weight = _weight()
    flat = weight.view(-1)
    assert type(flat) is NF4Tensor and flat.shape == (weight.numel(),) and flat.packed is weight.packed
    assert weight.view(weight.shape).shape == weight.shape
    assert torch.as_strided(weight, weight.shape, weight.stride(), 0).packed is weight.packed


@pytest.mark.parametrize(
    "op, match",
    [
        (lambda w: torch.chunk(w, 2, dim=1), r"aten\.split\.Tensor.*whole experts \(dim 0 of \[E, a, b\]\), not dim 1"),
        (lambda w: w[::2], r"aten\.slice\.Tensor.*not step 2"),
        (lambda w: w.new_zeros(2, 16, 8), r"aten\.new_zeros\.default.*\[n, 8, 16\], not \(2, 16, 8\)"),
        (lambda w: w.view(4, 128), r"aten\.view\.default.*to \[4, 128\]"),
        (lambda w: w.transpose(1, 2).view(-1), r"aten\.view\.default.*view\(-1\)"),
        (lambda w: torch.chunk(w.view(-1), 2), r"aten\.split\.Tensor.*\(512,\) takes whole experts"),
        (lambda w: torch.as_strided(w, (2, 8, 16), w.stride(), 0), r"aten\.as_strided\.default.*size \(2, 8, 16\)"),
    ],
    ids=[
        "split_dim1",
        "slice_step",
        "new_zeros_shape",
        "view_shape",
        "view_transposed",
        "split_flat",
        "as_strided_size",
    ],
)
def test_other_layouts_raise_naming_the_op(op, match):
    with pytest.raises(NotImplementedError, match=match):
        op(_weight())


def test_fewer_experts_than_ranks_reach_the_named_error():
    """One expert over two ranks: FSDP2's placeholder for the rank without experts (``new_empty(0)``) is a shard of
    zero experts, and the all-gather hook raises the error naming the weight (not an undefined op)."""
    weight = _weight()[:1].clone()
    empty = weight.new_empty(0)
    assert type(empty) is NF4Tensor and empty.shape == (0, *weight.shape[1:]) and empty.numel() == 0
    with pytest.raises(NotImplementedError, match="only new_empty"):
        weight.new_empty(3)
    module = _module(weight)
    with pytest.raises(ValueError, match="multiple of the FSDP world size"):
        weight.fsdp_pre_all_gather(Mesh(2), weight.shape, weight.stride(), module, MixedPrecisionPolicy())


# ------------------------------------------------------------------------------------ double-quantized scales
def _double_quantized(num_experts: int = 4, shape=(128, 128), transposed: bool = False) -> NF4Tensor:
    """Experts of 128 · 128 elements: 256 scales each, one block of 256 8-bit scales an expert."""
    dense = torch.randn(num_experts, *shape, generator=torch.Generator().manual_seed(1))
    weight = NF4Tensor.quantize(dense, double_quant=True)
    return weight.transpose(1, 2) if transposed else weight


@pytest.mark.parametrize("transposed", [False, True], ids=["stored", "transposed_view"])
@pytest.mark.parametrize("world", [2, 4])
def test_double_quantized_shard_then_gather_is_the_weight(world, transposed):
    """Each rank holds its experts' codes, 8-bit scale codes and their blocks of 256 scales (and the weight's
    offset), and dequantizes to their bits; the all-gather gives back the weight's codes and scales as held."""
    weight = _double_quantized(transposed=transposed)
    rows = weight.shape[0] // world
    for rank, shard in enumerate(_shards(weight, world)):
        assert shard.double_quantized and shard.absmax_scales.shape == (rows,)
        assert torch.equal(shard.absmax_codes, weight.absmax_codes[rank * rows : (rank + 1) * rows])
        assert torch.equal(shard.absmax_offset, weight.absmax_offset)
        assert torch.equal(shard.dequantize(), weight.dequantize_experts(rank * rows, (rank + 1) * rows))

    gathered, inner, outputs, (local, metadata) = _all_gather(weight, world)
    assert len(outputs) == 3 and metadata[2] == (local.absmax_offset,)  # the offset stays, the rest is gathered
    assert gathered.double_quantized and gathered.is_transposed_view == transposed
    for name in ("packed", "absmax_codes", "absmax_scales", "absmax_offset"):
        assert torch.equal(getattr(gathered, name), getattr(weight, name)), name
    assert torch.equal(gathered.dequantize(), weight.dequantize())
    assert (gathered.packed, gathered.absmax_codes, gathered.absmax_scales) == outputs and inner == outputs
    assert local.fsdp_post_all_gather(outputs, metadata, weight.dtype, out=gathered) is None


def test_double_quantized_world_of_one_keeps_the_scales():
    weight = _double_quantized()
    inputs, metadata = weight.fsdp_pre_all_gather(
        Mesh(1), weight.shape, weight.stride(), _module(weight), MixedPrecisionPolicy()
    )
    assert len(inputs) == 1 and inputs[0] is weight.packed
    gathered, _ = weight.fsdp_post_all_gather((inputs[0].clone(),), metadata, weight.dtype)
    assert gathered.absmax_codes is weight.absmax_codes and gathered.absmax_scales is weight.absmax_scales
    assert torch.equal(gathered.dequantize(), weight.dequantize())


def test_double_quantized_ranges_take_whole_blocks_of_scales():
    """128 scales an expert: ranges of experts start at even experts (or end at the last one, whose block is short);
    a cut inside a block of 256 scales (FSDP2 over 4 ranks here) is an error saying how to shard instead."""
    weight = _double_quantized(num_experts=3, shape=(64, 128))  # 384 scales: blocks of 256 and 128
    dense = weight.dequantize()
    for first, last in ((0, 2), (2, 3), (0, 3), (2, 2)):
        piece = weight[first:last]
        assert piece.double_quantized and torch.equal(piece.dequantize(), dense[first:last]), (first, last)
    assert weight[2:].absmax_scales.data_ptr() == weight.absmax_scales[1:].data_ptr()  # a view of the weight
    for cut in (lambda: weight[1:2], lambda: weight[:1], lambda: torch.chunk(_double_quantized(4, (64, 128)), 4)):
        with pytest.raises(NotImplementedError, match=r"multiple of 2 experts \(or at the last\); 1 is not"):
            cut()


def test_copy_into_a_double_quantized_range_keeps_the_offset():
    """A range's offset is the whole weight's: copying in experts whose scales have another offset would change the
    others, so it raises; with the same offset (FSDP2's shard buffers: new_zeros keeps it) it copies."""
    weight, other = _double_quantized(), NF4Tensor.quantize(torch.randn(4, 128, 128), double_quant=True)
    with pytest.raises(NotImplementedError, match="another offset"):
        weight[:2].copy_(other[:2])
    before = weight.dequantize()
    weight[2:].copy_(weight[:2].clone())
    assert torch.equal(weight.dequantize()[2:], before[:2]) and torch.equal(weight.dequantize()[:2], before[:2])
    buffer = weight.new_zeros(weight.shape)
    assert torch.equal(buffer.absmax_offset, weight.absmax_offset) and buffer.absmax_scales.shape == (4,)
