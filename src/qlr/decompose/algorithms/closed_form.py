"""Closed-form error reconstruction: quantize W once, then fit L R to the error E_q = W − Q under a scaling S.

    lorc        S = I                       (ZeroQuant-V2 LoRC: plain SVD of the quantization error)
    lqer        S = diag(mean |x|)          (LQER; falls back to sqrt(diag H) when mean |x| is not given)
    qera-exact  S = H^{1/2}                 (QERA: the closed-form minimiser of E‖x (Q + LR − W)ᵀ‖² for this Q)
    qera-approx S = diag(sqrt(diag H))      (QERA's diagonal approximation)

L R = SVD_r(E_q S) mapped back by S⁻¹; L and R are stored at ``lr_bits`` (fp16 or group-wise RTN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Decomposition, MethodConfig, register
from ..common import channel_scale, package, q_spec, quantize_q, store_factors
from ..lowrank import Whitener, lowrank_fit


@dataclass(frozen=True)
class ClosedFormConfig(MethodConfig):
    """Q by ``q_quantizer`` ("rtn" as the papers, or "gptq"), then a one-shot rank-r fit of W − Q."""

    rank: int = 64
    q_quantizer: str = "rtn"
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        q_spec(self)
        if self.q_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"q_quantizer must be 'rtn' or 'gptq', got {self.q_quantizer!r}")


def _closed_form(name: str, W: Tensor, H: Tensor, cfg: ClosedFormConfig, wh: Whitener) -> Decomposition:
    q = quantize_q(W, H, cfg, cfg.q_quantizer)
    L, R = lowrank_fit(W.float() - q.dequantize(), wh, cfg.rank)
    L, R, lq, rq = store_factors(L, R, cfg)
    return package(name, cfg, W, H, q, L, R, lq, rq)


@register("lorc", ClosedFormConfig)
def lorc(W: Tensor, H: Tensor, cfg: ClosedFormConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """LoRC: L R = plain rank-r SVD of W − Q (no activation information)."""
    n = W.shape[1]
    return _closed_form("lorc", W, H, cfg, Whitener.diagonal(torch.ones(n, device=W.device)))


@register("lqer", ClosedFormConfig)
def lqer(W: Tensor, H: Tensor, cfg: ClosedFormConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """LQER: S = diag(s), s = mean |x| per input channel (normalised); without ``mean_abs``, s = sqrt(diag H)."""
    return _closed_form("lqer", W, H, cfg, Whitener.diagonal(channel_scale(H, mean_abs).to(W.device)))


@register("qera-exact", ClosedFormConfig)
def qera_exact(W: Tensor, H: Tensor, cfg: ClosedFormConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """QERA-exact: S = H^{1/2} (damped by ``damp``), the activation-aware optimum for the given Q."""
    return _closed_form("qera-exact", W, H, cfg, Whitener.from_hessian(H.to(W.device), cfg.damp))


@register("qera-approx", ClosedFormConfig)
def qera_approx(W: Tensor, H: Tensor, cfg: ClosedFormConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """QERA-approx: S = diag(sqrt(E[x²])) = diag(sqrt(diag H))."""
    s = torch.diagonal(H).float().clamp_min(0).sqrt().to(W.device)
    return _closed_form("qera-approx", W, H, cfg, Whitener.diagonal(s / s.mean().clamp_min(1e-30)))
