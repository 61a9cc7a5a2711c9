"""Configs price themselves: the predicted storage equals what the decomposition stores, and budget ranks are the
largest that fit."""

import pytest

import qlr
from qlr.decompose import make_config, methods

CASES = [  # (method, options): every method, scalar and lattice coders, fp16 and quantized factors
    ("rtn", dict(rank=0)), ("gptq", dict(rank=0)), ("lorc", dict(rank=8)), ("lqer", dict(rank=8, lr_bits=4)),
    ("qera-exact", dict(rank=8, lr_bits=8, lr_group_size=32)), ("qera-approx", dict(rank=8)),
    ("srr", dict(rank=8)), ("loftq", dict(rank=8, iters=1)),
    ("caldera", dict(rank=8, lr_bits=4, outer_iters=1, inner_iters=1)),  # lattice Q and L/R, rotation signs
    ("caldera", dict(rank=8, lr_bits=4, q_quantizer="gptq", outer_iters=1, inner_iters=1)),
    ("odlri", dict(rank=8, lr_bits=16, outer_iters=1, inner_iters=1)),
]


def test_cases_cover_every_method():
    assert {m for m, _ in CASES} == set(methods())


@pytest.mark.parametrize(("method", "opts"), CASES)
def test_predicted_storage_is_what_is_stored(wide_layer, method, opts):
    W, H = wide_layer["W"], wide_layer["H"]
    m, n = W.shape
    dec = qlr.decompose(W, H, method, bits=2, **opts)
    cfg = make_config(method, bits=2, **opts)
    assert cfg.storage_bits(m, n) == dec.storage_bits()
    assert cfg.storage_bits(m, n, rank=dec.rank) == dec.storage_bits()


@pytest.mark.parametrize("method", ["lorc", "loftq", "caldera", "odlri", "srr"])
@pytest.mark.parametrize("budget", [2.5, 3.25, 4.5])
def test_budget_rank_is_the_largest_that_fits(method, budget):
    m, n = 256, 512
    cfg = make_config(method, bits=2).for_shape(m, n)
    r = cfg.budget_rank(m, n, budget)
    step = cfg.rank_multiple
    assert r % step == 0
    assert r == 0 or cfg.storage_bits(m, n, r) <= budget * m * n
    assert cfg.storage_bits(m, n, r + step) > budget * m * n


def test_loftq_is_priced_as_normalfloat():
    """NF codes with one fp16 absmax per group and no zero point (a scalar int grid would add bits per group)."""
    m, n, g = 256, 512, 64
    cfg = make_config("loftq", bits=2, group_size=g)
    assert cfg.q_storage_bits(m, n) == m * n * 2 + m * (n // g) * 16
    assert make_config("lorc", bits=2, group_size=g).q_storage_bits(m, n) == m * n * 2 + m * (n // g) * (16 + 2)
    fp16_lr = 16 * (m + n)
    assert cfg.budget_rank(m, n, 3.0) == (3 * m * n - cfg.q_storage_bits(m, n)) // fp16_lr


def test_q_only_methods_get_no_budget_rank():
    for method in ("rtn", "gptq"):
        cfg = make_config(method, bits=2)
        assert not cfg.has_low_rank and cfg.budget_rank(64, 128, 8.0) == 0
    assert make_config("lorc").has_low_rank


def test_lattice_budget_ranks_are_multiples_of_8():
    cfg = make_config("odlri", bits=2, lr_bits=4).for_shape(576, 1536)
    assert cfg.lr_quantizer == "e8p4" and cfg.rank_multiple == 8
    r = cfg.budget_rank(576, 1536, 2.5)
    # E8P Q: 2 bits + one fp16 scale; signs m + n; L/R: 4 bits per entry + 4 fp16 scales
    spare = 2.5 * 576 * 1536 - (2 * 576 * 1536 + 16) - (576 + 1536) - 64
    assert r == int(spare // (4 * (576 + 1536))) // 8 * 8
