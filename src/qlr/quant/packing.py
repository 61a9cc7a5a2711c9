"""Bit-packing of low-bit integer codes into int32 words.

Codes of ``bits`` bits (1 ≤ bits ≤ 8) are laid out as one little-endian bit stream per row (the last dim):
code k occupies stream bits ``[k·bits, (k+1)·bits)``, and stream bit t lives in word ``t // 32`` at bit
``t % 32``. A code may straddle two words (3, 5, 6, 7 bits), so 32 codes always fill exactly ``bits`` words
and a row of n codes needs ``ceil(n·bits / 32)`` words: the only waste is the tail padding of each row.

Both directions are vectorised torch on whatever device the input lives on (CPU or CUDA); the only Python loop
in :func:`pack` runs over chunks of rows to bound the int64 scratch memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "packed_words", "packed_bits", "MAX_BITS"]

MAX_BITS = 8
_WORD = 32
_PACK_CHUNK = 1 << 22  # codes per pack chunk (int64 scratch ≈ 3 × 32 MiB)


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits: ``ceil(n·bits / 32)``."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return -(-n * bits // _WORD)


def packed_bits(n: int, bits: int) -> int:
    """Bits actually occupied by ``n`` packed codes of ``bits`` bits, tail padding included (32 · words)."""
    return _WORD * packed_words(n, bits)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")


def _layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For the 32 codes of one block: the word holding each code's low part, its bit offset in that word,
    and how many of its bits fit there (the rest, if any, start at bit 0 of the next word); each (32,) int64.
    """
    start = torch.arange(_WORD, device=device, dtype=torch.int64) * bits
    word, off = start // _WORD, start % _WORD
    lo_bits = (_WORD - off).clamp(max=bits)
    return word, off, lo_bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes along the last dim.

    Args:
        codes: (..., n) integer tensor (normally uint8) with values in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        (..., ceil(n·bits/32)) int32 words on ``codes.device``; the words' bit patterns are the stream (a word
        whose top bit is set reads as a negative int32).
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    *lead, n = codes.shape
    nwords = packed_words(n, bits)
    flat = codes.reshape(math.prod(lead), n)
    out = torch.empty(flat.shape[0], nwords, dtype=torch.int32, device=codes.device)
    if flat.numel() == 0:
        return out.reshape(*lead, nwords)
    lo_v, hi_v = int(flat.min()), int(flat.max())
    if lo_v < 0 or hi_v >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; found values in "
                         f"[{lo_v}, {hi_v}]")
    nb = -(-n // _WORD)
    word, off, lo_bits = _layout(bits, codes.device)
    hi_word = (word + 1).clamp(max=bits - 1)  # codes that do not straddle contribute 0 there
    rows = max(1, _PACK_CHUNK // max(n, 1))
    for r0 in range(0, flat.shape[0], rows):
        c = flat[r0:r0 + rows].to(torch.int64)
        c = torch.nn.functional.pad(c, (0, nb * _WORD - n)).reshape(c.shape[0], nb, _WORD)
        acc = torch.zeros(c.shape[0], nb, bits, dtype=torch.int64, device=codes.device)
        # bit fields never overlap, so adding them is the same as OR-ing them
        acc.scatter_add_(-1, word.expand_as(c), (c << off) & 0xFFFFFFFF)
        acc.scatter_add_(-1, hi_word.expand_as(c), c >> lo_bits)
        acc = acc.reshape(c.shape[0], nb * bits)[:, :nwords]
        out[r0:r0 + rows] = torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)
    return out.reshape(*lead, nwords)


def unpack(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`.

    Args:
        words: (..., ceil(n·bits/32)) int32 words.
        bits: code width used when packing.
        n: number of codes per row (the original last-dim length).

    Returns:
        (..., n) uint8 codes on ``words.device``.
    """
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    *lead, w = words.shape
    if w != packed_words(n, bits):
        raise ValueError(f"{w} words per row cannot hold n={n} codes of {bits} bits "
                         f"(expected {packed_words(n, bits)})")
    if _WORD % bits == 0:  # 1, 2, 4, 8 bits: no code straddles a word
        per = _WORD // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
        codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.to(torch.uint8).reshape(*lead, w * per)[..., :n]
    nb = -(-n // _WORD)
    full = torch.nn.functional.pad(words, (0, nb * bits - w)).reshape(*lead, nb, bits)
    word, off, lo_bits = _layout(bits, words.device)
    idx_shape = (*lead, nb, _WORD)
    lo_w = full.gather(-1, word.expand(idx_shape))
    hi_w = full.gather(-1, (word + 1).clamp(max=bits - 1).expand(idx_shape))
    off32, lo32 = off.to(torch.int32), lo_bits.to(torch.int32)
    one = torch.ones((), dtype=torch.int32, device=words.device)
    # arithmetic shift may drag the sign bit down; the mask keeps only the lo_bits that belong to this code
    lo = (lo_w >> off32) & ((one << lo32) - 1)
    hi = (hi_w & ((one << (bits - lo32)) - 1)) << lo32
    return (lo | hi).to(torch.uint8).reshape(*lead, nb * _WORD)[..., :n]
