"""transformers' own distributed training on moekit, two processes on the CPU (gloo, ``torchrun``), against one process.

Expert parallelism through ``from_pretrained(CHECKPOINT, distributed_config=DistributedConfig(...),
experts_implementation="moekit")``, for Qwen3-MoE and NemotronH (non-gated relu², latent MoE), 8 experts split 4 + 4
over the two ranks. With transformers' ``ep_size`` API (5.24 here): ``DistributedConfig(ep_size=2, fsdp_size=2)`` (the
all-to-all token exchange, each rank on half of the global batch, FSDP2 on the dense modules; one case on the Triton
kernels through the interpreter), ``DistributedConfig(ep_size=2, tp_size=2, ep_implementation="all_reduce")``
(every rank on the whole batch, the other rank's routes handed to moekit as expert-parallel sentinels) and
``DistributedConfig(ep_size=2, tp_size=2)`` with PEFT LoRA on the tensor-parallel attention (experts frozen). With
transformers 5.17's API instead: ``DistributedConfig(tp_size=2, enable_expert_parallel=True)``.

What is compared, per case, against one process running the same weights (``tiny_models.build``, moekit) on the
whole global batch (fp32, relative error max|a - b| / max|b| <= 1e-5): the loss (averaged over the ranks where each
holds half of the batch); every dense trainable gradient, DTensor shards gathered whole; and every expert-weight
gradient as each rank holds it — its own shard (``grad.to_local()``, 4 experts) against the same 4 experts' rows of
the one-process gradient; a rank's experts are located by matching its local weight shard against the whole weight,
and the test checks that rank 0 holds experts 0-3 and rank 1 experts 4-7 of every expert weight. It also checks
that moekit ran every experts call with the 4 local experts, that the ranks together computed every (token, top-k
slot) pair exactly once, and that the masked layouts handed moekit the other rank's routes as sentinel rows.

PEFT LoRA on the experts' ``target_parameters`` under transformers' expert parallelism (TRAINING ``lora``, with
LoRA on q/v too; ``moekit.lora`` says how): transformers replaces the experts module's ``forward`` on the instance
(5.24's ``ep_forward(hidden_states, top_k_index, top_k_weights)`` takes no keyword argument, so moekit gets PEFT's
wrappers on the module for the length of the call), and PEFT builds the factors for all 8 experts while the rank's
weights hold 4 (moekit uses this rank's experts' rows). Stock PEFT fails there (its W + ΔW, ``torch.baddbmm`` on the
DTensor weight and plain LoRA tensors: "got mixed torch.Tensor and DTensor"). PEFT's adapters stay plain tensors,
one copy per rank, and each rank fills only its own experts' rows of the experts' LoRA gradients (checked, before
any reduction); the worker then reduces the adapters' gradients as training needs: the mean over the ranks for
``ep_size=2, fsdp_size=2`` (the Trainer's rule; exact there, each rank on its own half of the batch), the sum of
the experts' LoRA rows with 5.17's shared batch. The adapters' gradients are then compared whole against one
process's. Not covered: ``ep_size=2, tp_size=2`` with LoRA on the experts, which PEFT 0.21 refuses before moekit
runs (its tensor-parallel LoRA hooks read ``base_layer.weight``: AttributeError), and LoRA on the Triton kernels
under expert parallelism (through the interpreter such a case takes ~45 s, against ~9 s for the ``full`` one; the
one-process LoRA tests cover those kernels, and the case passes when run by hand:
``qwen3_moe:ep2_fsdp2:lora:triton``).

HF ``Trainer`` with FSDP2: accelerate cannot shard on CPU ranks — ``AcceleratorState`` turns an FSDP plugin into
``DistributedType.FSDP`` only for GPU-like distributed types (accelerate/state.py), so with ``use_cpu=True`` the
``fsdp=`` arguments are dropped and the Trainer wraps the model in DDP. What runs here instead is the Trainer on a
model FSDP2-sharded at load time by ``DistributedConfig(fsdp_size=2)`` (transformers 5.24: the Trainer leaves it
unwrapped and keeps PEFT's adapter, a plain tensor outside FSDP, in sync across the ranks): LoRA on the experts and
the attention of a tiny Qwen3-MoE on moekit, 6 SGD steps on one repeated batch. The loss falls at every step; the
per-step losses and the trained adapter equal a one-process Trainer run on transformers' eager experts (relative
error <= 1e-5); the adapter ``trainer.save_model`` wrote loads with plain PEFT onto a fresh eager model, holds exactly
the tensors ``transformers.distributed.gather_full_state_dict`` gathered on rank 0, gives the trained model's
logits, and changes the base model's output. Skipped where the Trainer lacks that support (5.17).

Two ``torchrun`` launches (tests/distributed_hf_worker.py): one for every expert-parallel case, one for the Trainer.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import distributed_hf_worker as worker
import pytest
import tiny_models as tm
import torch

import moekit

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TOL = 1e-5
# MOEKIT_DIST_DEVICE=cuda (``tools/gpu_session.sh OUT dist``): one rank per GPU, NCCL, the Triton kernels native, the
# Trainer also through accelerate's FSDP2; else two CPU ranks (gloo).
ON_GPU = worker.DEVICE == "cuda"
WORLD = torch.cuda.device_count() if ON_GPU else 2
LAYOUTS = worker.layouts(WORLD)
EXPERT_WEIGHTS = {"qwen3_moe": 4, "nemotron_h_latent": 4}  # 2 MoE layers x (up or gate_up, down)
ENGINE = ":triton" if ON_GPU else ""  # on the CPU one case runs the Triton interpreter (below)

if "ep_fsdp" in LAYOUTS:
    CASES = (
        [
            f"{model_type}:{layout}:full{ENGINE}"
            for model_type in EXPERT_WEIGHTS
            for layout in ("ep_fsdp", "ep_tp_allreduce")
        ]
        + [f"{model_type}:ep_tp:lora_attn{ENGINE}" for model_type in EXPERT_WEIGHTS]
        + [f"{model_type}:ep_fsdp:lora{ENGINE}" for model_type in EXPERT_WEIGHTS]
        + [f"{model_type}:ep_fsdp:qlora{ENGINE}" for model_type in EXPERT_WEIGHTS]
        + [f"{model_type}:ep_fsdp:qlora_saved{ENGINE}" for model_type in EXPERT_WEIGHTS]
        + ([] if ON_GPU else ["qwen3_moe:ep_fsdp:full:triton"])
    )
    REFUSED_CASES = ["qwen3_moe:ep_fsdp:qlora_saved_dq"]
    FSDP_CASES = [f"qwen3_moe:fsdp:{training}{ENGINE}" for training in ("qlora", "qlora_saved")]
elif "ep_legacy" in LAYOUTS:
    CASES = (
        [f"{model_type}:ep_legacy:full{ENGINE}" for model_type in EXPERT_WEIGHTS]
        + [
            f"qwen3_moe:ep_legacy:lora_attn{ENGINE}",
            f"qwen3_moe:ep_legacy:lora{ENGINE}",
            f"qwen3_moe:ep_legacy:qlora{ENGINE}",
            f"qwen3_moe:ep_legacy:qlora_saved{ENGINE}",
        ]
        + ([] if ON_GPU else ["qwen3_moe:ep_legacy:full:triton"])
    )
    REFUSED_CASES, FSDP_CASES = ["qwen3_moe:ep_legacy:qlora_saved_dq"], []
else:
    CASES, REFUSED_CASES, FSDP_CASES = [], [], []


def has_ep_plan(case: str) -> bool:
    """Whether the installed transformers defines an expert-parallel plan for the case's model (5.17's NemotronH
    has none)."""
    return bool(getattr(tm.make_config(case.split(":")[0]), "base_model_ep_plan", None))


CASES = [case for case in CASES if has_ep_plan(case)]
REFUSED_CASES = [case for case in REFUSED_CASES if has_ep_plan(case)]


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """One ``torchrun --nproc-per-node WORLD`` launch of the worker, importing the moekit this process imported."""
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(moekit.__file__)))
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (source_root, path) if p))
    if not ON_GPU:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks (gloo) on a GPU machine too: transformers picks the accelerator
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_hf_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), script]
    done = subprocess.run(command + list(args), check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done


# ------------------------------------------------------------------------------------------------ expert parallelism
@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> dict[str, dict]:
    if not CASES:
        pytest.skip("this transformers has no expert parallelism in transformers.distributed.DistributedConfig")
    out = tmp_path_factory.mktemp("distributed_hf") / "ep.json"
    torchrun("ep", str(out), *CASES, *REFUSED_CASES, *FSDP_CASES)
    return {record["case"]: record for record in json.loads(out.read_text())}


def check_case(record: dict) -> None:
    assert "error" not in record, record.get("traceback", record.get("error"))
    model_type, layout, training, *_ = record["case"].split(":")
    training = "qlora" if training == "qlora_saved" else training  # the same model, from a checkpoint of NF4 experts
    assert record["missing_grads"] == [] and record["unexpected_grads"] == [], record
    assert record["grads"] > 0
    assert record["loss_err"] <= TOL, record
    assert record["dense_grad_err"] <= TOL, record
    assert record["expert_grad_err"] <= TOL, record
    # moekit ran every experts call, each on this rank's experts
    share = tm.NUM_EXPERTS // WORLD
    assert record["engine_calls"] == 2 and record["engine_experts"] == [share], record
    # every (token, top-k slot) pair of the global batch went through exactly one rank's experts
    assert record["routed_rows"] == record["pairs"], record
    if layout in worker.MASKED:  # each rank masked the other ranks' routes
        assert record["sentinel_rows"] == record["pairs"] * (WORLD - 1), record
    elif training == "full":
        assert record["sentinel_rows"] == 0, record  # all-to-all: only this rank's rows reached its experts
    if training == "full" and WORLD > 1:
        assert record["expert_grads"] == EXPERT_WEIGHTS[model_type], record
        for name in record["expert_ranges"][0]:
            held = [ranges[name] for ranges in record["expert_ranges"]]
            assert held == [[rank * share, (rank + 1) * share] for rank in range(WORLD)], (name, held)
    elif training != "full":
        # frozen expert weights; the adapters' gradients (the experts' LoRA included, PEFT's plain tensors, reduced
        # over the ranks as the worker's sync_replicated_grads says) are among the dense ones, compared whole
        assert record["expert_grads"] == 0, record
    # QLoRA: every expert weight loaded as this rank's experts in NF4, on every rank
    assert record["nf4_expert_shards"] == (WORLD * EXPERT_WEIGHTS[model_type] if training == "qlora" else 0), record
    if training in ("lora", "qlora"):
        # before that reduction, each rank had filled the rows of its own experts of every expert-LoRA gradient
        # (those that one process fills: the experts with tokens), no others
        whole = record["expert_lora_rows_one_process"]
        assert len(whole) == 2 * EXPERT_WEIGHTS[model_type], whole  # A and B of each expert weight
        for rank, filled in enumerate(record["expert_lora_rows"]):
            own = [[e for e in experts if rank * share <= e < (rank + 1) * share] for experts in whole.values()]
            assert sorted(filled) == sorted(whole) and [filled[name] for name in whole] == own, (rank, filled)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_one_process(ep_results, case):
    check_case(ep_results[case])


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_at_load_qlora_matches_one_process(ep_results, case):
    """``DistributedConfig(fsdp_size=W)``, NF4 experts quantized as they load or read from a saved checkpoint: each
    rank holds its share of the experts' codes, FSDP2 gathers them for compute, and the data-parallel LoRA step equals
    one process's on the whole batch."""
    record = ep_results[case]
    assert "error" not in record, record.get("traceback", record.get("error"))
    assert record["missing_grads"] == [] and record["unexpected_grads"] == [] and record["grads"] > 0, record
    assert max(record["loss_err"], record["dense_grad_err"]) <= TOL, record
    assert record["nf4_expert_shards"] == WORLD * EXPERT_WEIGHTS["qwen3_moe"], record
    assert record["engine_experts"] == [tm.NUM_EXPERTS] and record["routed_rows"] == record["pairs"], record


@pytest.mark.parametrize("case", REFUSED_CASES)
def test_double_quantized_checkpoint_is_not_loaded_sharded(ep_results, case):
    """Double-quantized scales are blocks over the whole weight: a checkpoint of them is refused (the loading report
    says why) rather than cut along the experts."""
    assert "conversion" in ep_results[case].get("error", ""), ep_results[case]


# ------------------------------------------------------------------------------------------------ Trainer
def trainer_supported() -> bool:
    from transformers import Trainer

    return hasattr(Trainer, "_sync_replicated_trainable_parameters")


@pytest.fixture(scope="module", params=["load", "accelerate"])
def trained(request, tmp_path_factory) -> dict:
    """The Trainer on a model FSDP2-sharded at load (``load``) or by accelerate from the ``fsdp`` arguments."""
    if request.param == "load" and not trainer_supported():
        pytest.skip("this transformers' Trainer does not train PEFT adapters on models sharded at load time")
    if request.param == "accelerate" and not ON_GPU:
        pytest.skip("accelerate applies FSDP2 on GPU ranks only (on CPU ranks it wraps DDP): tools/gpu_session.sh dist")
    out = tmp_path_factory.mktemp(f"distributed_hf_trainer_{request.param}")
    torchrun("trainer", str(out), request.param)
    record = json.loads((out / "trainer.json").read_text())
    record["lora"] = torch.load(out / "lora.pt")
    record["logits"] = torch.load(out / "logits.pt")
    record["adapter"] = str(out / "adapter")
    return record


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The same training in one process on transformers' eager experts (no moekit), the whole batch per step."""
    from transformers import Trainer

    with tm.torch_threads(1):
        model = worker.peft_for_training(tm.build(worker.TRAIN_MODEL))
        args = worker.training_arguments(str(tmp_path_factory.mktemp("one_process")), worker.GLOBAL_BATCH)
        trainer = Trainer(model=model, args=args, train_dataset=worker.train_data())
        trainer.train()
    lora = {name: param.detach().cpu() for name, param in model.named_parameters() if "lora_" in name}
    return {"losses": worker.losses_of(trainer), "lora": lora}


def test_trainer_ran_sharded_on_moekit(trained):
    every_weight = sum(1 for _ in tm.build(worker.TRAIN_MODEL).parameters())
    assert trained["world"] == WORLD and trained["base_params"] == every_weight
    assert trained["sharded_base_params"] == every_weight  # FSDP2 sharded every base weight
    assert trained["lora_tensors"] == 16  # q, v, gate_up, down x A, B x 2 layers
    if trained["sharding"] == "load":
        assert trained["distributed_by_transformers"]
        assert trained["lora_dtensors"] == 0  # PEFT's adapters, added after loading, stay one plain copy per rank
        assert trained["rank_spread"] == 0.0  # the ranks' replicated adapters stayed identical
    else:
        assert not trained["distributed_by_transformers"]
        assert trained["lora_dtensors"] == 16  # accelerate's FSDP2 shards the adapters with their layers
    assert trained["engine_calls"] == 2 * worker.TRAIN_STEPS  # moekit ran both MoE layers at every step
    assert trained["engine_experts"] == [tm.NUM_EXPERTS]


def test_trainer_loss_falls(trained):
    losses = trained["losses"]
    assert len(losses) == worker.TRAIN_STEPS
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.85 * losses[0], losses


def test_trainer_matches_one_process(trained, one_process):
    assert len(one_process["losses"]) == worker.TRAIN_STEPS
    for step, (got, want) in enumerate(zip(trained["losses"], one_process["losses"])):
        assert abs(got - want) <= TOL * abs(want), (step, got, want)
    assert sorted(trained["lora"]) == sorted(one_process["lora"])
    for name, want in one_process["lora"].items():
        assert tm.rel_err(trained["lora"][name], want) <= TOL, name


def test_saved_adapter_loads_with_plain_peft(trained):
    from peft import PeftModel

    base = tm.build(worker.TRAIN_MODEL)  # eager experts, no moekit
    input_ids = tm.sample_batch(batch=worker.GLOBAL_BATCH, seq=worker.SEQ)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = PeftModel.from_pretrained(base, trained["adapter"])
    loaded = {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}
    assert sorted(loaded) == sorted(trained["lora"])
    for name, tensor in loaded.items():
        assert torch.equal(tensor, trained["lora"][name]), name
    assert any(name.endswith(".experts.lora_B.default.weight") for name in loaded)  # the experts' adapter too
    assert all(tensor.abs().max() > 0 for name, tensor in loaded.items() if "lora_B" in name)  # all trained
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert tm.rel_err(logits, trained["logits"]) <= TOL
    assert tm.rel_err(base_logits, logits) > 1e-3  # the adapter changes the model
