"""Decomposition of one weight matrix: W ≈ Q + L R (pure tensor functions, no model needed)."""

from .base import Decomposition, MethodConfig, decompose, get_method, make_config, methods, register
from .metrics import activation_aware_error, role_ratio

__all__ = ["Decomposition", "MethodConfig", "decompose", "get_method", "make_config", "methods", "register",
           "activation_aware_error", "role_ratio"]
