"""qlr: compress LLM weights as W ≈ Q + L R (a low-bit quantized matrix plus a low-rank product).

Core API (pure tensor functions)::

    dec = qlr.decompose(W, H, method="odlri", bits=2, rank=64)
    dec.Q, dec.L, dec.R, dec.reconstruct(), dec.bits_per_weight, dec.history
    qlr.activation_aware_error(W, W_hat, H)
    qlr.methods()
"""

from .decompose import Decomposition, activation_aware_error, decompose, methods

__version__ = "0.1.0"

__all__ = ["Decomposition", "activation_aware_error", "decompose", "methods", "__version__"]
