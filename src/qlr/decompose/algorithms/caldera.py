"""``caldera``: the joint Q/LR alternation from a zero start (CALDERA, Saha et al. 2024), see ``joint.py``."""

from __future__ import annotations

from torch import Tensor

from ..base import Decomposition, register
from ..joint import JointConfig, joint_decompose


@register("caldera", JointConfig)
def caldera(W: Tensor, H: Tensor, cfg: JointConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """CALDERA: LDLQ Q step, activation-aware LPLR step with low-precision L/R, best iterate kept.
    ``init`` defaults to "zero" (Q first), the ODLRI paper's baseline; "svd" gives the LR-first order."""
    return joint_decompose("caldera", W, H, cfg)
