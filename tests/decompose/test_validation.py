"""Degenerate inputs to ``qlr.decompose`` raise a ValueError that says what is wrong, before any work."""

import pytest
import torch

import qlr
from qlr.decompose.base import PSD_TOL, resolve_rank, validate_hessian

FAST = dict(outer_iters=2, inner_iters=2)


def _wh(m=16, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 128, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g), X @ X.T / 128


@pytest.mark.parametrize("method", ["odlri", "caldera", "rtn", "lorc"])
def test_all_zero_h_and_w(method):
    W, H = _wh()
    rank = 0 if method == "rtn" else 8
    opts = FAST if method in ("odlri", "caldera") else {}
    with pytest.raises(ValueError, match="H is all zeros in layer 'blk.3'"):
        qlr.decompose(W, torch.zeros_like(H), method, bits=2, rank=rank, name="blk.3", **opts)
    with pytest.raises(ValueError, match="W is all zeros in layer 'blk.3'.*exclude this layer"):
        qlr.decompose(torch.zeros_like(W), H, method, bits=2, rank=rank, name="blk.3", **opts)


def test_w_only_on_dead_channels():
    W, H = _wh()
    H[:4, :] = 0
    H[:, :4] = 0  # channels 0..3 never fire
    W.zero_()
    W[:, :4] = 1.0
    with pytest.raises(ValueError, match=r"tr\(W H Wᵀ\) is zero"):
        qlr.decompose(W, H, "odlri", bits=2, rank=8, **FAST)


@pytest.mark.parametrize("method", ["odlri", "caldera", "gptq"])
def test_negative_definite_h(method):
    W, H = _wh()
    rank = 0 if method == "gptq" else 8
    with pytest.raises(ValueError, match="negative diagonal entry.*not −H"):
        qlr.decompose(W, -H, method, bits=2, rank=rank)


@pytest.mark.parametrize("method", ["odlri", "caldera"])
def test_indefinite_h_with_positive_diagonal(method):
    W, H = _wh()
    v = torch.linalg.eigh(H).eigenvectors[:, -1]
    Hbad = H - 2 * float(torch.linalg.eigvalsh(H)[-1]) * torch.outer(v, v)  # largest eigenvalue flipped
    Hbad = (Hbad + Hbad.T) / 2
    Hbad.diagonal().clamp_(min=0)  # keep the cheap diagonal test quiet: the Cholesky test must catch it
    Hbad = (Hbad + Hbad.T) / 2
    assert float(torch.linalg.eigvalsh(Hbad)[0]) < 0
    with pytest.raises(ValueError, match="not positive semidefinite"):
        qlr.decompose(W, Hbad, method, bits=2, rank=8, **FAST)


def test_rounding_level_indefinite_h_passes():
    W, H = _wh()
    nu = float(H.abs().sum(1).max())
    v = torch.linalg.eigh(H).eigenvectors[:, 0]
    low = float(torch.linalg.eigvalsh(H)[0])
    Hr = H - (low + 0.1 * PSD_TOL * nu) * torch.outer(v, v)  # min eigenvalue −0.1·τ·‖H‖∞
    Hr = (Hr + Hr.T) / 2
    assert float(torch.linalg.eigvalsh(Hr)[0]) < 0
    validate_hessian(Hr, 32)  # no error
    Hbad = H - (low + 10 * PSD_TOL * nu) * torch.outer(v, v)  # −10·τ·‖H‖∞: beyond rounding
    with pytest.raises(ValueError, match="not positive semidefinite"):
        validate_hessian((Hbad + Hbad.T) / 2, 32)


def test_meta_and_empty_w():
    _, H = _wh()
    with pytest.raises(ValueError, match="W is on the meta device in layer 'x'"):
        qlr.decompose(torch.empty(16, 32, device="meta"), H, "odlri", bits=2, rank=8, name="x")
    with pytest.raises(ValueError, match=r"W is empty \(0 × 32\)"):
        qlr.decompose(torch.empty(0, 32), H, "odlri", bits=2, rank=8)
    with pytest.raises(ValueError, match=r"W is empty \(16 × 0\)"):
        qlr.decompose(torch.empty(16, 0), torch.empty(0, 0), "rtn", bits=2)
    W, _ = _wh()
    with pytest.raises(ValueError, match="H is on the meta device"):
        qlr.decompose(W, torch.empty(32, 32, device="meta"), "rtn", bits=2)


@pytest.mark.parametrize("rank, match", [(8.0, "pass the integer 8"), (2.5, "fractional rank must be in"),
                                         (-1, "rank must be >= 0"), (True, "got True of type bool"),
                                         ("8", "of type str")])
def test_bad_rank(rank, match):
    W, H = _wh()
    with pytest.raises(ValueError, match=match):
        qlr.decompose(W, H, "lorc", bits=2, rank=rank)


def test_fractional_rank():
    W, H = _wh()
    dec = qlr.decompose(W, H, "lorc", bits=3, rank=0.25)
    assert dec.rank == 4  # round(0.25 · min(16, 32))
    assert resolve_rank(0.01, 16, 32) == 1  # never rounds down to zero
    assert resolve_rank(7, 16, 32) == 7
