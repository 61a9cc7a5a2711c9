"""``caldera``: the joint Q/LR alternation from a zero start (CALDERA, Saha et al. 2024), see ``joint.py``."""

from __future__ import annotations

from torch import Tensor

from ..base import Decomposition, register
from ..joint import JointConfig, joint_decompose


@register("caldera", JointConfig)
def caldera(W: Tensor, H: Tensor, cfg: JointConfig, mean_abs: Tensor | None = None) -> Decomposition:
    """CALDERA on W (m × n) under H (n × n): LDLQ Q step (E8P codes refined by ``q_tune_iters`` descent passes),
    activation-aware LPLR step with low-precision L/R, best iterate kept. ``init="auto"`` starts LR first
    ("svd", CALDERA's own order) with fp16 L/R and Q first ("zero", the ODLRI paper's baseline) otherwise."""
    return joint_decompose("caldera", W, H, cfg)
