"""The GPU suite: the Triton engine against the reference engine at real model sizes, through the user's path.

    python -m pytest -m gpu -q tests/gpu                    on a CUDA machine (``tools/gpu_session.sh OUT gpu``)
    MOEKIT_TRITON_AUTOTUNE=config:N python -m pytest ...    the same with every kernel family's N-th tile config
    python -m pytest -m gpu -q tests/gpu --gpu-suite-cpu    on the CPU, through the Triton interpreter, at tiny
                                                            sizes (develops and checks the suite itself)

Without CUDA (and without ``--gpu-suite-cpu``) every test here is skipped at collection, so the default CPU run
(``python -m pytest -q``) spends no time on them. The option exists only when this directory is on the command
line (pytest reads a sub-directory's options from there).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-suite-cpu",
        action="store_true",
        default=False,
        help="run tests/gpu on the CPU through the Triton interpreter, at tiny sizes",
    )


def on_cpu(config) -> bool:
    return bool(config.getoption("--gpu-suite-cpu", default=False))


def pytest_collection_modifyitems(config, items):
    skip = None
    if not torch.cuda.is_available() and not on_cpu(config):
        skip = pytest.mark.skip(reason="needs a CUDA device (or --gpu-suite-cpu with tests/gpu on the command line)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


def pytest_report_header(config):
    """(Called only where this directory is on the command line.)"""
    device = "cpu (Triton interpreter)" if on_cpu(config) or not torch.cuda.is_available() else None
    device = device or torch.cuda.get_device_name()
    tile = os.environ.get("MOEKIT_TRITON_AUTOTUNE", "1")
    return f"moekit GPU suite: {device}, MOEKIT_TRITON_AUTOTUNE={tile}"


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return "cpu" if on_cpu(pytestconfig) else "cuda"


@pytest.fixture(autouse=True)
def _free_memory():
    """Each case allocates up to tens of GiB (fp64 truth at Mixtral's size): give it back before the next."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
