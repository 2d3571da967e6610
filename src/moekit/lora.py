"""LoRA on expert weights, read straight from PEFT's ``target_parameters`` wrappers — ΔW is never built.

PEFT wraps the experts module in one ``ParamWrapper`` per targeted parameter (nested). Its stock forward
re-parametrises the parameter to W + ΔW for all E experts before every call. For experts running on moekit
the wrapper instead passes straight through and hands itself down the call in the keyword argument
``moekit_lora_wrappers`` (a ``LoraWrappers``; nested wrappers append themselves, outermost first); the moekit
backend receives it, reads the small factors of every active adapter and applies ``y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ``
per expert. An argument, not shared state: it is exact per call and per thread, and torch.compile traces it
without a graph break (it cannot trace a ``contextvars.ContextVar``, which this used to be).

PEFT layout for a parameter of E experts and rank r (in/out are the true input/output features; PEFT swaps
them for transposed parameters so this holds for gpt-oss too):
    lora_A.weight [r*E, in]   expert e owns rows e*r:(e+1)*r
    lora_B.weight [out, r*E]  expert e owns columns e::E

Under transformers' expert parallelism (``DistributedConfig(ep_size=...)``; 5.17's ``enable_expert_parallel``) the
experts module's weights are DTensors ``Shard(0)`` on the expert-parallel mesh dimension, and its forward runs on
this rank's E/ep experts as local tensors. Two things differ there, and both are handled:

- transformers replaces the module's ``forward`` on the instance (5.24's ``ep_forward(hidden_states, top_k_index,
  top_k_weights)`` takes no keyword argument), so the wrappers are handed over on the module for the length of the
  call (``PENDING_WRAPPERS``) instead of as the keyword argument;
- PEFT's factors are built for all E experts: the wrapper records where this rank's experts start
  (``_expert_offset``, read from the DTensor before the call) and moekit uses those experts' rows of A and B.

Gradients under expert parallelism: PEFT adds its adapters after ``from_pretrained`` sharded the model, so the
experts' LoRA stays a plain tensor of all E experts, one replicated copy per rank, and each rank's backward fills
only its own experts' rows of its copy's gradient (the other rows stay zero). Those rows hold the gradient of every
token routed to those experts, whichever rank it came from (the expert-parallel exchange carries the tokens there and
their gradients back), and each token reaches one copy of its expert. So the experts' LoRA gradient is assembled by
summing the ranks' gradients; it then wants the same scaling as the dense adapters' gradients: divided by the number
of distinct batches the ranks trained on. The Trainer (5.24, ``_sync_replicated_trainable_parameters``) averages
every plain trainable tensor's gradient over all ranks instead. That is exact when every rank trains on its own
slice of the batch (``tp_size == 1``: ``ep_size x fsdp_size``, efsdp copies of the experts and HSDP included, by the
count above; tests/test_distributed_hf.py checks the rule with ``ep_size=2, fsdp_size=2``): the sum over the ranks
divided by the world size is then the dense gradients' own mean. Where ranks share a batch (``tp_size > 1``, or 5.17's ``enable_expert_parallel``, every rank on
the whole batch) the average leaves the experts' LoRA gradient ``tp_size`` times too small: sum it over the ranks and
divide by ``world_size / tp_size`` (5.17: the plain sum, tested) instead. (PEFT 0.21 refuses LoRA on the experts of
an ``ep_size x tp_size`` model before moekit runs: its tensor-parallel LoRA hooks read ``base_layer.weight``.)
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor

BACKEND_NAME = "moekit"
UP_PARAMS = ("gate_up_proj", "up_proj")
DOWN_PARAMS = ("down_proj",)

# The keyword argument that carries the wrappers on the call path down to the experts module.
WRAPPERS_KWARG = "moekit_lora_wrappers"
# Where the wrappers wait on an experts module whose forward transformers replaced on the instance (expert
# parallelism; see _passthrough_forward), for the length of one call.
PENDING_WRAPPERS = "_moekit_pending_lora_wrappers"


class LoraWrappers:
    """The PEFT wrappers on one experts call's path, outermost first.

    A plain holder, not a tuple: hooks that move or cast a call's arguments recurse into tuples and lists
    (accelerate's ``send_to_device`` would call ``.to()`` on the wrapper modules themselves) and leave other objects
    alone.
    """

    def __init__(self, wrappers: tuple = (), expert_offsets: tuple = ()):
        self.wrappers = wrappers
        # Per wrapper: the global index of the first expert the experts module's weights hold under expert
        # parallelism (PEFT's factors cover every expert, the weights this rank's), or None where they hold all.
        self.expert_offsets = expert_offsets or (None,) * len(wrappers)
        # Set by moekit's experts forward when it took these wrappers from the module (PENDING_WRAPPERS).
        self.taken = False

    def plus(self, wrapper: torch.nn.Module, expert_offset: int | None = None) -> LoraWrappers:
        return LoraWrappers(self.wrappers + (wrapper,), self.expert_offsets + (expert_offset,))


NO_WRAPPERS = LoraWrappers()


def runs_on_moekit(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) == BACKEND_NAME and hasattr(module, "has_gate")


def _passthrough_forward(original_forward):
    """ParamWrapper.forward that skips W + ΔW for experts on moekit; identical to PEFT's otherwise."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        if not runs_on_moekit(base) or self.disable_adapters or self.merged or "adapter_names" in kwargs:
            # An outer wrapper's argument, if any, travels on inside kwargs through PEFT's forward to the experts.
            return original_forward(self, x, *args, **kwargs)
        outer = kwargs.pop(WRAPPERS_KWARG, NO_WRAPPERS)
        self._check_forward_args(x, *args, **kwargs)
        # Read here, while the weight is still the DTensor: inside transformers' expert-parallel forward the experts
        # module holds this rank's local shard only.
        wrappers = outer.plus(self, _expert_offset(base, self.parameter_name))
        if self.base_layer is base and "forward" in base.__dict__:
            # transformers' expert parallelism replaced the experts module's forward on the instance, and 5.24's
            # ``ep_forward(hidden_states, top_k_index, top_k_weights)`` takes no keyword argument (5.17's passes
            # them on). It runs the class's forward, moekit's, on this rank's experts inside: hand the wrappers over
            # on the module for the length of the call instead.
            base.__dict__[PENDING_WRAPPERS] = wrappers
            try:
                out = base(x, *args, **kwargs)
            finally:
                base.__dict__.pop(PENDING_WRAPPERS, None)
            if not wrappers.taken:  # a forward that never ran moekit's on this module: the LoRA would be lost
                raise RuntimeError(
                    f"{type(base).__name__}.forward was replaced on the instance by one that did not run moekit's "
                    "experts forward on the module, so its LoRA on the expert weights would have been dropped"
                )
            return out
        # The innermost wrapper calls the experts module, outer ones the next wrapper: both take the argument.
        return self.base_layer(x, *args, **kwargs, **{WRAPPERS_KWARG: wrappers})

    forward._moekit_original = original_forward
    return forward


def _expert_offset(module: torch.nn.Module, name: str) -> int | None:
    """The global index of the first expert this rank holds when transformers' expert parallelism shards
    ``module``'s expert weight ``name``, else None.

    Expert parallelism makes the weight a DTensor ``Shard(0)`` on the expert-parallel mesh dimension: "ep" (5.24;
    with FSDP the mesh is ("efsdp", "ep"), and FSDP's shards are gathered again before the experts run, so only
    "ep" decides which experts the forward sees) or the one dimension of an unnamed mesh (5.17's expert-parallel
    TP mesh). Rank i of that dimension holds experts [i*n, (i+1)*n), n = E / size: ``torch.distributed.tensor``'s
    even ``Shard(0)`` split, and what transformers' routing assumes (``AllToAllEP``, ``AllReduceEP``)."""
    param = module._parameters.get(name)
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:  # a plain tensor: every expert is here
        return None
    names = mesh.mesh_dim_names
    for dim, placement in enumerate(param.placements):
        expert_parallel = names[dim] == "ep" if names is not None else mesh.ndim == 1
        if expert_parallel and placement.is_shard(0) and mesh.size(dim) > 1:
            return mesh.get_local_rank(dim) * (param.shape[0] // mesh.size(dim))
    return None


_PEFT_LAYER = "peft.tuners.lora.layer"  # where ParamWrapper lives


def install_peft_hook() -> bool:
    """Install the pass-through on PEFT's ParamWrapper (idempotent). Returns False when PEFT is absent."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if not hasattr(ParamWrapper.forward, "_moekit_original"):
        ParamWrapper.forward = _passthrough_forward(ParamWrapper.forward)
    return True


class _HookOnPeftImport(importlib.abc.MetaPathFinder):
    """Installs the pass-through right after PEFT's LoRA layers are imported, so ``import moekit`` does not import
    PEFT (seconds of import time) for users who never use it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PEFT_LAYER:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_hook(module):
                exec_module(module)
                install_peft_hook()

            spec.loader.exec_module = exec_then_hook
        return spec


def hook_peft_when_imported() -> None:
    """``install_peft_hook`` now if PEFT's LoRA layers are loaded, else as soon as they are."""
    if _PEFT_LAYER in sys.modules:
        install_peft_hook()
    elif not any(isinstance(finder, _HookOnPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookOnPeftImport())


class LoraFactors(NamedTuple):
    """One projection's LoRA, ``y += scale · (x A[e]ᵀ) B[e]ᵀ`` for expert e.

    ``a`` [E, R, in] and ``b`` [E, out, R] may be views of PEFT's parameters in their own dtype and strides
    (B's experts are strided by 1 in PEFT's layout): each engine makes the small operand copies it needs inside
    its own autograd Function, so the step pays no per-factor autograd ops.
    """

    a: Tensor
    b: Tensor
    scale: float = 1.0

    def folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A, scale·B) in ``dtype`` through autograd ops, B contiguous (grouped_mm's stride rules): the reference
        engine's operands."""
        factor_b = self.b if self.scale == 1.0 else self.b * self.scale
        return self.a.to(dtype), factor_b.to(dtype).contiguous()


def _adapter_factors(wrapper, adapter: str, num_experts: int, expert_offset: int | None = None) -> LoraFactors:
    """Views of one adapter's parameters: A [E, r, in] and B [E, out, r] (no copy), and its scaling.

    Under expert parallelism (``expert_offset``: the global index of this rank's first expert) the views cover the
    experts module's ``num_experts`` local experts, experts ``expert_offset ...`` of PEFT's factors; autograd fills
    only those experts' rows of the factors' gradients."""
    weight_a = wrapper.lora_A[adapter].weight  # [r*E, in]
    weight_b = wrapper.lora_B[adapter].weight  # [out, r*E]
    total = wrapper.num_experts
    first = 0 if expert_offset is None else expert_offset
    fits = total == num_experts if expert_offset is None else first + num_experts <= total
    if not fits or weight_a.shape[0] % total:
        held = f"{num_experts}" if expert_offset is None else f"{num_experts} from expert {expert_offset} on"
        raise ValueError(
            f"LoRA adapter '{adapter}' on '{wrapper.parameter_name}' was built for {total} experts "
            f"(lora_A.weight {tuple(weight_a.shape)}), but the experts module has {held}"
        )
    rank = weight_a.shape[0] // total
    factor_a = weight_a.view(total, rank, -1)
    factor_b = weight_b.view(weight_b.shape[0], rank, total).permute(2, 0, 1)
    if num_experts != total:
        factor_a, factor_b = factor_a[first : first + num_experts], factor_b[first : first + num_experts]
    return LoraFactors(factor_a, factor_b, float(wrapper.scaling[adapter]))


def _concatenated(adapters: list[LoraFactors]) -> LoraFactors:
    """Several adapters as one LoRA of the summed rank (scalings folded into the B copies)."""
    dtype = adapters[0].a.dtype
    return LoraFactors(
        torch.cat([f.a.to(dtype) for f in adapters], dim=1),
        torch.cat([(f.b * f.scale).to(dtype) for f in adapters], dim=2),
    )


def collect_lora(module: torch.nn.Module, wrappers: LoraWrappers | None = None) -> dict[str, LoraFactors]:
    """LoRA factors of the active adapters on ``module``'s expert weights, keyed by "up"/"down", from the PEFT
    ``wrappers`` of this call (the ``moekit_lora_wrappers`` argument; None: no LoRA).

    One adapter: views of its parameters and its scaling. Several: concatenated along the rank (their sum is
    one LoRA of the summed rank). Raises for LoRA that moekit cannot apply exactly, rather than dropping it.
    """
    per_projection: dict[str, list[LoraFactors]] = {}
    num_experts = _up_weight(module).shape[0]
    wrappers = wrappers if wrappers is not None else NO_WRAPPERS
    for wrapper, expert_offset in zip(wrappers.wrappers, wrappers.expert_offsets, strict=True):
        if wrapper.get_base_layer() is not module:
            continue
        name = wrapper.parameter_name
        if name in UP_PARAMS:
            projection = "up"
        elif name in DOWN_PARAMS:
            projection = "down"
        else:
            raise ValueError(
                f"moekit cannot apply LoRA to expert parameter '{name}': only {UP_PARAMS + DOWN_PARAMS} are supported. "
                "Remove it from LoraConfig.target_parameters or use experts_implementation='grouped_mm'."
            )
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            if getattr(wrapper, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"moekit does not support lora_bias on expert parameter '{name}'")
            factors = _adapter_factors(wrapper, adapter, num_experts, expert_offset)
            per_projection.setdefault(projection, []).append(factors)
    return {
        projection: _concatenated(adapters) if len(adapters) > 1 else adapters[0]
        for projection, adapters in per_projection.items()
    }


def _up_weight(module: torch.nn.Module) -> Tensor:
    return module.gate_up_proj if getattr(module, "has_gate", True) else module.up_proj
