"""Small LLM-like layers: heavy-tailed weights and a few activation-outlier input channels."""

from __future__ import annotations

import pytest
import torch

# "cpu" always; "cuda" only where a GPU is present (the `gpu` marker lets CI deselect it explicitly)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def llm_like(m: int = 48, n: int = 128, n_tokens: int = 1024, n_out: int = 4, out_scale: float = 20.0,
             seed: int = 0) -> dict:
    """W (m × n) Student-t(3) × column scales; X with ``n_out`` channels scaled ×``out_scale`` (diag(H) 100–1000×
    the rest); H = X Xᵀ / N in float64; mean_abs = mean |x| per channel."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=g, dtype=torch.float64)
    chi = (torch.randn(m, n, 3, generator=g, dtype=torch.float64) ** 2).sum(-1) / 3
    col = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    W = (0.02 * z / chi.sqrt() * col).float()
    # correlated channels (a shared rank-8 component), as real activations are; per-channel log-normal scales
    B = torch.randn(n, 8, generator=g, dtype=torch.float64) / 2
    Z = torch.randn(n, n_tokens, generator=g, dtype=torch.float64) + B @ torch.randn(
        8, n_tokens, generator=g, dtype=torch.float64)
    X = torch.exp(0.4 * torch.randn(n, 1, generator=g, dtype=torch.float64)) * Z
    idx = torch.randperm(n, generator=g)[:n_out].sort().values
    X[idx] *= out_scale
    return dict(W=W, H=X @ X.T / n_tokens, mean_abs=X.abs().mean(1), outliers=idx)


