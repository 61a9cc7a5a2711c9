"""What the QPEFT tests share besides the fixture (``conftest.py``): Q's stored codes."""

from __future__ import annotations

import torch

from qlr.nn.qlinear import QLRLinear


def q_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every compressed layer's Q codes and rotation signs, by buffer name."""
    return {f"{n}.{k}": v.clone() for n, mod in model.named_modules() if isinstance(mod, QLRLinear)
            for k, v in mod._buffers.items() if k.startswith("q_") or k.startswith("signs")}
