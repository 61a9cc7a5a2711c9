"""Plug-ins that let other libraries read qlr checkpoints.

transformers: :mod:`qlr.integrations.transformers` registers ``quant_method="qlr"`` with transformers' quantizer
plug-in API, so ``AutoModelForCausalLM.from_pretrained(checkpoint_dir)`` rebuilds the :class:`~qlr.nn.QLRLinear`
layers. Importing that module pulls in ``transformers.quantizers`` (about two seconds), so ``import qlr`` does not
import it: :func:`install_transformers_hook` (run by ``import qlr``) registers qlr right away when transformers'
quantizer registry is already loaded, and otherwise the moment transformers loads it (its ``modeling_utils`` does,
before any ``from_pretrained``).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["install_transformers_hook"]

_REGISTRY = "transformers.quantizers.auto"


def _register_transformers() -> None:
    try:
        from . import transformers as _tf

        _tf.register()
    except Exception as err:  # never break the user's transformers import; from_pretrained would then warn
        warnings.warn(f"qlr could not register its transformers quantizer ({type(err).__name__}: {err}); "
                      "AutoModelForCausalLM.from_pretrained will not read qlr checkpoints", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs transformers' own loader for the quantizer registry, then registers qlr in it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_transformers()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the wrapped loader
        return getattr(self._loader, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` once, through the other finders, and wraps its loader."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != _REGISTRY:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install_transformers_hook() -> None:
    """Register qlr with transformers now if its quantizer registry is loaded, else when it gets loaded."""
    if _REGISTRY in sys.modules:
        _register_transformers()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
