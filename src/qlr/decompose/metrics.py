"""Error measures for W ≈ Ŵ under the activation-aware loss tr(E H Eᵀ), E = W − Ŵ, H = X Xᵀ (n × n)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["activation_aware_error", "weighted_energy", "role_ratio"]


def weighted_energy(A: Tensor, H: Tensor) -> float:
    """tr(A H Aᵀ) = ‖A X‖_F² for A (m × n), H (n × n); computed in float64."""
    A64 = A.to(torch.float64)
    return float(((A64 @ H.to(device=A.device, dtype=torch.float64)) * A64).sum())


def activation_aware_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Relative activation-aware error tr(E H Eᵀ) / tr(W H Wᵀ) with E = W − Ŵ (all m × n; H n × n)."""
    if W.shape != W_hat.shape:
        raise ValueError(f"W {tuple(W.shape)} and W_hat {tuple(W_hat.shape)} differ in shape")
    denom = weighted_energy(W, H)
    if denom <= 0:
        raise ValueError("tr(W H Wᵀ) is zero: W or H is all zeros, the relative error is undefined")
    return weighted_energy(W.to(torch.float64) - W_hat.to(torch.float64), H) / denom


def role_ratio(part: Tensor, W: Tensor, H: Tensor) -> float:
    """‖part · X‖ / ‖W X‖ = sqrt(tr(P H Pᵀ) / tr(W H Wᵀ)): how much of W's output a component carries."""
    return (weighted_energy(part, H) / max(weighted_energy(W, H), 1e-300)) ** 0.5
