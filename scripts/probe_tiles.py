"""Probe: the up-projection of gated experts under single tile configs (no autotuning), at real shapes.

    PYTHONPATH=src python scripts/probe_tiles.py

For each shape and each (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidate, times ``up_proj`` alone
(CUDA events, median of 20) on plan-sorted random routing; the "gated" family's current space comes first.
"""

from __future__ import annotations

import statistics

import torch

from moekit.activations import ELEMENTWISE, Activation
from moekit.tools.bench import PRESETS, _timer, make_routing
from moekit.kernels import tiling, up_proj
from moekit.kernels.up_proj import _GATED
from moekit.plan import build_plan

CANDIDATES = [
    (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 32, 8, 6), (256, 64, 64, 8, 4), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (256, 128, 64, 8, 3),
]  # fmt: skip


def main() -> None:
    print(torch.cuda.get_device_name())
    act = Activation("glu", ELEMENTWISE["silu"], True)
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        shape = PRESETS[name]
        x, index, _ = make_routing(shape, 8192, "cuda", torch.bfloat16)
        plan = build_plan(index, shape.num_experts)
        weight = (
            torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, device="cuda", dtype=torch.bfloat16)
            * 0.02
        )
        w_in_out = weight.transpose(1, 2)
        flops = 2 * plan.num_rows * shape.hidden * 2 * shape.intermediate
        space = tiling._SPACES["gated"]["hopper"]
        for config in list(space) + [c for c in CANDIDATES if c not in space]:
            tiling._SPACES["gated"]["hopper"] = [config]
            _GATED.chosen.clear()

            def call(x=x, plan=plan, w_in_out=w_in_out):
                return up_proj(x, plan.token_of_row, w_in_out, None, plan.tokens_per_expert, plan.num_rows, act)

            try:
                for _ in range(3):
                    call()
                ms = statistics.median(_timer("cuda")(call, 20))
            except Exception as error:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  {name} {config}: failed ({type(error).__name__})")
                continue
            print(f"  {name} {config}: {ms:.3f} ms, {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s", flush=True)
        tiling._SPACES["gated"]["hopper"] = space


if __name__ == "__main__":
    main()
