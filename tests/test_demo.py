"""``moekit demo`` and the CLI plumbing, end to end on the CPU (a few seconds per run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit.options
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


def _result(**changes) -> demo.DemoResult:
    """A made-up demo result (no run): fp32, the logits matching, the loss falling from 6 to 1 in 60 steps."""
    result = demo.DemoResult(
        loss_start=6.0, loss_end=1.0, tokens_per_s_moekit=10_000.0, tokens_per_s_default=9_000.0,
        max_logit_diff=0.0, max_logit_diff_end=1e-5, max_train_loss_diff=1e-6, accuracy_start=0.01,
        accuracy_end=0.9, default_backend="grouped_mm", moekit_engine="reference", device="cpu", dtype="float32",
        steps=60, tokens_per_step=1024, threads=1, trainable_params=1, total_params=2, logit_tolerance=1e-3,
    )  # fmt: skip
    return dataclasses.replace(result, **changes)


def test_short_run_warns_and_succeeds(capsys):
    """Too few steps for the loss to fall by 30%: a warning line, exit 0; progress shows as plain lines (the
    captured stdout is not a terminal)."""
    assert demo.LOSS_CHECK_MIN_STEPS <= demo.DemoConfig().steps  # the default run is judged on its loss
    assert cli.main(["demo", "--steps", "1", "--device", "cpu", "--baseline-steps", "2", "--seq-len", "16"]) == 0
    captured = capsys.readouterr()
    assert "loss (held-out)" in captured.out and "tokens/s" in captured.out and "Δlogit" in captured.out
    assert "LoRA fine-tuning on moekit, step: 1/1 loss " in captured.out
    warning = [line for line in captured.err.splitlines() if "moekit demo:" in line]
    assert len(warning) == 1 and warning[0].startswith("moekit demo: warning: the loss did not fall enough in 1 steps")
    assert "FAILED" not in captured.err


def test_long_run_whose_loss_does_not_fall_fails(monkeypatch, capsys):
    # A default-length run whose loss stays flat: exit code 1 and a plain message.
    monkeypatch.setattr(demo, "run_demo", lambda config: _result(steps=config.steps, loss_end=5.9))
    assert cli.main(["demo", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "loss (held-out)" in captured.out and "tokens/s" in captured.out and "Δlogit" in captured.out
    assert "FAILED: the loss did not fall enough" in captured.err
    assert not _result(loss_end=5.9).ok and _result(loss_end=5.9, steps=demo.LOSS_CHECK_MIN_STEPS - 1).ok
    assert _result(loss_end=5.9, steps=demo.LOSS_CHECK_MIN_STEPS).as_dict()["loss_checked"]


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    """On a terminal the progress is tqdm's bar on stderr, and no plain progress lines."""
    monkeypatch.setattr(demo, "is_terminal", lambda stream=None: True)
    config = demo.DemoConfig(steps=2, device="cpu", batch_size=4, seq_len=16, baseline_steps=1)
    demo.run_demo(config, log=print)
    captured = capsys.readouterr()
    assert "LoRA fine-tuning on moekit: 100%" in captured.err
    assert "step: " not in captured.out


def test_report_prints_the_whole_table_when_not_a_terminal(capsys):
    """Captured stdout is no terminal: the table keeps its natural width instead of rich's 80 columns."""
    result = _result(default_backend="an_experts_backend_with_a_rather_long_name", tokens_per_s_moekit=123_456_789.0)
    demo.report(result)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) > 80
    assert "…" not in out
    assert "train tokens/s, an_experts_backend_with_a_rather_long_name" in out
    assert "123,456,789  (×13717.42)" in out
    assert "max |Δtrain loss| vs an_experts_backend_with_a_rather_long_name" in out


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
        (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'cpu', 'cuda')"),
        (["demo", "--steps", "0"], "must be a positive integer"),
        (["demo", "--steps", "many"], "--steps: must be a positive integer, got many"),
        (["demo", "--threads", "-1"], "--threads: must be a non-negative integer, got -1"),
        (
            ["demo", "--dtype", "fp8"],
            "argument --dtype: invalid choice: 'fp8' (choose from 'auto', 'float32', 'bfloat16')",
        ),
        (["demo", "--lr", "0"], "argument --lr: must be a positive number, got 0"),
        (["demo", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["demo", "--seq-len", "3"], "moekit demo: error: --seq-len must be at least 4"),
        (["demo", "--json", "/nonexistent/result.json"], "--json '/nonexistent/result.json': the directory"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        ([], "COMMAND (choose from demo, bench, check, quantize)"),
    ],
)
def test_usage_errors(capsys, argv, message):
    """Each usage error is one line on stderr, naming the argument (and the valid choices)."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out, captured


@pytest.mark.parametrize("command", [["demo"], ["bench", "--device", "cpu"], ["check", "--tiny", "qwen3_moe"]])
def test_bad_environment_is_one_line(monkeypatch, capsys, command):
    """A MOEKIT_* value moekit does not know stops every command before it does anything, in one line."""
    error = moekit.options.OptionsError("MOEKIT_BACKEND must be one of (unset), reference, triton; got 'bogus'")
    monkeypatch.setattr(moekit.options, "_ENV_ERROR", error)
    assert cli.main(command) == 2
    captured = capsys.readouterr()
    assert captured.err == "moekit: error: MOEKIT_BACKEND must be one of (unset), reference, triton; got 'bogus'\n"
    assert captured.out == ""


def test_bad_environment_in_a_fresh_process():
    """``MOEKIT_BACKEND=bogus moekit demo``: import succeeds, the command prints one line and exits 2."""
    src = str(Path(demo.__file__).resolve().parents[2])
    env = dict(
        os.environ,
        MOEKIT_BACKEND="bogus",
        PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "demo", "--steps", "1"],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "moekit: error: MOEKIT_BACKEND must be one of (unset), reference, triton; got 'bogus'"
    ]
    assert proc.stdout == ""


def _help_entries(text: str) -> dict[str, str]:
    """argparse help -> {first option string (or positional name): its whole entry, wrapped lines joined}."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["demo", "bench", "check"])
def test_help_shows_every_default(capsys, command):
    """Every option but the on/off flags says its default in ``moekit COMMAND --help``."""
    parser = cli.build_parser()
    subparser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert cli.main([command, "--help"]) == 0
    entries = _help_entries(capsys.readouterr().out)
    checked = 0
    for action in subparser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        entry = entries[action.option_strings[0] if action.option_strings else action.dest]
        assert "(default" in entry or "no default" in entry, entry
        checked += 1
    assert checked >= 5
    expected = {"demo": ["(default: 60)", "(default: 0.005)", "(default: 8)"], "bench": ["(default: fwd,full)",
                "(default: grouped_mm,moekit)", "(default: 16)"], "check": ["(default: 64)", "(default: float32)"]}  # fmt: skip
    text = " ".join(entries.values())
    assert all(default in text for default in expected[command])


def test_cuda_requested_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_help_lists_demo(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    src = str(Path(demo.__file__).resolve().parents[2])  # src/, which holds the moekit package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "demo", "--steps", "20", *FAST, "--json", str(path)],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "loss (held-out)" in proc.stdout
    assert "LoRA fine-tuning on moekit" not in proc.stdout + proc.stderr  # --no-progress: no bar, no lines
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


# --- NF4 experts (QLoRA) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["nf4", "nf4-dq"])
def test_demo_nf4_loss_falls(quant, tmp_path, capsys, monkeypatch):
    """``moekit demo --quant nf4`` (and ``nf4-dq``, double-quantized scales): LoRA on NF4 experts learns (the plain
    demo's rule), moekit on NF4 matches the default backend on the dequantized weights, and the summary shows the
    experts' bytes."""
    from moekit.quant.tensor import NF4Tensor

    calls = []
    original = NF4Tensor.dequantize_experts

    def spy(self, first, last, dtype=None):
        calls.append(last - first)
        return original(self, first, last, dtype)

    monkeypatch.setattr(NF4Tensor, "dequantize_experts", spy)
    path = tmp_path / "result.json"
    assert cli.main(["demo", "--quant", quant, "--steps", "20", *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert calls.count(1) > 100  # moekit ran on the NF4 codes, one expert dequantized at a time (the 16-expert
    # calls are the default-backend copy's dequantize(), once per weight)
    assert calls.count(demo.NUM_EXPERTS) == 6 and set(calls) == {1, demo.NUM_EXPERTS}
    assert result["quant"] == quant and result["ok"] and result["loss_checked"]
    assert result["loss_end"] < (1 - demo.MIN_LOSS_DROP) * result["loss_start"]
    assert result["max_logit_diff"] < 1e-4 and result["max_logit_diff_end"] < 1e-4
    assert result["max_train_loss_diff"] < 1e-4
    elements, held = result["expert_weight_elements"], result["expert_weight_bytes"]
    assert elements == 3 * demo.NUM_EXPERTS * 2 * demo.HIDDEN * demo.MOE_INTERMEDIATE
    if quant == "nf4":
        assert held == elements // 2 + 4 * (elements // 64)  # codes + fp32 absmax
        weights_text = "NF4 648.00 KiB (bf16 2.25 MiB, fp32 4.50 MiB: 0.28× of bf16)"
    else:  # codes + 8-bit absmax + per weight (6 of 12,288 scales each) an fp32 per 256 scales and the offset
        assert held == elements // 2 + elements // 64 + 6 * 4 * (elements // 6 // 64 // 256 + 1)
        weights_text = "NF4-DQ 594.30 KiB (bf16 2.25 MiB, fp32 4.50 MiB: 0.26× of bf16)"
    assert f"{quant.upper()} experts" in out and "(NF4, frozen: QLoRA)" in out
    assert "expert weights, moekit" in out and weights_text in out
    assert "dequantized experts" in out


def test_demo_quant_none_keeps_the_plain_summary(demo_result):
    assert demo_result["quant"] == "none"
    text = demo.expert_weights_text("none", 1024, 4096)
    assert text == "dense 4.00 KiB (bf16 2.00 KiB, fp32 4.00 KiB: 2.00× of bf16)"


def test_demo_bad_quant_is_one_line(capsys):
    assert cli.main(["demo", "--quant", "int4"]) == 2
    captured = capsys.readouterr()
    assert "argument --quant: invalid choice: 'int4' (choose from 'none', 'nf4', 'nf4-dq')" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    with pytest.raises(ValueError, match="quant must be one of none, nf4, nf4-dq, got 'int4'"):
        demo.run_demo(demo.DemoConfig(steps=1, device="cpu", quant="int4"), log=lambda _: None)
