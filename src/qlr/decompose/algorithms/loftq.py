"""``loftq``: LoftQ's alternation of NormalFloat quantization and a plain SVD (no activation information).

    L R ← 0;  repeat T times:  Q = NF_b(W − L R);  L R = SVD_r(W − Q).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...quant.grid import quantize_rtn
from ..base import Decomposition, MethodConfig, register
from ..common import package, store_factors
from ..lowrank import Whitener, lowrank_fit
from ..metrics import activation_aware_error


@dataclass(frozen=True)
class LoftQConfig(MethodConfig):
    """LoftQ: NF codes with an absmax scale per ``group_size`` block (symmetric), ``iters`` alternations."""

    q_format: ClassVar[str] = "nf"
    rank: int = 16
    iters: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.quant_spec()
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


@register("loftq", LoftQConfig)
def loftq(W: Tensor, H: Tensor, cfg: LoftQConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Returns the last iterate, as LoftQ does; ``history`` holds the activation-aware error of each."""
    W = W.float()
    spec = cfg.quant_spec()
    ident = Whitener.diagonal(torch.ones(W.shape[1], device=W.device))
    L, R = W.new_zeros(W.shape[0], cfg.rank), W.new_zeros(cfg.rank, W.shape[1])
    history = []
    for _ in range(cfg.iters):
        q = quantize_rtn(W - L @ R, spec)
        L, R = lowrank_fit(W - q.dequantize(), ident, cfg.rank)
        history.append(activation_aware_error(W, q.dequantize() + L @ R, H))
    L, R, lq, rq = store_factors(L, R, cfg)
    history[-1] = activation_aware_error(W, q.dequantize() + L @ R, H)
    return package("loftq", cfg, W, H, q, L, R, lq, rq, history=history)
