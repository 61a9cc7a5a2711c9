"""Random stored factors shared by the kernel tests."""

from __future__ import annotations

import torch

from qlr.quant.grid import QuantizedTensor, QuantSpec


def random_grid(m: int, n: int, spec: QuantSpec, zero: str = "int", seed: int = 0) -> QuantizedTensor:
    """Random codes/scales/zeros on ``spec``'s grid; ``zero="frac"`` gives non-integer zeros (stored as fp16)."""
    g = torch.Generator().manual_seed(seed)
    groups = spec.groups(n)
    codes = torch.randint(0, 2**spec.bits, (m, n), generator=g).to(torch.uint8)
    scale = torch.rand(m, groups, generator=g) + 0.25
    if spec.scale_bits == 8:
        scale = torch.exp2(torch.randint(-6, 2, (m, groups), generator=g).float())
    elif spec.scale_bits == 16:
        scale = scale.half().float()
    if spec.fmt == "nf" or spec.symmetric:
        z = torch.full((m, groups), float((spec.maxq + 1) // 2))
    elif zero == "frac":
        z = (torch.rand(m, groups, generator=g) * spec.maxq).half().float()
    else:
        z = torch.randint(0, 2**spec.bits, (m, groups), generator=g).float()
    return QuantizedTensor(codes, scale, z, spec)
