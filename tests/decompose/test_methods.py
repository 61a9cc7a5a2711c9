"""Behaviour of every registered method on LLM-like synthetic layers."""

import pytest
import torch

import qlr
from qlr.decompose.joint import odlri_init

FAST = dict(outer_iters=4, inner_iters=3)
LR_METHODS = ["lorc", "lqer", "qera-exact", "qera-approx", "srr"]


def test_registry_lists_every_named_method():
    assert set(qlr.methods()) == {"rtn", "gptq", "lorc", "lqer", "qera-exact", "qera-approx", "loftq",
                                  "caldera", "odlri", "srr"}


@pytest.mark.parametrize("method", sorted({"rtn", "gptq", "lorc", "lqer", "qera-exact", "qera-approx", "loftq",
                                           "caldera", "odlri", "srr"}))
def test_api_shapes_and_reconstruct(method, layer):
    W, H = layer["W"], layer["H"]
    rank = 0 if method in ("rtn", "gptq") else 8
    opts = FAST if method in ("caldera", "odlri") else {}
    dec = qlr.decompose(W, H, method, bits=3, rank=rank, mean_abs=layer["mean_abs"], **opts)
    m, n = W.shape
    assert dec.Q.shape == (m, n) and dec.L.shape == (m, rank) and dec.R.shape == (rank, n)
    assert torch.allclose(dec.reconstruct(), dec.Q + dec.L @ dec.R)
    assert dec.history and all(h == h for h in dec.history)
    err = qlr.activation_aware_error(W, dec.reconstruct(), H)
    assert err == pytest.approx(min(dec.history) if method in ("caldera", "odlri") else dec.history[-1], rel=1e-4)
    assert 0 < err < 1
    assert dec.bits_per_weight > 3


ACT_AWARE = ["lqer", "qera-exact", "qera-approx", "srr"]  # LR methods that weigh the error by the activations
LR4 = dict(group_size=64, rank=4, lr_bits=4)  # 2-bit: 2.92 bits/weight on `layer`, 2.69 on `outlier_layer`


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("method", ACT_AWARE)
@pytest.mark.parametrize("which", ["layer", "outlier_layer"])
def test_activation_aware_lr_methods_beat_rtn_at_fewer_bits(which, method, bits, request):
    """Q at g64 plus rank-4 factors at 4 bits beats RTN with g16 groups, which costs more all-in bits/weight
    (2-bit: 2.92 or 2.69 vs 3.125; 3-bit: 3.94 or 3.71 vs 4.19), with or without RTN's range search."""
    lay = request.getfixturevalue(which)
    W, H = lay["W"], lay["H"]
    dec = qlr.decompose(W, H, method, bits=bits, mean_abs=lay["mean_abs"], **LR4)
    rtns = [qlr.decompose(W, H, "rtn", bits=bits, group_size=16, clip_search=c) for c in (False, True)]
    assert dec.bits_per_weight < min(r.bits_per_weight for r in rtns)
    margin = 1.0 if method == "srr" else 0.8  # SRR's smallest margin: outlier_layer, 3 bits (0.0237 vs 0.0268)
    assert dec.history[-1] < margin * min(r.history[-1] for r in rtns)


@pytest.mark.parametrize("bits", [2, 3])
def test_closed_form_methods_at_equal_bits_on_the_outlier_layer(bits, outlier_layer):
    """Same Q, same factor storage, so exactly the same all-in bits; only the scaling S differs. LoRC (S = I)
    spends its rank on the heavy weight columns, the activation-aware scalings on the outlier channels
    (2-bit: LoRC 0.375, the others 0.073)."""
    W, H, mean_abs = outlier_layer["W"], outlier_layer["H"], outlier_layer["mean_abs"]
    decs = {m: qlr.decompose(W, H, m, bits=bits, mean_abs=mean_abs, **LR4)
            for m in ("lorc", "lqer", "qera-approx", "qera-exact")}
    assert len({d.storage_bits() for d in decs.values()}) == 1
    assert len({float(d.Q.sum()) for d in decs.values()}) == 1
    err = {m: d.history[-1] for m, d in decs.items()}
    for m in ("lqer", "qera-approx", "qera-exact"):
        assert err[m] < 0.3 * err["lorc"], m
    # with fp16 factors QERA-exact is the optimum for the shared Q
    fp = {m: qlr.decompose(W, H, m, bits=bits, mean_abs=mean_abs, group_size=64, rank=4).history[-1]
          for m in ("lorc", "lqer", "qera-approx", "qera-exact")}
    assert fp["qera-exact"] <= min(fp.values()) * (1 + 1e-6)


def test_lqer_scaling_is_mean_abs(outlier_layer):
    """LQER's S is diag(mean |x|): with a constant mean |x| it is LoRC, without mean_abs it falls back to
    sqrt(diag H), i.e. QERA-approx."""
    W, H = outlier_layer["W"], outlier_layer["H"]
    kw = dict(bits=2, group_size=64, rank=4)
    flat = qlr.decompose(W, H, "lqer", mean_abs=torch.ones(W.shape[1], dtype=torch.float64), **kw)
    assert torch.equal(flat.reconstruct(), qlr.decompose(W, H, "lorc", **kw).reconstruct())
    rms = qlr.decompose(W, H, "lqer", mean_abs=None, **kw)
    assert torch.equal(rms.reconstruct(), qlr.decompose(W, H, "qera-approx", **kw).reconstruct())
    own = qlr.decompose(W, H, "lqer", mean_abs=outlier_layer["mean_abs"], **kw)
    assert not torch.equal(own.reconstruct(), flat.reconstruct())


@pytest.mark.parametrize("bits", [2, 3])
def test_joint_methods_beat_gptq_and_gptq_beats_rtn(bits, layer):
    W, H = layer["W"], layer["H"]
    rtn = qlr.decompose(W, H, "rtn", bits=bits, rank=0).history[-1]
    gptq = qlr.decompose(W, H, "gptq", bits=bits, rank=0).history[-1]
    assert gptq < rtn
    for method in ("caldera", "odlri"):
        dec = qlr.decompose(W, H, method, bits=bits, rank=16, **FAST)
        assert min(dec.history) < gptq


def test_loftq_beats_nf_alone(layer):
    W, H = layer["W"], layer["H"]
    dec = qlr.decompose(W, H, "loftq", bits=2, rank=16)
    q_only = qlr.activation_aware_error(W, dec.Q, H)
    assert dec.history[-1] < q_only
    assert len(dec.history) == 5


def test_qera_exact_is_optimal_for_its_q(layer):
    """The LR part of qera-exact (fp16 factors) is the activation-aware optimum for its Q: no other method's LR
    fitted to the same Q does better."""
    W, H = layer["W"], layer["H"]
    kw = dict(bits=3, rank=16, lr_bits=16, damp=1e-6)
    exact = qlr.decompose(W, H, "qera-exact", **kw).history[-1]
    for other in ("lorc", "lqer", "qera-approx"):
        assert exact <= qlr.decompose(W, H, other, **kw).history[-1] * 1.0001


def test_caldera_history_never_ends_above_first_and_best_is_returned(layer):
    W, H = layer["W"], layer["H"]
    dec = qlr.decompose(W, H, "caldera", bits=2, rank=16, outer_iters=6, inner_iters=3, patience=0)
    assert len(dec.history) == 6
    assert dec.history[-1] <= dec.history[0] and min(dec.history) <= dec.history[0]
    assert qlr.activation_aware_error(W, dec.reconstruct(), H) == pytest.approx(min(dec.history), rel=1e-4)
    assert dec.diagnostics["best_iter"] == dec.history.index(min(dec.history))


def test_odlri_init_is_supported_on_the_outlier_channels(layer):
    W, H = layer["W"], layer["H"]
    L0, R0, idx = odlri_init(W, H, rank=16, k=4, damp=0.01)
    assert set(idx.tolist()) == set(layer["outliers"].tolist())  # the top diag(H) channels
    others = torch.ones(W.shape[1], dtype=torch.bool)
    others[idx] = False
    assert float(R0[:, others].abs().max()) == 0.0
    # with k <= r the restricted fit reproduces W's outlier columns
    assert torch.allclose((L0 @ R0)[:, idx], W[:, idx], atol=1e-4)


def test_odlri_k_is_capped_at_rank(layer):
    W, H = layer["W"], layer["H"]
    L0, R0, idx = odlri_init(W, H, rank=2, k=16, damp=0.01)
    assert idx.numel() == 2


def test_odlri_default_k_follows_the_papers_ratio(layer):
    """k defaults to rank // 16 (the paper's k = 16 at r = 256), at least 1; an explicit k is used as given."""
    W, H = layer["W"], layer["H"]
    fast = dict(bits=2, outer_iters=1, inner_iters=1)
    assert len(qlr.decompose(W, H, "odlri", rank=40, **fast).diagnostics["odlri_channels"]) == 2
    assert len(qlr.decompose(W, H, "odlri", rank=8, **fast).diagnostics["odlri_channels"]) == 1
    assert len(qlr.decompose(W, H, "odlri", rank=8, odlri_k=3, **fast).diagnostics["odlri_channels"]) == 3


def test_role_ratios_follow_the_paper(layer):
    """Zero init: Q carries the weight (‖QX‖/‖WX‖ ≫ ‖LRX‖/‖WX‖); SVD-of-W init: LR carries it."""
    W, H = layer["W"], layer["H"]
    zero = qlr.decompose(W, H, "caldera", bits=2, rank=16, init="zero", **FAST).diagnostics
    svd = qlr.decompose(W, H, "caldera", bits=2, rank=16, init="svd", **FAST).diagnostics
    odl = qlr.decompose(W, H, "odlri", bits=2, rank=16, odlri_k=4, **FAST).diagnostics
    assert zero["q_ratio"][0] > 0.8 and zero["lr_ratio"][0] < 0.5
    assert svd["lr_ratio"][0] > svd["q_ratio"][0]
    assert odl["lr_ratio"][0] > zero["lr_ratio"][0]
    assert len(odl["q_scale"]) == len(odl["q_ratio"])


def test_srr_theory_k_and_fixed_k(layer):
    W, H = layer["W"], layer["H"]
    auto = qlr.decompose(W, H, "srr", bits=3, rank=16, k_rule="theory")
    k = auto.diagnostics["preserve_k"]
    assert 0 <= k <= 16 and len(auto.diagnostics["k_scores"]) == 17
    fixed = qlr.decompose(W, H, "srr", bits=3, rank=16, preserve_k=5)
    assert fixed.diagnostics["preserve_k"] == 5


def test_quantized_lr_bit_accounting_and_bpw(layer):
    W, H = layer["W"], layer["H"]
    m, n = W.shape
    dec = qlr.decompose(W, H, "lorc", bits=2, rank=8, group_size=32, lr_bits=4, lr_group_size=32)
    q_bits = m * n * 2 + m * (n // 32) * (16 + 2)
    l_bits = m * 8 * 4 + m * 1 * (16 + 4)  # L: m × 8, one group per row (8 < 32)
    r_bits = 8 * n * 4 + 8 * (n // 32) * (16 + 4)
    assert dec.storage_bits() == q_bits + l_bits + r_bits
    assert dec.bits_per_weight == pytest.approx((q_bits + l_bits + r_bits) / (m * n))
    fp = qlr.decompose(W, H, "lorc", bits=2, rank=8, group_size=32)
    assert fp.storage_bits() == q_bits + 16 * 8 * (m + n)


def test_rtn_and_gptq_are_q_only(layer):
    with pytest.raises(ValueError, match="rank=0"):
        qlr.decompose(layer["W"], layer["H"], "rtn", bits=2, rank=8)
    assert qlr.decompose(layer["W"], layer["H"], "gptq", bits=2).rank == 0


@pytest.mark.parametrize("method", ["caldera", "odlri", "srr", "loftq"])
def test_deterministic(method, layer):
    W, H = layer["W"], layer["H"]
    opts = FAST if method in ("caldera", "odlri") else {}
    a = qlr.decompose(W, H, method, bits=2, rank=8, **opts)
    b = qlr.decompose(W, H, method, bits=2, rank=8, **opts)
    assert torch.equal(a.reconstruct(), b.reconstruct()) and a.history == b.history


@pytest.mark.parametrize("method", ["caldera", "odlri"])
def test_lattice_joint_path(method, layer):
    """E8P Q + E8P 4-bit L/R under incoherence: exact original-domain reconstruction, honest bits, beats GPTQ."""
    W, H = layer["W"], layer["H"]
    dec = qlr.decompose(W, H, method, bits=2, rank=16, lr_bits=4, q_quantizer="e8p", lr_quantizer="e8p4",
                        outer_iters=2, inner_iters=2)
    assert dec.rotation is not None
    err = qlr.activation_aware_error(W, dec.reconstruct(), H)
    assert err == pytest.approx(min(dec.history), rel=1e-3)  # the rotation is undone exactly
    m, n = W.shape
    expect = (m * n // 8 * 16 + 16) + 2 * (16 * (m + n) // 8 * 16 + 2 * 16) + (m + n)
    assert dec.storage_bits() == expect
    gptq = qlr.decompose(W, H, "gptq", bits=2, group_size=32).history[-1]
    assert err < gptq


def test_odlri_domain_picks_channels_where_it_says(layer):
    """Under incoherence, "input" ranks the model's own channels (the layer's outliers); "rotated" ranks the
    channels of the rotated H, which the outliers no longer single out."""
    W, H = layer["W"], layer["H"]
    opts = dict(bits=2, rank=16, odlri_k=4, lr_bits=4, q_quantizer="e8p", lr_quantizer="e8p4", outer_iters=1,
                inner_iters=1)
    inp = qlr.decompose(W, H, "odlri", odlri_domain="input", **opts)
    rot = qlr.decompose(W, H, "odlri", odlri_domain="rotated", **opts)
    assert set(inp.diagnostics["odlri_channels"]) == set(layer["outliers"].tolist())
    Hr = rot.rotation.rotate_hessian(H.to(torch.float64))
    top = torch.topk(torch.diagonal(Hr), 4).indices
    assert set(rot.diagnostics["odlri_channels"]) == set(top.tolist())
    assert inp.history != rot.history
    with pytest.raises(ValueError, match="odlri_domain"):
        qlr.decompose(W, H, "odlri", odlri_domain="both", **opts)


def test_lattice_options_are_validated(layer):
    W, H = layer["W"], layer["H"]
    with pytest.raises(ValueError, match="2 bits"):
        qlr.decompose(W, H, "caldera", bits=3, rank=16, q_quantizer="e8p")
    with pytest.raises(ValueError, match="lr_bits=4"):
        qlr.decompose(W, H, "caldera", bits=2, rank=16, lr_quantizer="e8p4", lr_bits=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        qlr.decompose(W, H, "caldera", bits=2, rank=12, lr_bits=4, lr_quantizer="e8p4")


def test_hessian_downdate_removes_lr_directions(layer):
    from qlr.decompose.joint import downdated_hessian
    from qlr.decompose.lowrank import Whitener, lowrank_fit
    from qlr.decompose.metrics import weighted_energy

    W, H = layer["W"], layer["H"]
    L, R = lowrank_fit(W, Whitener.from_hessian(H, 0.01), 4)
    LR = L @ R
    Hq = downdated_hessian(H, LR, 4, 0.01)
    assert torch.allclose(Hq, Hq.T) and float(torch.linalg.eigvalsh(Hq)[0]) > 0
    # the LR directions weigh (almost) nothing under the downdated H, unlike under H itself
    assert weighted_energy(LR, Hq) < 0.05 * weighted_energy(LR, H)


def test_hessian_downdate_removes_only_spanned_directions(layer):
    """A rank-2 LR (e.g. an ODLRI start with k = 2 < r) removes two directions of H, not r arbitrary ones."""
    from qlr.decompose.joint import downdated_hessian
    from qlr.quant.gptq import damped

    W, H = layer["W"], layer["H"]
    LR = torch.zeros_like(W)
    LR[:, :2] = W[:, :2]
    Hd = damped(H, 0.01)
    Hq = downdated_hessian(H, LR, 8, 0.01)
    removed = Hd + 0.01 * float(torch.diagonal(Hd).mean()) * torch.eye(H.shape[0], dtype=Hd.dtype) - Hq
    evals = torch.linalg.eigvalsh((removed + removed.T) / 2)
    assert int((evals > 1e-8 * float(evals.max())).sum()) == 2


def test_hessian_downdate_option(layer):
    W, H = layer["W"], layer["H"]
    on = qlr.decompose(W, H, "caldera", bits=2, rank=16, **FAST)
    off = qlr.decompose(W, H, "caldera", bits=2, rank=16, hessian_downdate=False, **FAST)
    assert on.config.hessian_downdate and not off.config.hessian_downdate
    assert on.history != off.history  # the option changes the Q step


def test_auto_quantizers_pick_the_lattice_at_2_bits(layer):
    """The default ("auto") is the E8P lattice for Q and L/R at 2 bits when the shape allows it, else the scalar
    grid; the resolved choice is what the decomposition records."""
    from qlr.decompose.joint import JointConfig

    cfg = JointConfig(bits=2, rank=64, lr_bits=4)
    assert (cfg.q_quantizer, cfg.lr_quantizer) == ("auto", "auto")
    r = cfg.resolve(576, 1536)
    assert (r.q_quantizer, r.lr_quantizer, r.use_incoherence) == ("e8p", "e8p4", True)
    assert cfg.resolve(576, 100).q_quantizer == "gptq"  # 100 columns: not a multiple of 8
    assert cfg.resolve(576, 8 * 11).q_quantizer == "gptq"  # 88 = 8·11: no Hadamard matrix of that size
    assert JointConfig(bits=3, rank=64).resolve(576, 576).q_quantizer == "gptq"
    assert JointConfig(bits=2, rank=12, lr_bits=4).resolve(576, 576).lr_quantizer == "uniform"
    assert JointConfig(bits=2, rank=64, lr_bits=16).resolve(576, 576).lr_quantizer == "uniform"
    assert JointConfig(bits=2, rank=64, incoherence=False).resolve(576, 576).q_quantizer == "gptq"
    W, H = layer["W"], layer["H"]
    dec = qlr.decompose(W, H, "caldera", bits=2, rank=16, **FAST)
    assert dec.config.q_quantizer == "e8p" and dec.config.lr_quantizer == "e8p4"


def test_joint_methods_at_rank_zero_are_their_q_step(layer):
    W, H = layer["W"], layer["H"]
    for method in ("caldera", "odlri"):
        dec = qlr.decompose(W, H, method, bits=2, rank=0, hessian_downdate=False, q_quantizer="gptq")
        assert dec.rank == 0 and len(dec.history) == 1
        gptq = qlr.decompose(W, H, "gptq", bits=2, clip_search=True)
        assert torch.equal(dec.Q, gptq.Q)
