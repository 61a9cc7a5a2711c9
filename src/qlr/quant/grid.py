"""Scalar quantization grids: group-wise uniform integer (RTN) and NormalFloat.

A weight matrix ``W`` (m × n, out × in) is split into groups of ``group_size`` consecutive input columns; every
(row, group) pair gets its own scale (and, for asymmetric integer grids, an integer zero point). Codes are
unsigned integers in ``[0, 2**bits)``.

* uniform, asymmetric:  ŵ = (c − z)·s,  s = (max − min)/(2^b − 1), z = round(−min/s)  (an exact zero exists)
* uniform, symmetric:   ŵ = (c − 2^{b−1})·s,  s = 2·absmax/(2^b − 1)   (GPTQ's convention)
* NormalFloat (NF_b):   ŵ = T[c]·s,  s = absmax,  T = the 2^b normal-quantile levels of QLoRA, with an exact 0

Storage per (row, group): the scale at ``scale_bits`` (fp16 by default) and, for asymmetric grids, a ``bits``-bit
zero point. ``QuantizedTensor.storage_bits()`` counts exactly that plus the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["QuantSpec", "QuantizedTensor", "GroupParams", "fit_params", "quantize_with", "dequantize_with",
           "quantize_rtn", "nf_levels", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How a matrix is quantized on a scalar grid.

    Attributes:
        bits: code width (2, 3, 4, 5, 6 or 8).
        group_size: consecutive input columns sharing one scale; 0 means one group per whole row.
        symmetric: symmetric integer grid (no stored zero point). Ignored for ``fmt="nf"``.
        fmt: ``"int"`` (uniform integer grid) or ``"nf"`` (NormalFloat levels, absmax scale).
        scale_bits: storage width of each scale (16 = fp16).
        clip_search: search a shrink factor of the group range that minimises the squared rounding error
            (as GPTQ's ``mse`` option); costs a little time, helps at 2 bits.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    fmt: str = "int"
    scale_bits: int = 16
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in ("int", "nf"):
            raise ValueError(f"fmt must be 'int' or 'nf', got {self.fmt!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported by the scalar quantizer; choose one of "
                             f"{SUPPORTED_BITS}")
        if self.fmt == "nf" and self.bits > 4:
            raise ValueError(f"NormalFloat supports 2, 3 or 4 bits, got bits={self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = whole row), got {self.group_size}")
        if self.scale_bits not in (8, 16, 32):
            raise ValueError(f"scale_bits must be 8, 16 or 32, got {self.scale_bits}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def has_zero(self) -> bool:
        """Whether a zero point is stored per group."""
        return self.fmt == "int" and not self.symmetric

    def groups(self, n: int) -> int:
        """Number of groups along an input dimension of size ``n``."""
        g = self.group_size or n
        return math.ceil(n / g)

    def group_len(self, n: int) -> int:
        return self.group_size or n

    def storage_bits(self, m: int, n: int) -> int:
        """Exact storage of an m × n matrix on this grid as qlr stores it: each row's codes packed into whole 32-bit
        words (a narrow factor such as L with rank 5 at 4 bits pays for its padding), one scale per (row, group),
        and the zero points (when the grid has them) packed together into whole 32-bit words."""
        words = math.ceil(n * self.bits / 32)
        k = m * self.groups(n)
        zeros = math.ceil(k * self.bits / 32) * 32 if self.has_zero else 0
        return m * words * 32 + k * self.scale_bits + zeros

    def bits_per_weight(self, n: int) -> float:
        """All-in bits per weight for a row of ``n`` weights (codes + scale + zero)."""
        return self.storage_bits(1, n) / n


@dataclass(frozen=True)
class GroupParams:
    """Per-(row, group) grid parameters: ``scale`` and ``zero`` are (m, groups) float tensors."""

    scale: Tensor
    zero: Tensor


def nf_levels(bits: int, device: torch.device | str = "cpu") -> Tensor:
    """QLoRA-style NormalFloat levels in [-1, 1]: 2^{b-1} positive and 2^{b-1} − 1 negative normal quantiles
    plus an exact zero, normalised by the largest magnitude. Returns a sorted float32 vector of length 2^b."""
    offset = 0.9677083  # QLoRA's choice: the quantile whose probability mass ends near the tail
    npos, nneg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    p_pos = torch.linspace(offset, 0.5, npos + 1, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(offset, 0.5, nneg + 1, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    lv = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    lv = lv / lv.abs().max()
    return lv.to(torch.float32).to(device)


def _minmax_params(w: Tensor, spec: QuantSpec, shrink: float = 1.0) -> tuple[Tensor, Tensor]:
    """Grid parameters from the min/max of each row of ``w`` (m × g); returns (scale, zero), each (m,)."""
    if spec.fmt == "nf":
        scale = (w.abs().amax(dim=1) * shrink).clamp_min(1e-12)
        return scale, torch.zeros_like(scale)
    wmin = (w.amin(dim=1) * shrink).clamp(max=0)
    wmax = (w.amax(dim=1) * shrink).clamp(min=0)
    if spec.symmetric:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = (2 * amax / spec.maxq).clamp_min(1e-12)
        zero = torch.full_like(scale, float((spec.maxq + 1) // 2))
    else:
        scale = ((wmax - wmin) / spec.maxq).clamp_min(1e-12)
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes for ``w`` (m × g, or m) with per-row ``scale``/``zero`` (m,). Returns uint8 codes, same shape."""
    s = scale if w.dim() == 1 else scale[:, None]
    if spec.fmt == "nf":
        lv = nf_levels(spec.bits, w.device)
        x = (w / s).clamp(-1, 1)
        mid = (lv[1:] + lv[:-1]) / 2
        return torch.bucketize(x.contiguous(), mid).to(torch.uint8)
    z = zero if w.dim() == 1 else zero[:, None]
    return torch.clamp(torch.round(w / s) + z, 0, spec.maxq).to(torch.uint8)


def dequantize_with(codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Inverse of :func:`quantize_with` (float32)."""
    s = scale if codes.dim() == 1 else scale[:, None]
    if spec.fmt == "nf":
        lv = nf_levels(spec.bits, codes.device)
        return lv[codes.long()] * s
    z = zero if codes.dim() == 1 else zero[:, None]
    return (codes.float() - z) * s


def fit_params(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Fit one group's grid to ``w`` (m × g). With ``clip_search`` a shrink factor in [0.5, 1] is chosen per row
    to minimise the squared rounding error. Scales are rounded to their storage precision. Returns (scale, zero)."""
    w = w.float()
    scale, zero = _minmax_params(w, spec)
    if spec.clip_search:
        best = torch.full((w.shape[0],), float("inf"), device=w.device)
        for shrink in torch.linspace(1.0, 0.5, 21).tolist():
            s, z = _minmax_params(w, spec, shrink)
            s = _round_scale(s, spec)
            err = (dequantize_with(quantize_with(w, s, z, spec), s, z, spec) - w).pow(2).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return _round_scale(scale, spec), zero


def _round_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    if spec.scale_bits == 16:
        return scale.to(torch.float16).float().clamp_min(6e-8)
    if spec.scale_bits == 8:  # power-of-two (E8M0-like) shared exponent
        return torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized m × n matrix: integer codes plus per-(row, group) scale/zero.

    Attributes:
        codes: (m, n) uint8 codes in ``[0, 2**bits)``, columns in *stored* order (see ``perm``).
        scale, zero: (m, groups) float32 grid parameters; groups run along the stored column order.
        spec: the grid.
        perm: optional (n,) column order used when quantizing (GPTQ act-order): stored column j is original
            column ``perm[j]``. ``None`` means identity.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec
    perm: Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> Tensor:
        """The float32 matrix (m × n) in the original column order."""
        m, n = self.codes.shape
        g = self.spec.group_len(n)
        idx = torch.arange(n, device=self.codes.device) // g
        s, z = self.scale[:, idx], self.zero[:, idx]
        if self.spec.fmt == "nf":
            lv = nf_levels(self.spec.bits, self.codes.device)
            out = lv[self.codes.long()] * s
        else:
            out = (self.codes.float() - z) * s
        if self.perm is not None:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(n, device=self.perm.device)
            out = out[:, inv]
        return out

    def storage_bits(self) -> int:
        """Exact storage in bits: codes, scales, zero points, and the permutation (ceil(log2 n) bits per index)."""
        m, n = self.codes.shape
        total = self.spec.storage_bits(m, n)
        if self.perm is not None:
            total += n * max(1, math.ceil(math.log2(n)))
        return total

    def mean_scale(self) -> float:
        """Mean absolute group scale (the paper's 'quantization scale')."""
        return float(self.scale.abs().mean())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=self.zero.to(device),
                       perm=None if self.perm is None else self.perm.to(device))


def quantize_rtn(W: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Group-wise round-to-nearest of ``W`` (m × n). Returns the codes and grid parameters."""
    W = W.float()
    m, n = W.shape
    g = spec.group_len(n)
    codes = torch.empty(m, n, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    for j in range(0, n, g):
        s, z = fit_params(W[:, j:j + g], spec)
        codes[:, j:j + g] = quantize_with(W[:, j:j + g], s, z, spec)
        scales.append(s)
        zeros.append(z)
    return QuantizedTensor(codes, torch.stack(scales, 1), torch.stack(zeros, 1), spec)
