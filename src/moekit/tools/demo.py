"""``moekit demo``: LoRA fine-tuning of a tiny NemotronH-style hybrid MoE on moekit, checked against transformers.

Everything is built in memory — nothing is downloaded or read from disk:

* a tiny random hybrid model (Mamba-2, attention and MoE layers; non-gated relu² experts; sigmoid routing
  with a score-correction bias; a shared expert), from a ``NemotronHConfig`` written below;
* PEFT LoRA on the routed experts' weights only (``target_parameters``), everything else frozen;
* a synthetic next-token task generated on the fly: Fibonacci sequences modulo 32,
  ``x[t] = (x[t-1] + x[t-2]) mod 32`` from a random pair, so every token after the first two is a
  deterministic function of the two before it.

The demo then

1. compares the logits of the moekit model with an identical copy on transformers' default experts backend
   (``grouped_mm``, or ``eager`` where it does not run) on one batch, before training;
2. fine-tunes the moekit model with AdamW, showing the loss in a progress bar, and times every step;
3. trains that copy on the first few batches too (its own optimizer, same start; its steps interleaved with
   moekit's so both see the same machine load; the moekit model is never touched) to time the default
   backend and compare the training losses. tokens/s are from median step times, warm-up step excluded;
4. evaluates the loss on a held-out batch before and after, and compares the logits with the default backend
   again after copying the trained LoRA weights into the copy. In fp32 the two must agree to rounding; in bf16,
   where a rounding difference can flip a token's top-k experts, each is compared with an fp32 reference and
   moekit must be as close to it as the default backend is.

``run_demo(DemoConfig(...)) -> DemoResult`` is the API; ``moekit demo`` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..backend import experts_layout, select_engine
from ..enable import enable, experts_modules
from ..quant.experts import TOOL_QUANTS, expert_weight_names, quantize_module, tool_quant_options
from ..quant.tensor import NF4Tensor, held_bytes
from .cli import HelpFormatter, PlainProgress, is_terminal, non_negative_int, positive_float, positive_int
from .cli import console as make_console

Tensor = torch.Tensor

# --- the model ------------------------------------------------------------------------------------------------

HIDDEN = 128
VOCAB = 256
LAYERS = ["mamba", "moe", "mamba", "moe", "full_attention", "moe"]
NUM_EXPERTS = 16
TOP_K = 4
MOE_INTERMEDIATE = 96
LORA_RANK = 8
LORA_ALPHA = 16


def model_config():
    """The demo model's config: a NemotronH-style hybrid at toy scale."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layers_block_type=list(LAYERS),
        # MoE: Nemotron-3-Nano's recipe (non-gated relu² experts, sigmoid router with correction bias,
        # normalised top-k weights scaled by 2.5, one shared expert), shrunk.
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_INTERMEDIATE,
        moe_shared_expert_intermediate_size=128,
        mlp_hidden_act="relu2",
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        # Attention.
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        # Mamba-2.
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_model(seed: int = 0):
    """The tiny random NemotronH model in fp32 on the CPU, deterministic in ``seed`` (global RNG untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config())
        with torch.no_grad():
            # HF initialises the LM head with std 0.02; behind the final RMSNorm that caps every logit at
            # 0.02·H ≈ 2.6, too flat to ever express a confident prediction. A trained model's head is not
            # like that, so give it a 1/√H scale.
            model.lm_head.weight.normal_(0.0, HIDDEN**-0.5)
            # The routing correction bias starts at zero in HF; make it matter for expert selection.
            for module in model.modules():
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def lora_target_parameters(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_parameters`` for the experts' weights, named from the experts module's ``has_gate`` flag."""
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no experts module")
    up = "gate_up_proj" if modules[0].has_gate else "up_proj"
    return [f"experts.{up}", "experts.down_proj"]


def add_lora(model: torch.nn.Module, seed: int = 0):
    """Wrap ``model`` in PEFT LoRA on its expert weights only (r=8, alpha=16); deterministic in ``seed``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        target_modules=[], target_parameters=lora_target_parameters(model), r=LORA_RANK, lora_alpha=LORA_ALPHA
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_peft_model(model, config)


QUANT_CHOICES = TOOL_QUANTS


def quantize_model_experts(model: torch.nn.Module, quant: str = "nf4") -> torch.nn.Module:
    """Every experts module's weights to frozen NF4 in place (``moekit.quant.experts.quantize_module``); "nf4-dq":
    their scales double-quantized."""
    options = tool_quant_options(quant)
    for module in experts_modules(model):
        quantize_module(module, **options)
    return model


def dequantize_model_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every NF4 expert weight of ``model`` in place by a frozen dense parameter holding
    ``weight.dequantize()``: the same values, on which transformers' own backends (and PEFT's ΔW) run."""
    for module in experts_modules(model):
        for name in expert_weight_names(module):
            weight = getattr(module, name)
            if isinstance(weight, NF4Tensor):
                setattr(module, name, torch.nn.Parameter(weight.dequantize(), requires_grad=False))
    return model


def expert_weight_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(elements, bytes as held) of every experts module's up and down weights; an NF4 weight counts its codes
    (half a byte an element) and its fp32 absmax (one per 64 elements)."""
    elements = held = 0
    for module in experts_modules(model):
        for name in expert_weight_names(module):
            weight = getattr(module, name)
            elements += weight.numel()
            held += held_bytes(weight)
    return elements, held


def build_lora_model(seed: int, device: torch.device | str, dtype: torch.dtype, quant: str = "none"):
    """The demo model with LoRA on its experts, in ``dtype`` on ``device``; the trainable LoRA factors stay in
    fp32, as PEFT keeps them by default (autocast_adapter_dtype). ``quant="nf4"``: the expert weights are
    quantized to frozen NF4 before PEFT wraps them (QLoRA); their compute dtype follows ``dtype``."""
    base = build_model(seed)
    if quant != "none":
        quantize_model_experts(base, quant)
    model = add_lora(base, seed=seed).to(device=device, dtype=dtype)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return model


# --- the task -------------------------------------------------------------------------------------------------

MODULUS = 32
TOKEN_OFFSET = 16  # symbol v is token TOKEN_OFFSET + v (ids 0..15 stay unused, like specials)
PROMPT = 2  # the first two tokens are random; every later one is determined by the two before it


def make_batch(generator: torch.Generator, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of Fibonacci sequences mod ``MODULUS``; labels ignore the random prompt."""
    values = torch.empty(batch_size, seq_len, dtype=torch.long)
    values[:, :PROMPT] = torch.randint(0, MODULUS, (batch_size, PROMPT), generator=generator)
    for t in range(PROMPT, seq_len):
        values[:, t] = (values[:, t - 1] + values[:, t - 2]) % MODULUS
    input_ids = values + TOKEN_OFFSET
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100  # HF shifts labels: position t is predicted from positions < t
    return input_ids, labels


# --- the run --------------------------------------------------------------------------------------------------

MIN_LOSS_DROP = 0.30  # the loss must fall by at least this fraction for the demo to succeed ...
LOSS_CHECK_MIN_STEPS = 20  # ... in a run of at least this many steps (a shorter one only warns)
FP32_LOGIT_TOLERANCE = 1e-3  # max |Δlogit| between the backends in fp32
BF16_ERROR_SLACK = 5e-3  # absolute slack on the mean |logit - fp32| comparison in low precision


@dataclass
class DemoConfig:
    steps: int = 60
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 5e-3
    seed: int = 0
    baseline_steps: int = 8  # timed training steps of the default-backend copy (after one warm-up step)
    # torch's CPU threads during the run. None: 1 on the CPU (the demo's ops are too small to gain from intra-op
    # threads, and where other processes load the cores OpenMP threads slow every op down 10-100×), torch's own
    # setting on cuda. 0: torch's own setting.
    threads: int | None = None
    progress: bool = True  # a progress bar on a terminal; plain progress lines through ``log`` elsewhere
    # "nf4": the expert weights quantized to frozen NF4 before PEFT (QLoRA); the default-backend copy then holds
    # their dequantized values (transformers' backends cannot run on NF4), so the two still compute the same thing.
    # "nf4-dq": the same with the scales double-quantized.
    quant: str = "none"


@dataclass
class DemoResult:
    loss_start: float
    loss_end: float
    tokens_per_s_moekit: float
    tokens_per_s_default: float
    max_logit_diff: float  # at step 0: moekit vs the default backend, same weights, same batch
    max_logit_diff_end: float  # after training, the trained LoRA copied into the default-backend model
    max_train_loss_diff: float  # over the steps both backends trained on the same batches from the same state
    accuracy_start: float
    accuracy_end: float
    default_backend: str
    moekit_engine: str  # "reference" or "triton", as moekit's backend selects it for these experts with LoRA
    device: str
    dtype: str
    steps: int
    tokens_per_step: int
    threads: int  # torch's CPU threads during the run
    trainable_params: int
    total_params: int
    logit_tolerance: float  # on max |Δlogit| in fp32 runs
    # Low-precision runs only: mean |logit - fp32 reference| of each backend, [before, after training]. The fp32
    # reference is the same weights upcast, on the default backend. (Max |Δlogit| between two bf16 runs is
    # dominated by the few tokens whose top-k routing flips on a rounding difference, so it is no verdict.)
    fp32_error_moekit: list[float] = field(default_factory=list)
    fp32_error_default: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list, repr=False)
    # The default-backend copy's losses on the same batches (its first baseline_steps + 1 steps).
    default_train_losses: list[float] = field(default_factory=list, repr=False)
    quant: str = "none"  # "nf4": moekit's experts are NF4; the default backend's copy holds the dequantized weights
    expert_weight_elements: int = 0  # elements of every experts module's up and down weights
    expert_weight_bytes: int = 0  # their bytes as moekit's model holds them (NF4: codes + absmax)

    @property
    def loss_drop(self) -> float:
        return 1.0 - self.loss_end / self.loss_start

    @property
    def loss_fell(self) -> bool:
        return self.loss_drop >= MIN_LOSS_DROP

    @property
    def loss_checked(self) -> bool:
        """Whether the run is long enough to be judged on its loss (shorter runs only warn)."""
        return self.steps >= LOSS_CHECK_MIN_STEPS

    @property
    def logits_match(self) -> bool:
        if not self.fp32_error_moekit:  # fp32: the two backends must agree to rounding
            return max(self.max_logit_diff, self.max_logit_diff_end) <= self.logit_tolerance
        # bf16: moekit must be as close to the fp32 reference as transformers' own backend is.
        return all(
            mine <= 1.5 * theirs + BF16_ERROR_SLACK
            for mine, theirs in zip(self.fp32_error_moekit, self.fp32_error_default)
        )

    @property
    def ok(self) -> bool:
        return (self.loss_fell or not self.loss_checked) and self.logits_match

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loss_drop": self.loss_drop,
            "loss_checked": self.loss_checked,
            "logits_match": self.logits_match,
            "ok": self.ok,
        }


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was requested, but torch.cuda.is_available() is False on this machine; use --device cpu"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning chatter (e.g. 'mamba_ssm is not installed') for the demo's duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _where(device, dtype, threads: int) -> str:
    """'cpu float32, 1 thread' / 'cuda:0 bfloat16'."""
    device = torch.device(device)
    text = f"{device} {str(dtype).removeprefix('torch.')}"
    return text + (f", {threads} thread{'s' if threads != 1 else ''}" if device.type == "cpu" else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_experts_implementation(peft_model, name: str) -> None:
    base = peft_model.get_base_model()
    base.set_experts_implementation(name)
    for module in experts_modules(base):
        module.config._experts_implementation = name


def _default_backend(peft_model, batch: tuple[Tensor, Tensor]) -> str:
    """Put ``peft_model`` on transformers' default experts backend (grouped_mm; eager where that fails)."""
    _set_experts_implementation(peft_model, "grouped_mm")
    try:
        input_ids, labels = batch
        peft_model(input_ids=input_ids, labels=labels).loss.backward()
        return "grouped_mm"
    except (RuntimeError, NotImplementedError, TypeError):
        _set_experts_implementation(peft_model, "eager")
        return "eager"
    finally:
        peft_model.zero_grad(set_to_none=True)


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _timed_step(model, optimizer, batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[float, float]:
    """One training step: (seconds, loss)."""
    input_ids, labels = batch
    _sync(device)
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # a host sync: the step has finished when the clock is read
    return time.perf_counter() - start, value


def _fp32_errors(default_model, batch, logits_moekit, logits_default, errors_moekit, errors_default) -> None:
    """Append each backend's mean |logit - fp32 reference| (the default model's weights, upcast)."""
    reference = copy.deepcopy(default_model).float()
    logits_reference, _, _ = _evaluate(reference, batch)
    del reference
    errors_moekit.append((logits_moekit - logits_reference).abs().mean().item())
    errors_default.append((logits_default - logits_reference).abs().mean().item())


@torch.no_grad()
def _evaluate(model, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, float, float]:
    """(fp32 logits, loss, accuracy on the determined positions) of ``model`` on ``batch``."""
    input_ids, labels = batch
    out = model(input_ids=input_ids, labels=labels)
    logits = out.logits.float()
    predicted = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    mask = targets != -100
    accuracy = (predicted[mask] == targets[mask]).float().mean().item()
    return logits, out.loss.item(), accuracy


@dataclass
class _Models:
    """The two models the demo compares, and the data they see."""

    moekit: Any  # the PEFT model on moekit
    default: Any  # an identical copy on transformers' default experts backend
    default_backend: str
    batches: list[tuple[Tensor, Tensor]]
    eval_batch: tuple[Tensor, Tensor]


def _build(config: DemoConfig, device: torch.device, dtype: torch.dtype) -> _Models:
    """The moekit model, its default-backend copy and the batches, checked to run where they should."""
    model = build_lora_model(config.seed, device, dtype, config.quant)
    default_model = copy.deepcopy(model)  # identical weights, its own config object
    dequantize_model_experts(default_model)  # NF4 experts: the copy holds their dequantized values
    enable(model)
    generator = torch.Generator().manual_seed(config.seed + 2)
    batches = [
        tuple(t.to(device) for t in make_batch(generator, config.batch_size, config.seq_len))
        for _ in range(max(config.steps, config.baseline_steps + 1))
    ]
    eval_batch = tuple(
        t.to(device) for t in make_batch(torch.Generator().manual_seed(config.seed + 3), 32, config.seq_len)
    )
    default_backend = _default_backend(default_model, batches[0])
    for name, candidate, expected in (("moekit", model, "moekit"), ("default", default_model, default_backend)):
        found = {m.config._experts_implementation for m in experts_modules(candidate)}
        if found != {expected}:
            raise RuntimeError(f"the {name} model's experts run on {sorted(found)}, expected {expected!r}")
    return _Models(model, default_model, default_backend, batches, eval_batch)


def _copy_trained_weights(source, target) -> None:
    """``target.load_state_dict(source.state_dict())``, except NF4 expert weights: they are frozen (training never
    changes them) and the dense copy already holds their dequantized values."""
    state = source.state_dict()
    dense = {name: value for name, value in state.items() if not isinstance(value, NF4Tensor)}
    result = target.load_state_dict(dense, strict=len(dense) == len(state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"the default-backend copy has no parameters {unexpected}")


def _bytes(count: float) -> str:
    """1,234,567 -> '1.18 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def expert_weights_text(quant: str, elements: int, held: int) -> str:
    """'NF4 648.00 KiB (bf16 2.25 MiB, fp32 4.50 MiB: 0.28× of bf16)': the expert weights as held, against what
    the same elements take dense."""
    bf16, fp32 = 2 * elements, 4 * elements
    name = "dense" if quant == "none" else quant.upper()
    return f"{name} {_bytes(held)} (bf16 {_bytes(bf16)}, fp32 {_bytes(fp32)}: {held / bf16:.2f}× of bf16)"


def _log_intro(log, config: DemoConfig, models: _Models, engine: str, where: str) -> None:
    trainable = sum(p.numel() for p in models.moekit.parameters() if p.requires_grad)
    total = sum(p.numel() for p in models.moekit.parameters())
    log(
        f"moekit demo: NemotronH-style hybrid {'/'.join(LAYERS)} · hidden {HIDDEN} · {NUM_EXPERTS} relu² experts "
        f"top-{TOP_K} (intermediate {MOE_INTERMEDIATE}) · vocab {VOCAB}"
    )
    quantized = " (NF4, frozen: QLoRA)" if config.quant != "none" else ""
    log(
        f"  LoRA r={LORA_RANK} alpha={LORA_ALPHA} on {', '.join(lora_target_parameters(models.moekit))}{quantized}: "
        f"{trainable:,} trainable of {total:,} parameters"
    )
    if config.quant != "none":
        elements, held = expert_weight_stats(models.moekit)
        log(
            f"  expert weights: {expert_weights_text(config.quant, elements, held)}; "
            f"the {models.default_backend} copy holds them dequantized"
        )
    log(
        f"  task: Fibonacci mod {MODULUS} (x[t] = x[t-1] + x[t-2]), {config.batch_size}×{config.seq_len} tokens "
        f"a step, AdamW lr {config.lr}"
    )
    log(f"  on {where}; moekit engine: {engine}")


def _compare(models: _Models, dtype: torch.dtype, errors_moekit: list, errors_default: list):
    """(max |Δlogit| between the backends, moekit's held-out loss, its accuracy); in low precision, also appends
    each backend's mean error against the fp32 reference."""
    logits_moekit, loss, accuracy = _evaluate(models.moekit, models.eval_batch)
    logits_default, _, _ = _evaluate(models.default, models.eval_batch)
    if dtype != torch.float32:
        _fp32_errors(models.default, models.eval_batch, logits_moekit, logits_default, errors_moekit, errors_default)
    return (logits_moekit - logits_default).abs().max().item(), loss, accuracy


def _progress(config: DemoConfig, log):
    """``(advance(loss), close())`` of the training progress: a tqdm bar where stderr is a terminal, plain lines
    through ``log`` (about six a run) elsewhere, nothing without ``config.progress``."""
    if not config.progress:
        return (lambda loss: None), (lambda: None)
    if is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.steps, desc="LoRA fine-tuning on moekit", unit="step", file=sys.stderr, dynamic_ncols=True,
            mininterval=0.25,
        )  # fmt: skip

        def advance(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        return advance, bar.close
    plain = PlainProgress(
        config.steps, "  LoRA fine-tuning on moekit, step", every=max(1, config.steps // 6), write=log
    )
    return (lambda loss: plain.update(f"loss {loss:.4f}")), (lambda: None)


@dataclass
class _Training:
    losses: list[float] = field(default_factory=list)
    default_losses: list[float] = field(default_factory=list)
    moekit_times: list[float] = field(default_factory=list)
    default_times: list[float] = field(default_factory=list)


def _train(config: DemoConfig, models: _Models, device: torch.device, log) -> _Training:
    """Fine-tune on moekit. The default-backend copy trains on the first batches too, from the same state with its
    own optimizer, its steps interleaved with moekit's so both see the same machine load; the moekit model never
    sees it. Step 0 is a warm-up and not timed (unless it is the only step)."""
    optimizer = _optimizer(models.moekit, config.lr)
    default_optimizer = _optimizer(models.default, config.lr)
    run = _Training()
    advance, close = _progress(config, log)
    for step in range(max(config.steps, config.baseline_steps + 1)):
        if step < config.steps:
            seconds, loss = _timed_step(models.moekit, optimizer, models.batches[step], device)
            run.losses.append(loss)
            if step > 0 or config.steps == 1:
                run.moekit_times.append(seconds)
            advance(loss)
        if step <= config.baseline_steps:
            seconds, loss = _timed_step(models.default, default_optimizer, models.batches[step], device)
            run.default_losses.append(loss)
            if step > 0:
                run.default_times.append(seconds)
    close()
    return run


def run_demo(config: DemoConfig | None = None, *, log=None) -> DemoResult:
    """Run the demo; ``log(str)`` (default: print to stdout) receives the narrative lines."""
    config = config or DemoConfig()
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}")
    if config.quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {config.quant!r}")
    log = log or (lambda line: print(line, flush=True))
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    threads = config.threads if config.threads is not None else (1 if device.type == "cpu" else 0)
    with _quiet_transformers(), _torch_threads(threads):
        threads = torch.get_num_threads()
        models = _build(config, device, dtype)
        experts = experts_modules(models.moekit)[0]
        engine = select_engine(torch.empty(0, HIDDEN, device=device, dtype=dtype), experts_layout(experts))
        _log_intro(log, config, models, engine, _where(device, dtype, threads))

        # 1. Before training: moekit vs the default backend, same weights, same batch.
        fp32_error_moekit: list[float] = []
        fp32_error_default: list[float] = []
        max_logit_diff, loss_start, accuracy_start = _compare(models, dtype, fp32_error_moekit, fp32_error_default)
        # 2./3. Fine-tune, and time both backends.
        run = _train(config, models, device, log)
        # 4. After training: held-out loss, and the trained LoRA on the default backend vs moekit.
        _copy_trained_weights(models.moekit, models.default)
        max_logit_diff_end, loss_end, accuracy_end = _compare(models, dtype, fp32_error_moekit, fp32_error_default)
        weight_elements, weight_bytes = expert_weight_stats(models.moekit)

    tokens_per_step = config.batch_size * config.seq_len
    return DemoResult(
        loss_start=loss_start,
        loss_end=loss_end,
        # Medians of the per-step times: robust to the odd slow step (another process, a GC pause).
        tokens_per_s_moekit=tokens_per_step / statistics.median(run.moekit_times),
        tokens_per_s_default=tokens_per_step / statistics.median(run.default_times),
        max_logit_diff=max_logit_diff,
        max_logit_diff_end=max_logit_diff_end,
        max_train_loss_diff=max(abs(a - b) for a, b in zip(run.losses, run.default_losses)),
        accuracy_start=accuracy_start,
        accuracy_end=accuracy_end,
        default_backend=models.default_backend,
        moekit_engine=engine,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        steps=config.steps,
        tokens_per_step=tokens_per_step,
        threads=threads,
        trainable_params=sum(p.numel() for p in models.moekit.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in models.moekit.parameters()),
        logit_tolerance=FP32_LOGIT_TOLERANCE,
        fp32_error_moekit=fp32_error_moekit,
        fp32_error_default=fp32_error_default,
        train_losses=run.losses,
        default_train_losses=run.default_losses,
        quant=config.quant,
        expert_weight_elements=weight_elements,
        expert_weight_bytes=weight_bytes,
    )


# --- reporting ------------------------------------------------------------------------------------------------


def _logit_rows(table, result: DemoResult) -> None:
    backend = result.default_backend
    verdict = "[green]ok[/green]" if result.logits_match else "[bold red]MISMATCH[/bold red]"
    if not result.fp32_error_moekit:  # fp32: the backends must agree to rounding
        for label, value in (("step 0", result.max_logit_diff), ("trained", result.max_logit_diff_end)):
            table.add_row(
                f"max |Δlogit| vs {backend}, {label}", f"{value:.2e}  {verdict} (tol {result.logit_tolerance:.0e})"
            )
        return
    # low precision: both backends against the fp32 reference
    table.add_row(f"max |Δlogit| vs {backend}, step 0", f"{result.max_logit_diff:.2e}")
    table.add_row(f"max |Δlogit| vs {backend}, trained", f"{result.max_logit_diff_end:.2e}  (top-k flips)")
    for name, errors, mark in (
        ("moekit", result.fp32_error_moekit, ""),
        (backend, result.fp32_error_default, f"  {verdict}"),
    ):
        table.add_row(f"mean |logit − fp32|, {name}", f"{errors[0]:.2e} → {errors[1]:.2e}{mark}")


def report(result: DemoResult, console=None) -> None:
    """Print the result table (rich; plain text at the table's full width when the output is not a terminal)."""
    from rich.table import Table

    console = console or make_console()
    backend = result.default_backend
    experts = f", {result.quant.upper()} experts" if result.quant != "none" else ""
    table = Table(
        title=f"moekit demo: {result.steps} steps on {_where(result.device, result.dtype, result.threads)}{experts}",
        title_justify="left",
        min_width=60,
    )
    table.add_column("")
    table.add_column("start → end / value")
    table.add_row(
        "loss (held-out)",
        f"{result.loss_start:.4f} → {result.loss_end:.4f}  (-{100 * result.loss_drop:.1f}%)",
    )
    table.add_row("accuracy (held-out)", f"{100 * result.accuracy_start:.1f}% → {100 * result.accuracy_end:.1f}%")
    speedup = result.tokens_per_s_moekit / result.tokens_per_s_default
    table.add_row(
        f"train tokens/s, moekit ({result.moekit_engine})", f"{result.tokens_per_s_moekit:,.0f}  (×{speedup:.2f})"
    )
    dense = ", dequantized experts" if result.quant != "none" else ""
    table.add_row(f"train tokens/s, {backend}", f"{result.tokens_per_s_default:,.0f}  (transformers default{dense})")
    _logit_rows(table, result)
    table.add_row(f"max |Δtrain loss| vs {backend}", f"{result.max_train_loss_diff:.2e}  (same batches, same start)")
    if result.quant != "none":
        table.add_row(
            "expert weights, moekit",
            expert_weights_text(result.quant, result.expert_weight_elements, result.expert_weight_bytes),
        )
    console.print(table)


def verdict(result: DemoResult) -> tuple[list[str], list[str]]:
    """(warnings, failures) of a run, each one line; any failure makes ``moekit demo`` exit 1."""
    warnings_, failures = [], []
    if not result.loss_fell:
        fall = f"{result.loss_start:.4f} -> {result.loss_end:.4f} ({100 * result.loss_drop:.1f}% < {100 * MIN_LOSS_DROP:.0f}%)"
        if result.loss_checked:
            failures.append(f"the loss did not fall enough: {fall}; try more --steps")
        else:
            warnings_.append(
                f"the loss did not fall enough in {result.steps} steps: {fall}; runs of fewer than "
                f"{LOSS_CHECK_MIN_STEPS} steps are not judged on it"
            )
    if not result.logits_match:
        if result.fp32_error_moekit:
            failures.append(
                f"moekit's logits are further from the fp32 reference (mean error {result.fp32_error_moekit}) "
                f"than transformers' {result.default_backend} ({result.fp32_error_default})"
            )
        else:
            failures.append(
                f"moekit's logits differ from transformers' {result.default_backend} by "
                f"{max(result.max_logit_diff, result.max_logit_diff_end):.3g} (tolerance {result.logit_tolerance:.0e})"
            )
    return warnings_, failures


# --- command line ---------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moekit demo`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="LoRA fine-tune a tiny NemotronH-style MoE on moekit and compare with transformers",
        description=(
            "Fine-tune LoRA on the experts of a tiny random NemotronH-style hybrid MoE (built in memory) on a "
            "synthetic task, on moekit; report the loss, tokens/s against transformers' default experts backend, "
            "and the logit difference between the two. Exit status 1 when the logits differ, or when a run of at "
            f"least {LOSS_CHECK_MIN_STEPS} steps does not lower the held-out loss by {100 * MIN_LOSS_DROP:.0f}%."
        ),
        formatter_class=HelpFormatter,
    )
    defaults = DemoConfig()
    add = parser.add_argument
    add("--steps", type=positive_int, default=defaults.steps, help="training steps")
    add("--device", choices=["cpu", "cuda"], default=None, help="device (default: cuda when available, else cpu)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default=defaults.dtype,
        help="model dtype; auto: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    add("--batch-size", type=positive_int, default=defaults.batch_size, help="sequences a step")
    add("--seq-len", type=positive_int, default=defaults.seq_len, help=f"tokens a sequence (at least {PROMPT + 2})")
    add("--lr", type=positive_float, default=defaults.lr, help="AdamW learning rate")
    add("--seed", type=int, default=defaults.seed, help="seed of the model, the LoRA init and the data")
    add("--baseline-steps", type=positive_int, default=defaults.baseline_steps,
        help="timed training steps on the default backend")  # fmt: skip
    add("--threads", type=non_negative_int, default=None,
        help="torch CPU threads; 0: torch's own choice (default: 1 on cpu, where the tiny ops gain nothing from "
        "threads and a loaded machine makes them far slower; torch's own choice on cuda)")  # fmt: skip
    add("--quant", choices=QUANT_CHOICES, default=defaults.quant,
        help="expert weights: none (dense), nf4 (QLoRA: quantized to frozen NF4 before PEFT adds LoRA; the "
        "default-backend copy holds the dequantized weights), or nf4-dq (the same with double-quantized scales)")  # fmt: skip
    add("--json", metavar="PATH", default=None, help="also write the result as JSON to PATH (default: not written)")
    add("--no-progress", action="store_true", help="no progress bar (or progress lines, when not on a terminal)")
    parser.set_defaults(func=command)
    return parser


def _argument_problem(args: argparse.Namespace) -> str | None:
    """One line naming the argument that is wrong and what it must be, or None."""
    if args.seq_len < PROMPT + 2:
        return f"--seq-len must be at least {PROMPT + 2} ({PROMPT} random tokens, then tokens to predict), got {args.seq_len}"
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        return f"--json {args.json!r}: the directory {os.path.dirname(os.path.abspath(args.json))!r} does not exist"
    try:
        resolve_device(args.device)
    except RuntimeError as error:
        return str(error)
    return None


def command(args: argparse.Namespace) -> int:
    problem = _argument_problem(args)
    if problem:
        print(f"moekit demo: error: {problem}", file=sys.stderr)
        return 2
    config = DemoConfig(
        steps=args.steps,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        baseline_steps=args.baseline_steps,
        threads=args.threads,
        progress=not args.no_progress,
        quant=args.quant,
    )
    result = run_demo(config)
    report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result.as_dict(), handle, indent=2)
            handle.write("\n")
    warnings_, failures = verdict(result)
    for warning in warnings_:
        print(f"moekit demo: warning: {warning}", file=sys.stderr)
    for failure in failures:
        print(f"moekit demo: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0
