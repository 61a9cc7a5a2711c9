"""Bad input gets a clear ValueError; a singular or rounding-indefinite H still works."""

import pytest
import torch

import qlr


def _wh(m=8, n=16):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 64, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g), X @ X.T / 64


def test_shape_mismatch():
    W, H = _wh()
    with pytest.raises(ValueError, match="H must be n × n"):
        qlr.decompose(W, H[:8, :8], "rtn", bits=2, rank=0)
    with pytest.raises(ValueError, match="2-D"):
        qlr.decompose(W[0], H, "rtn", bits=2, rank=0)


@pytest.mark.parametrize("where", ["W", "H"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf(where, bad):
    W, H = _wh()
    (W if where == "W" else H)[1, 1] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf in layer 'blk.0'"):
        qlr.decompose(W, H, "rtn", bits=2, rank=0, name="blk.0")


def test_asymmetric_h():
    W, H = _wh()
    H[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        qlr.decompose(W, H, "rtn", bits=2, rank=0)


def test_rank_too_large():
    W, H = _wh()
    with pytest.raises(ValueError, match="larger than min"):
        qlr.decompose(W, H, "lorc", bits=2, rank=9)


def test_unknown_method_lists_methods():
    W, H = _wh()
    with pytest.raises(ValueError, match="available methods: caldera, gptq"):
        qlr.decompose(W, H, "awq", bits=2)


def test_unknown_option_and_bad_bits():
    W, H = _wh()
    with pytest.raises(ValueError, match="no option"):
        qlr.decompose(W, H, "lorc", bits=2, rank=2, itres=3)
    with pytest.raises(ValueError, match="bits=7 is not supported"):
        qlr.decompose(W, H, "gptq", bits=7)
    with pytest.raises(ValueError, match="lr_bits"):
        qlr.decompose(W, H, "caldera", bits=2, rank=2, lr_bits=5)


@pytest.mark.parametrize("method", ["gptq", "caldera", "odlri", "qera-exact", "srr"])
def test_singular_h_still_works(method):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    H = X @ X.T  # rank 3
    H[2, :] = 0
    H[:, 2] = 0
    rank = 0 if method == "gptq" else 2
    opts = dict(outer_iters=2, inner_iters=2) if method in ("caldera", "odlri") else {}
    dec = qlr.decompose(W, H, method, bits=2, rank=rank, **opts)
    assert torch.isfinite(dec.reconstruct()).all()


def test_error_metric():
    W, H = _wh()
    assert qlr.activation_aware_error(W, W, H) == 0.0
    assert qlr.activation_aware_error(W, torch.zeros_like(W), H) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        qlr.activation_aware_error(W, W[:, :3], H)
