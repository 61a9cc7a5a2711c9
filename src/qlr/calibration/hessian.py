"""Accumulating calibration statistics of a linear layer's input: H = E[x xᵀ] (float64) and mean |x|."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Running H = (1/N) Σ_t x_t x_tᵀ (n × n, float64) and mean |x_t| (n,) over N tokens.

    ``add(x)`` takes activations of shape (..., n) in any dtype; sums are kept in float64 on ``device`` and divided
    once in :meth:`finalize`, so the result does not depend on how tokens were batched (up to float64 rounding)."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.sum_xx = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"expected inputs with last dim {self.n}, got {tuple(x.shape)}")
        x = x.reshape(-1, self.n).to(self.sum_xx.device, torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/Inf; run the model in float32 or check the "
                             "checkpoint")
        self.sum_xx.addmm_(x.T, x)
        self.sum_abs += x.abs().sum(0)
        self.count += x.shape[0]

    def finalize(self) -> tuple[Tensor, Tensor]:
        """(H, mean_abs): float64 (n × n) symmetric and float32 (n,). Raises if no token was seen."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        H = self.sum_xx / self.count
        H = (H + H.T) / 2
        return H, (self.sum_abs / self.count).float()
