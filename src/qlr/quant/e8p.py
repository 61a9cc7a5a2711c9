"""QuIP#'s E8P ("E8 padded") 2-bit vector codebook and its 4-bit two-stage residual variant (e8p4).

The codebook holds 2^16 vectors of R^8, so one 16-bit code stores 8 weights (2 bits per weight):

* 256 *absolute patterns* ``a`` with entries in {1/2, 3/2, 5/2}: the 227 distinct ``|v|`` of the points v of
  the half-integer E8 coset ``(Z + 1/2)^8`` (even coordinate sum) with ‖v‖² ≤ 10, plus 29 patterns of norm² 12
  (five 3/2 and three 1/2; the list of QuIP#'s ``e8p12`` codebook);
* a sign vector σ with the parity constraint "the number of negative entries ≡ Σ a (mod 2)", which makes
  ``σ ∘ a`` a point of E8 (even coordinate sum); 7 sign bits are stored and the 8th is implied;
* a shift of ±1/4.

Code layout (QuIP#'s, as an unsigned 16-bit integer): bits 15–8 the pattern index, bits 7–1 the signs of
dimensions 1…7 (bit 8 − k set means dimension k is negative), bit 0 set for +1/4, clear for −1/4.

Nearest-codeword search is exact without touching the 65,536 rows. For a shift t and y = x − t, the nearest
point of the whole coset (round to half-integers, fix the parity by moving the worst-rounded coordinate) is
the answer whenever it is a codeword. Otherwise every pattern ``a`` is scored 2 a·|y| − ‖a‖², minus
4·min_i a_i |y_i| when the signs of y violate the pattern's parity (then the cheapest coordinate is flipped),
and the best pattern wins. The closer of the two shifts' answers is the nearest codeword.

A quantized matrix is Ŵ = Σ_s scale_s · codeword(code_s) per 8-column block: one scale per stage for the whole
matrix (suited to incoherence-processed weights, whose entries are roughly i.i.d.). Stage 2 ("e8p4") codes the
residual of stage 1 with its own, smaller scale, for 4 bits per weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from itertools import product

import numpy as np
import torch
from torch import Tensor

__all__ = ["E8P_DIM", "LatticeQuantizedTensor", "e8p_abs_grid", "e8p_codebook", "e8p_encode", "e8p_decode",
           "e8p_round", "choose_scales", "quantize_e8p"]

E8P_DIM = 8
_CHUNK = 4096  # vectors per encode step; the largest temporary, when every row needs scoring, is the
# (2·chunk × 9 × 256) float32 score array ≈ 75 MiB
# Positions of the three 1/2 entries of the 29 norm²-12 patterns (the rest are 3/2), in QuIP#'s order (its
# later e8p12 list; an earlier version repeated (0, 4, 5) where this has (0, 1, 4)).
_NORM12_HALVES = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2), (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6),
                  (3, 4, 6), (3, 4, 5), (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5),
                  (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6), (1, 4, 6), (0, 4, 5), (0, 6, 7), (0, 5, 7),
                  (0, 4, 7), (0, 5, 6), (0, 4, 6), (0, 1, 4), (2, 3, 7))
_SCALE_SAMPLE = 2048


# ---- the codebook ---------------------------------------------------------------------------------
@cache
def _abs_grid_cpu() -> Tensor:
    """The 256 absolute patterns (256 × 8, float32), in lexicographic order then the norm-12 list."""
    small = [v for v in product((0.5, 1.5, 2.5), repeat=E8P_DIM) if sum(c * c for c in v) <= 10]
    big = [tuple(0.5 if i in halves else 1.5 for i in range(E8P_DIM)) for halves in _NORM12_HALVES]
    grid = torch.tensor(small + big, dtype=torch.float32)
    assert grid.shape == (256, E8P_DIM) and len(set(small + big)) == 256
    return grid


_CACHE: dict[tuple[str, str], Tensor] = {}


def _cached(name: str, device: torch.device | str, build: Callable[[], Tensor]) -> Tensor:
    key = (name, str(torch.device(device)))
    if key not in _CACHE:
        _CACHE[key] = build().to(device)
    return _CACHE[key]


def e8p_abs_grid(device: torch.device | str = "cpu") -> Tensor:
    """The 256 absolute patterns (256 × 8, float32) on ``device`` (cached)."""
    return _cached("abs", device, _abs_grid_cpu)


def _decode_arith(codes: Tensor) -> Tensor:
    """Codewords (…, 8) float32 for integer codes (…) in [0, 2^16), computed from the code's bit fields."""
    c = codes.to(torch.int64) & 0xFFFF
    a = e8p_abs_grid(c.device)[c >> 8]
    k = torch.arange(1, E8P_DIM, device=c.device)
    neg_rest = ((c[..., None] >> (E8P_DIM - k)) & 1).bool()  # dims 1..7
    odd_pattern = (a.sum(-1).round().to(torch.int64) % 2).bool()
    neg0 = (neg_rest.sum(-1) % 2).bool() != odd_pattern  # parity constraint implies dimension 0
    neg = torch.cat([neg0[..., None], neg_rest], dim=-1)
    shift = torch.where((c & 1).bool(), 0.25, -0.25)
    return torch.where(neg, -a, a) + shift[..., None]


def e8p_codebook(device: torch.device | str = "cpu") -> Tensor:
    """All 65,536 codewords (65536 × 8, float32, 2 MiB; row c is code c) on ``device`` (cached). Decoding is a
    row lookup in it; encoding never scans it."""
    return _cached("full", device, lambda: _decode_arith(torch.arange(1 << 16)))


def e8p_decode(codes: Tensor) -> Tensor:
    """Codewords (…, 8) float32 for integer codes (…) holding the unsigned 16-bit pattern (int16 storage is
    read as its bit pattern)."""
    return e8p_codebook(codes.device)[codes.to(torch.int64) & 0xFFFF]


@dataclass(frozen=True)
class _Tables:
    """Per-device constants of the encoder."""

    grid: Tensor  # (256, 8) absolute patterns
    g2: Tensor  # (8, 256) 2·gridᵀ
    gnorm: Tensor  # (256,) ‖a‖²
    lut: Tensor  # (4^8,) pattern index of |z| keyed by Σ 4^i (|z_i| − 1/2), |z_i| − 1/2 clamped to 3; −1 if none
    powers: Tensor  # (8,) float32 4^i
    sign_weights: Tensor  # (8,) float32 0, 2^7 … 2^1: negative dims 1..7 -> code bits 7..1 (dim 0 is implied)
    flipper: Tensor  # (9, 8) variant 0 keeps every coordinate, variant i ≥ 1 negates coordinate i − 1
    mismatch: Tensor  # (2, 256) bool: row π says which patterns' parity differs from a sign parity π
    shifts: Tensor  # (2, 1, 1): −1/4 (code bit 0 set: the codeword is s + 1/4), +1/4


_TABLES: dict[str, _Tables] = {}


def _tables(device: torch.device) -> _Tables:
    key = str(device)
    if key not in _TABLES:
        grid = e8p_abs_grid(device)
        powers = 4 ** torch.arange(E8P_DIM, device=device)
        lut = torch.full((4 ** E8P_DIM,), -1, dtype=torch.int64, device=device)
        lut[((grid - 0.5).round().to(torch.int64) * powers).sum(-1)] = torch.arange(256, device=device)
        parity = grid.sum(-1).round().to(torch.int64) % 2
        signs = torch.cat([torch.zeros(1, device=device), (2 << torch.arange(E8P_DIM - 2, -1, -1, device=device))])
        flipper = torch.cat([torch.ones(1, E8P_DIM, device=device), 1 - 2 * torch.eye(E8P_DIM, device=device)])
        mismatch = torch.stack([parity != 0, parity != 1])
        _TABLES[key] = _Tables(grid, (2 * grid).T.contiguous(), (grid * grid).sum(-1), lut, powers.float(),
                               signs.float(), flipper, mismatch,
                               torch.tensor([-0.25, 0.25], device=device).reshape(2, 1, 1))
    return _TABLES[key]


def _nearest_by_scoring(y: Tensor, t: _Tables) -> tuple[Tensor, Tensor]:
    """Exact nearest unshifted codeword σ∘a to each row of y (N, 8) by scoring all 256 patterns (see the
    module docstring). Returns (pattern index (N,), negative-sign mask (N, 8))."""
    ay, neg = y.abs(), y < 0
    # one GEMM scores every pattern with y's own signs (variant 0) and with each single coordinate flipped
    s = (ay[:, None, :] * t.flipper) @ t.g2  # (N, 9, 256): 2 a·(±|y|)
    needs_flip = t.mismatch[neg.sum(-1) % 2]  # (N, 256): the signs of y violate the pattern's parity
    best = torch.where(needs_flip, s[:, 1:].amax(1), s[:, 0]).sub_(t.gnorm).argmax(-1)
    flip = needs_flip.gather(1, best[:, None])
    i = (ay * t.grid[best]).argmin(-1, keepdim=True)  # the cheapest coordinate to flip
    return best, neg ^ (torch.zeros_like(neg).scatter_(1, i, flip))


def _encode_chunk(x: Tensor, t: _Tables) -> tuple[Tensor, Tensor]:
    """Codes (N,) and codewords (N, 8) of the nearest codewords to x (N, 8).

    For each shift ±1/4 the nearest unshifted codeword to y = x ∓ 1/4 is found exactly. Fast path: the nearest
    point z of the whole coset {(Z + 1/2)^8, even coordinate sum}, by rounding every coordinate to the nearest
    half-integer and, if the sum is odd, moving the worst-rounded coordinate to its other neighbour (Conway &
    Sloane's decoder). When z is a codeword (‖z‖² ≤ 10, or one of the 29 norm-12 patterns) it is the nearest
    one, since the codebook is a subset of the coset. The other rows (typically 5–30 % at the MSE-best scale)
    are scored against all patterns, except where the other shift already has a codeword no farther than z:
    ‖y − z‖ bounds every codeword of this shift from below, so that shift cannot win.
    """
    n = x.shape[0]
    y = (x[None] + t.shifts).reshape(2 * n, E8P_DIM)  # rows < n: y = x − 1/4 (code bit 0 set); rows ≥ n: x + 1/4
    fl = y.floor()  # z = fl + 1/2 rounds every coordinate to the nearest half-integer
    d = (y - fl).sub_(0.5)
    odd = fl.sum(-1).remainder_(2)  # Σz ≡ Σfl (mod 2): 1.0 when z is off the lattice
    j = d.abs().argmax(-1, keepdim=True)
    fl.scatter_add_(1, j, torch.copysign(odd[:, None], d.gather(1, j)))  # move the worst-rounded coordinate
    z = fl.add_(0.5)  # the coset's nearest point; the unshifted codeword where best ≥ 0
    best = t.lut[((z.abs() - 0.5).clamp_(max=3) @ t.powers).long()]  # base-4 digits |z_i| − 1/2 ∈ {0, 1, 2, ≥3}
    dist = (y - z).pow_(2).sum(-1)  # exact where best ≥ 0, a lower bound elsewhere
    ok = best >= 0
    other_ok, other = ok.roll(n), dist.roll(n)  # the same x at the other shift
    bad = torch.nonzero(~ok & ~(other_ok & (other <= dist))).squeeze(1)
    dist.masked_fill_(~ok, float("inf"))
    if bad.numel():
        yb = y[bad]
        b, ng = _nearest_by_scoring(yb, t)
        a = t.grid[b]
        w = torch.where(ng, -a, a)
        best[bad], z[bad], dist[bad] = b, w, (yb - w).pow_(2).sum(-1)
    code = (best << 8) + ((z < 0).float() @ t.sign_weights).long()
    first = dist[:n] <= dist[n:]
    return (torch.where(first, code[:n] + 1, code[n:]),
            torch.where(first[:, None], z[:n] + 0.25, z[n:] - 0.25))


# ---- the same encoder in NumPy, for CPU tensors ---------------------------------------------------------
# Inside block LDLQ every call codes one 8-column block (m vectors, m often 64), so a CPU call is dominated by the
# fixed cost of each tensor operation (~5 µs in PyTorch, ~1 µs in NumPy) rather than by arithmetic. The NumPy
# version performs the same float32 steps on zero-copy views of the CPU tensors, ~3× faster per call at m = 64.
@dataclass(frozen=True)
class _NpTables:
    grid: np.ndarray  # (256, 8) float32
    g2_t: Tensor  # (8, 256) float32, the torch CPU tensor
    gnorm: np.ndarray  # (256,) float32
    lut: np.ndarray  # (4^8,) int64
    powers: np.ndarray  # (8,) int64
    sign_weights: np.ndarray  # (8,) int64
    flipper: np.ndarray  # (9, 8) float32
    mismatch: np.ndarray  # (2, 256) bool


@cache
def _np_tables() -> _NpTables:
    t = _tables(torch.device("cpu"))
    return _NpTables(t.grid.numpy(), t.g2, t.gnorm.numpy(), t.lut.numpy(), t.powers.numpy().astype(np.int64),
                     t.sign_weights.numpy().astype(np.int64), t.flipper.numpy(), t.mismatch.numpy())


def _nearest_by_scoring_np(y: np.ndarray, t: _NpTables) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_nearest_by_scoring` on a float32 array."""
    n = y.shape[0]
    rows = np.arange(n)
    ay, neg = np.abs(y), y < 0
    # the one GEMM runs in torch: NumPy's BLAS would start its own thread pool next to torch's
    s = (torch.from_numpy((ay[:, None, :] * t.flipper).reshape(n * 9, E8P_DIM)) @ t.g2_t).numpy().reshape(n, 9, 256)
    needs_flip = t.mismatch[neg.sum(-1) % 2]
    best = (np.where(needs_flip, s[:, 1:].max(1), s[:, 0]) - t.gnorm).argmax(-1)
    i = (ay * t.grid[best]).argmin(-1)
    neg[rows, i] ^= needs_flip[rows, best]
    return best, neg


def _encode_chunk_np(x: np.ndarray, t: _NpTables) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_encode_chunk` on a float32 array (N, 8): codes (N,) int64, codewords (N, 8) float32."""
    n = x.shape[0]
    y = np.concatenate([x - np.float32(0.25), x + np.float32(0.25)])
    rows = np.arange(2 * n)
    fl = np.floor(y)
    d = y - fl - np.float32(0.5)
    odd = fl.sum(-1) % 2
    j = np.abs(d).argmax(-1)
    fl[rows, j] += np.copysign(odd, d[rows, j])
    z = fl + np.float32(0.5)
    best = t.lut[np.minimum(np.abs(z) - np.float32(0.5), 3).astype(np.int64) @ t.powers]
    dist = ((y - z) ** 2).sum(-1)
    ok = best >= 0
    other_ok, other = np.concatenate([ok[n:], ok[:n]]), np.concatenate([dist[n:], dist[:n]])
    bad = np.flatnonzero(~ok & ~(other_ok & (other <= dist)))
    dist[~ok] = np.inf
    if bad.size:
        yb = y[bad]
        b, ng = _nearest_by_scoring_np(yb, t)
        a = t.grid[b]
        w = np.where(ng, -a, a)
        best[bad], z[bad], dist[bad] = b, w, ((yb - w) ** 2).sum(-1)
    code = (best << 8) + (z < 0).astype(np.int64) @ t.sign_weights
    first = dist[:n] <= dist[n:]
    return (np.where(first, code[:n] + 1, code[n:]),
            np.where(first[:, None], z[:n] + np.float32(0.25), z[n:] - np.float32(0.25)))


_BACKEND = {"cpu": "numpy"}  # "torch" runs the PyTorch encoder on CPU too (tests compare the two)


def _use_numpy(x: Tensor) -> bool:
    return x.device.type == "cpu" and _BACKEND["cpu"] == "numpy"


def _encode(x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact nearest codewords to x (…, 8): (codes (…) int64, codewords (…, 8) float32)."""
    if x.shape[-1] != E8P_DIM:
        raise ValueError(f"E8P codes 8-dimensional vectors; got last dim {x.shape[-1]}")
    flat = x.reshape(-1, E8P_DIM).float()
    if flat.shape[0] == 0:
        return (torch.empty(x.shape[:-1], dtype=torch.int64, device=flat.device),
                torch.empty(x.shape, dtype=torch.float32, device=flat.device))
    if _use_numpy(flat):
        a, tn = flat.detach().numpy(), _np_tables()
        np_parts = [_encode_chunk_np(a[i:i + _CHUNK], tn) for i in range(0, a.shape[0], _CHUNK)]
        parts = [(torch.from_numpy(c), torch.from_numpy(w)) for c, w in np_parts]
    else:
        t = _tables(flat.device)
        parts = [_encode_chunk(flat[i:i + _CHUNK], t) for i in range(0, flat.shape[0], _CHUNK)]
    codes = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    words = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return codes.reshape(x.shape[:-1]), words.reshape(x.shape)


def e8p_encode(x: Tensor) -> Tensor:
    """Exact nearest-codeword codes (…) int64 in [0, 2^16) for vectors x (…, 8) in codebook units.

    Minimises ‖x − codeword‖² over the whole codebook (ties broken arbitrarily); works in chunks of
    vectors so memory stays bounded.
    """
    return _encode(x)[0]


# ---- stages and scales ----------------------------------------------------------------------------
def _as_scales(scales: float | Sequence[float] | Tensor) -> list[float]:
    if isinstance(scales, Tensor):
        return [float(v) for v in scales.reshape(-1)]
    if isinstance(scales, (int, float)):
        return [float(scales)]
    return [float(v) for v in scales]


def e8p_round(x: Tensor, scales: float | Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """Round vectors x (…, 8) — e.g. an (m × 8) column block inside LDLQ — to Σ_s scale_s · codeword_s,
    coding each stage's residual with the next scale (one scale per stage; len(scales) stages).

    Returns ``(x̂, codes)``: x̂ (…, 8) float32 and codes (stages, …) int64.
    """
    r = x.float()
    if _use_numpy(r) and r.shape[:-1].numel() <= _CHUNK and r.shape[-1] == E8P_DIM:  # one array pass, no tensors
        lead, a, tn = r.shape[:-1], r.detach().reshape(-1, E8P_DIM).numpy(), _np_tables()
        aq, np_codes = np.zeros_like(a), []
        for s in _as_scales(scales):
            c, w = _encode_chunk_np(a / np.float32(s), tn)
            q = w * np.float32(s)
            aq, a = aq + q, a - q
            np_codes.append(c)
        return torch.from_numpy(aq).reshape(r.shape), torch.from_numpy(np.stack(np_codes)).reshape(-1, *lead)
    xq = torch.zeros_like(r)
    codes = []
    for s in _as_scales(scales):
        c, w = _encode(r / s)
        q = w * s
        xq, r = xq + q, r - q
        codes.append(c)
    return xq, torch.stack(codes)


def _round_scale(s: float, scale_bits: int) -> float:
    if scale_bits == 16:
        return float(torch.tensor(s).to(torch.float16))
    return float(torch.tensor(s, dtype=torch.float32))


def _search_scale(v: Tensor, scale_bits: int) -> float:
    """The scale s = f · rms(v) minimising ‖v − s·Q(v/s)‖² over the 8-vectors v (N, 8), f ∈ [0.6, 1.6] on a 0.05
    grid: a local search that starts at f ∈ {0.9, 1.0, 1.1}, walks downhill in steps of 0.1 and then checks the
    two midpoints around the best (each step codes all candidates in one batched encode)."""
    rms = float(v.pow(2).mean().sqrt())
    if rms == 0.0:
        return 1.0
    tried: dict[float, float] = {}

    def evaluate(fs: Sequence[float]) -> None:
        new = [f for f in fs if 0.6 - 1e-9 <= f <= 1.6 + 1e-9 and round(f, 2) not in tried]
        if not new:
            return
        sc = torch.tensor([_round_scale(f * rms, scale_bits) for f in new], device=v.device)[:, None, None]
        xs = v[None] / sc
        _, w = _encode(xs)
        errs = (v[None] - w * sc).pow(2).sum((1, 2))
        tried.update({round(f, 2): float(e) for f, e in zip(new, errs, strict=True)})

    def best() -> float:
        return min(tried, key=lambda f: (tried[f], f))

    evaluate((0.9, 1.0, 1.1))
    while True:
        f = best()
        evaluate((round(f - 0.1, 2), round(f + 0.1, 2)))
        if best() == f:
            break
    f = best()
    evaluate((round(f - 0.05, 2), round(f + 0.05, 2)))
    return _round_scale(best() * rms, scale_bits)


def choose_scales(W: Tensor, stages: int = 1, scale: float | Sequence[float] | None = None,
                  scale_bits: int = 16) -> list[float]:
    """Per-matrix scales (one per stage) for coding W (m × n, n divisible by 8).

    Given scales are kept (rounded to ``scale_bits``); missing ones are searched in stage order: stage s's
    scale minimises the squared error of plain (no-feedback) rounding of what stage s codes — W itself, then
    the residual W − Ŵ_{<s} — over ``f · rms``, f ∈ [0.6, 1.6] on a 0.05 grid (local search from f ≈ 1), on a
    deterministic sample of 2,048 8-vectors.
    """
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 (e8p, 2 bits) or 2 (e8p4, 4 bits), got {stages}")
    if scale_bits not in (16, 32):
        raise ValueError(f"scale_bits must be 16 (fp16) or 32 (fp32), got {scale_bits}")
    given = [] if scale is None else _as_scales(scale)
    if len(given) > stages:
        raise ValueError(f"got {len(given)} scales for {stages} stage(s)")
    if any(s <= 0 for s in given):
        raise ValueError(f"scales must be positive, got {given}")
    if len(given) == stages:
        return [_round_scale(g, scale_bits) for g in given]
    v = W.float().reshape(-1, E8P_DIM)
    if v.shape[0] > _SCALE_SAMPLE:
        v = v[torch.linspace(0, v.shape[0] - 1, _SCALE_SAMPLE, device=v.device).long()]
    out: list[float] = []
    for st in range(stages):
        s = _round_scale(given[st], scale_bits) if st < len(given) else _search_scale(v, scale_bits)
        out.append(s)
        v = v - e8p_round(v, s)[0]
    return out


# ---- the quantized tensor -------------------------------------------------------------------------
def _to_int16(codes: Tensor) -> Tensor:
    """Store unsigned 16-bit codes in int16 by their bit pattern."""
    return torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)


@dataclass(frozen=True)
class LatticeQuantizedTensor:
    """An m × n matrix coded with E8P: Ŵ[i, 8k:8k+8] = Σ_s scales[s] · codeword(codes[s, i, k]).

    Attributes:
        codes: (stages, m, n // 8) int16 holding each unsigned 16-bit code's bit pattern.
        scales: (stages,) float32, one per stage for the whole matrix (exactly representable at
            ``scale_bits``).
        scale_bits: storage width of each scale (16 = fp16, 32 = fp32).
        meta: free-form notes (e.g. the method that produced it).
    """

    codes: Tensor
    scales: Tensor
    scale_bits: int = 16
    meta: dict = field(default_factory=dict)

    @property
    def stages(self) -> int:
        return int(self.codes.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2]) * E8P_DIM

    @property
    def bits(self) -> int:
        """Code bits per weight: 2 per stage."""
        return 2 * self.stages

    def dequantize(self) -> Tensor:
        """The float32 matrix Ŵ (m × n)."""
        m, n = self.shape
        out = torch.zeros(m, n, dtype=torch.float32, device=self.codes.device)
        for s in range(self.stages):
            out += float(self.scales[s]) * e8p_decode(self.codes[s]).reshape(m, n)
        return out

    def storage_bits(self) -> int:
        """Exact storage: 16 bits per 8 weights per stage, plus one ``scale_bits`` scale per stage."""
        m, n = self.shape
        return self.stages * (m * (n // E8P_DIM) * 16 + self.scale_bits)

    def mean_scale(self) -> float:
        """The first stage's scale: weight units per codebook unit (the analogue of a scalar grid's step)."""
        return float(self.scales[0])

    def to(self, device: torch.device | str) -> LatticeQuantizedTensor:
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Sequence[float], scale_bits: int = 16,
                   meta: dict | None = None) -> LatticeQuantizedTensor:
        """Build from int64 codes (stages, m, n // 8) in [0, 2^16) and per-stage scales."""
        return cls(_to_int16(codes), torch.tensor(list(scales), dtype=torch.float32, device=codes.device),
                   scale_bits, dict(meta or {}))


def quantize_e8p(W: Tensor, stages: int = 1, scale: float | Sequence[float] | None = None,
                 scale_bits: int = 16) -> LatticeQuantizedTensor:
    """Round W (m × n, n divisible by 8) to the nearest E8P codewords, 8 consecutive columns per code, with no
    error feedback: stages=1 is "e8p" (2 bits/weight), stages=2 is "e8p4" (4 bits/weight, stage 2 codes the
    residual of stage 1). Scales: see :func:`choose_scales` (per matrix, MSE-searched when not given).
    """
    m, n = W.shape
    if n % E8P_DIM:
        raise ValueError(f"E8P needs the number of columns to be a multiple of 8; W is {m} × {n}")
    scales = choose_scales(W, stages, scale, scale_bits)
    _, codes = e8p_round(W.float().reshape(m, n // E8P_DIM, E8P_DIM), scales)
    return LatticeQuantizedTensor.from_codes(codes, scales, scale_bits, {"method": "e8p-rtn"})
