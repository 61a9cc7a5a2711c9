"""``srr``: Preserve-Then-Quantize (structured residual reconstruction).

With an activation scaling S (diag(mean |x|)-like, or H^{1/2}):
    L1 R1 = top-k activation-aware fit of W                       (preserve W's dominant directions)
    Q     = Quant(W − L1 R1)                                      (quantize the residual)
    L2 R2 = activation-aware rank-(r − k) fit of W − L1R1 − Q     (spend the rest on the quantization error)
    L R   = [L1 L2] [R1; R2]

Choice of k (when ``preserve_k`` is None): minimise over 0 ≤ k ≤ r
    score(k) = tail_k(W S) · (1 − top_{r−k}(N S) / ‖N S‖²),
the energy of W S left beyond its top k singular directions (what the quantizer must carry; its rounding noise
scales with it) times the fraction of a white quantization-noise matrix N (seeded Gaussian, m × n) that a rank
r − k fit under S cannot recover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Decomposition, MethodConfig, register
from ..common import channel_scale, package, q_spec, quantize_q, store_factors
from ..lowrank import Whitener, lowrank_fit


@dataclass(frozen=True)
class SRRConfig(MethodConfig):
    """SRR options: ``preserve_k`` fixes k (None = theory-guided choice), ``scaling`` is "diag" (mean |x|, or
    sqrt(diag H) without it) or "full" (H^{1/2}); ``q_quantizer`` "rtn" or "gptq"."""

    rank: int = 64
    preserve_k: int | None = None
    scaling: str = "diag"
    q_quantizer: str = "rtn"
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        q_spec(self)
        if self.scaling not in ("diag", "full"):
            raise ValueError(f"scaling must be 'diag' or 'full', got {self.scaling!r}")
        if self.q_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"q_quantizer must be 'rtn' or 'gptq', got {self.q_quantizer!r}")
        if self.preserve_k is not None and not (0 <= self.preserve_k <= self.rank):
            raise ValueError(f"preserve_k must be in [0, rank={self.rank}], got {self.preserve_k}")


def choose_k(W: Tensor, wh: Whitener, rank: int, seed: int = 0) -> tuple[int, list[float]]:
    """The k minimising score(k) (module docstring). Returns (k, scores for k = 0..rank)."""
    sig2 = torch.linalg.svdvals(W.float() @ wh.S).double() ** 2
    tail = sig2.sum() - torch.cat([sig2.new_zeros(1), sig2.cumsum(0)])          # tail[k] = Σ_{i>k} σ_i²
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = torch.randn(W.shape, generator=g).to(W.device)
    nu2 = torch.linalg.svdvals(N @ wh.S).double() ** 2
    rec = torch.cat([nu2.new_zeros(1), nu2.cumsum(0)]) / nu2.sum()              # rec[j] = top-j fraction
    scores = [float(tail[k] * (1 - rec[rank - k])) for k in range(rank + 1)]
    return int(min(range(rank + 1), key=scores.__getitem__)), scores


@register("srr", SRRConfig)
def srr(W: Tensor, H: Tensor, cfg: SRRConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Preserve the top-k scaled directions, quantize the rest, reconstruct its error with rank r − k."""
    W = W.float()
    if cfg.scaling == "full":
        wh = Whitener.from_hessian(H.to(W.device), cfg.damp)
    else:
        wh = Whitener.diagonal(channel_scale(H, mean_abs).to(W.device))
    scores: list[float] = []
    k = cfg.preserve_k
    if k is None:
        k, scores = choose_k(W, wh, cfg.rank, cfg.seed)
    L1, R1 = lowrank_fit(W, wh, k)
    P = L1 @ R1
    q = quantize_q(W - P, H, cfg, cfg.q_quantizer)
    L2, R2 = lowrank_fit(W - P - q.dequantize(), wh, cfg.rank - k)
    L, R, lq, rq = store_factors(torch.cat([L1, L2], 1), torch.cat([R1, R2], 0), cfg)
    return package("srr", cfg, W, H, q, L, R, lq, rq, diagnostics={"preserve_k": k, "k_scores": scores})
