"""PEFT LoRA adapters on qlr models: train, load and merge standard PEFT adapters on frozen Q + L R layers.

A :class:`~qlr.nn.QLRLinear` is not an ``nn.Linear``, so PEFT needs to be told how to wrap it. This module gives
PEFT a LoRA layer for it (:func:`lora_layer_class`, registered through ``LoraConfig._register_custom_module``):

    y = QLRLinear(x) + s · B (A x)               (A: r_a × n, B: m × r_a, s = lora_alpha / r_a, or / √r_a with rslora)

and the entry points users of PEFT expect:

* :func:`get_peft_model` — ``peft.get_peft_model`` on a qlr model (e.g. QLoRA-style training of a new adapter on
  top of the compressed model, with PEFT's own trainer or loop);
* :func:`load_adapter` — ``PeftModel.from_pretrained`` of an adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) onto a qlr model, e.g. one trained on the FP model or exported by ``qlr export
  --format peft``;
* merging (``merge_and_unload()``, :func:`merge_into_factors`): the adapter is folded into the layer's own low-rank
  term, L' = [L, s B], R' = [R; A] (mapped into the stored domain when the layer is stored rotated), so the merged
  model is a plain qlr model of rank r + r_a whose factors are stored in fp16 (the extra bits are counted by
  ``bits_per_weight``). Q's codes are untouched. Unmerging is not supported (the fold is not recorded).

``peft`` is imported lazily: it is an optional dependency (``pip install peft``).
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import ops
from ..nn.qlinear import QLRLinear

__all__ = ["get_peft_model", "load_adapter", "lora_layer_class", "merge_into_factors", "register_qlr_layers"]


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # an optional dependency
        raise ImportError("PEFT adapters on qlr models need the peft package: pip install peft") from err
    return peft


@torch.no_grad()
def merge_into_factors(layer: QLRLinear, A: Tensor, B: Tensor, scale: float = 1.0) -> None:
    """Fold the low-rank term ``scale · B A`` (B: m × k, A: k × n, in the layer's original domain) into ``layer``'s
    own factors, in place: L' = [L, scale · B], R' = [R; A], stored as fp16 (rank r → r + k). A layer stored rotated
    gets A and B mapped into its stored domain (Aₛ = transform_in(A) row-wise, Bₛᵀ = transform_out(Bᵀ)), so its
    forward afterwards equals the old forward plus ``scale · x Aᵀ Bᵀ`` up to fp16 rounding of the factors."""
    m, n = layer.out_features, layer.in_features
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n or B.shape[0] != m or A.shape[0] != B.shape[1]:
        raise ValueError(f"a rank-k term for a {m}×{n} layer needs A (k × {n}) and B ({m} × k), got A "
                         f"{tuple(A.shape)} and B {tuple(B.shape)}")
    device = next(iter(layer._buffers.values())).device
    A, B = A.detach().float().to(device), (B.detach().float() * scale).to(device)
    if layer.meta["rotation"] is not None:
        s_out, s_in = layer._signs()
        A = ops.hadamard(A.contiguous(), s_in, None, False)
        B = ops.hadamard(B.T.contiguous(), s_out, None, False).T
    if layer.rank > 0:
        L, R = (t.detach().float() for t in layer.train_factors())
        L, R = torch.cat([L, B], 1), torch.cat([R, A], 0)
    else:
        L, R = B, A
    layer.rank = layer.meta["rank"] = L.shape[1]
    layer.l_train, layer.r_train = nn.Parameter(L.contiguous()), nn.Parameter(R.contiguous())
    layer.store_factors("fp16")


@cache
def lora_layer_class() -> type[nn.Module]:
    """PEFT's LoRA layer for a :class:`~qlr.nn.QLRLinear` base (built on first use, when peft is imported)."""
    peft = _peft()
    from peft.tuners.lora.layer import LoraLayer

    class QLRLoraLinear(nn.Module, LoraLayer):
        """y = base(x) + Σ_active s · B(A(dropout(x))) over a frozen :class:`~qlr.nn.QLRLinear` ``base``."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            super().__init__()
            with warnings.catch_warnings():  # PEFT warns that it does not know the type (it reads in/out_features)
                warnings.simplefilter("ignore", UserWarning)
                LoraLayer.__init__(self, base_layer)
            if config.use_dora or getattr(config, "velora_config", None) is not None:
                raise ValueError("qlr's PEFT layer supports plain LoRA (no DoRA/VeLoRA): set use_dora=False")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
            # PEFT then places the adapter on the device of the base layer's ``qweight``/``W_q``/``weight`` or
            # first parameter; a QLRLinear holds buffers only, so point it at one until the first forward.
            base = self.get_base_layer()
            base.__dict__.setdefault("W_q", next(iter(base.buffers())))

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            self.get_base_layer().__dict__.pop("W_q", None)
            result = self.base_layer(x)
            if self.disable_adapters or self.merged:
                return result
            dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                A, B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, A.weight.dtype)
                result = result + B(A(self.lora_dropout[name](xa))) * self.scaling[name]
            return result.to(dtype)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Fold the active adapters into the base layer's factors (:func:`merge_into_factors`)."""
            for name in adapter_names or list(self.active_adapters):
                if name not in self.lora_A:
                    continue
                A, B = self.lora_A[name].weight, self.lora_B[name].weight
                if safe_merge and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                    raise ValueError(f"adapter {name!r} has non-finite weights: not merged")
                merge_into_factors(self.get_base_layer(), A, B, float(self.scaling[name]))
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise NotImplementedError("an adapter folded into a qlr layer's factors cannot be unmerged: reload it")

        def get_delta_weight(self, adapter: str) -> Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    del peft
    return QLRLoraLinear


def register_qlr_layers(config: Any) -> Any:
    """Register qlr's LoRA layer for :class:`~qlr.nn.QLRLinear` targets in a PEFT ``LoraConfig``; returns it."""
    config._register_custom_module({QLRLinear: lora_layer_class()})
    return config


def get_peft_model(model: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model(model, config)`` for a model with :class:`~qlr.nn.QLRLinear` layers (which keep their
    codes and factors frozen; only the new adapter trains)."""
    peft = _peft()
    return peft.get_peft_model(model, register_qlr_layers(config), **kwargs)


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained(model, path)`` for a model with :class:`~qlr.nn.QLRLinear` layers.

    Raises:
        FileNotFoundError: ``path`` has no ``adapter_config.json``.
        ValueError: the adapter is not a LoRA adapter, or its shapes do not fit the model's layers (PEFT's message
            names the layer).
    """
    peft = _peft()
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    config = peft.PeftConfig.from_pretrained(str(path))
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{path}: qlr models take LoRA adapters, this one is {type(config).__name__}")
    return peft.PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable,
                                          config=register_qlr_layers(config), **kwargs)

