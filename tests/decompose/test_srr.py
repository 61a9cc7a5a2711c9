"""SRR as its authors run it: the energy rule for k, and the preserve → quantize → reconstruct structure."""

import math

import pytest
import torch

import qlr
from qlr.decompose import make_config
from qlr.decompose.algorithms.srr import energy_k
from qlr.decompose.lowrank import Whitener
from qlr.quant.grid import QuantSpec, quantize_rtn


def _known_spectrum(m: int, n: int, sigma: list[float], h: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """W (m × n) whose scaled matrix W diag(√h) has exactly the singular values ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(sigma, dtype=torch.float64)) @ V.T / h.sqrt()).float()


def test_energy_rule_closed_form():
    # σ = (3, 3, 3, 3, 1, …, 1): 4 at 3, 28 at 1; r = 6 keeps 4·9 + 2·1 = 38 of 36 + 28 = 64 → k = ⌊6 · 38/64⌋ = 3
    sigma = [3.0] * 4 + [1.0] * 28
    m, n, r = 40, 64, 6
    h = torch.exp(torch.linspace(-2, 2, n, dtype=torch.float64))  # a diagonal H with a wide range of channel energies
    W = _known_spectrum(m, n, sigma, h)
    frac = sum(s * s for s in sigma[:r]) / sum(s * s for s in sigma)
    assert frac == 38 / 64 and math.floor(r * frac) == 3
    k, got = energy_k(W, Whitener.diagonal(h.sqrt()), r)
    assert k == 3 and got == pytest.approx(frac, rel=1e-5)
    dec = qlr.decompose(W, torch.diag(h), "srr", bits=3, rank=r, scaling="diag")
    assert dec.diagnostics["preserve_k"] == 3 and dec.diagnostics["energy_frac"] == pytest.approx(frac, rel=1e-5)
    # all the energy in the top r: k = r; a flat spectrum: k = ⌊r · r/n⌋
    assert energy_k(_known_spectrum(m, n, [2.0] * r, h), Whitener.diagonal(h.sqrt()), r)[0] == r
    assert energy_k(_known_spectrum(m, n, [1.0] * 32, h), Whitener.diagonal(h.sqrt()), 8)[0] == math.floor(8 * 8 / 32)


def _scaled_truncation(D: torch.Tensor, s_mat: torch.Tensor, k: int) -> torch.Tensor:
    """The S-scaled rank-k truncation of D, mapped back: (D S)_k S⁻¹ (float64, independent of qlr's fit)."""
    U, sig, Vh = torch.linalg.svd(D.double() @ s_mat, full_matrices=False)
    return (U[:, :k] * sig[:k]) @ Vh[:k] @ torch.linalg.inv(s_mat)


@pytest.mark.parametrize("scaling", ["diag", "full"])
def test_preserve_quantize_reconstruct(layer, scaling):
    W, H = layer["W"], layer["H"]
    k, r = 5, 12
    dec = qlr.decompose(W, H, "srr", bits=3, rank=r, group_size=32, preserve_k=k, scaling=scaling)
    if scaling == "diag":
        s = torch.diagonal(H).sqrt()
        S = torch.diag(s / s.mean())
    else:  # H^{1/2} of the damped H
        Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
        ev, vec = torch.linalg.eigh(Hd)
        S = (vec * ev.sqrt()) @ vec.T
    P = _scaled_truncation(W, S, k)                                       # preserve
    Q = quantize_rtn((W.double() - P).float(), QuantSpec(bits=3, group_size=32)).dequantize()
    assert torch.allclose(dec.Q, Q, atol=1e-5)                            # quantize the rest
    LR = _scaled_truncation(W - Q, S, r)                                  # rank-r fit of W − Q under S
    assert torch.allclose(dec.L @ dec.R, LR.float(), atol=2e-3 * float(LR.abs().max()))
    assert dec.act_err == pytest.approx(qlr.activation_aware_error(W, Q + LR.float(), H), rel=1e-2)


def test_split_keeps_the_preserved_directions(layer):
    W, H = layer["W"], layer["H"]
    dec = qlr.decompose(W, H, "srr", bits=3, rank=10, preserve_k=4, reconstruct="split")
    s = torch.diagonal(H).sqrt()
    P = _scaled_truncation(W, torch.diag(s / s.mean()), 4).float()
    assert torch.allclose(dec.L[:, :4] @ dec.R[:4], P, atol=2e-3 * float(P.abs().max()))


@pytest.mark.parametrize(("scaling", "qera"), [("diag", "qera-approx"), ("full", "qera-exact")])
def test_k0_is_qera_and_srr_beats_it_at_equal_bits(layer, scaling, qera):
    W, H = layer["W"], layer["H"]
    kw = dict(rank=16, group_size=32)
    for bits in (2, 3):
        ref = qlr.decompose(W, H, qera, bits=bits, **kw)
        k0 = qlr.decompose(W, H, "srr", bits=bits, preserve_k=0, scaling=scaling, **kw)
        assert torch.equal(k0.reconstruct(), ref.reconstruct())  # nothing preserved: exactly QERA
        srr = qlr.decompose(W, H, "srr", bits=bits, scaling=scaling, **kw)
        assert srr.bits_per_weight == ref.bits_per_weight
        assert srr.diagnostics["preserve_k"] > 0
        assert srr.act_err < ref.act_err


def test_config_defaults_are_the_authors():
    cfg = make_config("srr")
    assert (cfg.bits, cfg.group_size, cfg.rank, cfg.scaling, cfg.k_rule, cfg.reconstruct) == (
        3, 32, 64, "diag", "energy", "refit")
    with pytest.raises(ValueError, match="k_rule"):
        make_config("srr", k_rule="median")
