"""``moekit quantize SOURCE OUT``: a dense (bf16) checkpoint to one whose experts are NF4, once.

It loads SOURCE with ``MoekitQuantConfig`` (each expert weight quantized as it loads, so the dense experts of the
whole model never sit in memory at once; ``--linear nf4``: the nn.Linear layers to bitsandbytes 4-bit too) and
writes it with ``save_pretrained`` to OUT, with SOURCE's tokenizer and other non-weight files beside it.
``from_pretrained(OUT)`` (with ``import moekit``) then reads the NF4 codes and scales as saved. Prints the expert
weights' bytes, dense and held, and the bytes written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from ..quant.experts import TOOL_QUANTS, tool_quant_options
from .cli import HelpFormatter

# Files of a model directory that save_pretrained writes itself (the rest, e.g. the tokenizer's, are copied).
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def copy_other_files(source: Path, out: Path) -> list[str]:
    """SOURCE's files that are neither weights nor written by save_pretrained (tokenizer, chat template, ...)."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in WRITTEN and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def quantize_checkpoint(source, out, quant: str = "nf4", linear: str = "none", device: str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> dict:  # fmt: skip
    """Load ``source`` quantized, save it to ``out``; returns what was done (bytes, seconds, files copied)."""
    from transformers import AutoModelForCausalLM

    from ..quant.hf import MoekitQuantConfig, _expert_weight_names
    from ..quant.tensor import held_bytes

    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"SOURCE {source} is not a model directory (it has no config.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"OUT {out} exists and is not empty: give a new directory")
    config = MoekitQuantConfig(
        linear=None if linear == "none" else linear, experts_double_quant=tool_quant_options(quant)["double_quant"]
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device, quantization_config=config)
    loaded = time.perf_counter()
    experts = [model.get_parameter(name) for name in _expert_weight_names(model)]
    model.save_pretrained(out)
    copied = copy_other_files(source, out)
    return {
        "expert_weights": len(experts),
        "expert_dense_bytes": sum(w.numel() * w.element_size() for w in experts),
        "expert_held_bytes": sum(held_bytes(w) for w in experts),
        "written_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "copied": copied,
        "load_s": loaded - started,
        "save_s": time.perf_counter() - loaded,
    }


def command(args: argparse.Namespace) -> int:
    try:
        done = quantize_checkpoint(args.source, args.out, args.quant, args.linear, args.device,
                                   getattr(torch, args.dtype))  # fmt: skip
    except (FileNotFoundError, FileExistsError) as error:
        print(f"moekit quantize: error: {error}", file=sys.stderr)
        return 2
    print(
        f"moekit quantize: {done['expert_weights']} expert weights, {_size(done['expert_dense_bytes'])} in "
        f"{args.dtype} -> {_size(done['expert_held_bytes'])} as {args.quant}; wrote {args.out} "
        f"({_size(done['written_bytes'])} of weights; loaded in {done['load_s']:.1f} s, saved in "
        f"{done['save_s']:.1f} s); copied {', '.join(done['copied']) or 'no other files'}"
    )
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.2f} MiB"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize",
        help="write a checkpoint whose expert weights are NF4",
        description="Load a dense checkpoint with its expert weights quantized to NF4 as they load, and save it: "
        "from_pretrained of the result (with import moekit) reads the NF4 codes as saved.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("source", help="the dense model directory (no default)")
    add("out", help="a new directory for the quantized model (no default)")
    add("--quant", default="nf4", choices=TOOL_QUANTS[1:], help="nf4, or nf4-dq: double-quantized scales")
    add("--linear", default="none", choices=["none", "nf4"], help="nf4: nn.Linear layers to bitsandbytes 4-bit too")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
        help="where the model loads and quantizes (cuda when available)")  # fmt: skip
    add("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="the dtype the model loads in (what the NF4 weights stand for)")  # fmt: skip
    parser.set_defaults(func=command)
    return parser
