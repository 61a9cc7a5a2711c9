"""Pure-torch reference of every qlr kernel: decode rows of a stored factor, multiply by it, rotate activations.

These run on any device and dtype and define what the fast paths (:mod:`qlr.kernels.cpu`, the custom ops in
:mod:`qlr.kernels.ops`) must compute. Shapes: a factor F is m × n (out × in); ``x`` is (B, n); products return
``x @ Fᵀ`` (B, m) in x's dtype.

Scalar grid arguments (see :mod:`qlr.quant.grid` and :mod:`qlr.quant.packing`): ``codes`` (m, ⌈n·bits/32⌉)
int32 packed rows; ``scale`` (m, groups) float16 / float32, or int8 power-of-two exponents; ``zero`` either None
(the constant ``zero_const``), int32 packed ``bits``-bit codes of the flattened (m, groups) zeros, or float16
(m, groups); ``levels`` the NormalFloat table (then F = levels[code] · scale) or None (F = (code − zero) · scale);
``group_len`` columns per group (the last group may be shorter).

E8P arguments (:mod:`qlr.quant.e8p`): ``codes`` (stages, m, n/8) int16 bit patterns and ``scale`` (stages,);
F = Σ_s scale_s · codeword(codes[s]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlr.quant.e8p import e8p_codebook
from qlr.quant.hadamard import hadamard_transform
from qlr.quant.packing import unpack

__all__ = ["grid_decode", "e8p_decode", "grid_mm", "e8p_mm", "grid_mm_t", "e8p_mm_t", "hadamard", "scale_float",
           "zero_float", "TILE_ROWS"]

TILE_ROWS = 2048
"""Rows of a factor decoded at a time by the reference products (bounds their float32 scratch)."""


def scale_float(scale: Tensor) -> Tensor:
    """Group scales as float32: int8 tensors hold power-of-two exponents."""
    return torch.exp2(scale.float()) if scale.dtype == torch.int8 else scale.float()


def zero_float(zero: Tensor | None, zero_const: float, bits: int, m: int, groups: int) -> Tensor | float:
    """Zero points as a float32 (m, groups) tensor, or the constant when ``zero`` is None."""
    if zero is None:
        return float(zero_const)
    if zero.dtype == torch.int32:
        return unpack(zero, bits, m * groups).float().reshape(m, groups)
    return zero.float()


def grid_decode(codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int, n: int,
                group_len: int, zero_const: float, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of a scalar-grid factor as float32 ((r1 − r0) × n)."""
    m, groups = scale.shape
    glen = group_len or n
    s = scale_float(scale[r0:r1])
    c = unpack(codes[r0:r1], bits, n)
    tiles = n % glen == 0
    if tiles:
        c = c.reshape(c.shape[0], n // glen, glen)
        s = s[:, :, None]
    else:
        gidx = torch.arange(n, device=codes.device) // glen
        s = s[:, gidx]
    if levels is not None:
        out = levels.float()[c.long()] * s
    else:
        z = zero_float(zero, zero_const, bits, m, groups)
        if isinstance(z, Tensor):
            z = z[r0:r1]
            z = z[:, :, None] if tiles else z[:, torch.arange(n, device=codes.device) // glen]
        out = (c.float() - z) * s
    return out.reshape(r1 - r0, n)


def e8p_decode(codes: Tensor, scale: Tensor, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of an E8P-coded factor as float32 ((r1 − r0) × n): Σ_s scale_s · codebook[codes[s]]."""
    stages, _, nb = codes.shape
    book = e8p_codebook(codes.device)  # 65536 × 8 float32, cached per device
    idx = codes[:, r0:r1].to(torch.int64) & 0xFFFF  # int16 bit pattern → unsigned code
    sc = scale.float()
    out = torch.zeros(r1 - r0, nb * 8, dtype=torch.float32, device=codes.device)
    for s in range(stages):  # the same order and float32 arithmetic as LatticeQuantizedTensor.dequantize
        out += sc[s] * book[idx[s]].reshape(r1 - r0, nb * 8)
    return out


def _tiled_mm(x: Tensor, m: int, decode) -> Tensor:  # noqa: ANN001 - decode(r0, r1) -> float32 rows
    y = torch.empty(x.shape[0], m, dtype=x.dtype, device=x.device)
    for r0 in range(0, m, TILE_ROWS):
        r1 = min(m, r0 + TILE_ROWS)
        y[:, r0:r1] = x @ decode(r0, r1).to(x.dtype).T
    return y


def _tiled_mm_t(g: Tensor, n: int, decode) -> Tensor:  # noqa: ANN001
    m = g.shape[1]
    out = torch.zeros(g.shape[0], n, dtype=g.dtype, device=g.device)
    for r0 in range(0, m, TILE_ROWS):
        r1 = min(m, r0 + TILE_ROWS)
        out += g[:, r0:r1] @ decode(r0, r1).to(g.dtype)
    return out


def grid_mm_t(g: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
              n: int, group_len: int, zero_const: float) -> Tensor:
    """g (B, m) @ F → (B, n) for a scalar-grid F (the gradient of :func:`grid_mm` with respect to x)."""
    return _tiled_mm_t(g, n, lambda r0, r1: grid_decode(codes, scale, zero, levels, bits, n, group_len, zero_const,
                                                        r0, r1))


def e8p_mm_t(g: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """g (B, m) @ F → (B, n) for an E8P-coded F (the gradient of :func:`e8p_mm` with respect to x)."""
    return _tiled_mm_t(g, codes.shape[2] * 8, lambda r0, r1: e8p_decode(codes, scale, r0, r1))


def grid_mm(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
            n: int, group_len: int, zero_const: float) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for a scalar-grid F, decoding TILE_ROWS rows at a time."""
    return _tiled_mm(x, codes.shape[0],
                     lambda r0, r1: grid_decode(codes, scale, zero, levels, bits, n, group_len, zero_const, r0, r1))


def e8p_mm(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for an E8P-coded F, decoding TILE_ROWS rows at a time."""
    return _tiled_mm(x, codes.shape[1], lambda r0, r1: e8p_decode(codes, scale, r0, r1))


def hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """(Had_n (x ∘ pre) / √n) ∘ post over the last dim of x (B, n), Had_nᵀ with ``transpose``; signs (n,) ±1."""
    if pre is not None:
        x = x * pre.to(x.dtype)
    y = hadamard_transform(x, transpose=transpose)
    return y * post.to(y.dtype) if post is not None else y
