import pytest
import torch

from qlr.calibration.hessian import HessianAccumulator


def test_matches_direct_and_is_batching_invariant():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 16, generator=g)
    a = HessianAccumulator(16)
    a.add(X)
    b = HessianAccumulator(16)
    for i in range(3):
        b.add(X[i, :7])
        b.add(X[i, 7:])
    flat = X.reshape(-1, 16).double()
    Ha, ma = a.finalize()
    Hb, _ = b.finalize()
    assert Ha.dtype == torch.float64
    assert torch.allclose(Ha, flat.T @ flat / 150)
    assert torch.allclose(Ha, Hb)
    assert torch.allclose(ma, flat.abs().mean(0).float())


def test_errors():
    a = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        a.finalize()
    with pytest.raises(ValueError, match="last dim 4"):
        a.add(torch.ones(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        a.add(torch.tensor([[float("nan"), 0, 0, 0]]))
