"""The fused CPU layer kernel (batch ≤ GEMV_MAX_BATCH) equals the dense Q + L R for factors whose scale group is
wider than the factor (rank 4 < group 64: a budget rank below the group size)."""

from __future__ import annotations

import copy

import pytest
import torch

import qlr
from qlr.kernels import cpu
from qlr.models.tiny import tiny_llama
from qlr.nn.qlinear import QLRLinear


@pytest.mark.skipif(cpu.lib() is None, reason="no compiled CPU kernels")
@pytest.mark.parametrize("method", ["odlri", "caldera"])
def test_group_wider_than_the_factor(method):
    model = tiny_llama(seed=0)
    ids = torch.tensor(list((b"a stitch in time saves nine; " * 20)[:512])).reshape(8, 64)
    qlr.compress(model, method, 2, rank=4, calibration=ids, progress=False, outer_iters=1, inner_iters=1)
    layers = [m for m in model.modules() if isinstance(m, QLRLinear)]
    assert any(m.meta["l"]["codec"] == "grid" and m.meta["l"]["group_size"] > m.rank for m in layers)
    for layer in layers:
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            ref = x.double() @ layer.dequantize_weight().double().T
            fused, blas = layer(x), layer(x.repeat(cpu.GEMV_MAX_BATCH, 1))[:3]
        scale = (x.double().abs() @ layer.dequantize_weight().double().abs().T).max()
        assert (fused.double() - ref).abs().max() < 1e-5 * scale
        assert (blas.double() - ref).abs().max() < 1e-5 * scale
    copy.deepcopy(model)  # a model that has run the fused kernel can still be copied
