"""``gptq``: GPTQ/LDLQ, Q only (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import Decomposition, MethodConfig, register
from ..common import package, q_spec, quantize_q


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ with damping ``damp``·mean(diag H); ``act_order`` quantizes columns by decreasing diag H."""

    rank: int = 0
    act_order: bool = False
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        q_spec(self)
        if self.rank:
            raise ValueError("method 'gptq' is Q only: pass rank=0 (use 'caldera' or 'odlri' for Q + LR with a "
                             "GPTQ/LDLQ Q step)")


@register("gptq", GPTQConfig)
def gptq(W: Tensor, H: Tensor, cfg: GPTQConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Q = argmin-greedy tr((W − Q) H (W − Q)ᵀ) on the grid (GPTQ column order, Cholesky feedback)."""
    q = quantize_q(W, H, cfg, "gptq")
    m, n = W.shape
    return package("gptq", cfg, W, H, q, W.new_zeros(m, 0), W.new_zeros(0, n))
