"""QLRLinear computes x (Q + L R)ᵀ + b from its compressed buffers, for every storage variant."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from qlr.decompose.base import Decomposition
from qlr.kernels import ops
from qlr.nn import QLRLinear
from qlr.quant.grid import QuantizedTensor, QuantSpec, quantize_rtn
from qlr.quant.hadamard import Incoherence
from qlr.quant.packing import packed_bits

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def make_dec(m: int = 96, n: int = 160, r: int = 8, spec: QuantSpec | None = None,
             lr_spec: QuantSpec | None = None, perm: bool = False, rotate: bool = False,
             seed: int = 0) -> Decomposition:
    """A Decomposition built directly: RTN codes for Q (optionally act-ordered), random L/R (fp16-exact or
    RTN-quantized), optional Hadamard incoherence."""
    g = torch.Generator().manual_seed(seed)
    spec = spec or QuantSpec(bits=2, group_size=64)
    W = torch.randn(m, n, generator=g)
    rot = Incoherence.random(m, n, seed=seed) if rotate else None
    Ws = rot.rotate_weight(W) if rot is not None else W
    if perm:
        p = torch.randperm(n, generator=g)
        q0 = quantize_rtn(Ws[:, p], spec)  # stored column j is original column p[j]
        q = QuantizedTensor(q0.codes, q0.scale, q0.zero, spec, p)
    else:
        q = quantize_rtn(Ws, spec)
    L = torch.randn(m, r, generator=g) * 0.1
    R = torch.randn(r, n, generator=g) * 0.1
    lq = rq = None
    if lr_spec is not None:
        lq, rq = quantize_rtn(L, lr_spec), quantize_rtn(R, lr_spec)
        L, R = lq.dequantize(), rq.dequantize()
    else:
        L, R = L.half().float(), R.half().float()  # what fp16 storage keeps exactly
    return Decomposition("test", None, q, L, R, lq=lq, rq=rq, rotation=rot, shape=(m, n))


def reference(dec: Decomposition, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ dec.reconstruct().double().T
    return y if bias is None else y + bias.double()


CASES = {
    "asym2": dict(spec=QuantSpec(bits=2, group_size=64)),
    "sym3": dict(spec=QuantSpec(bits=3, group_size=32, symmetric=True)),
    "asym4_row": dict(spec=QuantSpec(bits=4, group_size=0)),
    "nf3": dict(spec=QuantSpec(bits=3, group_size=64, fmt="nf")),
    "nf4": dict(spec=QuantSpec(bits=4, group_size=32, fmt="nf")),
    "int8_pow2scale": dict(spec=QuantSpec(bits=8, group_size=64, scale_bits=8)),
    "fp32_scale_odd_groups": dict(spec=QuantSpec(bits=3, group_size=48, scale_bits=32)),
    "actorder": dict(spec=QuantSpec(bits=3, group_size=32), perm=True),
    "lr_int4": dict(lr_spec=QuantSpec(bits=4, group_size=8)),
    "lr_int2_actorder": dict(lr_spec=QuantSpec(bits=2, group_size=4, symmetric=True), perm=True),
    "rank0": dict(r=0),
    "rotation": dict(m=64, n=96, rotate=True),
    "rotation_lr_actorder": dict(m=48, n=64, rotate=True, perm=True, lr_spec=QuantSpec(bits=3, group_size=8)),
}


@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 256)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_dense(case: str, bias: bool, lead: tuple[int, ...], kernels: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch sizes 1, 3, 17 (fused GEMV / BLAS) and 512 (BLAS over several tiles of Q, the last one partial)."""
    monkeypatch.setattr(ops, "TILE_ELEMS", 40 * 160)
    monkeypatch.setattr(ops, "TILE_MIN_ROWS", 1)
    monkeypatch.setattr(ops.reference, "TILE_ROWS", 40)
    dec = make_dec(**CASES[case])
    m, n = dec.L_s.shape[0], dec.R_s.shape[1]
    b = torch.randn(m) if bias else None
    mod = QLRLinear.from_decomposition(dec, bias=b)
    x = torch.randn(*lead, n)
    y = mod(x)
    assert y.shape == (*lead, m) and y.dtype == torch.float32
    ref = reference(dec, x, b)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mod.dequantize_weight(), dec.reconstruct(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", ["asym2", "sym3", "asym4_row", "nf3", "int8_pow2scale", "fp32_scale_odd_groups",
                                  "actorder"])
def test_q_decodes_bit_exactly(case: str) -> None:
    """With rank 0 the dense weight is Q alone and must equal QuantizedTensor.dequantize() bit for bit."""
    dec = make_dec(**{**CASES[case], "r": 0})
    assert torch.equal(QLRLinear.from_decomposition(dec).dequantize_weight(), dec.q.dequantize())


def _padding(qt: QuantizedTensor | None) -> int:
    """Tail-padding bits of the packed codes (per row) and of the flattened zero points."""
    if qt is None:
        return 0
    m, n = qt.codes.shape
    pad = m * (packed_bits(n, qt.spec.bits) - n * qt.spec.bits)
    if qt.spec.has_zero:
        k = m * qt.spec.groups(n)
        pad += packed_bits(k, qt.spec.bits) - k * qt.spec.bits
    return pad


@pytest.mark.parametrize("case", sorted(CASES))
def test_storage_bits_match_decomposition(case: str) -> None:
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec)
    expected = dec.storage_bits()  # the grids count their packing's padding: checked against a hand count
    for qt in (dec.q, dec.lq, dec.rq):
        if isinstance(qt, QuantizedTensor):
            m_, n_ = qt.codes.shape
            sp = qt.spec
            dense = m_ * n_ * sp.bits + m_ * sp.groups(n_) * (sp.scale_bits + (sp.bits if sp.has_zero else 0))
            perm = 0 if qt.perm is None else n_ * max(1, math.ceil(math.log2(n_)))
            assert qt.storage_bits() == dense + perm + _padding(qt)
    if dec.rotation is not None:  # one bit per sign, packed into whole int32 words
        m, n = dec.rotation.shape
        expected += packed_bits(m, 1) - m + packed_bits(n, 1) - n
    assert mod.storage_bits() == expected
    assert mod.qlr_meta()["storage_bits"] == expected
    m, n = dec.L_s.shape[0], dec.R_s.shape[1]
    assert mod.bits_per_weight == pytest.approx(expected / (m * n))


def test_storage_exact_without_padding() -> None:
    dec = make_dec(m=64, n=128, spec=QuantSpec(bits=3, group_size=64))  # 128·3 and 64·2·3 are multiples of 32
    assert QLRLinear.from_decomposition(dec).storage_bits() == dec.storage_bits()


def test_buffers_are_compact_and_complete() -> None:
    dec = make_dec(spec=QuantSpec(bits=3, group_size=32), perm=True, lr_spec=QuantSpec(bits=4, group_size=8))
    mod = QLRLinear.from_decomposition(dec, bias=torch.zeros(96))
    sd = mod.state_dict()
    assert set(sd) == {f"{f}_{k}" for f in "qlr" for k in ("codes", "scale", "zero")} | {"q_perm", "bias"}
    assert sd["q_codes"].dtype == torch.int32 and sd["q_codes"].shape == (96, 15)  # 160·3/32
    assert sd["q_scale"].dtype == torch.float16 and sd["q_scale"].shape == (96, 5)
    assert sd["q_zero"].shape == (96 * 5 * 3 // 32,) and sd["q_perm"].dtype == torch.int16
    assert list(mod.parameters()) == []
    assert all(t.numel() < 96 * 160 for t in sd.values())  # no dense W anywhere
    assert "rank=8" in repr(mod) and "+perm" in repr(mod)


@pytest.mark.parametrize("case", ["asym2", "actorder", "rotation_lr_actorder", "rank0"])
def test_from_meta_and_state_dict_round_trip(case: str) -> None:
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.L_s.shape[0]))
    empty = QLRLinear.from_meta(mod.qlr_meta())
    assert all(t.device.type == "meta" for t in empty.buffers())
    empty.load_state_dict(mod.state_dict(), assign=True)
    x = torch.randn(5, dec.R_s.shape[1])
    assert torch.equal(empty(x), mod(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_follows_input(dtype: torch.dtype) -> None:
    dec = make_dec(lr_spec=QuantSpec(bits=4, group_size=8))
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(96))
    x = torch.randn(4, 160)
    y = mod(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), mod(x).double(), rtol=0.05, atol=0.1)


def test_input_validation_and_unknown_codec() -> None:
    mod = QLRLinear.from_decomposition(make_dec())
    with pytest.raises(ValueError, match="last dim 160"):
        mod(torch.randn(2, 159))

    @dataclass
    class LatticeLike:
        codes: torch.Tensor

    dec = make_dec()
    dec.q = LatticeLike(torch.zeros(96, 20))  # type: ignore[assignment]
    with pytest.raises(NotImplementedError, match="codec for LatticeLike"):
        QLRLinear.from_decomposition(dec)
    with pytest.raises(ValueError, match="bias must have shape"):
        QLRLinear.from_decomposition(make_dec(), bias=torch.zeros(3))


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic(device: str) -> None:
    dec = make_dec(m=64, n=96, perm=True, rotate=True, lr_spec=QuantSpec(bits=4, group_size=8))
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(64))
    x = torch.randn(3, 96)
    ref = mod(x)
    mod_d = mod.to(device)
    y = mod_d(x.to(device))
    assert y.device.type == device
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod_d.dequantize_weight().cpu(), dec.reconstruct(), rtol=1e-5, atol=1e-5)


def test_fused_path_sees_buffer_changes_and_grads(kernels: str) -> None:
    """The compiled whole-layer kernel's cached description follows in-place writes, replaced buffers and moves;
    inputs that need gradients run through the differentiable ops and match the dense gradient."""
    dec = make_dec(m=64, n=96, perm=True, rotate=True, lr_spec=QuantSpec(bits=4, group_size=8))
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(64))
    x = torch.randn(2, 96)
    y0 = mod(x)
    torch.testing.assert_close(y0.double(), reference(dec, x, mod.bias), rtol=1e-5, atol=1e-4)
    mod.bias.add_(1.0)  # in place: same storage, new version
    torch.testing.assert_close(mod(x), y0 + 1.0, rtol=1e-5, atol=1e-5)
    mod.bias = mod.bias - 1.0  # a replaced buffer
    torch.testing.assert_close(mod(x), y0, rtol=1e-5, atol=1e-5)
    mod.q_scale.mul_(2)  # Q doubles
    torch.testing.assert_close(mod(x).double(), reference(dec, x, mod.bias) + x.double() @ dec.Q.double().T,
                               rtol=1e-5, atol=1e-4)
    mod.q_scale.div_(2)
    xg = x.clone().requires_grad_()
    mod(xg).square().sum().backward()
    W = mod.dequantize_weight().double()
    xd = x.double().requires_grad_()
    (xd @ W.T + mod.bias.double()).square().sum().backward()
    torch.testing.assert_close(xg.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["rotation_lr_actorder", "nf4", "asym2"])
def test_torch_compile_full_graph(case: str) -> None:
    """The kernels are torch.library ops with fake kernels: a QLRLinear compiles into one graph (no breaks) and
    gives the eager result."""
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.L_s.shape[0]))
    x = torch.randn(3, dec.R_s.shape[1])
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_q_computes_the_same_layer_and_gradients(case: str) -> None:
    """cache_q (Q decoded once, as fine-tuning uses it) gives the codes' own outputs and input gradients, against
    the float64 reference; cache_q(None) drops it and pickling never carries it."""
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.L_s.shape[0]))
    x = torch.randn(33, dec.R_s.shape[1], dtype=torch.float64).float().requires_grad_(True)
    g = torch.randn(33, dec.L_s.shape[0])
    y0 = mod(x)
    (gx0,) = torch.autograd.grad(y0, x, g)
    mod.cache_q()
    if mod.meta["q"] is not None:
        assert mod._cached_q().shape == (mod.out_features, mod.in_features)
    y1 = mod(x)
    (gx1,) = torch.autograd.grad(y1, x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-4)
    ref = reference(dec, x.detach(), mod.bias)
    torch.testing.assert_close(y1.detach().double(), ref, rtol=1e-5, atol=1e-4)
    import copy
    assert "_q_dense" not in copy.deepcopy(mod).__dict__
    mod.cache_q(None)
    assert "_q_dense" not in mod.__dict__


@pytest.mark.parametrize("case", ["rotation_lr_actorder", "asym2"])
@pytest.mark.parametrize("cached", [False, True])
def test_forward_under_bf16_autocast(case: str, cached: bool) -> None:
    """Under bf16 autocast (fine-tuning with amp, evaluation under autocast), with Q's codes or a bf16 cache of
    Q: the output within bf16 rounding of the float64 reference."""
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec)
    x = torch.randn(40, dec.R_s.shape[1])
    ref = reference(dec, x, None)
    if cached:
        mod.cache_q(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 2e-2


def _with_q(dec: Decomposition, q: object) -> Decomposition:
    return Decomposition(dec.method, dec.config, q, dec.L_s, dec.R_s, lq=dec.lq, rq=dec.rq, rotation=dec.rotation,
                         shape=dec.shape)


def check_trained_q_scales(dec: Decomposition, scaled: object, theta: torch.Tensor, mod: QLRLinear,
                           amp_cache: bool = False) -> None:
    """The layer with Q's scale multipliers ``theta`` (through the rounding) computes ``scaled`` (dec with Q's scales
    replaced by the stored, rounded scale·θ), the θ gradient is the exact derivative of a layer linear in θ, and
    store_q_scales writes those scales beside the untouched codes."""
    ref_dec = _with_q(dec, scaled)
    if amp_cache:
        mod.cache_q(torch.float32)
    p = mod.train_q_scales(through_rounding=True)
    assert p.shape == theta.shape and bool((p == 1).all())
    with torch.no_grad():
        p.copy_(theta)
    codes = mod.q_codes.clone()
    x = torch.randn(21, dec.R_s.shape[1])
    g = torch.randn(21, dec.L_s.shape[0])
    ref = reference(ref_dec, x, mod.bias)
    y = mod(x)
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad((y * g).sum(), p)
    # the output is linear in θ away from the rounding: a unit step in one multiplier moves ⟨y, g⟩ by its gradient
    mod.__dict__["_q_scale_rounding"] = False
    flat = torch.randperm(theta.numel(), generator=torch.Generator().manual_seed(1))[:5]
    with torch.no_grad():
        f0 = float((mod(x).double() * g.double()).sum())
        for k in flat.tolist():
            p.view(-1)[k] = theta.view(-1)[k] + 1.0
            f1 = float((mod(x).double() * g.double()).sum())
            p.view(-1)[k] = theta.view(-1)[k]
            assert abs((f1 - f0) - float(grad.view(-1)[k])) <= 1e-3 * (1 + abs(float(grad.view(-1)[k])))
    mod.__dict__["_q_scale_rounding"] = True
    mod.store_q_scales()
    assert mod.q_scale_train is None and "_q_dense" not in mod.__dict__
    assert torch.equal(mod.q_codes, codes)
    with torch.no_grad():
        torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("case", ["asym2", "sym3", "asym4_row", "nf3", "fp32_scale_odd_groups", "actorder",
                                  "rotation_lr_actorder", "rank0"])
def test_trained_q_scales_scale_each_group(case: str, cached: bool) -> None:
    """Q's scales as trainable multipliers (fine-tuning's train_scales) on every grid: group g of row i becomes
    θ[i, g]·scale[i, g]·(code − zero), in stored column order (act-order, groups that do not divide the width)."""
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.L_s.shape[0]))
    q = dec.q
    theta = 1 + 0.2 * torch.randn(q.scale.shape, generator=torch.Generator().manual_seed(3))
    dtype = {16: torch.float16, 32: torch.float32}[q.spec.scale_bits]
    new_scale = (mod.q_scale.float() * theta).to(dtype).float()
    scaled = QuantizedTensor(q.codes, new_scale, q.zero, q.spec, q.perm)
    check_trained_q_scales(dec, scaled, theta, mod, amp_cache=cached)
    assert torch.equal(mod.q_scale.float(), new_scale)


def test_trained_q_scales_refused_for_power_of_two_scales() -> None:
    mod = QLRLinear.from_decomposition(make_dec(**CASES["int8_pow2scale"]))
    assert "power-of-two" in mod.q_scales_untrainable()
    with pytest.raises(ValueError, match="power-of-two"):
        mod.train_q_scales()


def test_cached_q_follows_changes_to_the_codes() -> None:
    """A dense Q cached before Q's buffers change (load_state_dict, an in-place write, a move) is decoded again in
    the same dtype rather than used stale."""
    dec = make_dec(**CASES["asym2"])
    mod = QLRLinear.from_decomposition(dec)
    other = QLRLinear.from_decomposition(make_dec(**CASES["asym2"], seed=1))
    x = torch.randn(5, dec.R_s.shape[1])
    mod.cache_q(torch.float64)
    mod.load_state_dict(other.state_dict())
    y = mod(x)
    assert mod._cached_q().dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(y, other(x), rtol=1e-5, atol=1e-5)
        mod.q_scale.mul_(2)
        other.q_scale.mul_(2)
        torch.testing.assert_close(mod(x), other(x), rtol=1e-5, atol=1e-5)
