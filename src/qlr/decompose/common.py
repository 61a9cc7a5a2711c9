"""Pieces shared by the methods: grid specs from a config, the Q step, fp16/RTN storage of factors, packaging."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..quant.gptq import HessianFactor, damped, gptq_quantize
from ..quant.grid import QuantizedTensor, QuantSpec, quantize_rtn
from ..quant.ldlq_vq import ldlq_vector
from .base import Decomposition, MethodConfig, Quantized
from .metrics import activation_aware_error
from .refine import refine_lattice

__all__ = ["q_spec", "lr_spec", "quantize_q", "store_factors", "package", "channel_scale"]


def q_spec(cfg: MethodConfig, clip_search: bool | None = None) -> QuantSpec:
    """The grid of Q from a config: :meth:`MethodConfig.quant_spec` (validates bits/group size)."""
    return cfg.quant_spec(clip_search)


def lr_spec(cfg: MethodConfig) -> QuantSpec | None:
    """The grid of L and R, or None for fp16 factors: :meth:`MethodConfig.lr_quant_spec`."""
    return cfg.lr_quant_spec()


def quantize_q(W: Tensor, H: Tensor | HessianFactor, cfg: MethodConfig, kind: str) -> Quantized:
    """The Q step: ``kind`` = "rtn" (round to nearest), "gptq" (LDLQ feedback under H, scalar grid) or "e8p"
    (block LDLQ on QuIP#'s E8P lattice, 2 bits/weight, followed by ``cfg.q_tune_iters`` descent passes of
    :func:`~qlr.decompose.refine.refine_lattice` under the same damped H; ``H`` must then be the n × n matrix
    itself)."""
    if kind == "e8p":
        if isinstance(H, HessianFactor):
            raise TypeError("the e8p Q step needs H itself, not a GPTQ factor")
        q = ldlq_vector(W, H, stages=1, damp=cfg.damp)
        passes = getattr(cfg, "q_tune_iters", 0)
        return refine_lattice(W, q, damped(H, cfg.damp), passes) if passes else q
    spec = q_spec(cfg)
    if kind == "rtn":
        return quantize_rtn(W, spec)
    if kind == "gptq":
        return gptq_quantize(W, H, spec, damp=cfg.damp, act_order=getattr(cfg, "act_order", False))
    raise ValueError(f"unknown Q quantizer {kind!r}; use 'rtn', 'gptq' or 'e8p'")


def balance_factors(L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each rank-1 term of L (m × r) R (r × n) so that ‖L[:, i]‖ = ‖R[i, :]‖; the product is unchanged.
    Balanced factors round with similar relative errors."""
    ln, rn = L.norm(dim=0).clamp_min(1e-30), R.norm(dim=1).clamp_min(1e-30)
    c = (rn / ln).sqrt()
    return L * c, R / c[:, None]


def store_factors(L: Tensor, R: Tensor, cfg: MethodConfig
                  ) -> tuple[Tensor, Tensor, QuantizedTensor | None, QuantizedTensor | None]:
    """Round L (m × r) and R (r × n) to their storage: fp16, or group-wise RTN at ``lr_bits`` after balancing the
    two factors' row/column norms. Returns (L̂, R̂, codes of L or None, codes of R or None)."""
    spec = lr_spec(cfg)
    if L.shape[1] == 0 or spec is None:
        return L.half().float(), R.half().float(), None, None
    L, R = balance_factors(L, R)
    lq, rq = quantize_rtn(L, spec), quantize_rtn(R, spec)
    return lq.dequantize(), rq.dequantize(), lq, rq


def package(method: str, cfg: Any, W: Tensor, H: Tensor, q: Quantized | None, L: Tensor, R: Tensor,
            lq: Quantized | None = None, rq: Quantized | None = None,
            history: list[float] | None = None, diagnostics: dict | None = None,
            rotation: Any = None) -> Decomposition:
    """Build the Decomposition of W (m × n, original domain) and set ``act_err`` to the error of what is returned
    under H (n × n); one-shot methods get a one-entry history with that error."""
    dec = Decomposition(method=method, config=cfg, q=q, L_s=L, R_s=R, lq=lq, rq=rq, rotation=rotation,
                        history=list(history or []), diagnostics=dict(diagnostics or {}), shape=tuple(W.shape))
    dec.act_err = activation_aware_error(W, dec.reconstruct(), H)
    if not dec.history:
        dec.history = [dec.act_err]
    if q is not None and "q_scale" not in dec.diagnostics:
        dec.diagnostics["q_scale"] = q.mean_scale()
    return dec


def channel_scale(H: Tensor, mean_abs: Tensor | None) -> Tensor:
    """Per-input-channel activation scale s (n,): mean |x| when given, else sqrt(diag H) (the RMS), normalised to
    mean 1 and clamped away from zero so S⁻¹ exists."""
    s = mean_abs.float() if mean_abs is not None else torch.diagonal(H).float().clamp_min(0).sqrt()
    s = s / s.mean().clamp_min(1e-30)
    return s.clamp_min(1e-4)
