"""The E8P codebook: structure, exact nearest-codeword search, the two-stage variant and bit accounting."""

from __future__ import annotations

import pytest
import torch

from qlr.quant.e8p import (
    LatticeQuantizedTensor,
    choose_scales,
    e8p_abs_grid,
    e8p_codebook,
    e8p_decode,
    e8p_encode,
    e8p_round,
    quantize_e8p,
)
from tests.layers import DEVICES


def test_codebook_structure() -> None:
    grid = e8p_abs_grid()
    assert grid.shape == (256, 8) and torch.unique(grid, dim=0).shape[0] == 256
    norms = (grid * grid).sum(-1)
    assert int((norms <= 10).sum()) == 227 and int((norms == 12).sum()) == 29
    cb = e8p_codebook()
    assert cb.shape == (65536, 8) and torch.unique(cb, dim=0).shape[0] == 65536
    codes = torch.arange(65536)
    shift = torch.where(codes % 2 == 1, 0.25, -0.25)
    lattice = cb - shift[:, None]  # points of the half-integer coset of E8: (Z + 1/2)^8 with an even sum
    assert torch.equal((2 * lattice).remainder(2), torch.ones_like(lattice))
    assert torch.equal(lattice.sum(-1).remainder(2), torch.zeros(65536))
    assert torch.equal(lattice.abs(), grid[codes >> 8])


def test_code_layout() -> None:
    """Bits 15–8 pattern, bits 7–1 signs of dims 1…7, bit 0 the +1/4 shift (QuIP#'s layout)."""
    a = e8p_abs_grid()[0]  # all 1/2: even sum, so the number of negatives is even
    assert torch.equal(e8p_decode(torch.tensor(1)), a + 0.25)
    assert torch.equal(e8p_decode(torch.tensor(0)), a - 0.25)
    # negate dimension 7 (bit 1); dimension 0 must flip too to keep the parity
    expected = a.clone()
    expected[7] = expected[0] = -0.5
    assert torch.equal(e8p_decode(torch.tensor(0b10)), expected - 0.25)


def test_encode_decode_roundtrip_on_codewords() -> None:
    codes = torch.randint(0, 65536, (5000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(e8p_encode(e8p_decode(codes)), codes)
    full = torch.arange(0, 65536, 7)
    assert torch.equal(e8p_encode(e8p_codebook()[full]), full)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spread", [0.5, 1.0, 2.5])
def test_nearest_codeword_equals_brute_force(device: str, spread: float) -> None:
    x = spread * torch.randn(200, 8, generator=torch.Generator().manual_seed(int(spread * 10)))
    x = x.to(device)
    d = torch.cdist(x.double(), e8p_codebook(device).double())
    codes = e8p_encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (200,)
    assert torch.equal(codes, d.argmin(-1))
    torch.testing.assert_close(d.gather(1, codes[:, None]).squeeze(1), d.min(-1).values)


def test_coset_fast_path_agrees_with_full_scoring() -> None:
    """The coset-rounding fast path plus scoring fallback finds codewords as near as scoring every row against all
    patterns, and a typical input (unit RMS) exercises both paths (some rows round outside the codebook)."""
    from qlr.quant.e8p import _nearest_by_scoring, _tables

    t = _tables(torch.device("cpu"))
    x = 1.1 * torch.randn(3000, 8, generator=torch.Generator().manual_seed(7))
    z = torch.floor(x - 0.25) + 0.5
    outside = (z.abs() > 2.5).any(-1) | ((z * z).sum(-1) > 12)
    assert 0.02 < float(outside.float().mean()) < 0.9
    best_dist = torch.full((3000,), float("inf"))
    for shift in (0.25, -0.25):
        b, neg = _nearest_by_scoring(x - shift, t)
        a = t.grid[b]
        best_dist = torch.minimum(best_dist, (x - shift - torch.where(neg, -a, a)).pow(2).sum(-1))
    codes = e8p_encode(x)
    torch.testing.assert_close((x - e8p_decode(codes)).pow(2).sum(-1), best_dist)


@pytest.mark.parametrize("spread", [0.3, 1.1, 3.0])
def test_numpy_and_torch_encoders_agree(monkeypatch, spread: float) -> None:
    """On CPU the encoder runs in NumPy; the PyTorch one (used on other devices) finds codewords exactly as near,
    for one-stage codes, two-stage rounding of an LDLQ-sized block and a multi-chunk input."""
    from qlr.quant import e8p

    g = torch.Generator().manual_seed(3)
    x = spread * torch.randn(5000, 8, generator=g)  # > one chunk
    block = spread * torch.randn(64, 8, generator=g)
    assert e8p._BACKEND["cpu"] == "numpy"
    got = (e8p_encode(x), e8p_round(block, [0.9, 0.2]))
    monkeypatch.setitem(e8p._BACKEND, "cpu", "torch")
    want = (e8p_encode(x), e8p_round(block, [0.9, 0.2]))
    dist = [(x - e8p_decode(c)).pow(2).sum(-1) for c in (got[0], want[0])]
    torch.testing.assert_close(dist[0], dist[1])
    assert float((got[0] != want[0]).float().mean()) < 1e-3  # codes differ only on exact ties
    torch.testing.assert_close(got[1][0], want[1][0])
    assert got[1][1].shape == want[1][1].shape == (2, 64)


def test_encode_keeps_leading_shape_and_chunks() -> None:
    x = torch.randn(3, 2500, 8, generator=torch.Generator().manual_seed(1))  # > one chunk (4096)
    codes = e8p_encode(x)
    assert codes.shape == (3, 2500)
    assert torch.equal(codes.reshape(-1), e8p_encode(x.reshape(-1, 8)))
    with pytest.raises(ValueError, match="8-dimensional"):
        e8p_encode(torch.zeros(4, 6))


def test_e8p_round_stages() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    q1, c1 = e8p_round(x, 0.9)
    assert c1.shape == (1, 64)
    torch.testing.assert_close(q1, 0.9 * e8p_decode(c1[0]))
    q2, c2 = e8p_round(x, [0.9, 0.3])
    assert c2.shape == (2, 64) and torch.equal(c2[0], c1[0])
    torch.testing.assert_close(q2, 0.9 * e8p_decode(c2[0]) + 0.3 * e8p_decode(c2[1]))
    assert (x - q2).pow(2).sum() < (x - q1).pow(2).sum()


def test_quantize_e8p_error_and_e8p4() -> None:
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    q2, q4 = quantize_e8p(W), quantize_e8p(W, stages=2)
    e2 = float((W - q2.dequantize()).pow(2).mean() / W.pow(2).mean())
    e4 = float((W - q4.dequantize()).pow(2).mean() / W.pow(2).mean())
    assert 0.07 < e2 < 0.11  # E8P on Gaussian data: ≈ 0.09 relative MSE at 2 bits
    assert e4 < 0.2 * e2
    assert q2.dequantize().dtype == torch.float32 and q2.dequantize().shape == (64, 128)
    # the searched scale beats clearly wrong ones
    for bad in (0.5 * q2.mean_scale(), 2.0 * q2.mean_scale()):
        eb = float((W - quantize_e8p(W, scale=bad).dequantize()).pow(2).mean() / W.pow(2).mean())
        assert eb > e2


def test_storage_bits_hand_worked() -> None:
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    q = quantize_e8p(W, stages=2)
    # 16 rows × 4 codes per row × 2 stages × 16 bits + 2 fp16 scales
    assert q.storage_bits() == 16 * 4 * 2 * 16 + 2 * 16 == 2080
    assert quantize_e8p(W).storage_bits() == 16 * 4 * 16 + 16
    assert quantize_e8p(W, scale_bits=32).storage_bits() == 1024 + 32
    assert q.codes.dtype == torch.int16 and q.codes.shape == (2, 16, 4)
    assert q.shape == (16, 32) and q.stages == 2 and q.bits == 4


def test_scales_are_stored_precision_and_validated() -> None:
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    q = quantize_e8p(W, stages=2)
    assert torch.equal(q.scales, q.scales.half().float())
    assert q.mean_scale() == float(q.scales[0])
    assert choose_scales(W, 2, scale=[1.0, 0.25]) == [1.0, 0.25]
    fixed = choose_scales(W, 2, scale=1.0)
    assert fixed[0] == 1.0 and 0.1 < fixed[1] < 0.6
    with pytest.raises(ValueError, match="stages"):
        quantize_e8p(W, stages=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_e8p(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="positive"):
        quantize_e8p(W, scale=-1.0)


def test_codes_int16_roundtrip_and_determinism() -> None:
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    q = quantize_e8p(W, stages=2)
    raw = q.codes.to(torch.int64) & 0xFFFF
    again = LatticeQuantizedTensor.from_codes(raw, q.scales.tolist())
    assert torch.equal(again.codes, q.codes)
    torch.testing.assert_close(again.dequantize(), q.dequantize())
    assert torch.equal(quantize_e8p(W, stages=2).codes, q.codes)
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())
