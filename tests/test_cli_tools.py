"""`moekit bench` and `moekit check`: argument errors, the JSON records, and check catching broken setups."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

import moekit.engines.reference
import moekit.quant.experts
from moekit.tools import bench
from moekit.tools.cli import main
from moekit.tools.tiny import add_lora, build, lora_target_parameters

RECORD_KEYS = {
    "card",
    "shape",
    "impl",
    "mode",
    "tokens",
    "ms",
    "ms_synced",
    "peak_gib",
    "step_gib",
    "tflops",
    "dense_tflops",
}


# --- bench ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--preset", "no-such-model"], "unknown preset"),
        (["bench", "--preset", "no-such-model"], "--preset: unknown preset(s) no-such-model; choose from nemotron3-nano"),
        (["bench", "--hidden", "64"], "a custom shape needs --intermediate, --experts, --top-k"),
        (["bench", "--gated"], "a custom shape needs --hidden, --intermediate, --experts, --top-k"),
        (["bench", "--preset", "tiny", "--hidden", "64"], "give --preset or a custom shape"),
        (["bench", "--hidden", "8", "--intermediate", "8", "--experts", "2", "--top-k", "1", "--act", "gpt_oss"],
         "--act gpt_oss is a gated activation: add --gated"),
        (["bench", "--modes", "fwd,backward"], "unknown mode"),
        (["bench", "--modes", "fwd,backward"], "--modes: unknown mode(s) backward; choose from fwd, full, lora, frozen"),
        (["bench", "--impls", "cutlass"], "impl"),
        (["bench", "--impls", "cutlass"], "--impls: unknown impl(s) cutlass; choose from eager, grouped_mm, moekit,"),
        (["bench", "--device", "cpu", "--json", "/nonexistent/r.json"], "--json '/nonexistent/r.json': the directory"),
    ],
)  # fmt: skip
def test_bench_argument_errors(argv, message, capsys):
    """Each bad argument is one line naming it and the valid values, before anything is measured."""
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert message in out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "many"], "argument --tokens: invalid value 'many': expected comma-separated positive integers"),
        (["--tokens", "0"], "argument --tokens: invalid value '0'"),
        (["--lora-rank", "4,x"], "argument --lora-rank: invalid value '4,x'"),
        (["--hidden", "-8"], "argument --hidden: invalid value '-8': expected a positive integer"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'cpu', 'cuda')"),
        (["--act", "tanh"], "argument --act: invalid choice: 'tanh' (choose from"),
    ],
)
def test_bench_usage_error_from_argparse(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert "invalid" in err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bench_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda"]) == 2
    out = capsys.readouterr().out
    assert "--device cuda: no CUDA device is available" in out and len(out.strip().splitlines()) == 1


def test_bench_runs_on_cpu_and_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "records.json", tmp_path / "chart.png"
    argv = ["bench", "--device", "cpu", "--tokens", "32", "--modes", "fwd,full,lora,frozen", "--lora-rank", "4,8",
            "--impls", "eager,grouped_mm,moekit,liger", "--json", str(json_path), "--plot", str(png_path)]  # fmt: skip
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert "say nothing about GPU speed" in output
    records = json.loads(json_path.read_text())
    assert len(records) == 5 * 4  # fwd, full, lora r=4, lora r=8, frozen; four impls
    timed = [r for r in records if "ms" in r]
    assert {(r["impl"], r["mode"], r["lora_rank"]) for r in timed} == {
        (i, m, rank) for i in ("eager", "grouped_mm", "moekit")
        for m, rank in (("fwd", None), ("full", None), ("lora", 4), ("lora", 8), ("frozen", None))
    }  # fmt: skip
    for record in timed:
        assert RECORD_KEYS <= record.keys()
        assert record["ms"] > 0 and record["tflops"] > 0 and record["tokens"] == 32
    skipped = [r for r in records if "ms" not in r]
    assert {r["impl"] for r in skipped} == {"liger"} and all(r["skipped"] for r in skipped)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Not a terminal: a progress line per case, flushed as it ends; the table whole, at its natural width.
    assert "benchmarked: 1/20 tiny T=32 fwd eager: " in output and "benchmarked: 20/20 " in output
    assert f"skipped ({bench._peer_available('liger')})" in output
    assert "…" not in output and "÷ frozen" in output and "× grouped_mm" in output
    assert max(len(line) for line in output.splitlines()) > 80
    # The CPU run says what it measured: wall-clock time, and a dense rate that is not rounded to zero.
    assert "wall clock" in output and "CUDA events" not in output
    dense = re.search(r"measured dense float32 matmul: (\S+) TFLOP/s", output)
    assert dense and float(dense.group(1)) > 0 and dense.group(1) == bench._rate(records[0]["dense_tflops"])


def test_bench_caption_names_the_timer():
    from rich.console import Console

    for device, timer, other in (("cpu", "wall clock, time.perf_counter", "CUDA"), ("cuda", "CUDA events", "wall")):
        console = Console(record=True, width=400)
        console.print(bench._table([], None, device))
        text = console.export_text()
        assert timer in text and other not in text
    assert bench._rate(0.0123) == "0.0123" and bench._rate(225.123) == "225.1" and bench._rate(12.34) == "12.3"


def test_bench_table_folds_on_a_narrow_terminal():
    """On a terminal narrower than the table, values wrap within their cells instead of being cut."""
    from rich.console import Console

    record = {"shape": "nemotron3-nano", "tokens": 8192, "mode": "full", "impl": "moekit-reference", "ms": 225.123,
              "tflops": 12.3, "peak_gib": 1.0, "step_gib": 0.5, "lora_rank": None}  # fmt: skip
    console = Console(record=True, width=60, force_terminal=True)
    console.print(bench._table([record], 100.0, "cuda"))
    text = console.export_text()
    assert "…" not in text and "nem" in text and "225" in text  # folded over lines, not cut


def test_bench_sets_the_engine_through_options(monkeypatch):
    """A moekit impl's steps run with OPTIONS.backend set to its engine (never the environment), restored after."""
    import moekit.backend
    import moekit.options

    seen = []
    real = moekit.backend.select_engine

    def spy(*args, **kwargs):
        seen.append(moekit.options.OPTIONS.backend)
        return real(*args, **kwargs)

    monkeypatch.setattr(moekit.backend, "select_engine", spy)
    monkeypatch.delenv("MOEKIT_BACKEND", raising=False)
    before = moekit.options.OPTIONS.backend
    for impl, engine in (("moekit-reference", "reference"), ("moekit", "")):
        seen.clear()
        step = bench.make_step(bench.PRESETS["tiny"], impl, "full", 16, "cpu", torch.float32)
        step()
        assert seen and set(seen) == {engine}, (impl, seen)
        assert moekit.options.OPTIONS.backend == before and "MOEKIT_BACKEND" not in os.environ
    assert bench.engine_of("grouped_mm") is None and bench.engine_of("moekit-triton") == "triton"


def test_bench_table_puts_lora_over_its_frozen_base():
    """With frozen-base rows in the run, each LoRA row shows its step over the same impl's frozen step."""
    from rich.console import Console

    from moekit.tools.bench import _table

    def record(mode, impl, ms, rank=None):
        return {"shape": "s", "tokens": 8, "mode": mode, "impl": impl, "ms": ms, "tflops": 1.0, "peak_gib": 1.0,
                "step_gib": 0.5, "lora_rank": rank}  # fmt: skip

    records = [record("lora", "grouped_mm", 8.0, 16), record("lora", "moekit-triton", 2.5, 16),
               record("frozen", "moekit-triton", 2.0)]  # fmt: skip
    console = Console(record=True, width=240)
    console.print(_table(records, None))
    text = console.export_text()
    rows = {tuple(cell.strip() for cell in line.split("│")[3:5]): line.rstrip(" │")
            for line in text.splitlines() if line.count("│") > 10}  # fmt: skip
    assert "÷ frozen" in text
    assert rows[("lora r=16", "moekit-triton")].endswith("1.25")  # 2.5 / 2.0
    assert rows[("lora r=16", "grouped_mm")].endswith("-")  # grouped_mm has no frozen run
    assert rows[("frozen", "moekit-triton")].endswith("-")


def _tool(name: str):
    """A script of tools/ as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ab_bench():
    return _tool("ab_bench")


def test_nf4_operand_bench_checks_every_kernel(capsys):
    """tools/nf4_operand_bench.py --check: the dense, B-operand and register-A GEMMs equal the fp32 product on the
    dequantized weight; the register-A kernel on moekit's byte pairs instead of its halves is caught."""
    tool = _tool("nf4_operand_bench")
    assert tool.main(["--check"]) == 0
    assert capsys.readouterr().out.count(" ok") == len(tool.CHECK_CONFIGS)
    codes = torch.randint(0, 16, (4, 128))
    pairs = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    assert tool.pack_halves(pairs)[1, 33].item() == codes[1, 65].item() << 4 | codes[1, 97].item()  # block 1
    tool.pack_halves = lambda packed: packed  # the wrong packing for the register-A kernel: moekit's own
    register_a = [config for config in tool.CHECK_CONFIGS if config[0].startswith("register A")]
    rows = tool.run([(64, 64, 128)], register_a, "cpu", torch.float16)
    assert rows and not any(row["ok"] for row in rows)


def test_nf4_kernel_ab_loads_a_variant_and_needs_hopper(tmp_path, monkeypatch):
    """tools/nf4_kernel_ab.py: a copy of nf4_hopper.py loads as a module of moekit.kernels (its relative imports
    resolved, its kernels gluon's), and without a Hopper GPU the tool says so instead of failing in a launch."""
    import moekit.kernels.nf4_hopper as engine_kernels

    tool = _tool("nf4_kernel_ab")
    copy = tmp_path / "variant.py"
    copy.write_text(pathlib.Path(engine_kernels.__file__).read_text().replace("STAGES = 3", "STAGES = 4"))
    variant = tool.load_variant(copy)
    assert variant.__name__ == "moekit.kernels._ab_variant" and variant.STAGES == 4 and engine_kernels.STAGES == 3
    assert type(variant._register_nf4_kernel) is type(engine_kernels._register_nf4_kernel)
    monkeypatch.setattr(sys, "argv", ["nf4_kernel_ab.py", str(copy)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sm_90 GPU"):
        tool.main()


def test_ab_bench_summary_and_variant_check(tmp_path):
    """tools/ab_bench.py: one line per case with each variant's processes in order, and a variant whose path does
    not hold moekit is refused (here moekit is installed, so PYTHONPATH cannot select it)."""
    ab = _ab_bench()
    case = {"shape": "tiny", "tokens": 64, "mode": "lora", "lora_rank": 16, "impl": "moekit-triton", "step_gib": 0.5}
    records = [{**case, "ms": ms, "variant": v} for v, ms in (("old", 2.0), ("new", 1.5), ("old", 2.25), ("new", 1.25))]
    records.append({**case, "mode": "frozen", "lora_rank": None, "skipped": "why"})
    assert ab.summary(records, ["old", "new"]) == [
        "tiny T=64 lora r=16 moekit-triton: old 2.000 / 2.250 ms, 0.500 GiB | new 1.500 / 1.250 ms, 0.500 GiB"
    ]
    with pytest.raises(SystemExit, match="moekit imports from"):
        ab.check_variant(str(tmp_path))


def test_bench_custom_shape(tmp_path):
    json_path = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--hidden", "48", "--intermediate", "40", "--experts", "4", "--top-k", "2",
            "--gated", "--act", "gelu", "--tokens", "16", "--modes", "full", "--json", str(json_path)]  # fmt: skip
    assert main(argv) == 0
    (_, record_moekit) = json.loads(json_path.read_text())
    assert record_moekit["shape_dims"]["hidden"] == 48 and record_moekit["shape_dims"]["gated"]


# --- check ------------------------------------------------------------------------------------------------------
def test_check_tiny_model_passes(capsys):
    assert main(["check", "--tiny", "qwen3_moe", "--lora", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    # Not a terminal: each phase that may take long is announced by a line.
    assert "moekit check: loading a tiny qwen3_moe ..." in out
    assert "moekit check: one batch on transformers' default experts backend, then on moekit ..." in out


def test_check_device_and_tokens_errors(capsys):
    assert main(["check", "--tiny", "qwen3_moe", "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "argument --tokens: must be a positive integer, got 0" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert main(["check", "--tiny", "qwen3_moe", "--device", "cuda"]) == 2
        out = capsys.readouterr().out
        assert "--device cuda: no CUDA device is available" in out and len(out.strip().splitlines()) == 1


def test_check_needs_a_model(capsys):
    assert main(["check"]) == 2
    assert "give exactly one of MODEL_DIR or --tiny" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/nonexistent"], "MODEL_DIR '/nonexistent' is not a directory"),
        (["--tiny", "foo"], "--tiny 'foo' is not a tiny model type; choose from nemotron_h"),
        (["/tmp", "--tiny", "qwen3_moe"], "give exactly one of MODEL_DIR or --tiny MODEL_TYPE (got MODEL_DIR '/tmp'"),
        (["--tiny", "qwen3_moe", "--lora", "--adapter", "/tmp"], "--adapter loads a saved adapter and --lora"),
        (["--tiny", "qwen3_moe", "--adapter", "/nonexistent"], "--adapter '/nonexistent' is not a directory"),
    ],
)
def test_check_argument_errors_name_the_argument(capsys, argv, message):
    """Each bad argument gets one line naming it and what was expected, before anything is loaded."""
    assert main(["check", *argv]) == 2
    out = capsys.readouterr().out
    assert message in out and len(out.strip().splitlines()) == 1, out


def test_check_says_adapters_only_when_there_are_some(capsys):
    assert main(["check", "--tiny", "qwen3_moe", "--tokens", "16"]) == 0
    assert "adapter" not in capsys.readouterr().out.splitlines()[-1]


def _save(tmp_path, model_type, lora_config=None, break_adapter=None):
    base = build(model_type)
    base.save_pretrained(tmp_path / "base")
    if lora_config is None:
        peft_model = add_lora(base)
    else:
        peft_model = get_peft_model(base, lora_config)
    if break_adapter is not None:
        break_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return ["check", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--tokens", "16"]


def test_check_saved_model_and_adapter_pass(tmp_path, capsys):
    assert main(_save(tmp_path, "nemotron_h")) == 0, capsys.readouterr().out


def test_check_catches_unadapted_experts(tmp_path, capsys):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    assert main(_save(tmp_path, "qwen3_moe", config)) == 1
    output = capsys.readouterr().out
    assert "experts are not adapted" in output
    assert "target_parameters does not name experts.gate_up_proj / experts.down_proj" in output


def test_check_catches_nemotron_adapter_missing_up_proj(tmp_path, capsys):
    config = LoraConfig(r=4, target_modules=[], target_parameters=["experts.down_proj"])
    base = build("nemotron_h")
    model = get_peft_model(base, config)
    from moekit.tools.check import CheckReport, diagnose_adapter

    report = CheckReport()
    diagnose_adapter(model, report)
    assert report.ok  # down_proj is adapted: a partial adapter is a choice, not a bug
    assert lora_target_parameters(base) == ["experts.up_proj", "experts.down_proj"]


def test_check_catches_frozen_expert_adapters():
    from peft.tuners.lora.layer import ParamWrapper

    from moekit.tools.check import run_check

    model = add_lora(build("mixtral"))
    for wrapper in model.modules():
        if isinstance(wrapper, ParamWrapper) and wrapper.parameter_name == "down_proj":
            wrapper.lora_A.requires_grad_(False)
            wrapper.lora_B.requires_grad_(False)
    report = run_check(model, tokens=16)
    assert not report.ok
    assert any("trainable LoRA parameters but its config implies" in p for p in report.problems)


def test_check_catches_experts_without_adapter_gradient():
    from moekit.tools.check import run_check

    model = add_lora(build("nemotron_h"))
    with torch.no_grad():  # expert 3's adapter is dead: A rows and B columns zero -> no gradient reaches it
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.view(8, -1, param.shape[-1])[3] = 0
            if "lora_B" in name:
                param.view(param.shape[0], -1, 8)[..., 3] = 0
    report = run_check(model, tokens=32)
    assert any("experts [3] received tokens but their LoRA factors got no gradient" in p for p in report.problems)


def test_check_catches_a_wrong_engine(monkeypatch, capsys):
    original = moekit.engines.reference.DownProjection.forward

    def wrong(ctx, *args):
        return original(ctx, *args) * 1.01  # a 1% error, as a layout read wrong would give

    monkeypatch.setattr(moekit.engines.reference.DownProjection, "forward", staticmethod(wrong))
    assert main(["check", "--tiny", "olmoe", "--tokens", "16"]) == 1
    assert "experts output differs from grouped_mm" in capsys.readouterr().out


# --- NF4 experts (QLoRA) ----------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """One torch thread: the CPU NF4 steps are many tiny ops, which OpenMP threads on a loaded machine slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wrong_on_nf4(monkeypatch):
    """Make the reference engine's projections 1% off wherever the weight is NF4 (the dense path stays right)."""
    from moekit.quant.tensor import NF4Tensor

    original = moekit.engines.reference._project

    def wrong(rows, weight, *args):
        out = original(rows, weight, *args)
        return out * 1.01 if isinstance(weight, NF4Tensor) else out

    monkeypatch.setattr(moekit.engines.reference, "_project", wrong)


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq"])
def test_bench_nf4_rows_on_cpu(quant, tmp_path, capsys, one_thread):
    """--quant nf4 on the CPU: with --modes left out, fwd and lora; each mode gets a moekit+nf4 row beside
    grouped_mm and moekit, with its weight bytes, its ratio to moekit's dense row and a value check marked ok
    (--quant nf4-dq: moekit+nf4-dq rows, the scales double-quantized)."""
    json_path = tmp_path / "records.json"
    argv = ["bench", "--device", "cpu", "--quant", quant, "--tokens", "16", "--lora-rank", "4", "--json",
            str(json_path)]  # fmt: skip
    nf4_impl = f"moekit+{quant}"
    assert main(argv) == 0
    output = capsys.readouterr().out
    records = json.loads(json_path.read_text())
    assert [(r["mode"], r["impl"]) for r in records] == [
        (mode, impl) for mode in ("fwd", "lora") for impl in ("grouped_mm", "moekit", nf4_impl)
    ]
    for record in records:
        assert RECORD_KEYS <= record.keys() and record["ms"] > 0
        dense = 16 * (256 * 256 + 256 * 128) * 4  # the tiny preset's gate_up and down weights in float32
        assert record["expert_weight_bytes_dense"] == dense
        if record["impl"] != nf4_impl:
            assert record["quant"] == "none" and record["expert_weight_bytes"] == dense and "check" not in record
            continue
        elements = dense // 4
        scale_bytes = 4 * (elements // 64)  # fp32 absmax, or 8-bit codes + an fp32 per 256 (per weight) + offsets
        if quant == "nf4-dq":
            scale_bytes = elements // 64 + 4 * (16 * 256 * 256 // 64 // 256 + 16 * 256 * 128 // 64 // 256 + 2)
        assert record["quant"] == quant and record["expert_weight_bytes"] == elements // 2 + scale_bytes
        check = record["check"]
        assert check["ok"] and check["max_rel_err"] <= check["tolerance"] == 1e-4, check
        names = {"output"} | ({"d hidden", "d routing weights"} if record["mode"] == "lora" else set())
        names |= {f"d {f}[default] {p}" for f in ("lora_A", "lora_B") for p in ("gate_up_proj", "down_proj")
                  if record["mode"] == "lora"}  # fmt: skip
        assert set(check["errors"]) == names
    rows = [line for line in output.splitlines() if f"{nf4_impl} │" in line]
    ratio = "(0.14× of float32)" if quant == "nf4" else "(0.13× of float32)"
    assert len(rows) == 2 and all("ok " in row and ratio in row for row in rows)
    assert "÷ dense" in output and "weights MiB" in output and "values" in output
    assert f"benchmarked: 6/6 tiny T=16 lora r=4 {nf4_impl}: " in output


def test_bench_nf4_value_check_shows_a_wrong_result(monkeypatch, one_thread):
    """A fast wrong NF4 result is marked WRONG: the check compares against dense weights, not against itself."""
    from rich.console import Console

    shape = bench.Shape("small", 64, 32, 4, 2, gated=True, act="silu")
    case = bench.build_case(shape, "moekit+nf4", "lora", 16, "cpu", torch.float32, lora_rank=4)
    assert bench.check_values(case, 4, torch.float32)["ok"]
    _wrong_on_nf4(monkeypatch)
    check = bench.check_values(case, 4, torch.float32)
    assert not check["ok"] and 1e-2 < check["errors"]["output"] < 1e-1, check  # both projections 1% off
    record = {"shape": "small", "tokens": 16, "mode": "lora", "impl": "moekit+nf4", "ms": 2.0, "tflops": 1.0,
              "peak_gib": float("nan"), "step_gib": float("nan"), "lora_rank": 4, "quant": "nf4", "dtype": "float32",
              "expert_weight_bytes": 100, "expert_weight_bytes_dense": 400, "check": check}  # fmt: skip
    console = Console(record=True, width=300)
    console.print(bench._table([record], None, "cpu"))
    assert "WRONG" in console.export_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quant", "nf4", "--modes", "full,frozen"],
         "--quant nf4 times the fwd and lora modes only (full fine-tuning is impossible on a frozen NF4 base)"),
        (["--quant", "nf4", "--impls", "grouped_mm"], "--quant nf4 times moekit on NF4 experts, and --impls grouped_mm names none of moekit,"),
    ],
)  # fmt: skip
def test_bench_nf4_argument_errors(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    out = capsys.readouterr().out
    assert message in out and len(out.strip().splitlines()) == 1, out


def test_bad_quant_is_one_line(capsys):
    for command in (["bench"], ["check", "--tiny", "qwen3_moe"]):
        assert main([*command, "--quant", "int4"]) == 2
        err = capsys.readouterr().err
        assert "argument --quant: invalid choice: 'int4' (choose from 'none', 'nf4', 'nf4-dq')" in err, err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("quant, lora", [("nf4", False), ("nf4", True), ("nf4-dq", True)])
def test_check_nf4_tiny_passes(quant, lora, capsys, monkeypatch):
    held = []  # each experts module's double_quant
    original = moekit.quant.experts.quantize_module

    def spy(module, dtype=None, double_quant=False):
        held.append(double_quant)
        original(module, dtype, double_quant)

    monkeypatch.setattr(moekit.quant.experts, "quantize_module", spy)
    argv = ["check", "--tiny", "qwen3_moe", "--quant", quant, "--tokens", "16", *(["--lora"] if lora else [])]
    assert main(argv) == 0
    assert held == [quant == "nf4-dq"] * 2
    out = capsys.readouterr().out
    assert "on the 4 NF4 expert weights dequantized (moekit on the NF4 codes)" in out
    assert out.strip().splitlines()[-1] == ("OK: 2 MoE layers match and the adapters are live." if lora else
                                             "OK: 2 MoE layers match.")  # fmt: skip


def test_check_model_already_nf4():
    """A model whose experts are NF4 already: checked on the dequantized weights; its NF4 weights stay after."""
    from moekit.quant import NF4Tensor, quantize_experts
    from moekit.tools.check import run_check

    model = add_lora(quantize_experts(build("mixtral")))
    before = {n: p for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    report = run_check(model, tokens=16)
    assert report.ok, report.problems
    assert len(before) == 4 and all(p is before[n] for n, p in model.named_parameters() if n in before)
    assert {n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)} == set(before)
    assert all(layer.grad_error > 0 for layer in report.layers)  # LoRA and input gradients were compared


def test_check_saved_nf4_model_and_adapter(tmp_path, capsys):
    """A saved NF4 model (``save_pretrained`` of quantized experts) loads as such and is checked on its NF4 codes."""
    from moekit.quant import quantize_experts

    base = quantize_experts(build("qwen3_moe"), double_quant=True)
    base.save_pretrained(tmp_path / "base")
    add_lora(base).save_pretrained(tmp_path / "adapter")
    argv = ["check", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--tokens", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "on the 4 NF4 expert weights dequantized (moekit on the NF4 codes)" in out
    assert out.strip().splitlines()[-1] == "OK: 2 MoE layers match and the adapters are live."


def test_quantize_writes_a_checkpoint_of_nf4_experts(tmp_path, capsys):
    """``moekit quantize SOURCE OUT``: OUT loads with NF4 experts (the codes the source quantizes to), beside the
    source's other files; a source without config.json and a non-empty OUT are one-line errors naming them."""
    from transformers import AutoModelForCausalLM

    from moekit.quant import NF4Tensor

    source, out = tmp_path / "dense", tmp_path / "nf4"
    dense = build("qwen3_moe", dtype=torch.bfloat16)
    dense.save_pretrained(source)
    (source / "tokenizer_config.json").write_text("{}")
    assert main(["quantize", str(source), str(out), "--quant", "nf4-dq", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("moekit quantize: 4 expert weights") and "copied tokenizer_config.json" in line
    assert (out / "tokenizer_config.json").read_text() == "{}"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    weights = {n: p for n, p in loaded.named_parameters() if isinstance(p, NF4Tensor)}
    assert len(weights) == 4 and all(p.double_quantized and p.dtype == torch.bfloat16 for p in weights.values())
    for name, weight in weights.items():
        want = NF4Tensor.quantize(dense.get_parameter(name).detach(), double_quant=True)
        assert torch.equal(weight.packed, want.packed) and torch.equal(weight.absmax, want.absmax), name

    assert main(["quantize", str(source), str(out)]) == 2
    assert "OUT" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    assert "SOURCE" in capsys.readouterr().err


def test_check_nf4_catches_a_wrong_engine(monkeypatch, capsys):
    _wrong_on_nf4(monkeypatch)
    assert main(["check", "--tiny", "olmoe", "--quant", "nf4", "--tokens", "16"]) == 1
    out = capsys.readouterr().out
    assert "experts output differs from grouped_mm" in out


def test_qlora_real_size_chunked_loss_is_the_models_loss():
    """tools/qlora_real_size.py's chunked cross-entropy (one chunk's logits at a time) gives the model's own causal LM
    loss and the same adapter gradients, on its small Qwen3-MoE stand-in with NF4 experts and LoRA."""
    tool = _tool("qlora_real_size")
    model = tool.build_quantized(tool.small(2), torch.device("cpu"), torch.float32)
    lora = LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    grads = []
    for loss_fn in (lambda: model(input_ids=input_ids, labels=input_ids).loss,
                    lambda: tool.chunked_loss(model, input_ids, chunk=8)):  # fmt: skip
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (want, want_grads), (got, got_grads) = grads
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)
    assert len(got_grads) == len(want_grads) > 0
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(got_grads, want_grads))
