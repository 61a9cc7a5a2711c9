"""CALDERA as its code runs: the LR-first order with fp16 factors, QuIP#'s descent passes on Q, seeds, act_err."""

import pytest
import torch

import qlr
from qlr.decompose import make_config
from qlr.decompose.lowrank import Whitener, quantized_lowrank
from qlr.decompose.metrics import weighted_energy
from qlr.decompose.refine import refine_lattice
from qlr.quant.gptq import damped
from qlr.quant.grid import QuantSpec
from qlr.quant.ldlq_vq import ldlq_vector

FAST = dict(outer_iters=3, inner_iters=2)


def test_refine_lattice_is_a_descent_step(wide_layer):
    W, H = wide_layer["W"], wide_layer["H"]
    Hd = damped(H, 0.01)
    q = ldlq_vector(W, H, damp=0.01)
    errs = [weighted_energy(W - q.dequantize(), Hd)]
    for passes in (1, 2, 4):
        r = refine_lattice(W, q, Hd, passes)
        assert torch.equal(r.scales, q.scales) and r.storage_bits() == q.storage_bits()
        errs.append(weighted_energy(W - r.dequantize(), Hd))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 0.97 * errs[0]  # the passes do find better codes than one greedy LDLQ sweep
    assert refine_lattice(W, q, Hd, 0) is q


def test_init_auto_follows_the_factor_precision():
    assert make_config("caldera", lr_bits=16).resolve(64, 128).init == "svd"
    assert make_config("caldera", lr_bits=4).resolve(64, 128).init == "zero"
    assert make_config("odlri", lr_bits=16).resolve(64, 128).init == "odlri"
    with pytest.raises(ValueError, match="q_tune_iters"):
        make_config("caldera", q_tune_iters=-1)


def test_act_err_is_the_returned_decomposition(wide_layer):
    W, H = wide_layer["W"], wide_layer["H"]
    for method, opts in (("caldera", dict(FAST, lr_bits=4, init="zero", patience=0, outer_iters=4)),
                         ("loftq", dict(iters=3)), ("qera-exact", {})):
        dec = qlr.decompose(W, H, method, bits=2, rank=8, **opts)
        assert dec.act_err == pytest.approx(qlr.activation_aware_error(W, dec.reconstruct(), H), rel=1e-9)
        assert dec.summary()["act_err"] == dec.act_err
        if method == "caldera":  # the best iterate, not the last
            assert dec.act_err == pytest.approx(min(dec.history), rel=1e-4)
        else:
            assert dec.act_err == pytest.approx(dec.history[-1], rel=1e-4)


def test_lplr_rank_mixing_follows_the_seed(wide_layer):
    W, H = wide_layer["W"], wide_layer["H"]
    wh = Whitener.from_hessian(H, 0.01)
    spec = QuantSpec(bits=4, group_size=64)
    runs = [quantized_lowrank(W, wh, 16, spec, iters=1, lattice=True, seed=s) for s in (0, 0, 1)]
    assert torch.equal(runs[0].L, runs[1].L)
    assert not torch.equal(runs[0].L, runs[2].L)


def test_fp16_factors_lr_first_beats_q_first(wide_layer):
    """With exact (fp16) factors CALDERA's own order, LR first, is the better start (the default, init="auto")."""
    W, H = wide_layer["W"], wide_layer["H"]
    kw = dict(bits=2, rank=16, lr_bits=16, outer_iters=6, inner_iters=1)
    auto = qlr.decompose(W, H, "caldera", **kw)
    zero = qlr.decompose(W, H, "caldera", init="zero", **kw)
    assert auto.config.init == "svd" and auto.act_err < zero.act_err
