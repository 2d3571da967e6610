"""Cold-cache correctness on the GPU: the FIRST call of every Triton engine path, tuning included, against the
reference engine — run by every GPU visit that touches a kernel (``tools/gpu_session.sh OUT cold``).

    PYTHONPATH=src python tools/cold_cache.py --shapes nemotron3-nano,odd-relu2 --json OUT.json [--expect OUT.json]

Each shape runs every path through the user's route (transformers experts module, PEFT LoRA r=16 with non-zero B,
``moekit.enable``, the engine forced by ``moekit.options.override(backend=...)``): full fine-tuning, frozen base,
LoRA with the big GEMMs fused and split (the ``lora_gemm`` option), LoRA with a trainable base, and on NF4 expert
weights (``moekit.quant``) the frozen base and LoRA (the fp32 truth runs on the same NF4 codes). Each path runs at
two token counts, so the second is a new tuning key in a process that has tuned others. For each (path, tokens):
the Triton engine's first call (tuning on its live buffers), its second call (tuned), the reference engine in bf16
and in fp32. A case passes when the first call's output and every gradient are no worse against fp32 than the
bf16 reference (err <= 1.5 ref_err + 6e-3, err = max|a - b| / max|b|) and the second call equals the first bit
for bit.

Run it in a process with an empty tuning cache (``MOEKIT_CACHE_DIR`` a new directory), then again with the same
directory and ``--expect`` the first run's JSON: the second process must tune nothing (its first calls are fast)
and give the same bits (a digest per tensor).

Why first calls: the autotuner runs every candidate config on the call's live buffers, so a kernel that writes in
place (or accumulates) must have what it overwrites restored after each config; a missing restore shows only on
the first call of a tuning key, in a process whose cache lacks it, as a wrong result that later calls do not
repeat.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time

import torch

from moekit.options import override
from moekit.tools.bench import PRESETS, Shape, _wrap_lora, make_experts_module, make_routing

ODD = {
    s.name: s
    for s in (
        Shape("odd-relu2", 72, 40, 5, 3, gated=False, act="relu2"),
        Shape("odd-silu", 72, 40, 5, 3, gated=True, act="silu"),
        Shape("odd-gpt-oss", 72, 40, 5, 3, gated=True, act="gpt_oss"),
    )
}
SHAPES = {**{name: PRESETS[name] for name in ("nemotron3-nano", "qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b")}, **ODD}
# path: (LoRA, base trainable, the lora_gemm option, NF4 experts)
PATHS = {
    "full": (False, True, "auto", False),
    "frozen": (False, False, "auto", False),
    "lora-fused": (True, False, "fused", False),
    "lora-split": (True, False, "split", False),
    "lora-trainable": (True, True, "auto", False),
    "nf4-frozen": (False, False, "auto", True),
    "nf4-lora": (True, False, "auto", True),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


def build(shape: Shape, path: str, dtype: torch.dtype) -> torch.nn.Module:
    lora, trainable, _, nf4 = PATHS[path]
    module = make_experts_module(shape, "cuda", dtype)
    import moekit
    from moekit.quant.experts import quantize_module

    moekit.enable(module)
    if nf4:
        quantize_module(module)
    torch.manual_seed(0)  # PEFT initialises its factors from the global generator: same factors in every process
    model = _wrap_lora(module, 16) if lora else module
    module.requires_grad_(trainable)  # after PEFT, which freezes the base
    return model


def step(model, engine: str, inputs) -> list[torch.Tensor]:
    """Output and every gradient (hidden, routing weights, trainable parameters) of one call on ``engine``."""
    hidden, index, weights, upstream = inputs
    hidden = hidden.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)
    with override(backend=engine):
        out = model(hidden, index, weights)
        out.backward(upstream.to(out.dtype))
    grads = [out.detach(), hidden.grad, weights.grad]
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            grads.append(param.grad)
            param.grad = None
    torch.cuda.synchronize()
    return grads


def run_case(shape: Shape, path: str, tokens: int) -> dict:
    with override(lora_gemm=PATHS[path][2]):
        return _run_case(shape, path, tokens)


def _run_case(shape: Shape, path: str, tokens: int) -> dict:
    model = build(shape, path, torch.bfloat16)
    hidden, index, weights = make_routing(shape, tokens, "cuda", torch.bfloat16, seed=tokens)
    upstream = torch.randn(hidden.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    inputs = (hidden, index, weights, upstream.to(torch.bfloat16))
    start = time.perf_counter()
    first = step(model, "triton", inputs)
    first_s = time.perf_counter() - start
    second = step(model, "triton", inputs)
    reference = step(model, "reference", inputs)
    truth_model = copy.deepcopy(model).float()
    truth = step(truth_model, "reference", tuple(t.float() if t.is_floating_point() else t for t in inputs))
    del truth_model
    errors, ok = [], True
    for ours, ref, fp32 in zip(first, reference, truth):
        err, ref_err = rel_err(ours, fp32), rel_err(ref, fp32)
        errors.append((err, ref_err))
        ok &= bool(torch.isfinite(ours).all()) and err <= 1.5 * ref_err + 6e-3
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second))
    return {
        "shape": shape.name, "path": path, "tokens": tokens, "first_call_s": round(first_s, 2),
        "worst_err": max(e for e, _ in errors), "worst_ref_err": max(r for _, r in errors),
        "within": ok, "first_equals_second": bitwise, "digests": [digest(t) for t in first],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument(
        "--tokens", default="8192,32768", help="two token counts for the model shapes (odd shapes: 37, 301)"
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--expect", help="JSON of an earlier (cold) run: same bits required")
    args = parser.parse_args()
    expected = {}
    if args.expect:
        with open(args.expect) as handle:
            expected = {(r["shape"], r["path"], r["tokens"]): r["digests"] for r in json.load(handle)}
    records = []
    for name in args.shapes.split(","):
        tokens = [37, 301] if name in ODD else [int(t) for t in args.tokens.split(",")]
        for path in args.paths.split(","):
            for count in tokens:
                record = run_case(SHAPES[name], path, count)
                previous = expected.get((name, path, count))
                record["same_bits_as_expected"] = None if previous is None else previous == record["digests"]
                records.append(record)
                print(
                    f"{name:15s} {path:15s} T={count:5d} first call {record['first_call_s']:6.2f} s  "
                    f"err {record['worst_err']:.2e} (bf16 reference {record['worst_ref_err']:.2e})  "
                    f"{'ok' if record['within'] else 'WRONG'}  first==second {record['first_equals_second']}"
                    + ("" if previous is None else f"  same bits as cold run {record['same_bits_as_expected']}"),
                    flush=True,
                )
                with open(args.json, "w") as handle:
                    json.dump(records, handle, indent=1)
    bad = [r for r in records if not (r["within"] and r["first_equals_second"]) or r["same_bits_as_expected"] is False]
    print(f"cold-cache: {len(records) - len(bad)} of {len(records)} cases pass on {torch.cuda.get_device_name()}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
