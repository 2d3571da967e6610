"""Probe: what the split LoRA GEMM costs, piece by piece, at real shapes (issue #4).

    PYTHONPATH=src python scripts/probe_lora_add.py --preset nemotron3-nano,qwen3-30b-a3b --tokens 8192,32768

For the two big GEMMs that take a LoRA term where split (the forward down-projection and dX), times the base
product on torch's grouped_mm, the fused Triton GEMM (base + LoRA in one accumulator), and the in-place add of
u @ L[e] (``grouped_gemm(u, L, into=...)``), with the add's effective bandwidth against torch's own ``add_`` over
the same bytes (the ceiling a memory-bound pass can reach on this card). Then every tile config of the add.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from moekit.bench import PRESETS, make_routing
from moekit.grouped import grouped_matmul
from moekit.kernels import down_proj, grouped_gemm
from moekit.kernels.tiling import Autotuned, block_e, configs, expert_tile, num_row_tiles, rank_block
from moekit.plan import build_plan


@triton.jit
def _add_rows_kernel(
    out_ptr, u_ptr, l_ptr, counts_ptr, E, N, R, stride_om, stride_um, stride_le, stride_lr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """Candidate: out[r] += u[r] @ L[e] with one program per row tile sweeping all N columns (u's tile and the
    tile map loaded once per program, the column loop pipelined)."""
    pid_m = tl.program_id(0)
    total, expert, row_start, row_end = expert_tile(counts_ptr, E, pid_m, BLOCK_M, BLOCK_E)
    if pid_m >= total:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    rows64 = tl.where(m_mask, offs_m, row_start).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    ut = tl.load(u_ptr + rows64[:, None] * stride_um + offs_r[None, :], mask=r_mask[None, :], other=0.0)
    l_base = l_ptr + expert.to(tl.int64) * stride_le + offs_r[:, None] * stride_lr
    out_rows = out_ptr + rows64[:, None] * stride_om
    for n0 in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.load(out_rows + offs_n[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
        lt = tl.load(l_base + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(ut, lt, acc)
        tl.store(out_rows + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def add_rows(u, factor, counts, n, out, block_m, block_n, warps, stages):
    experts, rank, n_dim = factor.shape
    grid = (num_row_tiles(n, experts, block_m),)
    _add_rows_kernel[grid](
        out, u, factor, counts, experts, n_dim, rank, out.stride(0), u.stride(0), factor.stride(0),
        factor.stride(1), BLOCK_E=block_e(experts), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_block(rank),
        STAGES=stages, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


CANDIDATES = [(m, nb, w, s) for m in (32, 64, 128) for nb in (64, 128, 256) for w in (4, 8) for s in (2, 3)]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def probe(preset: str, tokens: int, rank: int, config_sweep: bool) -> None:
    shape = PRESETS[preset]
    _, index, _ = make_routing(shape, tokens, "cuda", torch.bfloat16)
    plan = build_plan(index, shape.num_experts)
    n, experts = plan.num_rows, shape.num_experts
    width = 2 * shape.intermediate if shape.gated else shape.intermediate
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size, std=1.0):
        return (torch.randn(*size, device="cuda", generator=gen) * std).to(torch.bfloat16)

    # The forward down-projection a [S, I] @ W_down[e] [I, H]; dX dh [S, W] @ W_up[e]ᵀ [W, H]
    for name, k_dim in (("fwd down", shape.intermediate), ("dX", width)):
        rows, weight = rand(n, k_dim), rand(experts, k_dim, shape.hidden, std=k_dim**-0.5)
        u, factor = rand(n, rank), rand(experts, rank, shape.hidden, std=0.01)
        probe_gemm(f"{preset} T={tokens} r={rank} {name}", plan, rows, weight, u, factor, config_sweep)
        torch.cuda.empty_cache()


def probe_gemm(label: str, plan, rows, weight, u, factor, config_sweep: bool) -> None:
    n, counts = plan.num_rows, plan.tokens_per_expert
    base = grouped_matmul(rows, weight, plan)
    gmm = bench_ms(lambda: grouped_matmul(rows, weight, plan))
    fused = bench_ms(lambda: grouped_gemm(rows, weight, counts, n, lora=(u, factor)))
    plain = bench_ms(lambda: grouped_gemm(rows, weight, counts, n))
    add = bench_ms(lambda: grouped_gemm(u, factor, counts, n, into=base))
    other = base.clone()
    torch_add = bench_ms(lambda: base.add_(other))
    out_bytes = 2 * base.numel() * base.element_size() + u.numel() * u.element_size()
    print(
        f"{label} (S={n}, K={rows.shape[1]}, N={base.shape[1]}): grouped_mm {gmm:.3f} ms, triton plain {plain:.3f}, "
        f"triton fused LoRA {fused:.3f}, split = grouped_mm + add {gmm + add:.3f} | add {add:.3f} ms = "
        f"{gbs(out_bytes, add):.0f} GB/s; torch add_ over the same bytes {torch_add:.3f} ms = "
        f"{gbs(3 * base.numel() * base.element_size(), torch_add):.0f} GB/s",
        flush=True,
    )
    if config_sweep:
        for i in range(len(configs("lora_add"))):
            os.environ["MOEKIT_TRITON_AUTOTUNE"] = f"config:{i}"
            down_proj._ADD = Autotuned(down_proj._grouped_gemm_kernel, "lora_add", key=down_proj._KEY)
            ms = bench_ms(lambda: grouped_gemm(u, factor, counts, n, into=base))
            print(f"    add config {i} {configs('lora_add')[0]}: {ms:.3f} ms {gbs(out_bytes, ms):.0f} GB/s")
        os.environ.pop("MOEKIT_TRITON_AUTOTUNE")
        down_proj._ADD = Autotuned(down_proj._grouped_gemm_kernel, "lora_add", key=down_proj._KEY)
    routed = plan.num_routed
    check = grouped_gemm(u, factor, counts, n, into=base.clone())[:routed]
    results = []
    for block_m, block_n, warps, stages in CANDIDATES:
        if block_m * block_n > 128 * 128 and warps == 4:
            continue
        same = torch.equal(
            add_rows(u, factor, counts, n, base.clone(), block_m, block_n, warps, stages)[:routed], check
        )
        ms = bench_ms(lambda: add_rows(u, factor, counts, n, base, block_m, block_n, warps, stages))  # noqa: B023
        results.append((ms, block_m, block_n, warps, stages, same))
    results.sort()
    for ms, block_m, block_n, warps, stages, same in results[:5]:
        print(
            f"    row-sweep add ({block_m}, {block_n}, {warps} warps, {stages} stages): {ms:.3f} ms "
            f"{gbs(out_bytes, ms):.0f} GB/s, bit-equal to the add: {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nemotron3-nano,qwen3-30b-a3b")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--configs", action="store_true", help="also time every tile config of the add")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for preset in args.preset.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            probe(preset, tokens, args.rank, args.configs)


if __name__ == "__main__":
    main()
