"""Device memory while loading a bf16 checkpoint straight into NF4 experts (``moekit.quant.MoekitQuantConfig``).

    PYTHONPATH=src python tools/measure_loading.py [--layers 4] [--out R.json]          # on a CUDA GPU
    PYTHONPATH=src python tools/measure_loading.py --device cpu --layers 1 --small      # a quick run on the CPU

1. Writes a local bf16 checkpoint of a Qwen3-MoE model of Qwen3-30B-A3B's widths (hidden 2048, 128 experts of
   intermediate 768, top-8, vocabulary 151936; ``--small``: hidden 256, 16 experts of 128, top-4, vocabulary
   4096) with ``--layers`` decoder layers, in the hub's layout (one tensor per expert projection,
   ``mlp.experts.N.gate_proj.weight``: transformers' converters merge them while loading). It is streamed: the
   model exists only on the meta device, and each safetensors shard (one per layer) is written one tensor at a
   time from one buffer per tensor shape, refilled: host memory never holds more than one tensor of each shape.
   Random normal weights (std ``--std``) from one seeded generator; norms 1.
2. Loads it with ``from_pretrained(path, quantization_config=MoekitQuantConfig(), dtype=torch.bfloat16,
   device_map=DEVICE)`` and reports the device's peak allocated memory during the load
   (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), the final footprint
   (``torch.cuda.memory_allocated``), one layer's bf16 expert bytes, and whether peak <= final + one layer.
   A forward of a few tokens checks the loaded model runs (after the measurement).
3. Saves the NF4 model (``save_pretrained``: its codes and scales as held) and loads that checkpoint back
   (``from_pretrained(nf4_path, dtype=torch.bfloat16, device_map=DEVICE)``: nothing dense is read), with the
   same measurements, and checks it holds the same codes and scales.
4. Loads the bf16 checkpoint plainly in bf16 for its footprint and peak beside it.

Prints a short table and writes the JSON to ``--out``. The checkpoint goes to a temporary directory (``--workdir``)
that is deleted at the end (``--keep`` keeps it). On the CPU there are no allocator statistics: the peaks are
null and the footprints are the bytes of the parameters (NF4 codes and scales counted as stored).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MOEKIT_TRITON_AUTOTUNE", "0")  # the sanity forward needs no tuning
try:
    import moekit
except ImportError:  # run from the checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import moekit
from moekit.quant import MoekitQuantConfig, NF4Tensor
from moekit.quant.tensor import held_bytes

GIB = 1 << 30

FULL = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "vocab_size": 151936, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144}  # fmt: skip
SMALL = {"hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 16, "num_experts_per_tok": 4,
         "vocab_size": 4096, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "intermediate_size": 512}  # fmt: skip


def make_config(layers: int, small: bool) -> Qwen3MoeConfig:
    widths = SMALL if small else FULL
    return Qwen3MoeConfig(
        num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, **widths,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- the checkpoint
def checkpoint_tensors(config: Qwen3MoeConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in the hub's layout: the model's (meta) state dict with each
    fused expert weight split into one tensor per expert and projection."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    size = config.moe_intermediate_size
    tensors = []
    for name, tensor in model.state_dict().items():
        if name.endswith(".experts.gate_up_proj"):  # [E, 2I, H]: gate rows first, then up
            stem = name.removesuffix("gate_up_proj")
            for e in range(tensor.shape[0]):
                tensors.append((f"{stem}{e}.gate_proj.weight", (size, tensor.shape[2])))
                tensors.append((f"{stem}{e}.up_proj.weight", (size, tensor.shape[2])))
        elif name.endswith(".experts.down_proj"):  # [E, H, I]
            stem = name.removesuffix("down_proj")
            tensors.extend((f"{stem}{e}.down_proj.weight", tuple(tensor.shape[1:])) for e in range(tensor.shape[0]))
        else:
            tensors.append((name, tuple(tensor.shape)))
    return tensors


def shard_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return f"layer-{int(parts[2]):03d}.safetensors"
    return "model-other.safetensors"


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], make) -> int:
    """One safetensors file of bf16 tensors, written one tensor at a time (``make(name, shape)`` gives each)."""
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            tensor = make(name, shape).contiguous()
            assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == shape, name
            f.write(tensor.view(torch.uint8).numpy().data)
    return offset


def write_checkpoint(path: Path, config: Qwen3MoeConfig, seed: int, std: float) -> int:
    """The config, the shards and their index in ``path``; returns the bytes of the tensors."""
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    buffers: dict[tuple[int, ...], torch.Tensor] = {}  # one per shape, refilled for each tensor (written at once)

    def make(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        buffer = buffers.get(shape)
        if buffer is None:
            buffer = buffers[shape] = torch.empty(shape, dtype=torch.bfloat16)
        return buffer.normal_(0.0, std, generator=generator)

    shards: dict[str, list] = {}
    for name, shape in checkpoint_tensors(config):
        shards.setdefault(shard_of(name), []).append((name, shape))
    total, weight_map = 0, {}
    for shard, entries in sorted(shards.items()):
        total += write_safetensors(path / shard, entries, make)
        weight_map.update((name, shard) for name, _ in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


# ------------------------------------------------------------------------------------------- measuring
def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (NF4: codes and scales; bitsandbytes: codes + state)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += held_bytes(tensor)
        if not isinstance(tensor, NF4Tensor):
            state = getattr(tensor, "quant_state", None)
            if state is not None and getattr(state, "absmax", None) is not None:
                total += state.absmax.nbytes
    return total


def measure_load(path: Path, device: torch.device, **kwargs) -> tuple[torch.nn.Module, dict]:
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=str(device), **kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    record = {"load_s": round(time.perf_counter() - start, 2), "param_bytes": param_bytes(model)}
    if cuda:
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        record["final_bytes"] = torch.cuda.memory_allocated(device) - base
    else:
        record["peak_bytes"] = None
        record["final_bytes"] = record["param_bytes"]
    return model, record


@torch.no_grad()
def sanity_forward(model: torch.nn.Module, device: torch.device, vocab: int) -> bool:
    input_ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    return bool(torch.isfinite(model(input_ids).logits).all())


def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--device", default="cuda", help="cuda (default: cuda:0), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="small widths (hidden 256, 16 experts) for a CPU run")
    parser.add_argument(
        "--linear",
        choices=["none", "nf4"],
        default="none",
        help="MoekitQuantConfig(linear=...): also bitsandbytes 4-bit nn.Linear (needs bitsandbytes)",
    )
    parser.add_argument(
        "--double-quant",
        action="store_true",
        help="MoekitQuantConfig(experts_double_quant=True): the experts' scales double-quantized",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="std of the random weights (default 0.02)")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--out", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    device = torch.device("cuda:0" if args.device == "cuda" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu --small for a CPU run)")

    started = time.perf_counter()
    config = make_config(args.layers, args.small)
    widths = SMALL if args.small else FULL
    hidden, inner, experts = widths["hidden_size"], widths["moe_intermediate_size"], widths["num_experts"]
    layer_expert_bytes = experts * 3 * inner * hidden * 2  # gate, up, down in bf16
    workdir = Path(tempfile.mkdtemp(prefix="moekit-measure-loading-", dir=args.workdir))
    record: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "moekit": moekit.__version__,
        },
        "model": {"model_type": "qwen3_moe", "layers": args.layers, "small": args.small, **widths},
        "linear": args.linear,
        "double_quant": args.double_quant,
        "one_layer_bf16_expert_bytes": layer_expert_bytes,
    }
    try:
        t = time.perf_counter()
        record["checkpoint_bytes"] = write_checkpoint(workdir, config, args.seed, args.std)
        record["write_s"] = round(time.perf_counter() - t, 2)

        quant_config = MoekitQuantConfig(
            linear=None if args.linear == "none" else args.linear, experts_double_quant=args.double_quant
        )
        model, quantized = measure_load(workdir, device, quantization_config=quant_config)
        nf4 = [p for p in model.parameters() if isinstance(p, NF4Tensor)]
        quantized["nf4_expert_weights"] = len(nf4)
        quantized["all_experts_nf4"] = len(nf4) == 2 * args.layers
        quantized["all_double_quantized"] = all(p.double_quantized for p in nf4)
        quantized["forward_finite"] = sanity_forward(model, device, config.vocab_size)
        if quantized["peak_bytes"] is not None:
            quantized["peak_minus_final_bytes"] = quantized["peak_bytes"] - quantized["final_bytes"]
            quantized["peak_ok"] = quantized["peak_bytes"] <= quantized["final_bytes"] + layer_expert_bytes
        else:
            quantized["peak_minus_final_bytes"] = quantized["peak_ok"] = None
        record["quantized"] = quantized

        model.save_pretrained(workdir / "nf4")
        record["nf4_checkpoint_bytes"] = sum(f.stat().st_size for f in (workdir / "nf4").glob("*.safetensors"))
        reloaded, again = measure_load(workdir / "nf4", device)
        held = {name: p._inner_tensors() for name, p in model.named_parameters() if isinstance(p, NF4Tensor)}
        again["same_nf4"] = held.keys() == {
            n for n, p in reloaded.named_parameters() if isinstance(p, NF4Tensor)
        } and all(
            all(torch.equal(a, b) for a, b in zip(held[name], reloaded.get_parameter(name)._inner_tensors()))
            for name in held
        )
        if again["peak_bytes"] is not None:
            again["peak_minus_final_bytes"] = again["peak_bytes"] - again["final_bytes"]
        record["nf4_reload"] = again
        del model, nf4, reloaded, held

        model, plain = measure_load(workdir, device)
        record["bf16"] = plain
        del model
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            record["checkpoint"] = str(workdir)
    record["total_s"] = round(time.perf_counter() - started, 2)

    q, r, p = record["quantized"], record["nf4_reload"], record["bf16"]
    rows = [
        ("checkpoint (bf16 tensors)", gib(record["checkpoint_bytes"]), f"written in {record['write_s']} s"),
        ("one layer's bf16 experts", gib(layer_expert_bytes), ""),
        ("NF4 load: peak during load", gib(q["peak_bytes"]), f"load {q['load_s']} s"),
        ("NF4 load: final footprint", gib(q["final_bytes"]), f"params {gib(q['param_bytes'])}"),
        ("NF4 load: peak - final", gib(q["peak_minus_final_bytes"]),
         {True: "ok: peak <= final + one layer", False: "OVER: peak > final + one layer", None: "n/a (no CUDA)"}[
             q["peak_ok"]]),
        ("NF4 checkpoint reloaded: peak", gib(r["peak_bytes"]),
         f"load {r['load_s']} s, files {gib(record['nf4_checkpoint_bytes'])}, same codes: {r['same_nf4']}"),
        ("NF4 checkpoint reloaded: final", gib(r["final_bytes"]), f"params {gib(r['param_bytes'])}"),
        ("bf16 load: peak during load", gib(p["peak_bytes"]), f"load {p['load_s']} s"),
        ("bf16 load: final footprint", gib(p["final_bytes"]), f"params {gib(p['param_bytes'])}"),
    ]  # fmt: skip
    print(f"measure_loading: qwen3_moe x{args.layers} layers{' (small)' if args.small else ''} on {record['device']}"
          f", transformers {transformers.__version__}; NF4 experts {q['nf4_expert_weights']}, forward finite: "
          f"{q['forward_finite']}; {record['total_s']} s in all")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"  {label:<{width}}  {value:>12}  {note}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    ok = q["all_experts_nf4"] and q["forward_finite"] and q["peak_ok"] is not False and r["same_nf4"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
