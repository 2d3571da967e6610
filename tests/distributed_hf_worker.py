"""transformers' own distributed training on moekit, under ``torchrun --nproc-per-node 2`` (gloo, CPU).

    torchrun --nproc-per-node 2 tests/distributed_hf_worker.py ep OUT.json [CASE ...]
    torchrun --nproc-per-node 2 tests/distributed_hf_worker.py trainer OUT_DIR [load|accelerate]
    MOEKIT_DIST_DEVICE=cuda torchrun --nproc-per-node N tests/distributed_hf_worker.py ...   (N GPUs, NCCL, the Triton
                                                                                      kernels native)

Every layout below is sized by the world size W (the names say which dimensions; the test runs W = 2 on the CPU, and
on a GPU machine one rank per GPU).

``ep``: expert parallelism through ``from_pretrained(CHECKPOINT, distributed_config=DistributedConfig(...),
experts_implementation="moekit")``. A case is MODEL_TYPE:LAYOUT:TRAINING[:ENGINE]; ``layouts()`` lists the
layouts the installed transformers offers:

- ``fsdp`` (the same transformers): ``DistributedConfig(fsdp_size=W)`` — no expert parallelism: FSDP2 shards every
  weight, the experts' 1/W a rank (NF4 codes too), all-gathered for compute; 1/W of the global batch a rank.
- ``ep_fsdp`` (transformers with the ``ep_size`` API, 5.24 here): ``DistributedConfig(ep_size=W, fsdp_size=W)``
  — each rank holds 1/W of the experts whole and 1/W of the global batch; tokens reach their experts through
  transformers' all-to-all (``AllToAllEP``); the dense modules are FSDP2-sharded.
- ``ep_tp``: ``DistributedConfig(ep_size=W, tp_size=W)`` — the attention tensor-parallel, both ranks on the whole
  batch, the tokens split between them and exchanged all-to-all (at inference, or where the experts' input needs no
  gradient, transformers' "auto" choice masks and all-reduces instead, as below).
- ``ep_tp_allreduce``: the same with ``ep_implementation="all_reduce"`` — every rank runs its experts on the whole
  batch, the routes to the other rank's experts handed to moekit as expert-parallel sentinels (id == local expert
  count), the outputs summed.
- ``ep_legacy`` (transformers 5.17's API): ``DistributedConfig(tp_size=W, enable_expert_parallel=True)`` — the
  model's ``base_model_ep_plan`` as the TP plan: the router masks the other rank's routes as sentinels, the experts'
  outputs are all-reduced; everything else replicated.

TRAINING ``full`` (every parameter trains), ``lora_attn`` (PEFT LoRA on q/v, the experts frozen: their backward
still runs, for the input gradients), ``lora`` (PEFT LoRA on the experts' ``target_parameters`` and q/v: moekit
applies this rank's experts' rows of PEFT's all-experts factors, ``moekit.lora``) or ``qlora`` (the same on NF4
experts, quantized as they load: ``quantization_config=MoekitQuantConfig()``; each rank holds its experts' codes) or
``qlora_saved`` (the same from a checkpoint of NF4 experts that ``save_pretrained`` wrote: each rank reads its experts'
codes and scales as saved; ``qlora_saved_dq``: with double-quantized scales, which cannot be cut along experts as they
load, so the load is refused).
ENGINE ``reference`` (default) or ``triton`` (the Triton kernels through TRITON_INTERPRET=1).

PEFT's adapters, added after ``from_pretrained`` sharded the model, stay plain tensors, one copy per rank: their
gradients are reduced as training needs (``sync_replicated_grads``); before that, which experts' rows of the
experts' LoRA gradients each rank filled is recorded (its own experts' only). Every rank also runs one process's step on the
whole global batch from the same weights (``tiny_models.build``, moekit enabled). Rank 0 writes, per case: the loss
error; the worst error over the dense gradients (DTensor shards gathered whole); the worst error over the
expert-weight gradients, each rank's own shard (``grad.to_local()``) against the same experts' rows of the
one-process gradient — a rank's experts are found by matching its local weight shard against the whole weight, by
value; which experts each rank held; what moekit's engine was handed (experts per call, routed and sentinel rows,
summed over the ranks); or the error the case raised.

``trainer``: HF ``Trainer`` (accelerate underneath) trains PEFT LoRA on the experts and the attention of a tiny
Qwen3-MoE on moekit for ``TRAIN_STEPS`` steps on one repeated global batch, the model FSDP2-sharded either at load
time by ``DistributedConfig(fsdp_size=W)`` (``load``, the default) or by accelerate from the Trainer's
``fsdp``/``fsdp_config`` arguments (``accelerate``: FSDP2 per decoder layer; GPU ranks only, accelerate shards
nothing on CPU ranks); saves the adapter with ``trainer.save_model``; rank 0 writes the per-step losses, the
LoRA tensors of ``transformers.distributed.gather_full_state_dict`` and the trained model's logits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib

if __name__ == "__main__":  # not when the test module imports the helpers below
    if os.environ.get("MOEKIT_DIST_DEVICE", "cpu") == "cpu":  # (distributed_ranks.DEVICE)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU ranks
    os.environ.setdefault("MOEKIT_TRITON_AUTOTUNE", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models as tm
from distributed_ranks import DEVICE, device, init_process_group

import moekit
import moekit.backend
from moekit.options import override
from moekit.quant import MoekitQuantConfig, NF4Tensor

GLOBAL_BATCH = 4
SEQ = 12

# The Trainer run (the test reproduces it in one process with the same settings).
TRAIN_MODEL = "qwen3_moe"
TRAIN_STEPS = 6
# Plain SGD: the trained adapter differs from one process's by its gradients' rounding only (AdamW's first steps,
# m / sqrt(v), blow the rounding of near-zero gradients up to ~5e-5 of the weights).
TRAIN_OPTIM = "sgd"
TRAIN_LR = 0.5


def layouts(world: int) -> dict[str, dict]:
    """The expert-parallel layouts the installed transformers offers for ``world`` ranks (``DistributedConfig``
    keyword arguments)."""
    from transformers.distributed import DistributedConfig

    if "ep_size" in DistributedConfig.__dataclass_fields__:
        # (the deprecated enable_expert_parallel=True, tp_size=2 of these versions resolves to tp_plan={}, which
        # 5.24 rejects: "`tp_size=2` was requested, but ... has no `tp_plan`")
        return {
            "fsdp": {"fsdp_size": world},  # (no expert parallelism: FSDP2 shards the experts, gathered for compute)
            "ep_fsdp": {"ep_size": world, "fsdp_size": world},
            "ep_tp": {"ep_size": world, "tp_size": world},
            "ep_tp_allreduce": {"ep_size": world, "tp_size": world, "ep_implementation": "all_reduce"},
        }
    if "enable_expert_parallel" in DistributedConfig.__dataclass_fields__:
        return {"ep_legacy": {"tp_size": world, "enable_expert_parallel": True}}
    return {}


# Layouts whose ranks each take their own slice of the global batch (the others all run the whole batch), and those
# that hand moekit the other ranks' routes as sentinels.
DATA_PARALLEL = {"fsdp", "ep_fsdp"}
MASKED = {"ep_tp_allreduce", "ep_legacy"}


# ------------------------------------------------------------------------------------------------ helpers
def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def lora_config(model: torch.nn.Module, experts: bool):
    from peft import LoraConfig

    targets = tm.lora_target_parameters(model) if experts else []
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=targets)


def lora_value(name: str, shape) -> torch.Tensor:
    """A LoRA factor's value from its name alone (the same whatever the model's parameter order)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return 0.1 * torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def set_lora(model: torch.nn.Module, which: tuple[str, ...] = ("lora_A", "lora_B")) -> None:
    """Give the LoRA factors named in ``which`` fixed random values (by name); PEFT's init keeps the others."""
    for name, param in model.named_parameters():
        if any(f".{kind}." in name for kind in which):
            value = lora_value(name, param.shape)
            if hasattr(param, "device_mesh"):  # a DTensor (PEFT's tensor-parallel LoRA): this rank's shard
                from torch.distributed.tensor import distribute_tensor

                param.to_local().copy_(distribute_tensor(value, param.device_mesh, param.placements).to_local())
            else:
                param.copy_(value)


def with_training(model: torch.nn.Module, training: str) -> torch.nn.Module:
    if training == "full":
        return model
    from peft import get_peft_model

    if training == "qlora" and not any(isinstance(local_of(p), NF4Tensor) for p in model.parameters()):
        moekit.quantize_experts(model)  # the one-process model (the sharded one loads quantized)
    model = get_peft_model(model, lora_config(model, experts=training in ("lora", "qlora")))
    set_lora(model)  # B too: every term of the gradient is live
    return model


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class EngineLog:
    """What moekit's engine was handed in each experts call (wraps ``moekit.backend.run_engine``)."""

    def __init__(self):
        self.calls: list[dict] = []
        self._original = moekit.backend.run_engine

    def __enter__(self):
        original = self._original

        def run_engine(call, hidden_states, top_k_index, top_k_weights):
            experts = call.num_experts
            sentinels = int((top_k_index == experts).sum())
            self.calls.append({"experts": experts, "rows": int(top_k_index.numel()), "sentinel_rows": sentinels})
            return original(call, hidden_states, top_k_index, top_k_weights)

        moekit.backend.run_engine = run_engine
        return self

    def __exit__(self, *exc):
        moekit.backend.run_engine = self._original


def loss_and_grads(model: torch.nn.Module, input_ids: torch.Tensor):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {
        name: param.grad for name, param in model.named_parameters() if param.requires_grad and param.grad is not None
    }
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return loss.detach(), grads, trainable


def sync_replicated_grads(model: torch.nn.Module, data_parallel: bool) -> None:
    """Reduce the gradients of the trainable parameters transformers did not distribute (PEFT's adapters, added
    after ``from_pretrained`` sharded the model: plain tensors, one copy per rank), as training them needs.

    Each rank on its own slice of the batch (``data_parallel``): the mean over the ranks, the rule of the Trainer's
    ``_sync_replicated_trainable_parameters`` — exact for the experts' LoRA too, whose rows only the owning rank
    fills, with the gradient of every rank's tokens. Every rank on the whole batch: the dense adapters' gradients
    are already whole; the experts' LoRA rows of each rank add up (the sum over the ranks).
    """
    for name, param in model.named_parameters():
        if not param.requires_grad or param.grad is None or hasattr(param, "device_mesh"):
            continue
        if data_parallel:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
        elif is_expert_lora(name):
            dist.all_reduce(param.grad)


def is_expert_lora(name: str) -> bool:
    return ".experts." in name and "lora_" in name


def filled_expert_rows(grads: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per expert-LoRA factor, the experts whose rows of this rank's gradient are non-zero (PEFT's layout: lora_A
    [r*E, in], expert e's rows e*r:(e+1)*r; lora_B [out, r*E], expert e's columns e::E)."""
    filled = {}
    for name, grad in grads.items():
        if not is_expert_lora(name):
            continue
        if ".lora_A." in name:
            per_expert = grad.view(tm.NUM_EXPERTS, -1).abs().amax(dim=1)
        else:
            per_expert = grad.view(grad.shape[0], -1, tm.NUM_EXPERTS).abs().amax(dim=(0, 1))
        filled[name] = per_expert.nonzero().flatten().tolist()
    return filled


def is_expert_weight(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return ".experts." in name and leaf in ("gate_up_proj", "up_proj", "down_proj")


def expert_offset(local: torch.Tensor, whole: torch.Tensor) -> int:
    """Where this rank's expert shard sits in the whole [E, ...] weight (found by value: the weights are random)."""
    count = local.shape[0]
    for start in range(whole.shape[0] - count + 1):
        if torch.equal(whole[start : start + count], local):
            return start
    raise AssertionError(f"this rank's expert shard {tuple(local.shape)} matches no rows of the whole weight")


def sum_over_ranks(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device())
    dist.all_reduce(tensor)
    return int(tensor)


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def save_checkpoint(model_type: str, root: str) -> str:
    """``tiny_models.build(model_type)`` saved by rank 0 (a checkpoint for every rank's ``from_pretrained``)."""
    path = os.path.join(root, f"checkpoint-{model_type}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(path, "config.json")):
        tm.build(model_type).save_pretrained(path)
    dist.barrier()
    return path


def save_nf4_checkpoint(model_type: str, root: str, double_quant: bool = False) -> str:
    """``save_checkpoint``'s model loaded with NF4 experts and saved by rank 0: a checkpoint of NF4 experts."""
    from transformers import AutoModelForCausalLM

    dense = save_checkpoint(model_type, root)
    path = os.path.join(root, f"checkpoint-{model_type}-nf4{'-dq' if double_quant else ''}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(path, "config.json")):
        config = MoekitQuantConfig(experts_double_quant=double_quant)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, quantization_config=config)
        model.save_pretrained(path)
    dist.barrier()
    return path


# ------------------------------------------------------------------------------------------------ ep cases
def run_ep_case(case: str, root: str) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    model_type, layout, training, *rest = case.split(":")
    engine = rest[0] if rest else "reference"
    rank, world = dist.get_rank(), dist.get_world_size()
    saved_nf4 = training.startswith("qlora_saved")  # QLoRA from a checkpoint of NF4 experts (save_pretrained's)
    if saved_nf4:
        checkpoint = save_nf4_checkpoint(model_type, root, double_quant=training == "qlora_saved_dq")
        training = "qlora"
    else:
        checkpoint = save_checkpoint(model_type, root)
    input_ids = tm.sample_batch(batch=GLOBAL_BATCH, seq=SEQ).to(device())
    if layout in DATA_PARALLEL:
        per_rank = GLOBAL_BATCH // world
        local_ids = input_ids[rank * per_rank : (rank + 1) * per_rank]
    else:
        local_ids = input_ids
    started = time.perf_counter()

    with override(backend=engine):
        # One process, the whole batch, the same weights.
        single = with_training(moekit.enable(tm.build(model_type)).to(device()), training)
        want_loss, want_grads, _ = loss_and_grads(single, input_ids)
        whole_weights = {name: param.detach() for name, param in single.named_parameters()}

        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            distributed_config=DistributedConfig(**layouts(world)[layout]),
            experts_implementation="moekit",
            attn_implementation="eager",
            dtype=torch.float32,
            **({"quantization_config": MoekitQuantConfig()} if training == "qlora" and not saved_nf4 else {}),
        )
        nf4_shards = sum(  # expert weights held as this rank's experts in NF4
            isinstance(local_of(p), NF4Tensor) and local_of(p).shape[0] * world == p.shape[0]
            for p in model.parameters()
        )
        if DEVICE == "cuda" and next(model.parameters()).device.type == "cpu":
            model.to(device())  # at world size 1 transformers 5.17 distributes nothing and leaves it where it loaded
        model = with_training(model, training)
        with EngineLog() as log:
            loss, grads, trainable = loss_and_grads(model, local_ids)
        lora_rows = filled_expert_rows(grads)  # before the reduction below (in place) mixes the ranks' rows
        sync_replicated_grads(model, data_parallel=layout in DATA_PARALLEL)

    if layout in DATA_PARALLEL:
        dist.all_reduce(loss)
        loss = loss / world
    params = dict(model.named_parameters())
    dense_err, expert_err, expert_ranges, expert_grads = 0.0, 0.0, {}, 0
    for name, want in want_grads.items():
        if name not in grads:
            continue
        grad, param = grads[name], params[name]
        if is_expert_weight(name) and hasattr(param, "to_local") and param.to_local().shape[0] < param.shape[0]:
            # This rank's experts: its shard of the gradient against the same experts' rows of one process's.
            local = param.to_local().detach()
            start = expert_offset(local, whole_weights[name])
            expert_ranges[name] = [start, start + local.shape[0]]
            expert_err = max(expert_err, tm.rel_err(grad.to_local(), want[start : start + local.shape[0]]))
            expert_grads += 1
        else:
            dense_err = max(dense_err, tm.rel_err(full(grad), want))

    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, expert_ranges)
    gathered_rows: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered_rows, lora_rows)
    sentinel_rows = sum(call["sentinel_rows"] for call in log.calls)
    routed_rows = sum(call["rows"] - call["sentinel_rows"] for call in log.calls)
    top_k = tm.make_config(model_type).num_experts_per_tok
    return {
        "case": case,
        "loss_err": max_over_ranks(tm.rel_err(loss, want_loss)),
        "dense_grad_err": max_over_ranks(dense_err),
        "expert_grad_err": max_over_ranks(expert_err),
        "grads": len(grads),
        "expert_grads": expert_grads,
        "missing_grads": sorted(set(want_grads) - set(grads)),
        "unexpected_grads": sorted(set(trainable) - set(want_grads)),
        "expert_ranges": gathered,  # per rank: {expert weight: [first, end)}
        "expert_lora_rows": gathered_rows,  # per rank: {expert-LoRA factor: the experts whose gradient rows it filled}
        "expert_lora_rows_one_process": filled_expert_rows(want_grads),  # (an expert may get no token)
        "engine_experts": sorted({call["experts"] for call in log.calls}),
        "engine_calls": len(log.calls),
        "nf4_expert_shards": sum_over_ranks(nf4_shards),
        # summed over the ranks and the experts calls (forward only: backward does not go through run_engine)
        "sentinel_rows": sum_over_ranks(sentinel_rows),
        "routed_rows": sum_over_ranks(routed_rows),
        "pairs": len(log.calls) * input_ids.numel() * top_k,  # (token, top-k slot) pairs of the global batch
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_ep(out_path: str, cases: list[str]) -> None:
    root = os.path.dirname(os.path.abspath(out_path))
    results = []
    for case in cases:
        try:
            record = run_ep_case(case, root)
        except Exception as error:  # noqa: BLE001  (recorded: the test says which cases are expected to fail)
            record = {"case": case, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        results.append(record)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)


# ------------------------------------------------------------------------------------------------ trainer
def train_data() -> list[dict]:
    """TRAIN_STEPS copies of one global batch of GLOBAL_BATCH sequences, in order: with sequential sampling every
    step's global batch is the same GLOBAL_BATCH sequences, however many ranks share it."""
    input_ids = tm.sample_batch(batch=GLOBAL_BATCH, seq=SEQ)
    return [{"input_ids": row, "labels": row} for row in input_ids] * TRAIN_STEPS


def training_arguments(output_dir: str, per_device_batch: int, fsdp_layer: str | None = None):
    """The Trainer's arguments; ``fsdp_layer``: accelerate's FSDP2 on every module of that class, and the root."""
    from transformers import TrainingArguments

    fsdp = {}
    if fsdp_layer:
        fsdp = {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": [fsdp_layer],
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
    return TrainingArguments(
        **fsdp,
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=TRAIN_STEPS,
        optim=TRAIN_OPTIM,
        learning_rate=TRAIN_LR,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=DEVICE == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )


def peft_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT LoRA on the experts and q/v; A fixed by name (so that one process can start from the same adapter),
    B PEFT's zeros: the adapter changes the model only through training."""
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(model, experts=True))
    set_lora(model, which=("lora_A",))
    return model


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def is_sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "device_mesh")  # a DTensor: FSDP2's shard


def run_trainer(out_dir: str, sharding: str = "load") -> None:
    """``sharding``: ``load`` (``DistributedConfig(fsdp_size=W)`` in ``from_pretrained``) or ``accelerate`` (the
    Trainer's ``fsdp`` arguments: accelerate applies FSDP2 per decoder layer when it prepares the model)."""
    from transformers import AutoModelForCausalLM, Trainer
    from transformers.distributed import DistributedConfig, gather_full_state_dict

    if sharding not in ("load", "accelerate"):
        raise SystemExit(f"unknown trainer sharding {sharding!r}: load or accelerate")
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = save_checkpoint(TRAIN_MODEL, out_dir)
    load = {"distributed_config": DistributedConfig(fsdp_size=world)} if sharding == "load" else {}
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, experts_implementation="moekit", attn_implementation="eager", dtype=torch.float32, **load
    )
    model = peft_for_training(model)
    layer = type(model.get_base_model().model.layers[0]).__name__ if sharding == "accelerate" else None
    trainer = Trainer(
        model=model,
        args=training_arguments(os.path.join(out_dir, "trainer"), GLOBAL_BATCH // world, fsdp_layer=layer),
        train_dataset=train_data(),
    )
    with EngineLog() as log:
        trainer.train()
    trainer.save_model(os.path.join(out_dir, "adapter"))
    base_params = [param for name, param in trainer.model.named_parameters() if "lora_" not in name]

    # The trained LoRA tensors as rank 0 gathers them whole (transformers' gather for a model sharded at load,
    # accelerate's for its own FSDP2), and whether the ranks' replicated copies agree.
    if sharding == "load":
        state = gather_full_state_dict(trainer.model)
    else:
        state = trainer.accelerator.get_state_dict(trainer.model)
    lora = {name: param.detach() for name, param in trainer.model.named_parameters() if "lora_" in name}
    spread = 0.0
    for param in (param for param in lora.values() if not is_sharded(param)):
        low, high = param.clone(), param.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        spread = max(spread, (high - low).abs().max().item())
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=tm.sample_batch(batch=GLOBAL_BATCH, seq=SEQ).to(device())).logits.cpu()
    if rank == 0:
        lora_state = {name: value.cpu() for name, value in state.items() if "lora_" in name}
        torch.save(lora_state, os.path.join(out_dir, "lora.pt"))
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
        record = {
            "sharding": sharding,
            "world": world,
            "device": str(device()),
            "losses": losses_of(trainer),
            "lora_tensors": len(lora),
            "lora_dtensors": sum(1 for param in lora.values() if is_sharded(param)),
            "rank_spread": spread,
            "base_params": len(base_params),
            "sharded_base_params": sum(1 for param in base_params if is_sharded(param)),
            "distributed_by_transformers": bool(getattr(trainer, "is_distributed_loading_by_transformers", False)),
            "engine_calls": len(log.calls),
            "engine_experts": sorted({call["experts"] for call in log.calls}),
        }
        with open(os.path.join(out_dir, "trainer.json"), "w") as handle:
            json.dump(record, handle, indent=1)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    mode, out_path, *cases = sys.argv[1:]
    quiet()
    torch.set_num_threads(1)
    if mode == "ep":
        init_process_group()
        run_ep(out_path, cases)
    elif mode == "trainer":
        run_trainer(out_path, *cases)
    else:
        raise SystemExit(f"unknown mode {mode!r}: ep or trainer")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
