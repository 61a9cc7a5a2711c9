"""Accumulating calibration statistics of a linear layer's input: H = E[x xᵀ] (float64) and mean |x|."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Running H = (1/N) Σ_t x_t x_tᵀ (n × n, float64) and mean |x_t| (n,) over N tokens.

    ``add(x)`` takes activations of shape (..., n) in any dtype. Each call's Gram matrix xᵀx is formed with a float32
    GEMM (over at most a few thousand tokens, where float32 is accurate to ~1e-6 relative) and the running sums are
    kept in float64 on ``device`` and divided once in :meth:`finalize`, so long calibration runs do not lose
    precision and the result does not depend on how tokens were batched beyond float32 rounding of each batch.
    (A float64 GEMM would cost ~4× as much on CPUs for no measurable change in the decompositions.)"""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.sum_xx = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"expected inputs with last dim {self.n}, got {tuple(x.shape)}")
        x = x.reshape(-1, self.n).to(self.sum_xx.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/Inf; run the model in float32 or check the "
                             "checkpoint")
        for i in range(0, x.shape[0], 4096):
            xi = x[i:i + 4096]
            self.sum_xx += (xi.T @ xi).to(torch.float64)
            self.sum_abs += xi.abs().sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def finalize(self) -> tuple[Tensor, Tensor]:
        """(H, mean_abs): float64 (n × n) symmetric and float32 (n,). Raises if no token was seen."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        H = self.sum_xx / self.count
        H = (H + H.T) / 2
        return H, (self.sum_abs / self.count).float()
