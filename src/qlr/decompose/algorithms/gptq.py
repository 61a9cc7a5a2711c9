"""``gptq``: GPTQ/LDLQ, Q only (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...quant.gptq import gptq_quantize
from ..base import Decomposition, MethodConfig, register
from ..common import package, q_spec


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ with damping ``damp``·mean(diag H).

    Attributes:
        act_order: quantize columns by decreasing diag H (off: it loses where the heavy weights and the
            activation outliers sit in different columns; see tests/quant/test_gptq.py).
        clip_search: shrink each group's range to minimise the group's share of tr(E H Eᵀ) (squared rounding
            errors weighted by the LDL pivots of H). On by default: min-max groups fitted to the feedback-updated
            columns lose to plain RTN on outlier-heavy layers (2-bit g64: 0.459 vs RTN's 0.418; with this search
            0.188; tests/outliers.py, seed 0).
        static_groups: fit every group's grid on W before any feedback (the grid RTN uses) instead of on the
            updated columns when the quantizer reaches the group.
    """

    rank: int = 0
    act_order: bool = False
    clip_search: bool = True
    static_groups: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        q_spec(self)
        if self.rank:
            raise ValueError("method 'gptq' is Q only: pass rank=0 (use 'caldera' or 'odlri' for Q + LR with a "
                             "GPTQ/LDLQ Q step)")


@register("gptq", GPTQConfig)
def gptq(W: Tensor, H: Tensor, cfg: GPTQConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Q = argmin-greedy tr((W − Q) H (W − Q)ᵀ) on the grid (GPTQ column order, Cholesky feedback)."""
    q = gptq_quantize(W, H, q_spec(cfg), damp=cfg.damp, act_order=cfg.act_order, static_groups=cfg.static_groups)
    m, n = W.shape
    return package("gptq", cfg, W, H, q, W.new_zeros(m, 0), W.new_zeros(0, n))
