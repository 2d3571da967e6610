"""What do the LoRA side kernels cost at the model shapes, and how much of it is PEFT's layout of B?

    PYTHONPATH=src python scripts/probe_lora_grads.py [--ranks 16,64]

PEFT keeps lora_B.weight as [out, R*E] (expert e's B is columns e::E), so B viewed [E, out, R] has strides
(1, R*E, E): no dimension is dense. The engine copies s·B into a dense bf16 operand every step and the
factor-gradient kernel writes dB straight into those strides. This probe times, per shape and rank (one GPU,
CUDA events around 20 calls back to back): the low-rank GEMM u = x[tok] Aᵀ, the factor gradients dA (dense layout) and dB
(PEFT's layout against a dense buffer, and a dense buffer plus one copy into PEFT's layout), and the s·B copy
(torch's elementwise copy against ``moekit.kernels.relayout.scaled_copy``).
"""

from __future__ import annotations

import argparse

import torch

from moekit.kernels import grouped_gemm, weight_grad
from moekit.kernels.relayout import scaled_copy
from moekit.kernels.tiling import wgrad_block_k
from moekit.kernels.weight_grad import chunk_table
from moekit.plan import build_plan

SHAPES = {"nemotron3-nano": (2688, 1856, 128, 6), "qwen3-30b-a3b": (2048, 1536, 128, 8)}  # H, I, E, K



def time_ms(fn, repeats: int = 20) -> float:
    """GPU ms per call: ``repeats`` calls queued back to back between two events (a single call's events would
    also count the host's launch time, which is of the order of these kernels' own)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def probe(name: str, hidden: int, experts: int, top_k: int, rank: int, tokens: int) -> None:
    """Print each LoRA side op's time at one shape and rank (dB and s·B of the down-projection: out = H)."""
    bf16 = torch.bfloat16
    index = torch.randn(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    plan = build_plan(index, experts)
    n, counts, tok = plan.num_rows, plan.tokens_per_expert, plan.token_of_row
    x = torch.randn(tokens, hidden, device="cuda", dtype=bf16)
    chunks = chunk_table(counts, n, wgrad_block_k(bf16))
    a_param = torch.randn(experts * rank, hidden, device="cuda") * 0.02  # PEFT lora_A [E*R, in]
    b_param = torch.randn(hidden, rank * experts, device="cuda") * 0.02  # PEFT lora_B [out, R*E]
    b_view = b_param.view(hidden, rank, experts).permute(2, 0, 1)  # [E, out, R], strides (1, R*E, E)
    a_kernel = a_param.view(experts, rank, hidden).to(bf16)
    u = torch.randn(n, rank, device="cuda", dtype=bf16)
    dense = torch.empty(experts, hidden, rank, device="cuda")
    peft_grad = torch.empty_like(b_view)
    dense_a = torch.empty(experts, rank, hidden, device="cuda")

    def factor_grad(out, transposed):  # Σ x[tok]ᵀ u over each expert's rows: dB [E, H, R] or dA [E, R, H]
        weight_grad(x, u, counts, n, experts, (hidden, rank), torch.float32, transposed, left_index=tok,
                    chunks=chunks, lowrank=True, out=out)  # fmt: skip

    def b_operand():
        return torch.empty(b_view.shape, dtype=bf16, device="cuda")

    cases = {
        "u = x[tok] A^T (lowrank GEMM)": lambda: grouped_gemm(
            x, a_kernel.transpose(1, 2), counts, n, gather=tok, lowrank=True
        ),
        "dA (dense layout)": lambda: factor_grad(dense_a, True),
        "dB into PEFT's strides": lambda: factor_grad(peft_grad, False),
        "dB dense": lambda: factor_grad(dense, False),
        "dB dense + copy to PEFT's strides": lambda: (factor_grad(dense, False), peft_grad.copy_(dense)),
        "dB dense + scaled_copy to PEFT's": lambda: (factor_grad(dense, False), scaled_copy(dense, peft_grad)),
        "s*B torch.mul to dense bf16": lambda: torch.mul(b_view, 2.0, out=b_operand()),
        "s*B scaled_copy to dense bf16": lambda: scaled_copy(b_view, b_operand(), 2.0),
    }
    for label, fn in cases.items():
        print(f"{name} T={tokens} r={rank}: {label:36s} {time_ms(fn):.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    for name, (hidden, _, experts, top_k) in SHAPES.items():
        for rank in (int(r) for r in args.ranks.split(",")):
            probe(name, hidden, experts, top_k, rank, args.tokens)


if __name__ == "__main__":
    main()
