"""Training on the moekit path: gradient checkpointing, HF Trainer with LoRA on the experts, adapter save/load.

(a) HF gradient checkpointing (reentrant and not) gives the gradients of the plain run, recomputes through moekit
    with the same routing, and matches eager PEFT too.
(b) Three ``transformers.Trainer`` steps with LoRA on the experts of a tiny nemotron_h, on moekit, reduce the loss.
(c) The adapter saved after that training loads with plain PEFT in a fresh process that never imports moekit, on
    the eager experts, and gives the same logits (fp32, max-relative error <= 2e-5).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import tiny_models as tm
import torch
from peft.tuners.lora.layer import ParamWrapper

import moekit
import moekit.backend
import moekit.engines.reference
from moekit.options import OPTIONS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_* renamed in 5.2x


@pytest.fixture(autouse=True, scope="module")
def _cpu_reference_setup():
    """One torch thread (see tiny_models.torch_threads); the models are on the CPU, so no engine is forced."""
    with tm.torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(OPTIONS, "backend", "")
        yield


class EngineCalls:
    """Counts calls into moekit's engine and forbids PEFT's ΔW builders, inside a MonkeyPatch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        self.with_lora = 0
        original = moekit.engines.reference.run

        def spy(*args, **kwargs):
            self.count += 1
            self.with_lora += args[0].up.lora is not None and args[0].down.lora is not None
            return original(*args, **kwargs)

        monkeypatch.setattr(moekit.engines.reference, "run", spy)
        for name in ("get_delta_weight", "get_delta_factors"):

            def forbidden(self, *args, _name=name, **kwargs):
                raise AssertionError(f"ParamWrapper.{_name} called on the moekit path (ΔW must never be built)")

            monkeypatch.setattr(ParamWrapper, name, forbidden)


# ---------------------------------------------------------------------------------------------------------------
# (a) gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("model_type", ["nemotron_h", "nemotron_h_latent", "qwen3_moe", "gpt_oss"])
def test_gradient_checkpointing_matches(model_type, use_reentrant):
    eager = tm.add_lora(tm.build(model_type))
    eager.train()
    plain = moekit.enable(copy.deepcopy(eager))
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.training
    input_ids = tm.sample_batch()
    num_modules = len(tm.experts_modules(plain))

    want_eager = tm.forward_backward(eager, input_ids)
    with pytest.MonkeyPatch.context() as mp:
        calls = EngineCalls(mp)
        with tm.RoutingRecorder(plain) as plain_routing:
            want = tm.forward_backward(plain, input_ids)
        assert calls.count == num_modules
        with tm.RoutingRecorder(checkpointed) as ckpt_routing:
            got = tm.forward_backward(checkpointed, input_ids)
        # Forward, then one recompute per experts module during backward: checkpointing really happened.
        assert calls.count == 3 * num_modules
        assert calls.with_lora == calls.count

    # The recompute routes every token to the same experts as the forward did.
    assert len(ckpt_routing.calls) == 2 * num_modules
    for number, routes in ckpt_routing.per_module().items():
        assert len(routes) == 2 and torch.equal(routes[0], routes[1]), f"experts module {number} re-routed"
        assert torch.equal(routes[0], plain_routing.per_module()[number][0])

    assert set(got[1]) == set(want[1]) and all(g is not None for g in got[1].values())
    assert tm.rel_err(got[0], want[0]) <= tm.FP32_TOL
    for name, grad in want[1].items():
        assert tm.rel_err(got[1][name], grad) <= tm.FP32_TOL, name
        assert tm.rel_err(got[1][name], want_eager[1][name]) <= tm.FP32_TOL, f"{name} vs eager PEFT"


# ---------------------------------------------------------------------------------------------------------------
# (b) Trainer and (c) adapter save/load
# ---------------------------------------------------------------------------------------------------------------

TRAIN_TYPE = "nemotron_h"
TRAIN_STEPS = 3


def _pattern_dataset(count: int = 2 * TRAIN_STEPS) -> list[dict]:
    """An easily learnable sequence (counting up), the same example every time."""
    ids = [3 + (i % 20) for i in range(12)]
    return [{"input_ids": list(ids), "labels": list(ids)} for _ in range(count)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny nemotron_h with LoRA on its experts, trained 3 Trainer steps on moekit (ΔW forbidden throughout)."""
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("moekit_training")
    base = tm.build(TRAIN_TYPE)
    base.save_pretrained(root / "base")
    model = moekit.enable(tm.add_lora(base, seed=1))
    args = TrainingArguments(
        output_dir=str(root / "out"),
        use_cpu=True,
        max_steps=TRAIN_STEPS,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    with pytest.MonkeyPatch.context() as mp:
        calls = EngineCalls(mp)
        trainer = Trainer(model=model, args=args, train_dataset=_pattern_dataset())
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    input_ids = tm.sample_batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.save_pretrained(root / "adapter")
    return {
        "root": root,
        "model": model,
        "losses": losses,
        "calls": calls,
        "input_ids": input_ids,
        "logits": logits,
        "steps": trainer.state.global_step,
    }


@pytest.mark.slow
def test_trainer_reduces_loss_on_moekit(trained):
    losses, calls = trained["losses"], trained["calls"]
    assert trained["steps"] == TRAIN_STEPS
    assert len(losses) == TRAIN_STEPS, trained["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], f"loss did not go down: {losses}"
    # moekit ran every experts call of every step, always with the LoRA factors; ΔW was never built.
    num_modules = len(tm.experts_modules(trained["model"]))
    assert calls.count >= TRAIN_STEPS * num_modules
    assert calls.with_lora == calls.count
    # Only the adapter trained; it moved away from its initial values.
    initial = tm.add_lora(tm.build(TRAIN_TYPE), seed=1)
    trained_params = dict(trained["model"].named_parameters())
    for name, param in initial.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, trained_params[name]), f"{name} did not train"
        else:
            assert torch.equal(param, trained_params[name]), f"frozen {name} changed"


_LOAD_WITH_PLAIN_PEFT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, ids_path, out_path = sys.argv[1:5]
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, experts_implementation="eager", attn_implementation="eager", dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert wrappers, "no LoRA on expert parameters was loaded"
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits
    assert "moekit" not in sys.modules, "moekit got imported"
    assert not hasattr(ParamWrapper.forward, "_moekit_original"), "PEFT is hooked"
    torch.save({"logits": logits, "wrappers": len(wrappers)}, out_path)
    """
)


@pytest.mark.slow
def test_adapter_trained_on_moekit_loads_with_plain_peft(trained):
    root = trained["root"]
    ids_path, out_path = root / "input_ids.pt", root / "plain_peft.pt"
    torch.save(trained["input_ids"], ids_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # nothing from this repo on the path
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_PLAIN_PEFT, str(root / "base"), str(root / "adapter"), str(ids_path),
         str(out_path)],
        check=False, cwd=str(root), env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = torch.load(out_path)
    # Both projections of every experts module carry a loaded adapter.
    assert loaded["wrappers"] == 2 * len(tm.experts_modules(trained["model"]))
    err = tm.rel_err(trained["logits"], loaded["logits"])
    assert err <= tm.FP32_TOL, f"plain PEFT on eager experts differs from the moekit-trained model: {err:.3e}"
    # The trained adapter matters: the base model alone is far from it.
    base = tm.build(TRAIN_TYPE)
    with torch.no_grad():
        base_logits = base(input_ids=trained["input_ids"]).logits
    assert tm.rel_err(base_logits, loaded["logits"]) > 1e-2
