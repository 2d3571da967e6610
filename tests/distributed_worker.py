"""One data-parallel training step per case, under ``torchrun --nproc-per-node 2`` (gloo, CPU), against one process.

    torchrun --nproc-per-node 2 tests/distributed_worker.py OUT.json [CASE ...]
    MOEKIT_DIST_DEVICE=cuda torchrun --nproc-per-node 1 tests/distributed_worker.py OUT.json [CASE ...]   (GPUs)

A case is MODEL_TYPE:WRAP:TRAINING[:ENGINE] — WRAP ``ddp`` (DistributedDataParallel) or ``fsdp2`` (``fully_shard``
on every decoder layer, then the root); TRAINING ``lora`` (PEFT LoRA on both expert weights and the attention's
q/v projections, every factor random), ``qlora`` (the same on NF4 experts), ``qlora-dq`` (NF4 experts with
double-quantized scales, the experts 4x wider so that each rank's half holds whole blocks of 256 scales) or ``full``
(every parameter trains); ENGINE ``reference`` (default) or
``triton`` (the Triton kernels through TRITON_INTERPRET=1). Each rank takes its half of one global batch; every rank
also runs the same step in one process on the whole batch. Rank 0 writes, per case, the relative error
(max|a - b| / max|b|) of the loss and of the worst trainable gradient (FSDP2's sharded gradients gathered whole)
against that single-process run, and how many gradients were compared; for FSDP2 on NF4 experts also how many NF4
parameters there are and how many are held sharded (a DTensor over an ``NF4Tensor`` of this rank's experts), how
many experts calls ran, and in how many every expert weight read was an ``NF4Tensor`` of all experts (the
all-gather's, not a dense copy).
"""

from __future__ import annotations

import json
import os
import sys

# MOEKIT_DIST_DEVICE=cuda: NCCL, one GPU per rank, the Triton kernels native (``tools/gpu_session.sh OUT dist``);
# else gloo on the CPU, the Triton kernels through the interpreter (set before triton is imported)
if os.environ.get("MOEKIT_DIST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MOEKIT_TRITON_AUTOTUNE", "0")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models as tm
from distributed_ranks import device, init_process_group

import moekit
from moekit.enable import experts_modules
from moekit.options import override
from moekit.quant import NF4Tensor
from moekit.quant.experts import expert_weight_names

DDP = torch.nn.parallel.DistributedDataParallel

GLOBAL_BATCH = 4


def build(model_type: str, training: str) -> torch.nn.Module:
    """The same tiny model on every rank (seeded), on moekit; LoRA factors random, so every term is live."""
    from peft import LoraConfig, get_peft_model

    wider = {"moe_intermediate_size": 128} if training == "qlora-dq" else {}
    model = moekit.enable(tm.build(model_type, **wider))
    if training == "full":
        return model.to(device())
    if training.startswith("qlora"):
        moekit.quantize_experts(model, double_quant=training == "qlora-dq")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=tm.lora_target_parameters(model)
    )
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.to(device())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def watch_nf4(model: torch.nn.Module, world: int) -> dict[str, int]:
    """FSDP2 on NF4 experts: ``nf4_params``, the NF4 parameters; ``nf4_sharded``, those held as a DTensor over an
    ``NF4Tensor`` of 1/world of the experts (``nf4_double_quantized`` of them with 8-bit scales); ``nf4_calls`` and
    ``nf4_gathered_calls`` (counted by the forward): the experts calls, and those whose expert weights were each an
    ``NF4Tensor`` of all experts (``nf4_gathered_double_quantized_calls``: and double-quantized)."""
    from torch.distributed.tensor import DTensor

    locals_ = [(p.to_local() if isinstance(p, DTensor) else p, p.shape[0]) for p in model.parameters()]
    nf4 = [(local, experts) for local, experts in locals_ if isinstance(local, NF4Tensor)]
    sharded = [local for local, experts in nf4 if local.shape[0] * world == experts]
    counts = {"nf4_params": len(nf4), "nf4_sharded": len(sharded), "nf4_calls": 0, "nf4_gathered_calls": 0}
    counts["nf4_double_quantized"] = sum(local.double_quantized for local in sharded)
    counts["nf4_gathered_double_quantized_calls"] = 0

    def check(module, args):
        weights = [getattr(module, name) for name in expert_weight_names(module)]
        counts["nf4_calls"] += 1
        counts["nf4_gathered_calls"] += all(type(w) is NF4Tensor and w.shape[0] == tm.NUM_EXPERTS for w in weights)
        counts["nf4_gathered_double_quantized_calls"] += all(w.double_quantized for w in weights)

    for module in experts_modules(model):
        module.register_forward_pre_hook(check)
    return counts


def step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            grads[name.removeprefix("module.")] = grad.detach().clone()
    return loss.detach(), grads


def run_case(case: str, rank: int, world: int) -> dict:
    model_type, wrap, training, *rest = case.split(":")
    engine = rest[0] if rest else "reference"
    input_ids = tm.sample_batch(batch=GLOBAL_BATCH, seq=12).to(device())
    per_rank = GLOBAL_BATCH // world
    with override(backend=engine):
        want_loss, want_grads = step(build(model_type, training), input_ids)
        model = build(model_type, training)
        if wrap == "ddp":
            # NF4 experts are frozen and identical on every rank: DDP's start-up broadcast skips them
            quantized = [name for name, param in model.named_parameters() if isinstance(param, NF4Tensor)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, quantized)
            model = DDP(model)
        elif wrap == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(model):
                fully_shard(layer)
            fully_shard(model)
        else:
            raise ValueError(f"unknown wrap {wrap!r}")
        nf4 = watch_nf4(model, world) if wrap == "fsdp2" and training.startswith("qlora") else {}
        loss, grads = step(model, input_ids[rank * per_rank : (rank + 1) * per_rank])
    dist.all_reduce(loss)
    loss = loss / world
    missing = sorted(set(want_grads) ^ set(grads))
    worst = max((tm.rel_err(grads[name], want) for name, want in want_grads.items() if name in grads), default=1.0)
    return {
        "case": case,
        "loss_err": tm.rel_err(loss, want_loss),
        "grad_err": worst,
        "grads": len(grads),
        "mismatched_names": missing,
        **nf4,
    }


def main() -> None:
    out_path, cases = sys.argv[1], sys.argv[2:]
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = [run_case(case, rank, world) for case in cases]
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
