"""Randomized Hadamard transforms: the built H_b, orthogonality, exact inverses, Incoherence identities."""

from __future__ import annotations

import pytest
import torch

from qlr.decompose.base import Decomposition
from qlr.quant.hadamard import (
    SUPPORTED_BASES,
    Incoherence,
    _base_matrix,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
)
from tests.layers import DEVICES  # noqa: E402

BUILT = [b for b in SUPPORTED_BASES if b > 1]
SIZES = [1, 2, 8, 12, 24, 28, 36, 40, 52, 60, 108, 140, 156, 172, 192, 576, 1536, 12 * 64, 20 * 8, 52 * 4,
         172 * 4]


@pytest.mark.parametrize("b", BUILT)
def test_base_matrix_is_hadamard(b: int) -> None:
    H = _base_matrix(b)
    assert H.shape == (b, b)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, b * torch.eye(b, dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_hadamard(n: int) -> None:
    Had = hadamard_matrix(n)
    assert set(Had.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(Had @ Had.T, n * torch.eye(n, dtype=torch.float64))


def test_transform_is_kronecker_product() -> None:
    """Had_{12·8} = H_12 ⊗ Sylvester_8, with the 2^a part in the fast (inner) index."""
    syl = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(3):
        syl = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), syl)
    assert torch.equal(hadamard_matrix(96), torch.kron(_base_matrix(12), syl))
    x = torch.randn(5, 96, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ hadamard_matrix(96).T)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_orthogonal_exact_inverse(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=tol, atol=tol)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [0, 7, 44, 100, 156 * 3, 172 * 5])
def test_unsupported_size_raises(n: int) -> None:
    assert not is_supported(n)
    with pytest.raises(ValueError, match=f"n = {n}") as info:
        hadamard_matrix(n)
    assert "2^a · b" in str(info.value) and "172" in str(info.value)
    if n:
        with pytest.raises(ValueError, match=f"n = {n}"):
            hadamard_transform(torch.zeros(2, n))


def _rand_W_H(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    X = torch.randn(4 * n, n, dtype=torch.float64, generator=g)
    X[:, :3] *= 30
    return W, X.T @ X / (4 * n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "n"), [(24, 96), (48, 576), (64, 40), (156, 344)])
def test_incoherence_identities(m: int, n: int, device: str) -> None:
    W, H = (t.to(device) for t in _rand_W_H(m, n))
    inc = Incoherence.random(m, n, seed=3, device=device)
    Wr = inc.rotate_weight(W)
    assert Wr.dtype == torch.float64 and Wr.shape == (m, n)
    torch.testing.assert_close(inc.unrotate_weight(Wr), W)
    # the rotation spreads outliers: the rotated weight is much flatter than a spiky one
    spiky = torch.zeros(m, n, dtype=torch.float64, device=device)
    spiky[0, 0] = 1.0
    assert inc.rotate_weight(spiky).abs().max() < 1.01 / (m * n) ** 0.5
    # the proxy loss is invariant: tr(E H Eᵀ) = tr(Er Hr Erᵀ)
    E = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    Er, Hr = inc.rotate_weight(E), inc.rotate_hessian(H)
    torch.testing.assert_close(torch.trace(Er @ Hr @ Er.T), torch.trace(E @ H @ E.T))
    # y = x Wᵀ = output_untransform(input_transform(x) @ Wrᵀ)
    x = torch.randn(5, 7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    torch.testing.assert_close(inc.output_untransform(inc.input_transform(x) @ Wr.T), x @ W.T)
    # factors: Uᵀ (Lr Rr) V = (Uᵀ Lr)(Rr V)
    Lr, Rr = Wr[:, :4], Wr[:4, :]
    torch.testing.assert_close(inc.unrotate_weight(Lr @ Rr), inc.unrotate_left(Lr) @ inc.unrotate_right(Rr))


def test_incoherence_dtype_and_matrices() -> None:
    m, n = 12, 16
    inc = Incoherence.random(m, n, seed=0)
    U = hadamard_matrix(m) * inc.signs_out.double() / m**0.5
    V = hadamard_matrix(n) * inc.signs_in.double() / n**0.5
    W = torch.randn(m, n)
    torch.testing.assert_close(inc.rotate_weight(W), (U @ W.double() @ V.T).float(), rtol=1e-5, atol=1e-5)
    assert inc.rotate_weight(W).dtype == torch.float32
    assert inc.rotate_weight(W.double()).dtype == torch.float64


def test_incoherence_determinism_and_storage() -> None:
    a, b = Incoherence.random(24, 48, seed=7), Incoherence.random(24, 48, seed=7)
    assert torch.equal(a.signs_out, b.signs_out) and torch.equal(a.signs_in, b.signs_in)
    c = Incoherence.random(24, 48, seed=8)
    assert not torch.equal(a.signs_in, c.signs_in)
    assert set(a.signs_in.unique().tolist()) == {-1.0, 1.0}
    assert a.storage_bits() == 24 + 48
    assert a.to("cpu").seed == 7
    with pytest.raises(ValueError, match="n = 100"):
        Incoherence.random(24, 100)


def test_decomposition_uses_rotation() -> None:
    m, n, r = 24, 48, 3
    inc = Incoherence.random(m, n, seed=1)
    g = torch.Generator().manual_seed(0)
    L_s, R_s = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    dec = Decomposition("test", None, None, L_s, R_s, rotation=inc, shape=(m, n))
    torch.testing.assert_close(dec.reconstruct(), inc.unrotate_weight(L_s @ R_s), rtol=1e-5, atol=1e-5)
    assert dec.storage_bits() == (m * r + r * n) * 16 + m + n
