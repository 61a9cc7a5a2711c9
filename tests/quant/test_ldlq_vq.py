"""Block LDLQ with the E8P codebook: the factorisation, the feedback identity, gains over plain rounding."""

from __future__ import annotations

import pytest
import torch

from qlr.quant.e8p import quantize_e8p
from qlr.quant.hadamard import Incoherence
from qlr.quant.ldlq_vq import block_ldl, damp_hessian, ldlq_vector


def _problem(m: int, n: int, seed: int = 0, outliers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian W and a correlated H with a few input channels scaled ×30 (activation outliers)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)
    X[:, :outliers] *= 30
    return W, (X.T @ X / X.shape[0]).double()


def _proxy(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - What).double()
    return float(torch.trace(E @ H @ E.T) / torch.trace(W.double() @ H @ W.double().T))


def test_block_ldl_factorisation() -> None:
    _, H = _problem(8, 48)
    U, D = block_ldl(H)
    assert U.shape == (48, 48) and D.shape == (6, 8, 8)
    torch.testing.assert_close(U @ torch.block_diag(*D) @ U.T, H)
    for k in range(6):  # identity diagonal blocks, nothing below them
        torch.testing.assert_close(U[8 * k:8 * k + 8, 8 * k:8 * k + 8], torch.eye(8, dtype=torch.float64))
        assert torch.count_nonzero(U[8 * k + 8:, 8 * k:8 * k + 8]) == 0
    with pytest.raises(ValueError, match="divisible"):
        block_ldl(torch.eye(12, dtype=torch.float64))


def test_damp_hessian() -> None:
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    Hd = damp_hessian(H, 0.1)
    assert Hd.dtype == torch.float64
    expected = torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64) + 0.1 * 7 / 3  # dead channel set to 1 first
    torch.testing.assert_close(Hd.diagonal(), expected)


def test_feedback_identity() -> None:
    """tr(E H Eᵀ) = Σ_k δ_k D_k δ_kᵀ, with δ_k the rounding error of block k's target."""
    W, H = _problem(16, 64, seed=1)
    q = ldlq_vector(W, H, damp=0.0, lazy_batch=16)
    What = q.dequantize()
    U, D = block_ldl(H)
    delta = (W - What).double() @ U  # (E U)_k = δ_k
    blocks = [delta[:, 8 * k:8 * k + 8] for k in range(8)]
    total = sum(float(torch.trace(d @ D[k] @ d.T)) for k, d in enumerate(blocks))
    E = (W - What).double()
    assert abs(total - float(torch.trace(E @ H @ E.T))) < 1e-6 * total
    # each block's target W_k + Σ_{j<k} E_j U_jk is plainly rounded to the nearest (scaled) codeword
    target = What.double() + delta
    for k in (1, 5):
        cols = slice(8 * k, 8 * k + 8)
        rounded = quantize_e8p(target[:, cols].float(), scale=q.mean_scale()).dequantize()
        torch.testing.assert_close(rounded, What[:, cols])


@pytest.mark.parametrize("stages", [1, 2])
def test_ldlq_beats_plain_rounding_on_outlier_hessian(stages: int) -> None:
    W, H = _problem(48, 192, seed=2)
    plain = quantize_e8p(W, stages=stages)
    ldlq = ldlq_vector(W, H, stages=stages)
    assert torch.equal(ldlq.scales, plain.scales)  # the scales come from W alone
    e_plain, e_ldlq = _proxy(W, plain.dequantize(), H), _proxy(W, ldlq.dequantize(), H)
    assert e_ldlq < 0.8 * e_plain
    assert ldlq.storage_bits() == plain.storage_bits() == stages * (48 * 24 * 16 + 16)
    assert ldlq.meta["method"] == "ldlq-e8p"


def test_e8p4_beats_e8p_under_ldlq() -> None:
    W, H = _problem(32, 128, seed=3)
    e2 = _proxy(W, ldlq_vector(W, H).dequantize(), H)
    e4 = _proxy(W, ldlq_vector(W, H, stages=2).dequantize(), H)
    assert e4 < 0.3 * e2


def test_incoherence_helps_ldlq_on_outlier_channels() -> None:
    """With a nearly diagonal H dominated by a few ×30 channels, LDLQ alone has little to feed forward; after
    the random Hadamard rotation H is dense and block LDLQ removes most of the proxy error (QuIP#)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(48, 192, generator=g)
    X = torch.randn(768, 192, generator=g)
    X[:, [3, 50, 100, 170]] *= 30
    H = (X.T @ X / 768).double()
    inc = Incoherence.random(48, 192, seed=0)
    plain = _proxy(W, ldlq_vector(W, H).dequantize(), H)
    rotated = ldlq_vector(inc.rotate_weight(W), inc.rotate_hessian(H))
    assert _proxy(W, inc.unrotate_weight(rotated.dequantize()), H) < 0.5 * plain


def test_identity_hessian_matches_plain_rounding() -> None:
    W, _ = _problem(16, 64, seed=4)
    H = torch.eye(64, dtype=torch.float64)
    assert torch.equal(ldlq_vector(W, H).codes, quantize_e8p(W).codes)


def test_lazy_batch_and_determinism() -> None:
    W, H = _problem(24, 96, seed=5)
    a = ldlq_vector(W, H, lazy_batch=16)
    b = ldlq_vector(W, H, lazy_batch=128)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=1e-5)
    assert torch.equal(ldlq_vector(W, H, lazy_batch=16).codes, a.codes)


def test_input_validation() -> None:
    W, H = _problem(8, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        ldlq_vector(W[:, :30], H[:30, :30])
    with pytest.raises(ValueError, match="32 × 32"):
        ldlq_vector(W, H[:16, :16])
    with pytest.raises(ValueError, match="lazy_batch"):
        ldlq_vector(W, H, lazy_batch=12)
