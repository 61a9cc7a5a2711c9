"""An outlier-heavy synthetic layer on which plain GPTQ used to lose to RTN (issue 16)."""

from __future__ import annotations

import torch


def outlier_layer(m: int = 64, n: int = 256, n_tokens: int = 2048, n_heavy: int = 3, heavy_scale: float = 8.0,
                  n_act: int = 6, act_scale: float = 40.0, seed: int = 0) -> dict:
    """W (m × n): Gaussian × column scales uniform in [1, 3], with ``n_heavy`` columns ×``heavy_scale``;
    X (n × ``n_tokens``): independent channels with log-normal scales, ``n_act`` other channels ×``act_scale``
    (activation outliers). H = X Xᵀ / N in float64 (its off-diagonal entries are sampling noise only, which GPTQ's
    feedback amplifies from the outlier columns onto the rest). Deterministic in ``seed``.

    Returns: dict(W, H, mean_abs, heavy, outliers), the last two the sorted column indices."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    col = 1 + 2 * torch.rand(n, generator=g, dtype=f64)
    W = 0.02 * torch.randn(m, n, generator=g, dtype=f64) * col
    perm = torch.randperm(n, generator=g)
    heavy, act = perm[:n_heavy].sort().values, perm[n_heavy:n_heavy + n_act].sort().values
    W[:, heavy] *= heavy_scale
    X = torch.exp(0.4 * torch.randn(n, 1, generator=g, dtype=f64)) * torch.randn(n, n_tokens, generator=g, dtype=f64)
    X[act] *= act_scale
    return dict(W=W.float(), H=X @ X.T / n_tokens, mean_abs=X.abs().mean(1), heavy=heavy, outliers=act)
