"""The activation-aware low-rank step and its low-precision (LPLR) refinement.

Exact step: for a residual D (m × n) and the damped H = V Λ Vᵀ (n × n), S = H^{1/2},

    argmin_{rank(LR) ≤ r} ‖(D − L R) S‖_F   →   D S = U Σ Pᵀ,  L = U_r Σ_r^{1/2},  R = Σ_r^{1/2} P_rᵀ S⁻¹.

Low-precision step (CALDERA's LPLR, made a descent method): starting from the exact factors, alternate
  R ← least squares given the quantized L, then quantize R with GPTQ/LDLQ under H (R multiplies X directly);
  L ← argmin ‖(D − L R̂) S‖ given the quantized R̂, i.e. L* = D H R̂ᵀ (R̂ H R̂ᵀ)⁻¹, then quantize L with LDLQ under
      the r × r Gram matrix G = R̂ H R̂ᵀ — the exact Hessian of that sub-problem, so its rounding is error-aware;
and keep the pair with the lowest tr((D − L̂R̂) H (D − L̂R̂)ᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..quant.gptq import HessianFactor, damped, gptq_quantize, prepare_hessian
from ..quant.grid import QuantSpec
from ..quant.hadamard import hadamard_transform, is_supported
from ..quant.ldlq_vq import feedback_matrix, ldlq_vector
from .metrics import weighted_energy

__all__ = ["Whitener", "lowrank_fit", "LowRankResult", "quantized_lowrank", "psd_solve"]


@dataclass(frozen=True)
class Whitener:
    """S = H^{1/2} and S⁻¹ = H^{-1/2} of the damped H (n × n, float32), from one float64 eigendecomposition.

    ``H`` is the damped H (float32) used in the objective; eigenvalues are floored at 1e-12·max for stability."""

    S: Tensor
    S_inv: Tensor
    H: Tensor

    @classmethod
    def from_hessian(cls, H: Tensor, damp: float = 0.01) -> Whitener:
        Hd = damped(H, damp)
        evals, evecs = torch.linalg.eigh(Hd)
        evals = evals.clamp_min(float(evals.max()) * 1e-12)
        root = evals.sqrt()
        S = (evecs * root) @ evecs.T
        S_inv = (evecs / root) @ evecs.T
        return cls(S.float(), S_inv.float(), Hd.float())

    @classmethod
    def diagonal(cls, s: Tensor) -> Whitener:
        """A diagonal scaling S = diag(s) (s > 0, length n)."""
        s = s.float().clamp_min(float(s.max()) * 1e-8 + 1e-30)
        return cls(torch.diag(s), torch.diag(1.0 / s), torch.diag(s * s))


def lowrank_fit(D: Tensor, wh: Whitener, rank: int) -> tuple[Tensor, Tensor]:
    """Exact minimiser of ‖(D − L R) S‖_F over rank ``rank``: L (m × r) = U Σ^{1/2}, R (r × n) = Σ^{1/2} Pᵀ S⁻¹."""
    m, n = D.shape
    if rank == 0:
        return D.new_zeros(m, 0), D.new_zeros(0, n)
    DS = D.float() @ wh.S.to(D.device)
    U, sig, Vh = torch.linalg.svd(DS, full_matrices=False)
    root = sig[:rank].sqrt()
    L = U[:, :rank] * root
    R = (root[:, None] * Vh[:rank]) @ wh.S_inv.to(D.device)
    return L, R


def psd_solve(G: Tensor, B: Tensor, ridge: float = 1e-8) -> Tensor:
    """Solve G X = B for a symmetric PSD G (r × r), B (r × k), in float64 with a tiny ridge (rank-deficient G,
    e.g. an all-zero row of a quantized factor, stays solvable on every device). Returns float32 X (r × k)."""
    G64 = G.to(torch.float64)
    lam = ridge * float(torch.diagonal(G64).mean().clamp_min(1e-30))
    G64 = G64 + lam * torch.eye(G64.shape[0], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(G64, B.to(torch.float64)).float()


def _mix_seed(seed: int, rank: int) -> int:
    """The generator seed of the rank mixing: distinct for every (seed, rank), and equal to the rank for seed 0
    (the draw qlr made before the seed reached it, so seed-0 results are unchanged)."""
    return seed * (1 << 20) + rank


@dataclass
class LowRankResult:
    """Quantized (or fp16) factors: L (m × r), R (r × n) dequantized; their codes when quantized; the error
    tr((D − LR) H (D − LR)ᵀ) they reach on the target D."""

    L: Tensor
    R: Tensor
    lq: Any
    rq: Any
    sse: float


def _fp16(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    return L.half().float(), R.half().float()


def quantized_lowrank(D: Tensor, wh: Whitener, rank: int, spec: QuantSpec | None, *, iters: int = 10,
                      hfac: HessianFactor | None = None, damp: float = 0.01, lattice: bool = False,
                      tol: float = 1e-6, seed: int = 0) -> LowRankResult:
    """Rank-``rank`` factors of D (m × n) stored at ``spec`` (None = fp16), minimising ‖(D − L R) S‖_F.

    ``wh`` supplies H (damped) and its square roots; ``hfac`` (GPTQ factor of the same H) is reused when given.
    With ``lattice=True`` L and R are coded with the two-stage E8P lattice (4 bits/weight, block LDLQ under the
    same Hessians) instead of ``spec``'s scalar grid; ``rank`` and n must then be multiples of 8. Before the first
    rounding the rank dimension is mixed by a random-sign Hadamard matrix when r allows it (L R = (L Pᵀ)(P R) for
    orthogonal P), which evens out the factors' row/column magnitudes for a per-matrix lattice scale. The lattice
    scales are searched in the first round and then kept as the same multiples of each factor's RMS.
    Runs up to ``iters`` LPLR rounds, stopping early once a round improves the error by less than ``tol``
    (relative), and returns the best pair found (never worse than the first)."""
    H = wh.H.to(D.device)
    L, R = lowrank_fit(D, wh, rank)
    if rank == 0:
        return LowRankResult(L, R, None, None, weighted_energy(D, H, fast=True))
    if spec is None:
        Lh, Rh = _fp16(L, R)
        return LowRankResult(Lh, Rh, None, None, weighted_energy(D - Lh @ Rh, H, fast=True))
    if lattice:
        if rank % 8 or D.shape[1] % 8:
            raise ValueError(f"lattice-coded L/R need rank and n to be multiples of 8, got rank {rank}, n {D.shape[1]}")

        UR = feedback_matrix(H, damp)  # R's Hessian is H in every round: factorise it once
        rel: dict[str, list[float]] = {}  # per factor: its stage scales over its RMS, searched in the first round

        def lattice(X: Tensor, G: Tensor | None, U: Tensor | None, which: str) -> Any:
            rms = float(X.pow(2).mean().sqrt()) or 1.0
            scale = [f * rms for f in rel[which]] if which in rel else None
            q = ldlq_vector(X, G, stages=2, damp=damp, scale=scale, U=U)
            rel.setdefault(which, [float(s) / rms for s in q.scales])
            return q

        def qR(X: Tensor) -> Any:
            return lattice(X, None, UR, "R")

        def qL(X: Tensor, G: Tensor) -> Any:
            return lattice(X, G, None, "L")

        if is_supported(rank):
            # L R = (L Pᵀ)(P R) with P = Had_r diag(s)/√r orthogonal: spreads the rank-1 terms' magnitudes
            g = torch.Generator().manual_seed(_mix_seed(seed, rank))
            s = (torch.randint(0, 2, (rank,), generator=g) * 2 - 1).to(L)
            R = hadamard_transform(R.T * s).T.contiguous()
            L = hadamard_transform(L * s)
    else:
        hfac = hfac or prepare_hessian(H, damp)

        def qR(X: Tensor) -> Any:
            return gptq_quantize(X, hfac, spec)

        def qL(X: Tensor, G: Tensor) -> Any:
            return gptq_quantize(X, G, spec, damp=damp)
    DH = D.float() @ H
    best: LowRankResult | None = None
    rq = qR(R)
    rounds = max(1, iters)
    for it in range(rounds):
        Rhat = rq.dequantize()
        G = Rhat @ H @ Rhat.T
        Lstar = psd_solve(G, (DH @ Rhat.T).T).T
        lq = qL(Lstar, G)
        Lhat = lq.dequantize()
        sse = weighted_energy(D - Lhat @ Rhat, H, fast=True)
        prev = best.sse if best is not None else None
        if best is None or sse < best.sse:
            best = LowRankResult(Lhat, Rhat, lq, rq, sse)
        if prev is not None and sse >= prev * (1 - tol):
            break  # no (or less than ``tol`` relative) progress: further rounds are not worth their cost
        if it == rounds - 1:
            break  # the last round: a new R would never be paired with an L
        # R given the quantized L: R* = (L̂ᵀL̂)⁻¹ L̂ᵀ D (H-independent for an unconstrained R)
        LtL = Lhat.T @ Lhat
        Rstar = psd_solve(LtL, Lhat.T @ D.float())
        rq = qR(Rstar)
    assert best is not None
    return best
