"""Bit-packing: exact round trips, compact sizes, the documented bit layout, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from qlr.quant.packing import pack, packed_bits, packed_words, unpack


def _round_trip(bits: int, n: int, device: str) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 4, n), generator=g, dtype=torch.uint8).to(device)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.device.type == device
    assert words.shape == (3, 4, math.ceil(n * bits / 32))
    back = unpack(words, bits, n)
    assert back.dtype == torch.uint8 and back.device.type == device
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 1, 5, 6, 7])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 63, 100, 577])
def test_round_trip_exact(bits: int, n: int) -> None:
    _round_trip(bits, n, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_round_trip_cuda() -> None:
    for bits in (2, 3, 4, 8):
        for n in (33, 577):
            _round_trip(bits, n, "cuda")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_round_trip(bits: int) -> None:
    """All-ones codes set every bit, including the int32 sign bit; all-zero and alternating patterns too."""
    n = 97
    for fill in (0, 2**bits - 1):
        codes = torch.full((2, n), fill, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), bits, n), codes)
    alt = (torch.arange(n) % 2 * (2**bits - 1)).to(torch.uint8)[None]
    assert torch.equal(unpack(pack(alt, bits), bits, n), alt)


def test_sizes_are_compact() -> None:
    assert packed_words(32, 3) == 3  # 32 three-bit codes fill exactly three words
    assert packed_words(33, 3) == 4  # not 6: no per-block padding, only the row tail
    assert packed_words(576, 2) == 36
    assert packed_words(0, 4) == 0
    assert packed_bits(33, 3) == 128
    for bits in (2, 3, 4, 8):
        for n in (1, 31, 32, 33, 1536):
            assert packed_bits(n, bits) - n * bits < 32


def test_documented_bit_layout() -> None:
    """Code k occupies stream bits [3k, 3k+3); code 10 straddles words 0 and 1 (bits 30, 31 | 32)."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101
    codes[0, 0] = 0b011
    words = pack(codes, 3)
    assert words.tolist() == [[(1 << 30) | 0b011, 0b1, 0]]
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 7] = 0xF  # top nibble of the first word: the sign bit is set
    assert pack(codes, 4).tolist() == [[-(1 << 28)]]


def test_empty_and_2d_shapes() -> None:
    assert pack(torch.zeros(0, 5, dtype=torch.uint8), 3).shape == (0, 1)
    assert unpack(torch.zeros(4, 0, dtype=torch.int32), 2, 0).shape == (4, 0)
    c = torch.randint(0, 4, (7,), dtype=torch.uint8)
    assert torch.equal(unpack(pack(c, 2), 2, 7), c)


def test_validation() -> None:
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(torch.tensor([[0, 8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(TypeError):
        pack(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 2, dtype=torch.int32), 3, 33)
    with pytest.raises(TypeError):
        unpack(torch.zeros(1, 3, dtype=torch.int64), 3, 32)
