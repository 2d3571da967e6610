"""Data-parallel training on moekit, two processes on the CPU (gloo, ``torchrun``), against one process.

DistributedDataParallel and FSDP2 (``fully_shard`` per decoder layer, then the root), with PEFT LoRA on the experts
and the attention and with full fine-tuning, for NemotronH (non-gated relu², latent MoE) and Qwen3-MoE: the loss
and every trainable gradient (FSDP2's shards gathered) equal one process's on the same global batch (fp32,
relative error <= 1e-5); one FSDP2 case runs the Triton kernels through the interpreter. Both wraps also train LoRA
on NF4 experts (QLoRA): DDP leaves their frozen codes out of its start-up broadcast; FSDP2 (FSDP-QLoRA) holds each
NF4 parameter sharded along the experts (a DTensor over an ``NF4Tensor`` of half the experts) and the experts read
the all-gathered ``NF4Tensor`` of every expert, never a dense copy (the single-process round trip of the
all-gather hooks, a transposed view and the uneven-experts error are in tests/test_nf4_fsdp.py). QLoRA under FSDP2
on the Triton kernels is not run here: through the interpreter it alone takes longer than every other case. One
``torchrun`` launch runs every case (tests/distributed_worker.py).
Out-of-range expert ids on one rank raise on that rank and end the launch instead of leaving the other rank waiting
in its collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CASES = [
    f"{model_type}:{wrap}:{training}"
    for model_type in ("nemotron_h_latent", "qwen3_moe")
    for wrap in ("ddp", "fsdp2")
    for training in ("lora", "full")
] + [
    "qwen3_moe:fsdp2:lora:triton",
    "nemotron_h_latent:ddp:qlora",
    "qwen3_moe:ddp:qlora",
    "nemotron_h_latent:fsdp2:qlora",
    "qwen3_moe:fsdp2:qlora",
    "qwen3_moe:fsdp2:qlora-dq",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command + CASES, check=False, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return {record["case"]: record for record in json.loads(out.read_text())}


@pytest.mark.parametrize("case", CASES)
def test_matches_one_process(results, case):
    record = results[case]
    assert record["mismatched_names"] == []
    assert record["grads"] > 0
    assert record["loss_err"] <= 1e-5, record
    assert record["grad_err"] <= 1e-5, record
    wrap, training = case.split(":")[1:3]
    if wrap == "fsdp2" and training.startswith("qlora"):  # experts held sharded, read gathered as NF4 of all experts
        assert record["nf4_sharded"] == record["nf4_params"] > 0, record
        assert record["nf4_gathered_calls"] == record["nf4_calls"] > 0, record
        double = record["nf4_params"] if training == "qlora-dq" else 0  # held and gathered with 8-bit scales
        assert record["nf4_double_quantized"] == double, record
        assert record["nf4_gathered_double_quantized_calls"] == (record["nf4_calls"] if double else 0), record


_BAD_IDS_WORKER = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import tiny_models as tm
import moekit
from moekit.enable import experts_modules

dist.init_process_group("gloo")
rank = dist.get_rank()
experts = experts_modules(moekit.enable(tm.build("qwen3_moe")))[0]
hidden, num_experts = experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[0]
x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(rank))
top_k_index = torch.randint(0, num_experts, (6, 2), generator=torch.Generator().manual_seed(10 + rank))
if rank == 1:
    top_k_index[3, 1] = num_experts + 5  # a caller bug on this rank only
out = experts(x, top_k_index, torch.rand(6, 2))
dist.all_reduce(out)  # the other rank waits here for one that has raised
print(f"rank {rank} passed the all-reduce", flush=True)
"""


def test_bad_expert_ids_on_one_rank_fail_the_run_without_hanging(tmp_path):
    """Out-of-range expert ids on one rank raise there, naming top_k_index and the bad id, and the launch ends
    (torchrun stops the rank left waiting in the collective) instead of hanging."""
    worker = tmp_path / "bad_ids_worker.py"
    worker.write_text(_BAD_IDS_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
               os.path.dirname(__file__)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "top_k_index holds expert id 13, outside [0, 8]" in log, log[-3000:]
    assert "rank 0 passed the all-reduce" not in log and "rank 1 passed the all-reduce" not in log


_SHARDED_THEN_QUANTIZED_WORKER = """
import sys
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import tiny_models as tm
import moekit

dist.init_process_group("gloo")
model = tm.build("qwen3_moe")
for layer in model.model.layers:
    fully_shard(layer)
try:
    moekit.quantize_experts(model)
except ValueError as error:
    print("ERROR " + str(error), flush=True)
dist.destroy_process_group()
"""


def test_quantizing_a_sharded_model_is_a_clear_error(tmp_path):
    """Experts already FSDP2-sharded (DTensors of dense weights) are not quantized in place: the error says to
    quantize before sharding, naming the weight."""
    worker = tmp_path / "sharded_then_quantized_worker.py"
    worker.write_text(_SHARDED_THEN_QUANTIZED_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(worker),
               os.path.dirname(__file__)]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "ERROR Qwen3MoeExperts.gate_up_proj is a DTensor of dense weights" in done.stdout, done.stdout
    assert "quantize first (moekit.quantize_experts before fully_shard)" in done.stdout


_TUNING_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_launch import _JitStandIn
from moekit.kernels import tuning
from moekit.options import OPTIONS

dist.init_process_group("gloo")
rank = dist.get_rank()
tuning._generation = lambda: "hopper"  # a space of several configs
OPTIONS.pinned_config, OPTIONS.cache_dir = None, sys.argv[2] + f"/rank{rank}"  # tune; no shared cache
OPTIONS.tuning_broadcast = sys.argv[3] == "1"
space = tuning.configs("gemm")
fastest = {0: 1, 1: 3}[rank]  # each rank's timings prefer another config
tuning.Autotuned._tune = lambda self, configs, grid, args, kwargs: configs[fastest]
jit = _JitStandIn()
kernel = tuning.Autotuned(jit, "gemm", key=["n"])
kernel.fast.native = False
kernel.name = "stand_in[gemm]"  # its tuning-cache id (a stand-in has no source to hash)
kernel.get(torch.bfloat16)[(1,)](torch.zeros(8), 64, 0.5, BLOCK=4)
choices = [None, None]
dist.all_gather_object(choices, space.index(next(iter(kernel.chosen.values()))))
if rank == 0:
    print("CHOICES " + json.dumps(choices), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "each_rank"])
def test_ranks_take_rank0s_tuned_config(tmp_path, broadcast):
    """MOEKIT_TUNING_BROADCAST: two ranks whose timings prefer different configs both launch rank 0's choice; without
    it each keeps its own."""
    worker = tmp_path / "tuning_worker.py"
    worker.write_text(_TUNING_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
               os.path.dirname(__file__), str(tmp_path), "1" if broadcast else "0"]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    choices = json.loads(done.stdout.split("CHOICES ", 1)[1].splitlines()[0])
    assert choices == ([1, 1] if broadcast else [1, 3])


def test_tuning_broadcast_is_read_from_the_environment():
    from moekit.options import Options, OptionsError

    assert Options.from_env({"MOEKIT_TUNING_BROADCAST": "1"}).tuning_broadcast
    assert (
        not Options.from_env({}).tuning_broadcast
        and not Options.from_env({"MOEKIT_TUNING_BROADCAST": "0"}).tuning_broadcast
    )
    with pytest.raises(OptionsError, match="MOEKIT_TUNING_BROADCAST"):
        Options.from_env({"MOEKIT_TUNING_BROADCAST": "yes"})
