"""Which calls in a moekit step make the host wait for the GPU? Runs bench steps (after warm-up) under
``torch.cuda.set_sync_debug_mode("warn")`` and prints where each synchronizing call came from."""

from __future__ import annotations

import argparse
import traceback
import warnings

import torch

from moekit.tools.bench import PRESETS, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mixtral-8x7b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--modes", default="fwd,full,lora")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        step = make_step(PRESETS[args.preset], "moekit-triton", mode, args.tokens, "cuda", torch.bfloat16)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"{args.preset} {mode}: {len(syncs)} synchronizing call(s)")
        for w in syncs:
            print(f"  {w.filename}:{w.lineno}: {str(w.message)[:120]}")
        if syncs:  # the Python stack of the first one
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError:
                print("".join(traceback.format_exc().splitlines(keepends=True)[-16:]))
            finally:
                torch.cuda.set_sync_debug_mode(0)


if __name__ == "__main__":
    main()
