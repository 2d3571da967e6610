"""Where a distributed worker's rank runs (``distributed_worker.py``, ``distributed_hf_worker.py``).

MOEKIT_DIST_DEVICE=cuda: NCCL, one GPU per rank (LOCAL_RANK), the Triton kernels native (``tools/gpu_session.sh OUT
dist``); else gloo on the CPU. (Each worker sets TRITON_INTERPRET for CPU ranks itself, before triton is imported.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

DEVICE = os.environ.get("MOEKIT_DIST_DEVICE", "cpu")


def device() -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK) under MOEKIT_DIST_DEVICE=cuda, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if DEVICE == "cuda" else torch.device("cpu")


def init_process_group() -> None:
    """NCCL on this rank's GPU, or gloo."""
    if DEVICE == "cuda":
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
