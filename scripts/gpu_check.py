"""GPU correctness (and a quick timing) of moekit's Triton engine against the reference engine.

    PYTHONPATH=src python scripts/gpu_check.py [--out DIR] [--skip tests,sweep,lora,bench,lora_bench] [--smoke]
                                               [--lora]

Sections, each in its own process (tests and sweeps side by side, the timings alone afterwards):
  tests  pytest -m triton on tests/test_triton_engine.py, test_engine.py, test_triton_lora.py, natively on the GPU
         (one kernel config: no tuning)
  sweep  randomized shapes (the four model shapes at T=512, random small/odd ones, zero tokens), fresh random
         inputs, bf16 and fp32, forward output and every gradient vs the reference engine and an fp64 reference
         (bf16 passes when no worse than the bf16 reference: err <= 1.5 ref_err + 6e-3; fp32: err <= 1e-4), all
         kernel outputs NaN-poisoned; then one bf16 case with T*K*H > 2^31 (int64 offsets) vs an fp32 reference
  bench  T=8192 bf16 at the Nemotron-3-Nano and Qwen3-30B-A3B shapes: transformers grouped_mm vs the reference
         engine vs the Triton engine (with build_plan timed, with the plan prebuilt, and the backward variants
         MOEKIT_TRITON_DA=fused|split, MOEKIT_TRITON_WGRAD=gather), forward and forward+backward (median, CUDA
         events), peak memory, the max relative error of each variant vs the reference at that size (tuned
         configs), plus a per-kernel profile of one Triton forward+backward
  lora   fused LoRA (factors straight into the Triton kernels) at real sizes: Nemotron-3-Nano and Qwen3-30B-A3B,
         r=16, T=512/2048/8192, base frozen; a trainable base, several adapters (r=8+16+64), gpt-oss; bf16 (and
         fp32 at T=512), forward and every gradient (x, routing weights, A/B of both projections, base) vs the
         reference engine and an fp64 reference (same pass rule as the sweep), NaN-poisoned. Its timing
         (``lora_bench``, after ``bench``): T=8192, r=16, fwd+bwd of grouped_mm + PEFT LoRA, moekit-triton + PEFT
         LoRA (``moekit.tools.bench.run_case(..., "lora", ...)``), moekit-triton with the base frozen and no LoRA, and
         LoRA factors passed straight to the engine; plus a per-kernel profile of the fused LoRA fwd+bwd
``--lora`` runs only the LoRA parts (LoRA tests, lora, lora_bench).
Full results go to DIR (default $OUT or ./gpu_check_out) as JSON and logs; a summary table is printed last.
``--smoke`` runs tiny versions on the CPU under TRITON_INTERPRET=1 (checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, H, I, E, K, activation spec, transposed, bias
MODEL_SHAPES = [
    ("nemotron3-nano", 2688, 1856, 128, 6, "relu2", False, False),
    ("qwen3-30b-a3b", 2048, 768, 128, 8, "silu_glu", False, False),
    ("gpt-oss-20b", 2880, 2880, 32, 4, "clamped_glu", True, True),
    ("mixtral-8x7b", 4096, 14336, 8, 2, "silu_glu", False, False),
]
ACT_SPECS = ["relu2", "relu", "silu", "gelu", "gelu_tanh", "silu_glu", "silu_glu_interleaved", "gelu_glu",
             "clamped_glu"]  # fmt: skip


def make_activation(spec: str):
    from moekit.activations import ELEMENTWISE, Activation

    if spec == "clamped_glu":
        return Activation("clamped_glu", None, False, alpha=1.702, limit=7.0)
    if spec.endswith("_glu_interleaved"):
        return Activation("glu", ELEMENTWISE[spec.split("_")[0]], False)
    if spec.endswith("_glu"):
        return Activation("glu", ELEMENTWISE[spec[: -len("_glu")]], True)
    return Activation("plain", ELEMENTWISE[spec])


def make_inputs(T, H, I, E, K, spec, transposed, bias, dtype, device, seed, sentinel_fraction=0.0):
    import torch

    from moekit.engines.reference import ExpertsLayout

    g = torch.Generator(device=device).manual_seed(seed)
    act = make_activation(spec)
    W = 2 * I if act.gated else I

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = rnd(T, H)
    logits = torch.randn(T, E, generator=g, device=device)
    rw, idx = torch.topk(logits.softmax(-1), K, dim=-1)
    if sentinel_fraction:
        drop = torch.rand(idx.shape, generator=g, device=device) < sentinel_fraction
        idx = torch.where(drop, torch.full_like(idx, E), idx)
    up = rnd(E, H, W, scale=H**-0.5) if transposed else rnd(E, W, H, scale=H**-0.5)
    down = rnd(E, I, H, scale=I**-0.5) if transposed else rnd(E, H, I, scale=I**-0.5)
    up_b = rnd(E, W, scale=0.1) if bias else None
    down_b = rnd(E, H, scale=0.1) if bias else None
    grad_out = rnd(T, H)
    layout = ExpertsLayout(act, transposed)
    return layout, idx, [x, rw.to(dtype), up, up_b, down, down_b], grad_out


def run_engine(fn, layout, idx, tensors, grad_out, num_experts, dtype=None, backward=True):
    import torch

    from moekit.plan import build_plan

    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]
    plan = build_plan(idx, num_experts)
    out = fn(layout, plan, *leaves)
    results = {"out": out.detach()}
    if backward:
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
        it = iter(grads)
        for name, t in zip(("x", "rw", "up", "up_b", "down", "down_b"), leaves):
            if t is not None:
                results[name] = next(it)
    del out, leaves
    return results


def rel_err(a, b) -> float:
    if b.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    if not bool(torch_isfinite(a)):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def torch_isfinite(t):
    import torch

    return torch.isfinite(t).all()


# --------------------------------------------------------------------------------------------------- sweep
def _case(name, T, H, I, E, K, spec, transposed, bias, sentinel_fraction=0.0):
    return {"name": name, "T": T, "H": H, "I": I, "E": E, "K": K, "spec": spec, "transposed": transposed,
            "bias": bias, "sentinel_fraction": sentinel_fraction}  # fmt: skip


def sweep_cases(smoke: bool, rng: random.Random) -> list[dict]:
    """The four model shapes at T=512, random small/odd shapes, zero tokens (the int64 case runs separately)."""
    if smoke:
        return [_case("smoke", 9, 24, 20, 4, 2, "silu_glu", False, True),
                _case("smoke-clamped", 7, 24, 20, 3, 2, "clamped_glu", True, True, 0.3)]  # fmt: skip
    cases = [_case(name, 512, *rest) for name, *rest in MODEL_SHAPES]
    for i in range(12):
        E = rng.choice([1, 2, 3, 8, 17, 64, 128, 512])
        cases.append(_case(
            f"random{i}", rng.choice([1, 3, 50, 257, 1000]), rng.choice([24, 64, 96, 200, 576, 1000]),
            rng.choice([20, 32, 100, 256, 768, 1856]), E, rng.randint(1, min(E, 22)), rng.choice(ACT_SPECS),
            rng.random() < 0.5, rng.random() < 0.5, rng.choice([0.0, 0.0, 0.3]),
        ))  # fmt: skip
    cases.append(_case("zero-tokens", 0, 256, 128, 8, 2, "silu_glu", False, True))
    return cases


def sweep(args) -> dict:
    import torch

    from moekit.kernels import tiling
    from moekit.engines.reference import experts_reference
    from moekit.engines.triton import experts_triton

    tiling.POISON_OUTPUTS = True  # unwritten elements show up as NaN -> inf error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(1234)
    cases = sweep_cases(args.smoke, rng)
    shard, shards = (int(v) for v in args.shard.split("/"))
    cases = cases[shard::shards]
    rows = []
    dtypes = [torch.bfloat16, torch.float32]
    for case in cases:
        for dtype in dtypes:
            c = dict(case)
            name = c.pop("name")
            T, H, I, E, K = c["T"], c["H"], c["I"], c["E"], c["K"]
            if dtype == torch.float32 and T > 256:
                T = 256
            row = {"case": name, "dtype": str(dtype).split(".")[-1], "T": T, "H": H, "I": I, "E": E, "K": K, "act": c["spec"],
                       "transposed": c["transposed"], "bias": c["bias"]}  # fmt: skip
            t0 = time.time()
            try:
                layout, idx, tensors, grad_out = make_inputs(
                    T, H, I, E, K, c["spec"], c["transposed"], c["bias"], dtype, device, seed=rng.randrange(1 << 30),
                    sentinel_fraction=c.get("sentinel_fraction", 0.0),
                )  # fmt: skip
                ours = run_engine(experts_triton, layout, idx, tensors, grad_out, E)
                ref = run_engine(experts_reference, layout, idx, tensors, grad_out, E)
                truth = run_engine(experts_reference, layout, idx, tensors, grad_out, E, dtype=torch.float64)
                errs, ref_errs = {}, {}
                for key in truth:
                    errs[key] = rel_err(ours[key], truth[key])
                    ref_errs[key] = rel_err(ref[key], truth[key])
                    assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
                if dtype == torch.float32:
                    ok = all(e <= 1e-4 for e in errs.values())
                else:
                    ok = all(errs[k] <= 1.5 * ref_errs[k] + 6e-3 for k in errs)
                row.update(ok=ok, max_err=max(errs.values()), max_ref_err=max(ref_errs.values()),
                           errs=errs, ref_errs=ref_errs)  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                row.update(ok=False, error=repr(exc)[:300], trace=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("errs", "ref_errs", "trace")}), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def large(args) -> dict:
    row = large_case("cuda")
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return {"rows": [row]}


def large_case(device) -> dict:
    """T*K*H > 2^31 (int64 offsets), bf16. Triton and the bf16 reference are both compared with an fp32
    reference on the same inputs (fp64 would not fit); results are parked on the host between runs."""
    import torch

    from moekit.engines.reference import experts_reference
    from moekit.engines.triton import experts_triton

    T, H, I, E, K = 66000, 4096, 64, 16, 8
    row = {"case": "int64-offsets", "dtype": "bfloat16", "T": T, "H": H, "I": I, "E": E, "K": K, "act": "relu2",
           "transposed": False, "bias": True, "rows_x_hidden": T * K * H}  # fmt: skip
    t0 = time.time()

    def on_host(results):
        return {k: v.cpu() for k, v in results.items()}

    try:
        layout, idx, tensors, grad_out = make_inputs(T, H, I, E, K, "relu2", False, True, torch.bfloat16, device, 5)
        ours = on_host(run_engine(experts_triton, layout, idx, tensors, grad_out, E))
        torch.cuda.empty_cache()
        ref = on_host(run_engine(experts_reference, layout, idx, tensors, grad_out, E))
        torch.cuda.empty_cache()
        truth = on_host(run_engine(experts_reference, layout, idx, tensors, grad_out, E, dtype=torch.float32))
        errs = {k: rel_err(ours[k], truth[k]) for k in truth}
        ref_errs = {k: rel_err(ref[k], truth[k]) for k in truth}
        ok = all(errs[k] <= 1.5 * ref_errs[k] + 6e-3 for k in errs)
        row.update(ok=ok, max_err=max(errs.values()), max_ref_err=max(ref_errs.values()), errs=errs, ref_errs=ref_errs)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, error=repr(exc)[:300], trace=traceback.format_exc()[-2000:])
    row["seconds"] = round(time.time() - t0, 2)
    torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------------- bench
def _baseline_module(up, down, spec, num_experts):
    import torch
    import torch.nn.functional as F

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = num_experts
            self.has_gate = spec != "relu2"
            self.has_bias = False
            self.is_transposed = False
            self.is_concatenated = True
            self.has_post_expert_norm = False
            self._is_expert_parallel = False
            self.act_fn = F.silu if self.has_gate else (lambda h: torch.square(F.relu(h)))
            if self.has_gate:
                self.gate_up_proj = up
            else:
                self.up_proj = up
            self.down_proj = down

        def _apply_gate(self, gate_up_out):
            gate, up_half = gate_up_out.chunk(2, dim=-1)
            return self.act_fn(gate) * up_half

    return Experts()


def bench(args) -> dict:
    import torch

    from moekit.kernels import tiling

    try:
        from transformers.integrations.moe import grouped_mm_experts_forward
    except ImportError:
        grouped_mm_experts_forward = None
    T = 8192 if not args.smoke else 64
    rows, profiles = [], {}
    for shape in MODEL_SHAPES[:2]:
        shape_rows, profiles[shape[0]] = bench_shape(shape, T, grouped_mm_experts_forward)
        rows += shape_rows
        torch.cuda.empty_cache()
    return {"rows": rows, "profiles": profiles, "tuning": tiling.tuning_report()}


def bench_shape(shape, T, grouped_mm_experts_forward):
    """grouped_mm / reference / triton at one model shape: forward, forward+backward, peak memory, profile."""
    import torch
    import triton

    from moekit.plan import build_plan
    from moekit.engines.reference import experts_reference
    from moekit.engines.triton import experts_triton

    rows = []
    name, H, I, E, K, spec, transposed, bias = shape
    layout, idx, tensors, grad_out = make_inputs(T, H, I, E, K, spec, transposed, bias, torch.bfloat16, "cuda", 11)
    x, rw, up, _, down, _ = tensors
    x = x.requires_grad_(True)
    rw = rw.requires_grad_(True)
    up = torch.nn.Parameter(up)
    down = torch.nn.Parameter(down)
    inputs = [x, rw, up, down]
    gated = spec != "relu2"
    flops_fwd = (6 if gated else 4) * T * K * H * I
    module = _baseline_module(up, down, spec, E)

    plan = build_plan(idx, E)

    def triton_engine(da_mode, prebuilt, wgrad="copy"):
        def fn():
            os.environ["MOEKIT_TRITON_DA"] = da_mode  # read in backward; set on every call (variants alternate)
            os.environ["MOEKIT_TRITON_WGRAD"] = wgrad
            return experts_triton(layout, plan if prebuilt else build_plan(idx, E), x, rw, up, None, down, None)

        return fn

    engines = {
        "triton": triton_engine("auto", False),
        # plan built once outside the timed region: the difference is build_plan's cost (host syncs included)
        "triton_plan0": triton_engine("auto", True),
        "tri_dA_fused": triton_engine("fused", True),
        "tri_dA_split": triton_engine("split", True),
        "tri_wg_gather": triton_engine("auto", True, "gather"),
        "reference": lambda: experts_reference(layout, build_plan(idx, E), x, rw, up, None, down, None),
    }
    if grouped_mm_experts_forward is not None:
        engines["grouped_mm"] = lambda: grouped_mm_experts_forward(module, x, idx, rw)
    for engine, fn in engines.items():
        row = {"shape": name, "engine": engine, "T": T}
        try:
            t0 = time.time()
            out = fn()
            torch.autograd.grad(out, inputs, grad_out)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.time() - t0, 2)  # includes compile + autotune
            with torch.no_grad():
                fwd = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

            def full(fn=fn):
                torch.autograd.grad(fn(), inputs, grad_out)

            fb = triton.testing.do_bench(full, warmup=50, rep=500, return_mode="median")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            full()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            row.update(fwd_ms=round(fwd, 3), full_ms=round(fb, 3), fwd_tflops=round(flops_fwd / fwd / 1e9, 1),
                       full_tflops=round(3 * flops_fwd / fb / 1e9, 1), peak_gib=round(peak, 3))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            row.update(error=repr(exc)[:300], trace=traceback.format_exc()[-2000:])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    # correctness of the tuned configs at this size: every Triton variant vs the bf16 reference
    try:
        ref_out = engines["reference"]()
        ref = [ref_out.detach(), *torch.autograd.grad(ref_out, inputs, grad_out)]
        del ref_out
        for row in rows:
            if row["engine"].startswith("tri") and "error" not in row:
                out = engines[row["engine"]]()
                ours = [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
                row["max_rel_err_vs_ref"] = round(max(rel_err(o, r) for o, r in zip(ours, ref)), 5)
                del out, ours
        del ref
    except Exception as exc:  # noqa: BLE001
        rows.append(
            {"shape": name, "engine": "check", "error": repr(exc)[:300], "trace": traceback.format_exc()[-2000:]}
        )
    os.environ["MOEKIT_TRITON_DA"], os.environ["MOEKIT_TRITON_WGRAD"] = "auto", "copy"
    try:
        profile = profile_triton(engines["triton_plan0"], inputs, grad_out)
    except Exception as exc:  # noqa: BLE001
        profile = {"error": repr(exc)[:300]}
    return rows, profile


def profile_triton(fn, inputs, grad_out) -> dict:
    """Per-kernel GPU time of forward+backward: totals (3 iterations averaged) and one iteration's sequence."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        torch.autograd.grad(fn(), inputs, grad_out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.autograd.grad(fn(), inputs, grad_out)
        torch.cuda.synchronize()
    totals = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t:
            totals[evt.key] = totals.get(evt.key, 0) + t / 3 / 1000.0
    result = {"totals": sorted(([k[:70], round(v, 3)] for k, v in totals.items()), key=lambda kv: -kv[1])[:14]}
    try:
        kernels = []
        for evt in prof.events():
            t = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0)
            if t and str(getattr(evt, "device_type", "")).endswith("CUDA"):
                kernels.append((evt.time_range.start, evt.name[:40], round(t / 1000.0, 3)))
        kernels.sort()
        per_iter = len(kernels) // 3
        result["sequence"] = [[name, ms] for _, name, ms in kernels[:per_iter] if ms >= 0.02]
        span = (kernels[per_iter - 1][0] - kernels[0][0]) / 1000.0 if per_iter else 0
        result["first_to_last_kernel_start_ms"] = round(span, 3)
        if per_iter:
            busy = sum(ms for _, _, ms in kernels[:per_iter])
            result["idle_ms"] = round(span + kernels[per_iter - 1][2] - busy, 3)
    except Exception as exc:  # noqa: BLE001
        result["sequence_error"] = repr(exc)[:200]
    return result


# --------------------------------------------------------------------------------------------------- lora
LORA_NAMES = ("x", "rw", "up", "up_b", "down", "down_b", "up_A", "up_B", "down_A", "down_B")


def make_lora(E, d_in, d_out, ranks, dtype, device, seed):
    """(A [E, R, in], B [E, out, R]) with R = sum(ranks) (several adapters concatenated along R); the low-rank
    term is about as large as the base term, so a wrong factor cannot hide under the tolerance."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    pairs = [(torch.randn(E, r, d_in, generator=g, device=device) * d_in**-0.5,
              torch.randn(E, d_out, r, generator=g, device=device) * r**-0.5) for r in ranks]  # fmt: skip
    return torch.cat([a for a, _ in pairs], 1).to(dtype), torch.cat([b for _, b in pairs], 2).to(dtype)


def make_lora_inputs(T, H, I, E, K, spec, transposed, bias, ranks, dtype, device, seed):
    layout, idx, tensors, grad_out = make_inputs(T, H, I, E, K, spec, transposed, bias, dtype, device, seed)
    W = 2 * I if layout.activation.gated else I
    return layout, idx, tensors + [*make_lora(E, H, W, ranks, dtype, device, seed + 1),
                                   *make_lora(E, I, H, ranks, dtype, device, seed + 2)], grad_out  # fmt: skip


def run_lora_engine(fn, layout, idx, tensors, grad_out, num_experts, trainable_base, dtype=None, peft=False):
    """Output and the gradients of x, the routing weights, the LoRA factors (and the base when trainable).
    ``peft``: the factors are leaves in PEFT's layout and dtype (fp32 lora_A [R*E, in], lora_B [out, R*E]; fp64
    for the truth), passed as per-expert views with a scale of 0.5, as the backend passes them."""
    import torch

    from moekit.lora import LoraFactors
    from moekit.plan import build_plan

    wants = (True, True) + (trainable_base,) * 4 + (True,) * 4
    if peft:  # [E, R, in] -> [R*E, in];  [E, out, R] -> [out, R*E], scale 0.5 undone on B
        factor_dtype = dtype or torch.float32
        tensors = tensors[:6] + [
            t.to(factor_dtype).permute(1, 2, 0).reshape(t.shape[1], -1) * 2.0 if i % 2 else
            t.to(factor_dtype).reshape(-1, t.shape[2])
            for i, t in enumerate(tensors[6:])
        ]  # fmt: skip
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(w) for t, w in zip(tensors, wants)]
    x, rw, up, up_b, down, down_b, ua, ub, da, db = leaves
    if peft:
        def views(weight_a, weight_b):
            rank = weight_a.shape[0] // num_experts
            return LoraFactors(weight_a.view(num_experts, rank, -1),
                               weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1), 0.5)  # fmt: skip

        up_lora, down_lora = views(ua, ub), views(da, db)
    else:
        up_lora, down_lora = (ua, ub), (da, db)
    out = fn(layout, build_plan(idx, num_experts), x, rw, up, up_b, down, down_b, up_lora=up_lora, down_lora=down_lora)
    named = [(n, t) for n, t in zip(LORA_NAMES, leaves) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [t for _, t in named], grad_out.to(out.dtype))
    results = {"out": out.detach(), **{n: g for (n, _), g in zip(named, grads)}}
    del out, leaves
    return results


def lora_cases(smoke: bool) -> list[dict]:
    """Nemotron-3-Nano and Qwen3-30B-A3B at r=16, T = 512..8192, frozen base; r=64 at T=8192 with the factors in
    PEFT's layout (fp32, a scale); a trainable base, several adapters (r = 8 + 16 + 64) and the gpt-oss layout at
    T=512; fp32 at T=512 (dtype None: bf16, plus fp32 when T <= 512)."""
    if smoke:
        small = {"H": 24, "I": 20, "K": 2, "transposed": False}
        return [{"name": "smoke-lora", "T": 9, "E": 4, "spec": "silu_glu", "bias": True, "ranks": (4,),
                 "trainable": True, **small},
                {"name": "smoke-lora-relu2", "T": 7, "E": 3, "spec": "relu2", "bias": False, "ranks": (2, 3),
                 "trainable": False, "peft": True, **small}]  # fmt: skip
    cases = []
    for name, H, I, E, K, spec, transposed, bias in MODEL_SHAPES[:2]:
        dims = {"H": H, "I": I, "E": E, "K": K, "spec": spec, "transposed": transposed, "bias": bias}
        for T in (512, 2048, 8192):
            cases.append({"name": name, "T": T, "ranks": (16,), "trainable": False, **dims})
        cases.append({"name": name + " PEFT layout", "T": 8192, "ranks": (64,), "trainable": False, "peft": True,
                      **dims})  # fmt: skip
        cases.append({"name": name + "+base", "T": 2048, "ranks": (16,), "trainable": True, **dims})
        cases.append({"name": name + " 3 adapters", "T": 512, "ranks": (8, 16, 64), "trainable": False, **dims})
    name, H, I, E, K, spec, transposed, bias = MODEL_SHAPES[2]
    cases.append({"name": name + "+base", "T": 512, "H": H, "I": I, "E": E, "K": K, "spec": spec,
                  "transposed": transposed, "bias": bias, "ranks": (16,), "trainable": True})  # fmt: skip
    return cases


def lora_sweep(args) -> dict:
    """Fused LoRA (Triton) vs the reference engine against an fp64 reference, every gradient, NaN-poisoned."""
    import torch

    from moekit.kernels import tiling
    from moekit.engines.reference import experts_reference
    from moekit.engines.triton import experts_triton

    tiling.POISON_OUTPUTS = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for i, case in enumerate(lora_cases(args.smoke)):
        for dtype in (torch.bfloat16, torch.float32) if case["T"] <= 512 else (torch.bfloat16,):
            c = dict(case)
            row = {"case": c.pop("name"), "dtype": str(dtype).split(".")[-1], "T": c["T"], "H": c["H"], "I": c["I"],
                   "E": c["E"], "K": c["K"], "act": c["spec"], "R": sum(c["ranks"]), "trainable": c["trainable"]}  # fmt: skip
            t0 = time.time()
            try:
                layout, idx, tensors, grad_out = make_lora_inputs(
                    c["T"], c["H"], c["I"], c["E"], c["K"], c["spec"], c["transposed"], c["bias"], c["ranks"],
                    dtype, device, seed=100 + i,
                )  # fmt: skip
                common = (layout, idx, tensors, grad_out, c["E"], c["trainable"])
                peft = c.get("peft", False)
                ours = run_lora_engine(experts_triton, *common, peft=peft)
                ref = run_lora_engine(experts_reference, *common, peft=peft)
                truth = run_lora_engine(experts_reference, *common, torch.float64, peft=peft)
                errs = {k: rel_err(ours[k], truth[k]) for k in truth}
                ref_errs = {k: rel_err(ref[k], truth[k]) for k in truth}
                for key in truth:
                    assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
                if dtype == torch.float32:
                    ok = all(e <= 1e-4 for e in errs.values())
                else:
                    ok = all(errs[k] <= 1.5 * ref_errs[k] + 6e-3 for k in errs)
                row.update(ok=ok, max_err=max(errs.values()), max_ref_err=max(ref_errs.values()),
                           errs=errs, ref_errs=ref_errs)  # fmt: skip
                del ours, ref, truth
            except Exception as exc:  # noqa: BLE001
                row.update(ok=False, error=repr(exc)[:300], trace=traceback.format_exc()[-2000:])
            row["seconds"] = round(time.time() - t0, 2)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("trace",)}, default=str), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def _time_steps(step, warmup=3, repeats=20):
    """Median ms of ``step`` (CUDA events), peak GiB above what was resident before the timed steps."""
    import statistics

    import torch

    if not torch.cuda.is_available():  # smoke run on the CPU: wall time
        step()
        begin = time.perf_counter()
        step()
        return (time.perf_counter() - begin) * 1e3, float("nan")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    from moekit.tools.bench import _timer

    host = []

    def issue():  # CPU time to issue the step (the GPU is the bound when it is below the step's ms)
        begin = time.perf_counter()
        step()
        host.append((time.perf_counter() - begin) * 1e3)

    times = _timer("cuda")(issue, repeats)  # steps back to back, as ``moekit bench`` times them
    _time_steps.host_ms = statistics.median(host)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - resident) / 2**30


def _frozen_base_case(shape, T, device, rank=None):
    """moekit-triton through the HF module (as ``moekit.tools.bench`` runs it), base frozen, x and routing weights
    trainable; without LoRA (rank None), or with LoRA factors passed straight to ``experts_triton`` (no PEFT)."""
    import torch

    import moekit.backend
    from moekit.tools.bench import _select, make_experts_module, make_routing

    module = make_experts_module(shape, device, torch.bfloat16)
    _select(module, "moekit-triton")
    module.requires_grad_(False)
    hidden, index, weights = make_routing(shape, T, device, torch.bfloat16)
    hidden.requires_grad_(True)
    weights.requires_grad_(True)
    upstream = torch.randn_like(hidden)
    lora = {}
    if rank:
        W = (2 if shape.gated else 1) * shape.intermediate
        lora = {"up": make_lora(shape.num_experts, shape.hidden, W, (rank,), torch.bfloat16, device, 3),
                "down": make_lora(shape.num_experts, shape.intermediate, shape.hidden, (rank,), torch.bfloat16,
                                  device, 4)}  # fmt: skip
        for a, b in lora.values():
            a.requires_grad_(True)
            b.requires_grad_(True)
    real_collect = moekit.backend.collect_lora
    moekit.backend.collect_lora = lambda module, wrappers=None: lora
    try:

        def step():
            out = module(hidden, index, weights)
            out.backward(upstream)
            hidden.grad = weights.grad = None
            for a, b in lora.values():
                a.grad = b.grad = None

        ms, step_gib = _time_steps(step, warmup=5, repeats=40 if torch.cuda.is_available() else 1)
    finally:
        moekit.backend.collect_lora = real_collect
        os.environ.pop("MOEKIT_BACKEND", None)
    return {"ms": ms, "step_gib": step_gib, "host_ms": getattr(_time_steps, "host_ms", float("nan"))}


def lora_bench(args) -> dict:
    """T=8192 (64 smoke), r=16, bf16, fwd+bwd: grouped_mm + PEFT LoRA vs moekit-triton + PEFT LoRA (fused, through
    ``moekit.enable``) vs moekit-triton with the base frozen and no LoRA, vs LoRA factors passed straight to the
    engine (no PEFT wrapper); plus a per-kernel profile of the fused LoRA fwd+bwd."""
    import gc

    import torch

    import moekit.engines.triton as engine
    from moekit.tools.bench import PRESETS, run_case

    T = 64 if args.smoke else 8192
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # smoke run under the interpreter (the script's logic only): let MOEKIT_BACKEND=triton run
        import moekit.backend

        moekit.backend.select_engine = lambda *a, **k: os.environ.get("MOEKIT_BACKEND") or "reference"
    rows, profiles = [], {}
    fallbacks = []
    real_reference = engine.experts_reference

    def spy(*a, **k):  # a LoRA call that silently left the Triton engine would show here
        fallbacks.append(1)
        return real_reference(*a, **k)

    reps = 40 if device == "cuda" else 1
    for name in ("nemotron3-nano", "qwen3-30b-a3b") if device == "cuda" else ("tiny",):
        shape = PRESETS[name]
        cases = {
            "grouped_mm+peft": lambda s=shape: run_case(s, "grouped_mm", "lora", T, device, lora_rank=16, repeats=reps),
            "triton+peft": lambda s=shape: run_case(s, "moekit-triton", "lora", T, device, lora_rank=16, repeats=reps),
            "triton frozen": lambda s=shape: _frozen_base_case(s, T, device),
            "triton lora direct": lambda s=shape: _frozen_base_case(s, T, device, rank=16),
        }
        for impl, fn in cases.items():
            row = {"shape": name, "impl": impl, "T": T, "rank": 16}
            engine.experts_reference = spy
            fallbacks.clear()
            try:
                t0 = time.time()
                rec = fn()
                row.update(ms=round(rec["ms"], 3), step_gib=round(rec.get("step_gib", float("nan")), 3),
                           host_ms=round(rec.get("host_ms", float("nan")), 3),
                           seconds=round(time.time() - t0, 1), fell_back_to_reference=bool(fallbacks))  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                row.update(error=repr(exc)[:300], trace=traceback.format_exc()[-2000:])
            finally:
                engine.experts_reference = real_reference
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        if device == "cuda":
            try:
                profiles[name] = _lora_profile(shape, T)
            except Exception as exc:  # noqa: BLE001
                profiles[name] = {"error": repr(exc)[:300]}
            gc.collect()
            torch.cuda.empty_cache()
    return {"rows": rows, "profiles": profiles}


def _lora_profile(shape, T):
    import torch

    from moekit.plan import build_plan
    from moekit.engines.triton import experts_triton

    spec = "silu_glu" if shape.gated else "relu2"
    layout, idx, tensors, grad_out = make_lora_inputs(
        T, shape.hidden, shape.intermediate, shape.num_experts, shape.top_k, spec, False, False, (16,),
        torch.bfloat16, "cuda", 21,
    )  # fmt: skip
    x, rw, up, _, down, _, ua, ub, da, db = tensors
    inputs = [t.requires_grad_(True) for t in (x, rw, ua, ub, da, db)]
    plan = build_plan(idx, shape.num_experts)

    def fn():
        return experts_triton(layout, plan, x, rw, up, None, down, None, up_lora=(ua, ub), down_lora=(da, db))

    return profile_triton(fn, inputs, grad_out)


# --------------------------------------------------------------------------------------------------- tests
def tests(args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "triton",
        *([] if args.lora else ["tests/test_triton_engine.py", "tests/test_engine.py"]),
        "tests/test_triton_lora.py",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    try:
        import xdist  # noqa: F401

        if not args.smoke:
            cmd += ["-n", "8"]
    except ImportError:
        pass
    env = dict(os.environ, MOEKIT_TRITON_AUTOTUNE="0")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"rc": proc.returncode, "summary": summary[-1] if summary else out[-300:], "seconds": round(time.time() - t0, 1),
            "log": out[-20000:]}  # fmt: skip


# --------------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    parser.add_argument("--skip", default="")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-shards", type=int, default=4)
    parser.add_argument("--config", type=int, default=0,
                        help="run the correctness sections with the N-th tile config of every kernel family "
                             "(MOEKIT_TRITON_AUTOTUNE=config:N); 0 is the default config")
    parser.add_argument("--lora", action="store_true",
                        help="only the LoRA parts: LoRA tests, LoRA sweep, LoRA timing")  # fmt: skip
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    if args.section:  # child process: run one section, write its JSON
        sections = {"tests": tests, "sweep": sweep, "large": large, "bench": bench, "lora": lora_sweep,
                    "lora_bench": lora_bench}  # fmt: skip
        result = sections[args.section](args)
        suffix = (
            "_" + args.shard.split("/")[0] if args.section == "sweep" else ("_l" if args.section == "large" else "")
        )
        with open(os.path.join(args.out, f"{args.section}{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        return

    skip = set(filter(None, args.skip.split(",")))
    base = [sys.executable, os.path.abspath(__file__), "--out", args.out] + (["--smoke"] if args.smoke else [])
    base += ["--lora"] if args.lora else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")
    t0 = time.time()
    procs = {}

    def launch(name, section, extra=()):
        log = open(os.path.join(args.out, f"{name}.log"), "w")  # noqa: SIM115 (closed at exit)
        sec_env = dict(env, MOEKIT_TRITON_AUTOTUNE=f"config:{args.config}") if section != "bench" else env
        procs[name] = subprocess.Popen(
            [*base, "--section", section, *extra], env=sec_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def wait(names):
        for name in names:
            procs[name].wait()
            print(f"[{time.time() - t0:6.1f}s] {name} finished rc={procs[name].returncode}", flush=True)

    if "tests" not in skip:
        launch("tests", "tests")
    if "lora" not in skip:  # the fused-LoRA sweep, beside the tests and the sweep shards
        launch("lora", "lora")
    if "sweep" not in skip and not args.lora:
        shards = 1 if args.smoke else args.sweep_shards
        for i in range(shards):
            launch(f"sweep_{i}", "sweep", ["--shard", f"{i}/{shards}"])
        wait([f"sweep_{i}" for i in range(shards)])
        if not args.smoke:  # T*K*H > 2^31 (needs ~30 GB: after the shards, beside the tests)
            launch("sweep_l", "large")
    wait([name for name in procs if procs[name].returncode is None])
    if args.smoke is False or os.environ.get("MOEKIT_SMOKE_BENCH"):
        timings = [s for s in ("bench", "lora_bench") if s not in skip and not (args.lora and s == "bench")]
        for section in timings:  # GPU timing alone
            with open(os.path.join(args.out, f"{section}.log"), "w") as log:
                rc = subprocess.run(base + ["--section", section], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, check=False).returncode  # fmt: skip
            print(f"[{time.time() - t0:6.1f}s] {section} finished rc={rc}", flush=True)
    summarize(args.out)


def _load(out, section):
    path = os.path.join(out, f"{section}.json")
    if not os.path.exists(path):
        log = os.path.join(out, f"{section}.log")
        tail = ""
        if os.path.exists(log):
            with open(log) as f:
                tail = f.read()[-1500:]
        return None, tail
    with open(path) as f:
        return json.load(f), ""


def summarize(out):
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    print(f"\n==== moekit Triton engine GPU check: {device}, torch {torch.__version__}, triton {tv} ====")
    shard_files = sorted(f[:-5] for f in os.listdir(out) if f.startswith(("sweep_", "large_")) and f.endswith(".json"))
    rows, tail = [], ""
    for name in shard_files:
        rows += _load(out, name)[0]["rows"]
    for log in sorted(f for f in os.listdir(out) if f.startswith("sweep_") and f.endswith(".log")):
        if log[:-4] not in shard_files:
            tail += f"[{log}] " + _load(out, log[:-4])[1]
    res = {"rows": rows} if rows else None
    if res:
        bad = [r for r in rows if not r.get("ok")]
        print(f"-- sweep: {len(rows) - len(bad)}/{len(rows)} ok")
        print(
            f"{'case':16} {'dtype':8} {'T':>6} {'H':>5} {'I':>6} {'E':>4} {'K':>3} {'act':21} tr  b  {'err':>9} {'ref_err':>9} ok"
        )
        for r in rows:
            err = r.get("max_err", float("nan"))
            print(f"{r['case']:16} {r['dtype']:8} {r['T']:>6} {r['H']:>5} {r['I']:>6} {r['E']:>4} {r['K']:>3} "
                  f"{r['act']:21} {int(r['transposed'])}   {int(r['bias'])}  {err:9.2e} {r.get('max_ref_err', float('nan')):9.2e} "
                  f"{'ok' if r.get('ok') else 'FAIL ' + r.get('error', '')[:80]}")  # fmt: skip
    elif tail:
        print("-- sweep: no result; log tail:\n" + tail)
    res, tail = _load(out, "bench")
    if res:
        print("-- tuning: " + "; ".join(res.get("tuning", []))[:3000])
        for shape, prof in res.get("profiles", {}).items():
            _print_profile(f"triton fwd+bwd {shape}", prof)
        print(f"-- bench (bf16, median ms; TFLOP/s; peak GiB of fwd+bwd) on {device}")
        print(
            f"{'shape':16} {'engine':11} {'fwd':>8} {'TF/s':>6} {'full':>8} {'TF/s':>6} {'peak':>6} {'1st call s':>10}"
            "  max rel err vs ref"
        )
        by = {}
        for r in res["rows"]:
            by[(r["shape"], r["engine"])] = r
            if "error" in r:
                print(f"{r['shape']:16} {r['engine']:11} ERROR {r['error'][:100]}")
                continue
            print(f"{r['shape']:16} {r['engine']:11} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.0f} {r['full_ms']:8.3f} "
                  f"{r['full_tflops']:6.0f} {r['peak_gib']:6.2f} {r['first_call_s']:10.1f}"
                  f"  {r.get('max_rel_err_vs_ref', '')}")  # fmt: skip
        for shape in dict.fromkeys(r["shape"] for r in res["rows"]):
            g = by.get((shape, "grouped_mm"))
            for engine in ("triton", "triton_plan0", "tri_dA_fused", "tri_dA_split", "tri_wg_gather"):
                t = by.get((shape, engine))
                if t and g and "error" not in t and "error" not in g:
                    print(f"   {shape}: {engine} vs grouped_mm  fwd {g['fwd_ms'] / t['fwd_ms']:.2f}x  "
                          f"fwd+bwd {g['full_ms'] / t['full_ms']:.2f}x")  # fmt: skip
    elif tail:
        print("-- bench: no result; log tail:\n" + tail)
    summarize_lora(out)
    res, tail = _load(out, "tests")
    if res:
        print(f"-- tests (pytest -m triton, native): rc={res['rc']} {res['summary']} ({res['seconds']}s)")
        if res["rc"]:
            print(res["log"][-3000:])
    elif tail:
        print("-- tests: no result; log tail:\n" + tail)


def _print_profile(title: str, prof: dict) -> None:
    """Per-kernel totals of a profiled step and, when recorded, the kernels of one iteration in order."""
    totals = ", ".join(f"{k.split('(')[0]} {v}" for k, v in prof.get("totals", []))
    print(f"-- profile {title} (ms per iteration): {totals}{prof.get('error', '')}")
    seq = prof.get("sequence")
    if seq:
        print("   one iteration, in order: " + ", ".join(f"{k.split('(')[0]} {v}" for k, v in seq)
              + f"; GPU idle between kernels {prof.get('idle_ms')} ms")  # fmt: skip


def summarize_lora(out):
    res, tail = _load(out, "lora")
    if res:
        rows = res["rows"]
        bad = [r for r in rows if not r.get("ok")]
        print(f"-- LoRA sweep (fused LoRA vs reference, both against fp64): {len(rows) - len(bad)}/{len(rows)} ok")
        print(f"{'case':26} {'dtype':8} {'T':>5} {'H':>5} {'I':>5} {'E':>4} {'K':>2} {'R':>3} base  {'err':>9} "
              f"{'ref_err':>9} {'s':>6} ok")  # fmt: skip
        for r in rows:
            print(f"{r['case']:26} {r['dtype']:8} {r['T']:>5} {r['H']:>5} {r['I']:>5} {r['E']:>4} {r['K']:>2} "
                  f"{r['R']:>3} {'train' if r['trainable'] else 'frozn'} {r.get('max_err', float('nan')):9.2e} "
                  f"{r.get('max_ref_err', float('nan')):9.2e} {r.get('seconds', 0):6.1f} "
                  f"{'ok' if r.get('ok') else 'FAIL ' + r.get('error', str(r.get('errs')))[:200]}")  # fmt: skip
    elif tail:
        print("-- LoRA sweep: no result; log tail:\n" + tail)
    res, tail = _load(out, "lora_bench")
    if res:
        print("-- LoRA timing (bf16, r=16, fwd+bwd, median ms of 40, x and routing weights trainable, base frozen)")
        by = {}
        for r in res["rows"]:
            by[(r["shape"], r["impl"])] = r
            if "error" in r:
                print(f"{r['shape']:16} {r['impl']:20} ERROR {r['error'][:200]}")
                continue
            print(f"{r['shape']:16} {r['impl']:20} T={r['T']:>5} {r['ms']:8.3f} ms  step {r['step_gib']:6.2f} GiB"
                  f"  host issue {r.get('host_ms', float('nan')):6.2f} ms"
                  f"{'  (FELL BACK TO THE REFERENCE)' if r.get('fell_back_to_reference') else ''}")  # fmt: skip
        for shape in dict.fromkeys(r["shape"] for r in res["rows"]):
            ours, frozen = by.get((shape, "triton+peft"), {}), by.get((shape, "triton frozen"), {})
            peft, direct = by.get((shape, "grouped_mm+peft"), {}), by.get((shape, "triton lora direct"), {})
            if "ms" in ours and "ms" in frozen and "ms" in peft:
                print(f"   {shape}: LoRA / frozen base {ours['ms'] / frozen['ms']:.2f}x (target <= 1.2; direct "
                      f"{direct.get('ms', float('nan')) / frozen['ms']:.2f}x), grouped_mm+PEFT / ours "
                      f"{peft['ms'] / ours['ms']:.2f}x (target >= 4)")  # fmt: skip
        for shape, prof in res.get("profiles", {}).items():
            _print_profile(f"fused LoRA fwd+bwd {shape}", prof)
    elif tail:
        print("-- LoRA timing: no result; log tail:\n" + tail)


if __name__ == "__main__":
    main()
