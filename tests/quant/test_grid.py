import pytest
import torch

from qlr.quant.grid import QuantSpec, nf_levels, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 0])
def test_rtn_codes_in_range_and_error_bounded(bits, symmetric, group_size):
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(W, QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    err = (q.dequantize() - W).abs()
    g = group_size or 128
    step = q.scale.repeat_interleave(g, dim=1)[:, :128]
    # rounding (half a step) plus, at the range ends, the integer zero point or the symmetric grid's short side
    assert bool((err <= step * 1.0 + 1e-5).all())


def test_rtn_is_exact_on_grid_values():
    spec = QuantSpec(bits=3, group_size=4)
    W = torch.tensor([[0.0, 1.0, 2.0, 7.0, -1.0, 0.0, 3.0, 6.0]]) * 0.5
    q = quantize_rtn(W, spec)
    assert torch.allclose(q.dequantize(), W, atol=1e-4)


def test_bit_accounting_hand_worked():
    # 2 rows × 8 cols, 3-bit, groups of 4, asymmetric fp16 scale + 3-bit zero, as stored: each row's 24 code bits
    # in one 32-bit word (64), scales 2·2·16 = 64, the four 3-bit zeros packed into one word (32) → 160 bits
    q = quantize_rtn(torch.randn(2, 8), QuantSpec(bits=3, group_size=4))
    assert q.storage_bits() == 160
    # 768 2-bit codes fill 48 words exactly; 12 groups of fp16 scale + 2-bit zero (24 bits, one word)
    assert QuantSpec(bits=2, group_size=64).bits_per_weight(768) == pytest.approx((1536 + 12 * 16 + 32) / 768)
    qs = quantize_rtn(torch.randn(2, 8), QuantSpec(bits=3, group_size=4, symmetric=True))
    assert qs.storage_bits() == 64 + 64


def test_nf_levels_have_exact_zero_and_unit_range():
    for b in (2, 3, 4):
        lv = nf_levels(b)
        assert lv.numel() == 2**b and float(lv.max()) == 1.0 and bool((lv == 0).any())
        assert bool((lv[1:] > lv[:-1]).all())


def test_clip_search_never_worse():
    W = torch.distributions.StudentT(3).sample((32, 256))
    a = quantize_rtn(W, QuantSpec(bits=2, group_size=64))
    b = quantize_rtn(W, QuantSpec(bits=2, group_size=64, clip_search=True))
    assert (b.dequantize() - W).pow(2).sum() <= (a.dequantize() - W).pow(2).sum() * 1.001


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=7), dict(fmt="nf", bits=8), dict(group_size=-1),
                                 dict(fmt="mx")])
def test_bad_spec(bad):
    with pytest.raises(ValueError):
        QuantSpec(**bad)
