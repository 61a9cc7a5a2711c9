import torch

from qlr.decompose.lowrank import Whitener, lowrank_fit, quantized_lowrank
from qlr.decompose.metrics import weighted_energy
from qlr.quant.grid import QuantSpec


def _brute_force_optimum(D, H, rank):
    """Eckart–Young under H: the optimum of ‖(D − LR) H^{1/2}‖² is the tail energy of D H^{1/2}."""
    evals, evecs = torch.linalg.eigh(H)
    S = (evecs * evals.sqrt()) @ evecs.T
    sig = torch.linalg.svdvals(D.double() @ S)
    return float((sig[rank:] ** 2).sum())


def test_exact_lowrank_step_matches_brute_force(layer):
    D, H = layer["W"], layer["H"]
    wh = Whitener.from_hessian(H, damp=0.0)
    for r in (1, 4, 16):
        L, R = lowrank_fit(D, wh, r)
        assert L.shape == (D.shape[0], r) and R.shape == (r, D.shape[1])
        got = weighted_energy(D - L @ R, H)
        opt = _brute_force_optimum(D, H.clone(), r)
        assert abs(got - opt) <= 1e-3 * weighted_energy(D, H)


def test_exact_step_is_a_local_minimum(layer):
    D, H = layer["W"], layer["H"]
    wh = Whitener.from_hessian(H, damp=0.0)
    L, R = lowrank_fit(D, wh, 8)
    base = weighted_energy(D - L @ R, H)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dL = 1e-3 * torch.randn(L.shape, generator=g) * L.abs().mean()
        dR = 1e-3 * torch.randn(R.shape, generator=g) * R.abs().mean()
        assert weighted_energy(D - (L + dL) @ (R + dR), H) >= base * (1 - 1e-6)


def test_rank_zero():
    D = torch.randn(4, 8)
    L, R = lowrank_fit(D, Whitener.diagonal(torch.ones(8)), 0)
    assert L.shape == (4, 0) and R.shape == (0, 8)


def test_quantized_lowrank_keeps_best_and_is_close_to_exact(layer):
    D, H = layer["W"], layer["H"]
    wh = Whitener.from_hessian(H, 0.01)
    L, R = lowrank_fit(D, wh, 16)
    exact = weighted_energy(D - L @ R, wh.H)
    one = quantized_lowrank(D, wh, 16, QuantSpec(bits=4, group_size=32, clip_search=True), iters=1)
    many = quantized_lowrank(D, wh, 16, QuantSpec(bits=4, group_size=32, clip_search=True), iters=6)
    assert many.sse <= one.sse
    assert one.lq is not None and torch.equal(one.L, one.lq.dequantize())
    assert exact <= many.sse <= 1.5 * exact
