"""Per-architecture facts as data: where the decoder blocks are and which linears each block runs, in order.

A new architecture with the Llama layout needs one table entry, not a new script. Everything else in qlr
(calibration, compression, saving) reads module paths from an ``ArchSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

__all__ = [
    "ARCH_SPECS",
    "ArchSpec",
    "arch_spec",
    "find_linears",
    "get_blocks",
    "iter_linears",
    "select_layers",
    "supported_architectures",
]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one causal-LM architecture (dotted, relative to the model or to one block).

    Attributes:
        name: the model class name this spec describes, e.g. ``"LlamaForCausalLM"``.
        blocks: path of the ``nn.ModuleList`` of decoder layers, e.g. ``"model.layers"``.
        embedding: path of the token embedding, e.g. ``"model.embed_tokens"``.
        final_norm: path of the norm applied after the last block, e.g. ``"model.norm"``.
        lm_head: path of the output projection, e.g. ``"lm_head"``.
        rotary: path of the shared rotary-embedding module, or ``None`` if the blocks own theirs.
        linear_groups: the block's linears (paths relative to one block) grouped in execution order; the
            linears of one group read the same input, e.g. ``(("self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj"), ("self_attn.o_proj",), ...)``.
    """

    name: str
    blocks: str
    embedding: str
    final_norm: str
    lm_head: str
    rotary: str | None
    linear_groups: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        """All block-relative linear paths, flattened in execution order."""
        return tuple(name for group in self.linear_groups for name in group)


_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_layout(name: str) -> ArchSpec:
    return ArchSpec(
        name=name,
        blocks="model.layers",
        embedding="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        rotary="model.rotary_emb",
        linear_groups=_LLAMA_GROUPS,
    )


ARCH_SPECS: Mapping[str, ArchSpec] = MappingProxyType(
    {name: _llama_layout(name) for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")}
)
"""Supported architectures, keyed by model class name (read-only)."""


def supported_architectures() -> list[str]:
    """Sorted class names of the supported architectures."""
    return sorted(ARCH_SPECS)


def arch_spec(model: nn.Module | str) -> ArchSpec:
    """The ``ArchSpec`` of a model instance (or of a class name such as ``config.architectures[0]``).

    Subclasses of a supported class resolve through the MRO. Raises ``ValueError`` naming the class and
    listing the supported ones otherwise.
    """
    if isinstance(model, str):
        candidates = [model]
        shown = model
    else:
        candidates = [cls.__name__ for cls in type(model).__mro__]
        shown = type(model).__name__
    for name in candidates:
        if name in ARCH_SPECS:
            return ARCH_SPECS[name]
    raise ValueError(
        f"unsupported architecture {shown!r}; qlr supports: {', '.join(supported_architectures())}"
    )


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of ``model`` (``spec.blocks``), in forward order."""
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError as err:
        raise ValueError(
            f"{type(model).__name__} has no module {spec.blocks!r} ({spec.name} layout)"
        ) from err
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{spec.blocks!r} is a {type(blocks).__name__}, expected nn.ModuleList")
    return blocks


def find_linears(block: nn.Module, spec: ArchSpec, strict: bool = True) -> dict[str, nn.Linear]:
    """The block's linears named by ``spec``, as ``{block-relative path: nn.Linear}`` in execution order.

    A path that does not exist raises ``KeyError``. A module that is not an ``nn.Linear`` (e.g. one already
    replaced by a compressed layer) raises ``TypeError`` when ``strict``, and is skipped otherwise.
    """
    found: dict[str, nn.Linear] = {}
    for name in spec.linears:
        try:
            module = block.get_submodule(name)
        except AttributeError as err:
            raise KeyError(
                f"block {type(block).__name__} has no linear {name!r} ({spec.name} layout)"
            ) from err
        if isinstance(module, nn.Linear):
            found[name] = module
        elif strict:
            raise TypeError(f"{name!r} is a {type(module).__name__}, expected nn.Linear")
    return found


def iter_linears(model: nn.Module, spec: ArchSpec, strict: bool = True) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(model-relative path, nn.Linear)`` for every block linear, block by block in execution order.

    Paths look like ``"model.layers.3.self_attn.q_proj"``; see ``find_linears`` for ``strict``.
    """
    for index, block in enumerate(get_blocks(model, spec)):
        for name, module in find_linears(block, spec, strict=strict).items():
            yield f"{spec.blocks}.{index}.{name}", module


def select_layers(names: Iterable[str], regex: str | None) -> list[str]:
    """The names matching ``regex`` (``re.search``), order kept; ``None`` or ``""`` selects all.

    An invalid pattern raises ``ValueError``. May return an empty list; callers decide whether that is an
    error.
    """
    names = list(names)
    if not regex:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ValueError(f"invalid layer regex {regex!r}: {err}") from err
    return [name for name in names if pattern.search(name)]
