"""transformers plug-in: ``AutoModelForCausalLM.from_pretrained(qlr_checkpoint_dir)`` gives the compressed model.

:func:`qlr.save` writes a Hugging Face ``config.json`` next to ``model.safetensors``: the model's config plus ::

    "quantization_config": {
        "quant_method": "qlr",
        "format_version": 1,              # of this block; newer ones are refused with "upgrade qlr"
        "qlr_version": "0.1.0",           # the qlr that wrote it
        "layers": {"model.layers.0.self_attn.q_proj": {<QLRLinear.qlr_meta()>}, ...},
        "unfused_experts": []             # fused MoE expert modules that qlr.models.moe.unfuse_experts split
    }

With qlr registered (``import qlr`` does it, lazily: see :mod:`qlr.integrations`), transformers builds the model on
the meta device, :class:`QLRHfQuantizer` unfuses the listed experts and puts an empty
:class:`~qlr.nn.QLRLinear` (from its metadata) at every listed path (an ``nn.Linear`` or GPT-2 ``Conv1D`` there),
and transformers fills the buffers from ``model.safetensors`` in their stored dtypes (a ``dtype=`` argument casts
the other float tensors only). Tied weights, stored once, are tied again by transformers; non-persistent buffers
that qlr stores (rotary ``inv_freq``) are not reported as unexpected and are set to their stored values, so the
model equals :func:`qlr.load`'s. ``save_pretrained`` writes the buffers and this config again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qlr.models.surgery import replace_linear
from qlr.nn.qlinear import QLRLinear

from .._version import __version__

__all__ = ["QLRConfig", "QLRHfQuantizer", "register", "QUANT_METHOD", "FORMAT_VERSION"]

QUANT_METHOD = "qlr"
FORMAT_VERSION = 1
_KEYS = ("quant_method", "format_version", "qlr_version", "layers", "unfused_experts")
_FIX = "re-save the model with qlr.save (or restore the checkpoint's config.json)"


def _malformed(msg: str) -> ValueError:
    return ValueError(f"config.json quantization_config (quant_method 'qlr') is malformed: {msg}; {_FIX}")


class QLRConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qlr checkpoint (see the module docstring); checked on construction.

    Args:
        layers: {module path: ``QLRLinear.qlr_meta()``}, at least one layer.
        unfused_experts: module paths of fused MoE experts to unfuse before the layers are swapped in.
        format_version, qlr_version, quant_method: as written by :func:`qlr.save`.

    Raises:
        ValueError: naming the bad key or layer, for unknown keys, a wrong ``quant_method``, a newer
            ``format_version`` or layer metadata that :meth:`QLRLinear.from_meta` cannot build.
    """

    def __init__(self, layers: Mapping[str, Mapping[str, Any]] | None = None,
                 unfused_experts: list[str] | None = None, format_version: int = FORMAT_VERSION,
                 qlr_version: str | None = None, quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        if kwargs:
            raise _malformed(f"unknown keys {sorted(kwargs)} (known: {list(_KEYS)})")
        self.quant_method = quant_method
        self.format_version = format_version
        self.qlr_version = __version__ if qlr_version is None else qlr_version
        self.layers = {} if layers is None else layers
        self.unfused_experts = [] if unfused_experts is None else unfused_experts
        self.post_init()

    def __repr__(self) -> str:
        return (f"QLRConfig(format_version={self.format_version}, qlr_version={self.qlr_version!r}, "
                f"layers=<{len(self.layers)} QLRLinear>, unfused_experts={self.unfused_experts})")

    def post_init(self) -> None:
        """Check every field (called by ``__init__``)."""
        if self.quant_method != QUANT_METHOD:
            raise _malformed(f"quant_method is {self.quant_method!r}, expected {QUANT_METHOD!r}")
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise _malformed(f"format_version must be an integer, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"config.json quantization_config has qlr format version {self.format_version}, newer "
                             f"than this qlr ({__version__}) reads ({FORMAT_VERSION}); upgrade qlr")
        if not isinstance(self.unfused_experts, list) or not all(isinstance(p, str) for p in self.unfused_experts):
            raise _malformed(f"unfused_experts must be a list of module paths, got {self.unfused_experts!r}")
        if not isinstance(self.layers, dict) or not self.layers:
            raise _malformed(f"layers must be a non-empty {{module path: QLRLinear metadata}} mapping, got "
                             f"{type(self.layers).__name__}")
        for name, meta in self.layers.items():
            if not isinstance(meta, dict):
                raise _malformed(f"layer {name!r}: metadata must be a mapping, got {type(meta).__name__}")
            try:
                QLRLinear.from_meta(meta, device="meta")
            except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as err:
                raise _malformed(f"layer {name!r}: {type(err).__name__}: {err}") from None


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or transformers ``Conv1D`` (weight stored in × out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}" if path else name: buf for path, mod in model.named_modules()
            for name, buf in mod._buffers.items() if buf is not None and name in mod._non_persistent_buffers_set}


def _swap_layers(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    for name, meta in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise _malformed(f"layer {name!r} is not a module of {type(model).__name__}") from None
        new = QLRLinear.from_meta(meta, device="meta")
        shape = _in_out(old)
        if shape is None:
            raise _malformed(f"layer {name!r} is a {type(old).__name__}, not an nn.Linear or Conv1D")
        if shape != (new.in_features, new.out_features):
            raise _malformed(f"layer {name!r} is {shape[0]} → {shape[1]} in the model but {new.in_features} → "
                             f"{new.out_features} in its metadata")
        replace_linear(model, name, new)


class QLRHfQuantizer(HfQuantizer):
    """Loads pre-compressed qlr checkpoints (it cannot compress on the fly: use ``qlr.compress``)."""

    requires_calibration = True  # transformers refuses QLRConfig for a checkpoint that is not compressed
    quantization_config: QLRConfig

    def __init__(self, quantization_config: QLRConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] = []
        self._qlr_prefixes: tuple[str, ...] = ()

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if cfg.unfused_experts:
            from qlr.models.moe import unfuse_experts

            unfuse_experts(model, cfg.unfused_experts)
        _swap_layers(model, cfg.layers)
        for name in cfg.layers:  # the compressed layers and their parents load from the checkpoint: an
            parent = name.rpartition(".")[0]  # architecture's weight init (e.g. GPT-2's scaled c_proj) must not
            for path in (name, parent):  # touch them (a QLRLinear has no .weight)
                model.get_submodule(path)._is_hf_initialized = True
        self._qlr_prefixes = tuple(name + "." for name in cfg.layers)
        self._checkpoint_files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if self._checkpoint_files:  # a missing code tensor would otherwise load as uninitialised memory
            stored: set[str] = set()
            for path in self._checkpoint_files:
                with safe_open(path, "pt") as f:
                    stored.update(f.keys())
            absent = [f"{name}.{b}" for name in cfg.layers for b in model.get_submodule(name)._buffers
                      if f"{name}.{b}" not in stored]
            if absent:
                raise ValueError(f"the checkpoint's weights lack {len(absent)} QLRLinear tensors listed in its "
                                 f"config.json, e.g. {absent[:3]}; {_FIX}")
        # qlr.save also stores non-persistent buffers (rotary inv_freq); they are not in the state dict, so tell
        # transformers not to report them as unexpected, and set them after loading
        extra = {f"^{re.escape(n)}$" for n in _non_persistent_buffers(model)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | extra
        return model

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """QLRLinear buffers load in their stored dtypes (their codecs depend on it); others as transformers
        decides (e.g. the ``dtype=`` argument)."""
        targets = getattr(converter, "target_patterns", None) or ()
        if any(t.startswith(self._qlr_prefixes) for t in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        buffers = _non_persistent_buffers(model)
        for path in self._checkpoint_files:
            with safe_open(path, "pt") as f:
                for name in buffers.keys() & set(f.keys()):
                    owner_path, _, attr = name.rpartition(".")
                    owner = model.get_submodule(owner_path) if owner_path else model
                    owner.register_buffer(attr, f.get_tensor(name).to(buffers[name].device), persistent=False)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register :class:`QLRConfig` and :class:`QLRHfQuantizer` under ``quant_method="qlr"`` (idempotent)."""
    for mapping, cls, reg in ((AUTO_QUANTIZATION_CONFIG_MAPPING, QLRConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, QLRHfQuantizer, register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and current.__module__ == __name__:  # this module re-imported
            del mapping[QUANT_METHOD]
        reg(QUANT_METHOD)(cls)


register()
