"""``srr``: Preserve-Then-Quantize (SRR, structured residual reconstruction), as the authors' code runs it.

With an activation scaling S (n × n): "diag" S = diag(√diag H) (QERA-approx's scaling) or "full" S = H^{1/2}
(QERA-exact's, of the damped H); W (m × n) and the rank r:

    σ_1 ≥ σ_2 ≥ …  = singular values of W S
    k    = ⌊r · Σ_{i≤r} σ_i² / Σ_i σ_i²⌋                  (the energy rule; ``k_rule="energy"``, the default)
    P    = top-k S-scaled fit of W  (S⁻¹-mapped truncated SVD of W S)   (preserve the dominant directions)
    Q    = Quant(W − P)                                    (quantize the rest)
    L R  = rank-r fit of W − Q under S                     (``reconstruct="refit"``: QERA's step on W − Q, so
                                                            the r directions cover P and the rounding error)

This is the published configuration (authors' defaults: 3-bit MXINT blocks of 32, rank 64, ``scaling_mode:
diag``, one iteration); qlr's Q is its own integer grid (``bits``, ``group_size``; default 3-bit, groups of 32).

Options kept from qlr's earlier SRR:
  ``k_rule="theory"`` picks k minimising score(k) = tail_k(W S) · (1 − top_{r−k}(N S) / ‖N S‖²): the energy of
  W S beyond its top k (what Q must carry) times the fraction of a white noise matrix N (m × n, drawn with
  ``seed``) that rank r − k cannot recover under S.
  ``reconstruct="split"`` keeps P as it is and spends the other r − k directions on W − P − Q:
  L R = [L1 L2][R1; R2].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Decomposition, MethodConfig, register
from ..common import package, quantize_q, store_factors
from ..lowrank import Whitener, lowrank_fit

__all__ = ["SRRConfig", "energy_k", "theory_k", "srr"]


@dataclass(frozen=True)
class SRRConfig(MethodConfig):
    """SRR options (module docstring).

    Attributes:
        preserve_k: fix k (0 ≤ k ≤ rank); None = choose it by ``k_rule``.
        k_rule: "energy" (the authors' ⌊r · energy fraction of the top r⌋) or "theory" (qlr's noise criterion).
        scaling: "diag" (√diag H, as QERA-approx) or "full" (H^{1/2} of the damped H, as QERA-exact).
        reconstruct: "refit" (rank-r fit of W − Q, the authors') or "split" (keep P, rank r − k on the rest).
        q_quantizer: "rtn" (the authors') or "gptq".
    """

    bits: int = 3
    rank: int = 64
    group_size: int = 32
    preserve_k: int | None = None
    k_rule: str = "energy"
    scaling: str = "diag"
    reconstruct: str = "refit"
    q_quantizer: str = "rtn"
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.quant_spec()
        if self.scaling not in ("diag", "full"):
            raise ValueError(f"scaling must be 'diag' or 'full', got {self.scaling!r}")
        if self.k_rule not in ("energy", "theory"):
            raise ValueError(f"k_rule must be 'energy' or 'theory', got {self.k_rule!r}")
        if self.reconstruct not in ("refit", "split"):
            raise ValueError(f"reconstruct must be 'refit' or 'split', got {self.reconstruct!r}")
        if self.q_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"q_quantizer must be 'rtn' or 'gptq', got {self.q_quantizer!r}")
        if self.preserve_k is not None and not (0 <= self.preserve_k <= self.rank):
            raise ValueError(f"preserve_k must be in [0, rank={self.rank}], got {self.preserve_k}")


def _scaled_svdvals2(W: Tensor, wh: Whitener) -> Tensor:
    """σ_i² of W S (float64, descending)."""
    return torch.linalg.svdvals(W.double() @ wh.S.to(W.device).double()) ** 2


def energy_k(W: Tensor, wh: Whitener, rank: int) -> tuple[int, float]:
    """The authors' rule: k = ⌊r · Σ_{i≤r} σ_i² / Σ_i σ_i²⌋ (σ of W S, W m × n), capped at r; the floor allows
    1e-9 of rounding, so that a spectrum with all its energy in the top r gives k = r. Returns (k, the fraction)."""
    sig2 = _scaled_svdvals2(W, wh)
    total = float(sig2.sum())
    frac = float(sig2[:rank].sum()) / total if total > 0 else 0.0
    return min(rank, math.floor(rank * frac + 1e-9)), frac


def theory_k(W: Tensor, wh: Whitener, rank: int, seed: int = 0) -> tuple[int, list[float]]:
    """qlr's rule: the k minimising score(k) (module docstring). Returns (k, scores for k = 0..rank)."""
    sig2 = _scaled_svdvals2(W, wh)
    tail = sig2.sum() - torch.cat([sig2.new_zeros(1), sig2.cumsum(0)])          # tail[k] = Σ_{i>k} σ_i²
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = torch.randn(W.shape, generator=g).to(W.device)
    nu2 = torch.linalg.svdvals(N @ wh.S.to(W.device)).double() ** 2
    rec = torch.cat([nu2.new_zeros(1), nu2.cumsum(0)]) / nu2.sum()              # rec[j] = top-j fraction
    scores = [float(tail[k] * (1 - rec[rank - k])) for k in range(rank + 1)]
    return int(min(range(rank + 1), key=scores.__getitem__)), scores


def scaling(H: Tensor, cfg: SRRConfig, device: torch.device) -> Whitener:
    """S of ``cfg.scaling``: diag(√diag H) (normalised to mean 1; a common factor changes no SVD) or H^{1/2}."""
    if cfg.scaling == "full":
        return Whitener.from_hessian(H.to(device), cfg.damp)
    s = torch.diagonal(H).float().clamp_min(0).sqrt().to(device)
    return Whitener.diagonal(s / s.mean().clamp_min(1e-30))


@register("srr", SRRConfig)
def srr(W: Tensor, H: Tensor, cfg: SRRConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Preserve k scaled directions of W (m × n), quantize the rest, fit rank r under S (module docstring).
    ``diagnostics``: ``preserve_k`` (k), ``energy_frac`` (energy rule) or ``k_scores`` (theory rule)."""
    W = W.float()
    wh = scaling(H, cfg, W.device)
    diag: dict = {}
    k = cfg.preserve_k
    if k is None and cfg.k_rule == "energy":
        k, diag["energy_frac"] = energy_k(W, wh, cfg.rank)
    elif k is None:
        k, diag["k_scores"] = theory_k(W, wh, cfg.rank, cfg.seed)
    diag["preserve_k"] = k
    L1, R1 = lowrank_fit(W, wh, k)
    q = quantize_q(W - L1 @ R1, H, cfg, cfg.q_quantizer)
    Qd = q.dequantize()
    if cfg.reconstruct == "refit":
        L, R = lowrank_fit(W - Qd, wh, cfg.rank)
    else:
        L2, R2 = lowrank_fit(W - L1 @ R1 - Qd, wh, cfg.rank - k)
        L, R = torch.cat([L1, L2], 1), torch.cat([R1, R2], 0)
    L, R, lq, rq = store_factors(L, R, cfg)
    return package("srr", cfg, W, H, q, L, R, lq, rq, diagnostics=diag)
