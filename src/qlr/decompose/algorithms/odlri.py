"""``odlri``: Outlier-Driven Low-Rank Initialization (arXiv 2506.02077) followed by the CALDERA alternation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import Decomposition, register
from ..joint import JointConfig, joint_decompose


@dataclass(frozen=True)
class ODLRIConfig(JointConfig):
    """As :class:`JointConfig`, starting from ODLRI's L0R0 (``init="odlri"``) on the ``odlri_k`` input channels
    with the largest diag(H) (default k = max(1, rank // 16): the paper's best ratio, k = 16 at r = 256; k is
    capped at the rank)."""

    init: str = "odlri"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "odlri":
            raise ValueError("method 'odlri' always starts from the ODLRI init; use 'caldera' with init="
                             f"{self.init!r} instead")


@register("odlri", ODLRIConfig)
def odlri(W: Tensor, H: Tensor, cfg: ODLRIConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """L0R0 fitted to W on the top-k diag(H) channels under H restricted to them, then exactly CALDERA's loop."""
    return joint_decompose("odlri", W, H, cfg)
