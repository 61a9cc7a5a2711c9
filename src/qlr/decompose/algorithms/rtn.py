"""``rtn``: group-wise round-to-nearest, Q only (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import Decomposition, MethodConfig, register
from ..common import package, q_spec, quantize_q


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest. ``clip_search`` shrinks each group's range to minimise its squared error."""

    rank: int = 0
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        q_spec(self)
        if self.rank:
            raise ValueError("method 'rtn' is Q only: pass rank=0 (use 'lorc', 'lqer' or 'qera-exact' to add a "
                             "low-rank correction)")


@register("rtn", RTNConfig)
def rtn(W: Tensor, H: Tensor, cfg: RTNConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """Q = RTN(W); L, R empty. Minimises the plain squared error group by group (H is only used to report)."""
    q = quantize_q(W, H, cfg, "rtn")
    m, n = W.shape
    return package("rtn", cfg, W, H, q, W.new_zeros(m, 0), W.new_zeros(0, n))
