"""Where a causal LM keeps its decoder blocks and which linears they run, found from the module tree.

No per-architecture table is needed: the decoder blocks are the ``nn.ModuleList`` that holds the most parameters
among those whose layers all contain linear layers (llm-compressor's
observation); the linears of a block are its ``nn.Linear`` modules and transformers' GPT-2 style ``Conv1D``
(which stores its weight transposed, in × out). Which linears read the same input is discovered at calibration
time with hooks, not declared. ``ARCH_SPECS`` holds overrides only, for a model whose layout defeats the search.

Fused mixture-of-experts weights (transformers' ``*Experts`` modules with 3-D ``gate_up_proj``/``down_proj``)
hold no linear modules; :func:`qlr.models.moe.unfuse_experts` turns them into per-expert linears first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn

__all__ = [
    "ARCH_SPECS",
    "DEFAULT_SKIP",
    "ArchSpec",
    "arch_spec",
    "block_linears",
    "blocks_path",
    "find_blocks",
    "get_blocks",
    "is_linear",
    "iter_linears",
    "linear_weight",
    "select_layers",
]

DEFAULT_SKIP = r"(^|\.)(gate|router|shared_expert_gate)$"
"""Block-relative linears never compressed by default: mixture-of-experts routers (a handful of outputs whose
argmax picks the experts; peers keep them in full precision too)."""


@dataclass(frozen=True)
class ArchSpec:
    """Overrides for one model class (matched by class name through the MRO).

    Attributes:
        name: the model class name, e.g. ``"LlamaForCausalLM"``.
        blocks: dotted path of the ``nn.ModuleList`` of decoder layers (None: found by :func:`find_blocks`).
        skip: regular expression over block-relative linear names that are never compressed
            (default :data:`DEFAULT_SKIP`).
    """

    name: str
    blocks: str | None = None
    skip: str = DEFAULT_SKIP


ARCH_SPECS: Mapping[str, ArchSpec] = MappingProxyType({})
"""Per-class overrides (read-only); every architecture not listed uses the generic search."""


def arch_spec(model: nn.Module | str) -> ArchSpec:
    """The overrides for a model (or class name): the first ``ARCH_SPECS`` entry along the MRO, else defaults."""
    names = [model] if isinstance(model, str) else [cls.__name__ for cls in type(model).__mro__]
    for name in names:
        if name in ARCH_SPECS:
            return ARCH_SPECS[name]
    return ArchSpec(name=names[0])


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (a linear whose weight is stored in × out)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear as (out_features, in_features), whatever its storage (``Conv1D``: transposed)."""
    w = module.weight.detach()
    return w.T if _is_conv1d(module) else w


def _holds_linear(module: nn.Module) -> bool:
    """Whether ``module`` contains a linear, or a layer qlr already compressed (which has ``qlr_meta``)."""
    return any(is_linear(m) or hasattr(m, "qlr_meta") for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the decoder layers of ``model``, in forward order.

    The override's ``blocks`` path when there is one; otherwise, among the ``nn.ModuleList`` s whose children
    all hold linear layers, the one with the most parameters (hybrid stacks with several layer classes
    qualify). Raises ValueError naming the
    model class when there is none."""
    spec = arch_spec(model)
    if spec.blocks is not None:
        try:
            blocks = model.get_submodule(spec.blocks)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {spec.blocks!r} (set in qlr's override "
                             "table)") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{spec.blocks!r} of {type(model).__name__} is a {type(blocks).__name__}, expected "
                             "an nn.ModuleList of decoder layers")
        return spec.blocks, blocks
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not all(_holds_linear(child) for child in mod):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(f"qlr cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                         "repeated layers holding nn.Linear/Conv1D modules (fused expert weights are split by "
                         "qlr.models.moe.unfuse_experts first); add an ArchSpec override naming them")
    return best[1], best[2]


def blocks_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer list, e.g. ``"model.layers"`` or ``"transformer.h"``."""
    return find_blocks(model)[0]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (see :func:`find_blocks`)."""
    return find_blocks(model)[1]


def block_linears(block: nn.Module, skip: str | None = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """The block's linear layers as ``{block-relative path: module}`` in module-definition order, without those
    whose path matches ``skip`` (``re.search``; None skips nothing). Compressed layers are not linears here."""
    pattern = re.compile(skip) if skip else None
    return {name: mod for name, mod in block.named_modules()
            if name and is_linear(mod) and not (pattern is not None and pattern.search(name))}


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(model-relative path, linear)`` for every compressible block linear, block by block.

    Paths look like ``"model.layers.3.self_attn.q_proj"``; the override's ``skip`` pattern applies."""
    path, blocks = find_blocks(model)
    skip = arch_spec(model).skip
    for index, block in enumerate(blocks):
        for name, module in block_linears(block, skip).items():
            yield f"{path}.{index}.{name}", module


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
        raise ValueError(f"the layer pattern {regex!r} is not a valid regular expression: {err}") from None
    return [name for name in names if pattern.search(name)]
