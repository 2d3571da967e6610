"""``moekit demo`` and the CLI plumbing, end to end on the CPU (a few seconds per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.tools import cli, demo

# On the CPU, also on a GPU machine (the demo runs 1 thread there by default).
FAST = ["--device", "cpu", "--no-progress", "--baseline-steps", "2"]


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory) -> dict:
    """One short demo through ``moekit.tools.cli.main``; its JSON result."""
    path = tmp_path_factory.mktemp("demo") / "result.json"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--steps", "20", *FAST, "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread setting is undone afterwards
    return json.loads(path.read_text())


def test_loss_falls(demo_result):
    assert demo_result["loss_end"] < (1 - demo.MIN_LOSS_DROP) * demo_result["loss_start"]
    assert demo_result["accuracy_end"] > demo_result["accuracy_start"] + 0.1
    assert len(demo_result["train_losses"]) == 20
    assert demo_result["ok"] and demo_result["loss_drop"] >= demo.MIN_LOSS_DROP


def test_logits_match_default_backend(demo_result):
    assert demo_result["dtype"] == "float32" and demo_result["device"] == "cpu"
    assert demo_result["default_backend"] in ("grouped_mm", "eager")
    assert demo_result["moekit_engine"] == "reference"  # the CPU engine
    assert demo_result["max_logit_diff"] < 1e-4  # step 0, same weights, same batch
    assert demo_result["max_logit_diff_end"] < 1e-4  # trained LoRA (B != 0): exercises moekit's LoRA path
    assert demo_result["max_train_loss_diff"] < 1e-4  # same batches from the same start: gradients agree


def test_throughput_reported(demo_result):
    assert demo_result["tokens_per_s_moekit"] > 0
    assert demo_result["tokens_per_s_default"] > 0
    assert demo_result["tokens_per_step"] == 16 * 64
    assert demo_result["threads"] == 1  # the CPU default


def test_output_and_exit_code(capsys):
    # Too few steps for the loss to fall by 30%: exit code 1 and a plain message.
    assert cli.main(["demo", "--steps", "1", *FAST, "--seq-len", "16"]) == 1
    captured = capsys.readouterr()
    assert "loss (held-out)" in captured.out and "tokens/s" in captured.out and "Δlogit" in captured.out
    assert "FAILED: the loss did not fall enough" in captured.err


def test_run_demo_api_is_deterministic():
    config = demo.DemoConfig(steps=2, device="cpu", batch_size=4, seq_len=16, baseline_steps=1, progress=False)
    first, second = demo.run_demo(config, log=lambda _: None), demo.run_demo(config, log=lambda _: None)
    assert first.train_losses == second.train_losses
    assert first.loss_start == second.loss_start


def test_bf16_is_judged_against_fp32():
    config = demo.DemoConfig(
        steps=2, device="cpu", dtype="bfloat16", batch_size=4, seq_len=16, baseline_steps=1, progress=False
    )
    result = demo.run_demo(config, log=lambda _: None)
    assert result.dtype == "bfloat16"
    assert len(result.fp32_error_moekit) == len(result.fp32_error_default) == 2
    assert result.logits_match, (result.fp32_error_moekit, result.fp32_error_default)


def test_lora_targets_follow_has_gate():
    model = demo.build_model()
    assert demo.lora_target_parameters(model) == ["experts.up_proj", "experts.down_proj"]  # relu², non-gated


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["demo", "--steps", "0"], "must be a positive integer"),
        (["demo", "--steps", "many"], "--steps: must be a positive integer, got many"),
        (["demo", "--threads", "-1"], "--threads: must be a non-negative integer, got -1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cuda_requested_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_help_lists_demo(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    src = str(Path(demo.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "demo", "--steps", "20", *FAST, "--json", str(path)],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "loss (held-out)" in proc.stdout
    result = json.loads(path.read_text())
    assert result["loss_end"] < (1 - demo.MIN_LOSS_DROP) * result["loss_start"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_demo_on_cuda(tmp_path, dtype):
    path = tmp_path / "result.json"
    argv = ["demo", "--device", "cuda", "--dtype", dtype, "--steps", "20", "--no-progress", "--json", str(path)]
    assert cli.main(argv) == 0
    result = json.loads(path.read_text())
    assert result["device"].startswith("cuda") and result["dtype"] == dtype
    assert result["ok"] and result["tokens_per_s_moekit"] > 0
    if dtype == "float32":
        assert result["max_logit_diff"] < 1e-4 and result["max_logit_diff_end"] < 1e-4
