"""Model facts and loading: decoder blocks and linears found from the module tree (``registry``), expert
splitting (``moe``), offline loading, tiny test models.

``registry`` is imported eagerly (it needs only torch); ``load_model``, ``tiny_llama`` and ``ByteTokenizer``
are resolved on first access so that importing the registry does not import transformers.
"""

from __future__ import annotations

from typing import Any

from qlr.models.registry import (
    ARCH_SPECS,
    DEFAULT_SKIP,
    ArchSpec,
    arch_spec,
    block_linears,
    blocks_path,
    find_blocks,
    get_blocks,
    is_linear,
    iter_linears,
    linear_weight,
    select_layers,
)

__all__ = [
    "ARCH_SPECS",
    "DEFAULT_SKIP",
    "ArchSpec",
    "ByteTokenizer",
    "arch_spec",
    "block_linears",
    "blocks_path",
    "find_blocks",
    "get_blocks",
    "is_linear",
    "iter_linears",
    "linear_weight",
    "load_model",
    "select_layers",
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
