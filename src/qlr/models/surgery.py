"""Model surgery: put a module at a dotted path of a model (a compressed linear in place of an ``nn.Linear``)."""

from __future__ import annotations

from torch import nn

__all__ = ["replace_linear"]


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` (e.g. ``"model.layers.0.self_attn.q_proj"``); returns the old
    submodule. Raises AttributeError naming the path when it does not exist."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, attr) or not isinstance(getattr(parent, attr), nn.Module):
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}")
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old
