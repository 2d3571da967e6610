"""Load a dense (bf16) checkpoint straight into NF4 experts, through transformers' quantizer registry; save and
load the NF4 model itself.

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=moekit.quant.MoekitQuantConfig(), dtype=torch.bfloat16, device_map="cuda"
    )
    model.save_pretrained(quantized_path)          # NF4 experts as they are held
    model = AutoModelForCausalLM.from_pretrained(quantized_path, dtype=torch.bfloat16, device_map="cuda")

Each expert weight (the 3-D ``gate_up_proj`` / ``up_proj`` and ``down_proj`` of every experts module decorated with
transformers' ``@use_experts_implementation``) becomes a frozen ``NF4Tensor`` parameter as it is loaded: the dense
weight of the whole model never exists on the device. ``linear="nf4"`` also turns the ``nn.Linear`` layers
(attention, dense and shared MLPs, Mamba projections; not ``lm_head``, the tied or output embeddings, nor the
routers) into bitsandbytes ``Linear4bit`` in the same load, through transformers' own bitsandbytes 4-bit quantizer.

How it hooks into transformers (the same in 5.17 and 5.25, which both load through ``core_model_loading``):

- ``MoekitQuantConfig`` is registered as quant_method "moekit" (``register_quantization_config``) and
  ``MoekitHfQuantizer`` as its quantizer (``register_quantizer``), when ``moekit`` is imported.
- ``param_needs_quantization`` says yes to expert weights (and, with ``linear="nf4"``, to what the bitsandbytes
  quantizer says yes to); the loader then attaches ``get_quantize_ops()`` to that parameter's converter. That op
  quantizes an expert weight once the model's own converter has merged the checkpoint's per-expert tensors, and
  hands everything else to bitsandbytes' ``Bnb4bitQuantize``. On-the-fly quantization makes transformers load
  synchronously, one parameter at a time.
- ``update_weight_conversions`` marks the model's converters that build expert weights (the merge of
  ``experts.N.gate_proj`` / ``up_proj`` / ``down_proj`` into the fused 3-D weights) ``force_cpu``: the per-expert
  tensors and their merge stay in host memory, and the quantize op moves a few experts at a time to the target
  device and quantizes them there. Device memory during loading stays at the final footprint plus a few experts'
  temporaries (a checkpoint that already stores fused weights is read onto the device one weight at a time: at most
  one projection of one layer in the dense dtype). transformers 5.17 calls this hook with the conversions only,
  5.25 with the model too; the model is also kept from ``preprocess_model`` for 5.17.
- After loading, the experts run on moekit (``moekit.enable``), ``model.is_quantized`` is true and
  ``model.hf_quantizer`` is this quantizer (``is_trainable``: train PEFT adapters on it; the adapters PEFT saves
  are plain adapters of the original model); ``model.dequantize()`` gives the dense model back.
- Saving (``get_state_dict_and_metadata``) writes each NF4 weight as its parts under names the model's own
  conversions leave alone (``serialized_key``: ``experts.down_proj`` -> ``experts.nf4_down_proj.packed``, ...), and
  config.json names this config. Loading such a checkpoint (``pre_quantized``) adds one converter a projection
  (``get_weight_conversions``) whose op (``MoekitDeserialize``) builds the ``NF4Tensor`` from its parts on the target
  device: the codes and scales are read as saved, never dense; the per-expert parts are 3-D [E, 1, n], so a load
  that shards the weights along their experts (expert parallelism) cuts them the same way and each rank builds its
  experts' NF4Tensor (not double-quantized scales: blocks over the whole weight). With ``linear="nf4"`` the
  bitsandbytes linears are saved as bitsandbytes saves them, and its converters load them back.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized, get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..enable import enable, experts_modules, is_experts_module
from ..lora import DOWN_PARAMS, UP_PARAMS
from .experts import METHODS, expert_weight_names, quantize_module
from .nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE
from .tensor import SERIALIZED_PARTS, NF4Tensor

QUANT_METHOD = "moekit"
LINEAR_METHODS = (None, "nf4")
# Bytes a quantized element takes: 4-bit codes and one fp32 absmax per block (transformers sizes device maps and its
# allocator warm-up with this).
NF4_ELEMENT_SIZE = 0.5 + 4 / BLOCKSIZE
NF4_DOUBLE_QUANT_ELEMENT_SIZE = 0.5 + (1 + 4 / ABSMAX_BLOCKSIZE) / BLOCKSIZE  # scales in 8 bits

NOT_SERIALIZABLE = (
    "moekit: a model loaded with bitsandbytes' own BitsAndBytesConfig whose experts were then quantized "
    "(quantize_experts) cannot be saved: which of its linears bitsandbytes quantized is not recorded in a form "
    "MoekitQuantConfig loads back. Load with quantization_config=MoekitQuantConfig(linear='nf4') instead (it saves), "
    "save the PEFT adapters (plain adapters of the original checkpoint), or call model.dequantize() first."
)
# A checkpoint holds an NF4 expert weight `...experts.down_proj` as the tensors `...experts.nf4_down_proj.<part>`
# (NF4Tensor.serialized: packed, and absmax or its double-quantized parts), names the model's own conversions (which
# merge or split `experts.down_proj`) do not match, so they pass through saving and loading untouched.


def serialized_key(name: str, part: str) -> str:
    """The checkpoint key of ``part`` of the expert weight named ``name``."""
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix + '.' if prefix else ''}nf4_{leaf}.{part}"


def _bitsandbytes_installed() -> bool:
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def _dtype_name(value) -> str | None:
    """A floating-point dtype (torch.dtype, "bfloat16" or "torch.bfloat16") as its name; None stays None."""
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"MoekitQuantConfig: compute_dtype must be a floating-point torch dtype (e.g. torch.bfloat16 or "
            f"'bfloat16') or None (the dtype the model loads in); got {value!r}"
        )
    return str(dtype).removeprefix("torch.")


class MoekitQuantConfig(QuantizationConfigMixin):
    """Quantize a dense checkpoint as ``from_pretrained`` loads it (``quantization_config=MoekitQuantConfig()``).
    ``save_pretrained`` of the quantized model writes this config into config.json beside the NF4 tensors, so
    ``from_pretrained`` of that directory loads them as saved (no argument needed).

    experts              "nf4": every expert weight to NF4 (bitsandbytes' numerics, blocks of 64, fp32 absmax),
                         run on moekit's engines.
    experts_double_quant the experts' absmax in 8 bits, as bitsandbytes' double quantization holds it (4.13 bits
                         an element instead of 4.5; under FSDP2 each rank's experts must hold whole blocks of
                         256 scales).
    linear               None (default): the nn.Linear layers stay in the load dtype. "nf4": they become
                         bitsandbytes ``Linear4bit`` (NF4) in the same load, through transformers' bitsandbytes
                         4-bit quantizer (needs bitsandbytes; not lm_head, tied/output embeddings or routers).
    compute_dtype        the dtype the quantized layers compute in (the dtype NF4 experts stand for, and
                         bitsandbytes' ``bnb_4bit_compute_dtype``); None (default): the dtype the model loads in.
                         Another dtype than the model's needs ``torch.autocast`` around the forward.
    linear_skip_modules  with linear="nf4": more module names (or patterns, as bitsandbytes'
                         ``llm_int8_skip_modules``) to keep dense, on top of the defaults above.
    linear_double_quant  with linear="nf4": bitsandbytes' double quantization of the absmax
                         (``bnb_4bit_use_double_quant``).
    """

    def __init__(
        self,
        experts: str = "nf4",
        linear: str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        linear_skip_modules: list[str] | None = None,
        linear_double_quant: bool = False,
        experts_double_quant: bool = False,
        quant_method: str = QUANT_METHOD,
        **unknown,
    ):
        if unknown:
            raise TypeError(
                f"MoekitQuantConfig: unknown option(s) {sorted(unknown)}; the options are experts, linear, "
                "compute_dtype, linear_skip_modules, linear_double_quant, experts_double_quant"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"MoekitQuantConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if experts not in METHODS:
            raise ValueError(f"MoekitQuantConfig: experts must be one of {METHODS}, got {experts!r}")
        if linear not in LINEAR_METHODS:
            raise ValueError(
                f"MoekitQuantConfig: linear must be one of {LINEAR_METHODS} (None: nn.Linear layers stay dense; "
                f"'nf4': bitsandbytes 4-bit), got {linear!r}"
            )
        if linear is None and linear_skip_modules is not None:
            raise ValueError("MoekitQuantConfig: linear_skip_modules applies only with linear='nf4'")
        if linear_skip_modules is not None and (
            isinstance(linear_skip_modules, str) or not all(isinstance(n, str) for n in linear_skip_modules)
        ):
            raise ValueError(
                f"MoekitQuantConfig: linear_skip_modules must be a list of module names, got {linear_skip_modules!r}"
            )
        for name, flag in (
            ("linear_double_quant", linear_double_quant),
            ("experts_double_quant", experts_double_quant),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"MoekitQuantConfig: {name} must be True or False, got {flag!r}")
        if linear == "nf4" and not _bitsandbytes_installed():
            raise ImportError(
                "MoekitQuantConfig(linear='nf4') quantizes the nn.Linear layers with bitsandbytes, which is not "
                "installed: pip install bitsandbytes (or leave linear=None to quantize the experts only)"
            )
        self.quant_method = QUANT_METHOD
        self.experts = experts
        self.linear = linear
        self.compute_dtype = _dtype_name(compute_dtype)
        self.linear_skip_modules = list(linear_skip_modules) if linear_skip_modules is not None else None
        self.linear_double_quant = linear_double_quant
        self.experts_double_quant = experts_double_quant

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else getattr(torch, self.compute_dtype)


def _is_expert_weight(module: torch.nn.Module, name: str) -> bool:
    return is_experts_module(module) and name in expert_weight_names(module)


def _expert_weight_names(model: torch.nn.Module) -> list[str]:
    """Full names of every expert weight of ``model``."""
    ids = {id(m) for m in experts_modules(model)}
    return [
        f"{prefix}.{leaf}" if prefix else leaf
        for prefix, module in model.named_modules()
        if id(module) in ids
        for leaf in expert_weight_names(module)
    ]


def _router_linears(model: torch.nn.Module) -> list[str]:
    """Names of the nn.Linear layers beside an experts module with at most as many outputs as experts: the routers
    and shared-expert gates (kept dense with linear="nf4")."""
    ids = {id(m) for m in experts_modules(model)}
    names = []
    for prefix, parent in model.named_modules():
        children = dict(parent.named_children())
        experts = [child for child in children.values() if id(child) in ids]
        if not experts:
            continue
        num_experts = getattr(experts[0], expert_weight_names(experts[0])[0]).shape[0]
        for name, child in children.items():
            if type(child) is torch.nn.Linear and child.out_features <= num_experts:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def _normalize_device(device) -> torch.device:
    if device == "disk":
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def _targets(converter, names: list[str]) -> bool:
    """Whether a converter of the model's conversion mapping builds one of ``names``."""
    patterns = converter.target_patterns if isinstance(converter.target_patterns, list) else [converter.target_patterns]
    for pattern in patterns:
        tail = str(pattern).lstrip("^").rstrip("$").lstrip(".")
        if tail and any(name == tail or name.endswith("." + tail) for name in names):
            return True
    return False


class MoekitQuantize(ConversionOps):
    """The quantize op transformers runs on a loaded parameter that ``param_needs_quantization``: an expert weight to
    a frozen ``NF4Tensor`` parameter on its target device; an nn.Linear weight to bitsandbytes (linear="nf4")."""

    def __init__(self, hf_quantizer: MoekitHfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(
        self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None, **kwargs
    ):
        quantizer = self.hf_quantizer
        result, linear = {}, {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, leaf = get_module_from_name(model, name)
            if _is_expert_weight(module, leaf):
                dtype = quantizer.quantization_config.torch_compute_dtype or value.dtype
                quantized = NF4Tensor.quantize(
                    value, dtype, quantizer.target_device(name), quantizer.quantization_config.experts_double_quant
                )
                result[name] = torch.nn.Parameter(quantized, requires_grad=False)
            else:
                linear[name] = value
        if linear:
            if quantizer.bnb is None:
                raise RuntimeError(f"moekit's quantizer was handed {sorted(linear)}, which are not expert weights")
            result.update(
                quantizer.bnb.get_quantize_ops().convert(
                    linear,
                    source_patterns=source_patterns,
                    target_patterns=target_patterns,
                    full_layer_name=full_layer_name,
                    model=model,
                    **kwargs,
                )
            )
        return result


class MoekitDeserialize(ConversionOps):
    """The load op of a checkpoint moekit saved: an expert weight's parts (``serialized_key``) to its frozen
    ``NF4Tensor`` parameter on its target device, standing for the compute dtype (default: the model's)."""

    def __init__(self, hf_quantizer: MoekitHfQuantizer, parts: dict[str, str]):
        self.hf_quantizer = hf_quantizer
        self.parts = parts  # source pattern -> part

    def __deepcopy__(self, memo):
        # The loader deep-copies each converter. The op holds no state of its own, and its quantizer (with the
        # model it keeps while loading) must not be copied.
        return self

    @torch.no_grad()
    def convert(
        self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None, **kwargs
    ):
        module, leaf = get_module_from_name(model, full_layer_name)
        empty = getattr(module, leaf)
        device = self.hf_quantizer.target_device(full_layer_name)
        parts = {}
        for pattern, value in input_dict.items():
            parts[self.parts[pattern]] = (value[0] if isinstance(value, list) else value).to(device)
        shape = empty.shape
        if hasattr(empty, "_local_tensor"):  # sharded as it loads (expert parallelism, FSDP in from_pretrained)
            # The loader cut each part as the weight's placements say: right along the experts (dim 0, the parts'
            # rows) with fp32 scales; double-quantized scales are blocks over the whole weight.
            along_experts = all(p.is_replicate() or getattr(p, "dim", None) == 0 for p in empty.placements)
            if not along_experts or "absmax" not in parts:
                raise NotImplementedError(
                    f"{full_layer_name}: this checkpoint of NF4 experts cannot be loaded sharded as "
                    f"{tuple(empty.placements)}: only whole experts a rank (dim 0) with fp32 scales (not "
                    "double-quantized) can. Load the dense checkpoint with quantization_config=MoekitQuantConfig()"
                )
            shape = empty._local_tensor.shape
        dtype = self.hf_quantizer.quantization_config.torch_compute_dtype or empty.dtype
        weight = NF4Tensor.deserialized(parts, shape, dtype, full_layer_name)
        return {full_layer_name: torch.nn.Parameter(weight, requires_grad=False)}


def _loads_saved_tensors(conversion) -> bool:
    """A converter that loads a quantizer's saved tensors (MoekitDeserialize; bitsandbytes' with linear="nf4")."""
    return isinstance(conversion, WeightConverter) and any(
        getattr(op, "hf_quantizer", None) is not None for op in conversion.operations
    )


class MoekitHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``MoekitQuantConfig`` (see the module docstring for the hooks it uses)."""

    requires_calibration = False
    quantization_config: MoekitQuantConfig

    def __init__(self, quantization_config: MoekitQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # pre_quantized: the checkpoint's config names quant_method "moekit", so it is a moekit save: NF4 experts
        # (loaded by MoekitDeserialize; an expert weight held dense loads dense and is quantized after loading),
        # and with linear="nf4" bitsandbytes linears as bitsandbytes saves them (its quantizer loads them).
        self.device_map: dict | None = None
        self.dtype: torch.dtype | None = None
        self.model = None
        self.bnb = None  # transformers' bitsandbytes 4-bit quantizer, for the nn.Linear layers (linear="nf4")
        self.adopted_bnb = False  # the bnb quantizer is that of a BitsAndBytesConfig load (mark_quantized)
        if quantization_config.linear == "nf4":
            from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
            from transformers.utils.quantization_config import BitsAndBytesConfig

            bnb_config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=quantization_config.torch_compute_dtype,
                bnb_4bit_use_double_quant=quantization_config.linear_double_quant,
            )
            self.bnb = Bnb4BitHfQuantizer(bnb_config, pre_quantized=self.pre_quantized)

    # ------------------------------------------------------------------------------------------ before loading
    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.linear == "nf4" and not _bitsandbytes_installed():
            raise ImportError(
                "MoekitQuantConfig(linear='nf4') quantizes the nn.Linear layers with bitsandbytes, which is not "
                "installed: pip install bitsandbytes (or leave linear=None to quantize the experts only)"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            if "disk" in {str(value) for value in device_map.values()}:
                raise ValueError(
                    "moekit's NF4 experts cannot be offloaded to disk: give a device_map without 'disk' entries"
                )
            self.device_map = device_map  # called again with the expanded map of device_map="auto" and the like
        if self.bnb is not None:
            self.bnb.validate_environment(*args, **kwargs)

    def update_device_map(self, device_map):
        if isinstance(device_map, dict):
            self.device_map = device_map
        return device_map

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        module, leaf = get_module_from_name(model, param_name)
        if _is_expert_weight(module, leaf):
            return NF4_DOUBLE_QUANT_ELEMENT_SIZE if self.quantization_config.experts_double_quant else NF4_ELEMENT_SIZE
        if self.bnb is not None:
            return self.bnb.param_element_size(model, param_name, param)
        return param.element_size()

    def preprocess_model(self, model, dtype=None, **kwargs):
        self.model = model  # for update_weight_conversions on transformers 5.17, which is not handed the model
        if dtype is not None:
            self.dtype = dtype
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        modules = experts_modules(model)
        if not modules:
            raise ValueError(
                f"{type(model).__name__} has no experts module decorated with transformers' "
                "@use_experts_implementation, so MoekitQuantConfig has nothing to quantize"
            )
        for module in modules:
            for name in expert_weight_names(module):
                shape = getattr(module, name).shape
                if len(shape) != 3 or (shape[1] * shape[2]) % BLOCKSIZE:
                    raise ValueError(
                        f"{type(module).__name__}.{name} has shape {tuple(shape)}: NF4 experts need 3-D weights whose "
                        f"experts hold a multiple of {BLOCKSIZE} elements"
                    )
        if self.bnb is not None:
            skip = get_keys_to_not_convert(model)
            skip += [re.escape(name) + "$" for name in _router_linears(model)]
            skip += self.quantization_config.linear_skip_modules or []
            bnb_config = self.bnb.quantization_config
            bnb_config.llm_int8_skip_modules = list(dict.fromkeys(skip))
            if self.quantization_config.compute_dtype is None:  # the dtype the model loads in
                bnb_config.bnb_4bit_compute_dtype = self.dtype if self.dtype is not None else torch.float32
            self.bnb._process_model_before_weight_loading(model, device_map=kwargs.get("device_map"))
        return model

    def update_weight_conversions(self, weight_conversions, model=None):
        """The model's converters that build expert weights merge their per-expert tensors in host memory
        (``force_cpu``); the quantize op then moves them to the device a few experts at a time."""
        model = model if model is not None else self.model
        names = _expert_weight_names(model) if model is not None else []
        updated = []
        for conversion in weight_conversions:
            if isinstance(conversion, WeightConverter) and not conversion.force_cpu and _targets(conversion, names):
                conversion = copy.deepcopy(conversion)
                conversion.force_cpu = True
            updated.append(conversion)
        return updated + self.get_weight_conversions()

    def get_weight_conversions(self):
        """A checkpoint moekit saved: each expert weight's parts (``serialized_key``) load into its NF4Tensor, and
        bitsandbytes' converters load its linears (linear="nf4")."""
        if not self.pre_quantized:
            return []
        conversions = self.bnb.get_weight_conversions() if self.bnb is not None else []
        for leaf in (*UP_PARAMS, *DOWN_PARAMS):
            parts = {rf"{re.escape(serialized_key(leaf, part))}$": part for part in SERIALIZED_PARTS}
            conversions.append(WeightConverter(list(parts), leaf, [MoekitDeserialize(self, parts)]))
        return conversions

    # ------------------------------------------------------------------------------------------ while loading
    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, leaf = get_module_from_name(model, param_name)
        if _is_expert_weight(module, leaf):
            return True
        return self.bnb is not None and self.bnb.param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return MoekitQuantize(self)

    def target_device(self, param_name: str) -> torch.device:
        """Where ``param_name`` goes by the device map from_pretrained was given (cpu without one)."""
        device_map = self.device_map or {"": "cpu"}
        best, device = -1, "cpu"
        for key, value in device_map.items():
            if (key == "" or param_name == key or param_name.startswith(key + ".")) and len(key) > best:
                best, device = len(key), value
        return _normalize_device(device)

    # ------------------------------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        experts = {id(module) for module in experts_modules(model)}
        for prefix, module in model.named_modules():
            if id(module) in experts:
                # weights the checkpoint lacked (initialised dense) or held dense under a moekit config (loaded dense,
                # on the host where force_cpu put them): quantized onto the device map's device (without one, where
                # they are); the rest is NF4 already
                name = f"{prefix}.{expert_weight_names(module)[0]}"
                device = self.target_device(name) if self.device_map else None
                quantize_module(module, config.torch_compute_dtype, config.experts_double_quant, device)
        enable(model)
        if getattr(model, "_weight_conversions", None):  # saving writes the quantized tensors as held: no reverting
            model._weight_conversions = [c for c in model._weight_conversions if not _loads_saved_tensors(c)]
        if self.bnb is not None:
            self.bnb._process_model_after_weight_loading(model, **kwargs)
        self.model = None
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        if self.adopted_bnb:
            warnings.warn(NOT_SERIALIZABLE, stacklevel=2)
        return not self.adopted_bnb

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: the state dict with each NF4 expert weight as its parts
        (``serialized_key``), which a load with this config in config.json reads back (``MoekitDeserialize``)."""
        state = {}
        for name, tensor in model.state_dict().items():
            if hasattr(tensor, "_local_tensor"):
                raise NotImplementedError(
                    f"{name} is sharded (a DTensor): save NF4 experts from an unsharded model, or save the adapters"
                )
            if isinstance(tensor, NF4Tensor):
                state.update((serialized_key(name, part), t) for part, t in tensor.serialized().items())
            else:
                state[name] = tensor
        return state, {}

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    def _dequantize(self, model, dtype=None):
        """The experts' NF4 weights back to dense parameters (and the Linear4bit layers to nn.Linear)."""
        if isinstance(dtype, str):  # transformers' default, config.dtype, is a name once the model has been saved
            dtype = getattr(torch, _dtype_name(dtype))
        for module in experts_modules(model):
            for name in expert_weight_names(module):
                weight = getattr(module, name)
                if isinstance(weight, NF4Tensor):
                    dense = weight.dequantize(dtype or weight.dtype)
                    setattr(module, name, torch.nn.Parameter(dense, requires_grad=True))
        if self.bnb is not None:
            model = self.bnb._dequantize(model, dtype=dtype)
            for attribute in ("is_loaded_in_4bit", "is_4bit_serializable"):
                if hasattr(model, attribute):
                    delattr(model, attribute)
        return model


def mark_quantized(model: torch.nn.Module, dtype: torch.dtype | None, double_quant: bool) -> None:
    """After ``quantize_experts``: the transformers model in ``model`` (itself, or the base of a PEFT model) is
    marked quantized as a ``MoekitQuantConfig`` load marks it (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``), so ``save_pretrained`` writes its NF4 experts (and the config that loads them
    back), ``model.dequantize()`` gives the dense model back and the Trainer asks for adapters. A model loaded with
    bitsandbytes 4-bit linears is marked as ``linear="nf4"`` would load it, its bitsandbytes quantizer kept for the
    linears (``save_pretrained`` refuses it, saying why); a model of another quantizer keeps that quantizer."""
    from transformers import PreTrainedModel
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    target = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    existing = getattr(target, "hf_quantizer", None)
    if target is None or isinstance(existing, MoekitHfQuantizer):
        return
    if isinstance(existing, Bnb4BitHfQuantizer):  # loaded with BitsAndBytesConfig(load_in_4bit=True): linear="nf4"
        bnb_config = existing.quantization_config
        config = MoekitQuantConfig(
            linear="nf4",
            compute_dtype=dtype or bnb_config.bnb_4bit_compute_dtype,
            linear_double_quant=bnb_config.bnb_4bit_use_double_quant,
            experts_double_quant=double_quant,
        )
        quantizer = MoekitHfQuantizer(config)
        quantizer.bnb, quantizer.adopted_bnb = existing, True  # its linears as loaded; dequantize does both
    elif existing is not None:
        return  # another quantizer's model: left as it is
    else:
        quantizer = MoekitHfQuantizer(MoekitQuantConfig(compute_dtype=dtype, experts_double_quant=double_quant))
    target.hf_quantizer = quantizer
    config = quantizer.quantization_config
    target.is_quantized = True
    target.quantization_method = QUANT_METHOD
    target.config.quantization_config = config
    _assign_is_quantized(target)


def _register(mapping: dict, register, name: str, cls) -> None:
    """Register ``cls`` under ``name``; a re-import of this module replaces its own earlier registration."""
    current = mapping.get(name)
    if current is None:
        register(name)(cls)
    elif current is not cls:
        if (current.__module__, current.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"transformers already has a quantization method {name!r}: {current.__module__}.{current.__qualname__}"
            )
        mapping[name] = cls


_register(_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.register_quantization_config, QUANT_METHOD, MoekitQuantConfig)
_register(_auto.AUTO_QUANTIZER_MAPPING, _auto.register_quantizer, QUANT_METHOD, MoekitHfQuantizer)
