"""Model facts and loading: architecture specs (``registry``), offline loading, tiny test models.

``registry`` is imported eagerly (it needs only torch); ``load_model``, ``tiny_llama`` and ``ByteTokenizer``
are resolved on first access so that importing the registry does not import transformers.
"""

from __future__ import annotations

from typing import Any

from qlr.models.registry import (
    ARCH_SPECS,
    ArchSpec,
    arch_spec,
    find_linears,
    get_blocks,
    iter_linears,
    select_layers,
    supported_architectures,
)

__all__ = [
    "ARCH_SPECS",
    "ArchSpec",
    "ByteTokenizer",
    "arch_spec",
    "find_linears",
    "get_blocks",
    "iter_linears",
    "load_model",
    "select_layers",
    "supported_architectures",
    "tiny_llama",
]

_LAZY = {
    "load_model": "qlr.models.loading",
    "tiny_llama": "qlr.models.tiny",
    "ByteTokenizer": "qlr.models.tiny",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
