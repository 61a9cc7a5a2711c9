"""QLRLinear stores and runs E8P lattice codes (Q, L and/or R): forward ≈ x (Q + L R)ᵀ + b, rows decode bit for bit
as ``LatticeQuantizedTensor.dequantize()``, storage bits agree, and meta → load and checkpoint save → load give
identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlr import io
from qlr.decompose.base import Decomposition
from qlr.kernels import ops
from qlr.nn import LatticeCodec, QLRLinear, codec_for
from qlr.quant.e8p import LatticeQuantizedTensor, quantize_e8p
from qlr.quant.grid import QuantSpec, quantize_rtn
from qlr.quant.hadamard import Incoherence
from tests.nn.test_qlinear import reference

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def make_dec(m: int = 64, n: int = 96, r: int = 8, stages: int = 1, scale_bits: int = 16, lr: str = "fp16",
             rotate: bool = False, seed: int = 0) -> Decomposition:
    """Q = E8P(U W Vᵀ) (``stages`` stages), L/R random and stored as ``lr``: "fp16", "int4" (scalar grid) or
    "e8p"/"e8p4" (lattice); optional Hadamard incoherence."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    rot = Incoherence.random(m, n, seed=seed) if rotate else None
    Ws = rot.rotate_weight(W) if rot is not None else W
    q = quantize_e8p(Ws, stages=stages, scale_bits=scale_bits)
    L = torch.randn(m, r, generator=g) * 0.1
    R = torch.randn(r, n, generator=g) * 0.1
    lq = rq = None
    if lr == "int4":
        lq, rq = quantize_rtn(L, QuantSpec(bits=4, group_size=8)), quantize_rtn(R, QuantSpec(bits=4, group_size=32))
    elif lr in ("e8p", "e8p4"):
        st = 1 if lr == "e8p" else 2
        lq, rq = quantize_e8p(L, stages=st), quantize_e8p(R, stages=st, scale_bits=32)
    if lq is not None:
        L, R = lq.dequantize(), rq.dequantize()
    else:
        L, R = L.half().float(), R.half().float()  # what fp16 storage keeps exactly
    return Decomposition("test", None, q, L, R, lq=lq, rq=rq, rotation=rot, shape=(m, n))


CASES = {
    "e8p_lr_fp16": dict(),
    "e8p4_lr_fp16": dict(stages=2),
    "e8p_s32_lr_int4": dict(scale_bits=32, lr="int4"),
    "e8p_lr_e8p": dict(lr="e8p"),
    "e8p4_lr_e8p4": dict(stages=2, lr="e8p4"),
    "rank0": dict(r=0),
    "rot_lr_fp16": dict(rotate=True),
    "rot_e8p4_lr_int4": dict(stages=2, lr="int4", rotate=True),
    "rot_lr_e8p": dict(m=48, n=128, lr="e8p", rotate=True),
}


@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 256)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_dense(case: str, bias: bool, lead: tuple[int, ...], kernels: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch sizes 1, 3, 17 (fused GEMV / BLAS) and 512 (BLAS over several tiles of Q, the last one partial)."""
    monkeypatch.setattr(ops, "TILE_ELEMS", 24 * 128)
    monkeypatch.setattr(ops, "TILE_MIN_ROWS", 1)
    monkeypatch.setattr(ops.reference, "TILE_ROWS", 24)
    dec = make_dec(**CASES[case])
    m, n = dec.shape
    b = torch.randn(m) if bias else None
    mod = QLRLinear.from_decomposition(dec, bias=b)
    assert mod.meta["q"]["codec"] == "e8p"
    x = torch.randn(*lead, n)
    y = mod(x)
    assert y.shape == (*lead, m) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(dec, x, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mod.dequantize_weight().double(), dec.reconstruct().double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["e8p4_lr_e8p4", "rot_lr_e8p", "e8p_s32_lr_int4"])
def test_rows_decode_bit_for_bit(case: str) -> None:
    """Q (and lattice L/R) decoded tile by tile equal ``dequantize()`` exactly, in the stored domain."""
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec)
    m = dec.shape[0]
    rows = mod._decoder("q")
    tiled = torch.cat([rows(r0, min(m, r0 + 20)) for r0 in range(0, m, 20)])
    assert torch.equal(tiled, dec.q.dequantize())
    assert torch.equal(mod._dense("q"), dec.q.dequantize())
    assert rows(5, 5).shape == (0, dec.shape[1])
    for f, codes in (("l", dec.lq), ("r", dec.rq)):
        if isinstance(codes, LatticeQuantizedTensor):
            assert torch.equal(mod._dense(f), codes.dequantize())


@pytest.mark.parametrize("case", sorted(CASES))
def test_storage_bits_match_tensors(case: str) -> None:
    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec)
    for f, src in (("q", dec.q), ("l", dec.lq), ("r", dec.rq)):
        if isinstance(src, LatticeQuantizedTensor) and mod.meta[f] is not None:
            assert codec_for(name="e8p").storage_bits(mod._bufs(f), mod.meta[f]) == src.storage_bits()
    # the sign vectors are stored in whole int32 words; every size here is a multiple of 32 but 48
    pad = 0 if dec.rotation is None else sum(32 * -(-k // 32) - k for k in dec.shape)
    assert mod.storage_bits() == dec.storage_bits() + pad


def test_codec_choice_buffers_and_repr() -> None:
    dec = make_dec(stages=2, scale_bits=32, lr="e8p")
    assert isinstance(codec_for(dec.q), LatticeCodec)
    mod = QLRLinear.from_decomposition(dec)
    assert mod.q_codes.dtype == torch.int16 and mod.q_codes.shape == (2, 64, 12)
    assert mod.q_scale.dtype == torch.float32 and mod.l_scale.dtype == torch.float16
    assert torch.equal(mod.q_codes, dec.q.codes) and mod.q_codes.data_ptr() != dec.q.codes.data_ptr()
    assert mod.meta["q"] == {"codec": "e8p", "shape": [64, 96], "stages": 2, "scale_bits": 32}
    assert "q=e8p4/s32" in repr(mod) and "l=e8p," in repr(mod)


def test_unrepresentable_scale_refused() -> None:
    lt = LatticeQuantizedTensor.from_codes(torch.zeros(1, 8, 2, dtype=torch.int64), [0.1], scale_bits=16)
    with pytest.raises(ValueError, match="not exactly representable"):
        LatticeCodec().encode(lt)


@pytest.mark.parametrize("case", ["e8p4_lr_e8p4", "rot_e8p4_lr_int4", "rot_lr_e8p"])
def test_meta_roundtrip_identical(case: str) -> None:
    dec = make_dec(**CASES[case])
    m, n = dec.shape
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(m))
    meta = json.loads(json.dumps(mod.qlr_meta()))
    empty = QLRLinear.from_meta(meta)
    assert all(t.is_meta for t in empty.buffers())
    assert empty.storage_bits() == mod.storage_bits() == meta["storage_bits"]
    empty.load_state_dict(mod.state_dict(), assign=True)
    x = torch.randn(5, n)
    assert torch.equal(empty(x), mod(x))


@pytest.mark.parametrize("device", DEVICES)
def test_device(device: str) -> None:
    dec = make_dec(stages=2, lr="e8p", rotate=True)
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.shape[0])).to(device)
    x = torch.randn(4, dec.shape[1])
    y = mod(x.to(device))
    assert y.device.type == device
    assert torch.equal(mod._dense("q").cpu(), dec.q.dequantize())
    torch.testing.assert_close(y.cpu(), QLRLinear.from_decomposition(dec, bias=mod.bias.cpu())(x),
                               rtol=1e-5, atol=1e-4)
    if device == "cuda":
        y16 = mod(x.to(device, torch.float16))
        assert y16.dtype == torch.float16 and torch.isfinite(y16).all()


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _lattice_decomposition(W: torch.Tensor, i: int) -> Decomposition:
    """Q = E8P(W) (e8p / e8p4 by layer index, Hadamard rotation on some), L R = rank-8 SVD of the residual, fp16
    or lattice-coded."""
    W = W.float()
    m, n = W.shape
    rot = Incoherence.random(m, n, seed=i) if i % 3 == 1 else None
    Ws = rot.rotate_weight(W) if rot is not None else W
    q = quantize_e8p(Ws, stages=1 + i % 2, scale_bits=(16, 32)[i % 4 == 2])
    U, S, Vh = torch.linalg.svd(Ws - q.dequantize(), full_matrices=False)
    L, R = U[:, :8] * S[:8], Vh[:8]
    lq = rq = None
    if i % 2 == 0:
        lq, rq = quantize_e8p(L, stages=2), quantize_e8p(R)
        L, R = lq.dequantize(), rq.dequantize()
    else:
        L, R = L.half().float(), R.half().float()
    return Decomposition("e8p", None, q, L, R, lq=lq, rq=rq, rotation=rot, shape=(m, n), history=[0.01 * i])


def test_checkpoint_save_load_inspect(tmp_path: Path) -> None:
    from tests.test_io import tiny_compressed_llama

    model, act_err = tiny_compressed_llama(_lattice_decomposition)
    names = list(act_err)
    # Q has one or two E8P stages (2 or 4 bits) by layer: no single ``bits`` for inspect to check
    directory = io.save(model, tmp_path / "tiny", info={"method": "e8p", "bits": None, "rank": 8})
    loaded = io.load(directory)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    qlr = [m for m in loaded.modules() if isinstance(m, QLRLinear)]
    assert len(qlr) == len(names) == 14 and all(m.meta["q"]["codec"] == "e8p" for m in qlr)
    assert any(m.meta["l"]["codec"] == "e8p" for m in qlr) and any(m.meta["rotation"] for m in qlr)
    report = io.inspect(directory)
    assert report["num_layers"] == 14
    assert report["bits_per_weight_measured"] == pytest.approx(report["bits_per_weight_meta"], rel=1e-12)
    for row, mod in zip(report["layers"], qlr):
        assert row["bits_per_weight_measured"] == pytest.approx(row["bits_per_weight_meta"], rel=1e-12)
        assert row["bits_per_weight_meta"] == pytest.approx(mod.bits_per_weight, rel=1e-12)


def test_torch_compile_full_graph() -> None:
    """E8P Q and lattice L/R under the rotation compile into one graph and give the eager result."""
    dec = make_dec(stages=2, lr="e8p4", rotate=True)
    mod = QLRLinear.from_decomposition(dec)
    x = torch.randn(3, dec.shape[1])
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["e8p_lr_fp16", "e8p_s32_lr_int4", "rot_lr_e8p", "rank0"])
def test_trained_q_scale_scales_the_lattice(case: str) -> None:
    """A one-stage E8P Q's scale as a trainable multiplier: Q becomes θ·scale·codewords (θ one scalar), stored
    rounded to the scale's dtype beside the untouched codes; a two-stage Q is refused."""
    from tests.nn.test_qlinear import check_trained_q_scales

    dec = make_dec(**CASES[case])
    mod = QLRLinear.from_decomposition(dec, bias=torch.randn(dec.L_s.shape[0]))
    theta = torch.tensor([1.137])
    dtype = {16: torch.float16, 32: torch.float32}[dec.q.scale_bits]
    new_scale = (dec.q.scales.float() * theta).to(dtype).float()
    scaled = LatticeQuantizedTensor(dec.q.codes, new_scale, dec.q.scale_bits)
    check_trained_q_scales(dec, scaled, theta, mod)
    assert torch.equal(mod.q_scale.float(), new_scale)
    two = QLRLinear.from_decomposition(make_dec(**CASES["e8p4_lr_fp16"]))
    with pytest.raises(ValueError, match="2-stage"):
        two.train_q_scales()
