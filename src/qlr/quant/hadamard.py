"""Randomized Hadamard incoherence processing (QuIP#).

A Hadamard matrix ``Had_n`` (n × n, entries ±1, ``Had_n Had_nᵀ = n I``) is built for ``n = 2^a · b`` as the
Kronecker product ``H_b ⊗ H_{2^a}``: ``H_{2^a}`` is Sylvester's matrix, applied by the butterfly fast
Walsh–Hadamard transform (a vectorised steps, no loop over elements), and ``H_b`` is a small dense matrix
built here from mathematics:

* Paley I (prime q ≡ 3 mod 4, order q + 1):   b = 12, 20, 60, 108, 140
* Paley II (prime power q ≡ 1 mod 4, order 2(q + 1)):  b = 28 (q = 13), 36 (q = 17), 52 (q = 25, over GF(25))
* Sylvester doubling:  b = 40 = 2 · 20
* Williamson array from four symmetric circulant ±1 matrices A, B, C, D of order k with
  A² + B² + C² + D² = 4k I:  b = 156 (k = 39), 172 (k = 43; Llama's 11008 = 172 · 64). Their first rows are
  the published Williamson quadruples (Hall 1983 for 43, London 2013 for 39, as tabulated in SageMath); the
  Hadamard property is checked when the matrix is built.

Incoherence processing rotates a weight W (m × n, out × in) to ``U W Vᵀ`` with the orthogonal
``U = Had_m · diag(signs_out) / √m`` and ``V = Had_n · diag(signs_in) / √n``, and the Hessian to ``V H Vᵀ``,
so that tr(E H Eᵀ) is unchanged while the rotated weight has no outlier entries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import Tensor

__all__ = ["SUPPORTED_BASES", "hadamard_matrix", "hadamard_transform", "is_supported", "Incoherence"]

SUPPORTED_BASES = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
"""Orders b of the dense factor H_b (times a power of two); b = 1 is the pure power-of-two case."""

_PALEY1 = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
_PALEY2 = {28: 13, 36: 17, 52: 25}
_WILLIAMSON = {  # first rows of the symmetric circulants A, B, C, D ('+' = 1, '-' = −1)
    156: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
          "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    172: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
          "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


def _supported_forms() -> str:
    return "n = 2^a · b with b in " + ", ".join(str(b) for b in SUPPORTED_BASES)


# ---- construction of H_b --------------------------------------------------------------------------
def _field(q: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int]]:
    """Elements of GF(q) for q = p (prime) or q = 25 (GF(5)[x]/(x² − 2)) as (a, c) pairs meaning a + c·x,
    and the quadratic character χ of every element (0 for zero, +1 for nonzero squares, −1 otherwise)."""
    if q == 25:
        p, elems = 5, [(a, c) for a in range(5) for c in range(5)]

        def mul(u: tuple[int, int], v: tuple[int, int]) -> tuple[int, int]:  # x² = 2
            return ((u[0] * v[0] + 2 * u[1] * v[1]) % p, (u[0] * v[1] + u[1] * v[0]) % p)
    else:
        elems = [(a, 0) for a in range(q)]

        def mul(u: tuple[int, int], v: tuple[int, int]) -> tuple[int, int]:
            return ((u[0] * v[0]) % q, 0)

    squares = {mul(e, e) for e in elems if e != (0, 0)}
    chi = {e: 0 if e == (0, 0) else (1 if e in squares else -1) for e in elems}
    return elems, chi


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix Q_ij = χ(e_j − e_i) of GF(q) (q × q, int64)."""
    elems, chi = _field(q)
    p = 5 if q == 25 else q
    rows = [[chi[((ej[0] - ei[0]) % p, (ej[1] - ei[1]) % p)] for ej in elems] for ei in elems]
    return torch.tensor(rows, dtype=torch.int64)


def _paley1(q: int) -> Tensor:
    """Paley I: H = I + S with the skew conference matrix S = [[0, 1ᵀ], [−1, Q]]
    (order q + 1, q ≡ 3 mod 4)."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> Tensor:
    """Paley II: S = [[0, 1ᵀ], [1, Q]] (symmetric, q ≡ 1 mod 4);
    H = S ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] (order 2(q + 1))."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, 1, Q
    A = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    B = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(S, A) + torch.kron(torch.eye(q + 1, dtype=torch.int64), B)


def _williamson(b: int) -> Tensor:
    """Williamson array [[A, B, C, D], [−B, A, −D, C], [−C, D, A, −B], [−D, −C, B, A]] of order b = 4k."""
    k = b // 4
    idx = (torch.arange(k)[None, :] - torch.arange(k)[:, None]) % k  # circulant: M_ij = row[(j − i) mod k]
    first_rows = [torch.tensor([1 if c == "+" else -1 for c in r], dtype=torch.int64) for r in _WILLIAMSON[b]]
    A, B, C, D = (row[idx] for row in first_rows)
    rows = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
    return torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)


@cache
def _base_matrix(b: int) -> Tensor:
    """H_b as a CPU float64 tensor (cached), verified to satisfy H Hᵀ = b I."""
    if b == 1:
        H = torch.ones(1, 1, dtype=torch.int64)
    elif b in _PALEY1:
        H = _paley1(_PALEY1[b])
    elif b in _PALEY2:
        H = _paley2(_PALEY2[b])
    elif b == 40:
        H20 = _base_matrix(20).to(torch.int64)
        H = torch.kron(torch.tensor([[1, 1], [1, -1]], dtype=torch.int64), H20)
    elif b in _WILLIAMSON:
        H = _williamson(b)
    else:
        raise ValueError(f"no Hadamard base matrix of order {b}; supported sizes are {_supported_forms()}")
    if not torch.equal(H @ H.T, b * torch.eye(b, dtype=torch.int64)):  # cheap guard on the construction
        raise RuntimeError(f"internal error: the constructed H_{b} is not a Hadamard matrix")
    return H.to(torch.float64)


@cache
def _factor(n: int) -> tuple[int, int]:
    """Split n = b · 2^a with the smallest supported b; returns (b, 2^a). Raises ValueError naming n."""
    if n >= 1:
        for b in SUPPORTED_BASES:
            if n % b == 0 and (n // b) & (n // b - 1) == 0:
                return b, n // b
    raise ValueError(f"no Hadamard transform of size n = {n}; supported sizes are {_supported_forms()}")


def is_supported(n: int) -> bool:
    """Whether :func:`hadamard_transform` supports size ``n``."""
    try:
        _factor(n)
    except ValueError:
        return False
    return True


_DEVICE_CACHE: dict[tuple[int, torch.dtype, str], Tensor] = {}


def _base_on(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (b, dtype, str(device))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = _base_matrix(b).to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """The unnormalised ±1 Hadamard matrix Had_n = H_b ⊗ H_{2^a} (n × n) that
    :func:`hadamard_transform` applies."""
    _factor(n)
    return hadamard_transform(torch.eye(n, dtype=dtype, device=device), normalize=False).T.contiguous()


# ---- transforms -----------------------------------------------------------------------------------
def _fwht(x: Tensor) -> Tensor:
    """Unnormalised Sylvester Walsh–Hadamard transform over the last dim (a power of two): log2 butterfly
    steps, ping-ponging between two buffers (no allocation per step). Returns a new tensor."""
    n = x.shape[-1]
    shape = x.shape
    x = x.reshape(-1, n).clone()
    buf = torch.empty_like(x)
    h = 1
    while h < n:
        y, o = x.view(-1, n // (2 * h), 2, h), buf.view(-1, n // (2 * h), 2, h)
        torch.add(y[:, :, 0], y[:, :, 1], out=o[:, :, 0])
        torch.sub(y[:, :, 0], y[:, :, 1], out=o[:, :, 1])
        x, buf = buf, x
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x: Tensor, *, transpose: bool = False, normalize: bool = True) -> Tensor:
    """Apply Had_n (or Had_nᵀ with ``transpose``) to every vector along the last dim of ``x`` (…, n).

    Returns ``x @ Had_nᵀ`` (or ``x @ Had_n``), divided by √n when ``normalize`` (then the map is orthogonal
    and the ``transpose`` variant is its exact inverse). Same shape and dtype as ``x``.
    """
    n = x.shape[-1]
    b, p = _factor(n)
    y = x.reshape(-1, b, p)
    y = _fwht(y) if p > 1 else y
    if b > 1:
        Hb = _base_on(b, x.dtype, x.device)
        if p == 1:  # a plain 2-D product
            y = y.reshape(-1, b) @ (Hb if transpose else Hb.T)
        else:  # batched over rows; contiguous, as strided batches are very slow on some CPU builds
            y = torch.matmul(Hb.T if transpose else Hb, y.contiguous())
    y = y.reshape(x.shape)
    return y / (n**0.5) if normalize else y


# ---- incoherence ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Incoherence:
    """Random-sign Hadamard rotations on both sides of an m × n weight.

    ``U = Had_m diag(signs_out) / √m`` (m × m) and ``V = Had_n diag(signs_in) / √n`` (n × n) are orthogonal;
    the stored ("rotated") weight is ``Wr = U W Vᵀ`` and a layer computes ``y = x Wᵀ = (x Vᵀ) Wrᵀ U``.

    Attributes:
        signs_out: (m,) ±1 float32.
        signs_in: (n,) ±1 float32.
        seed: the seed the signs were drawn with.
    """

    signs_out: Tensor
    signs_in: Tensor
    seed: int = 0

    def __post_init__(self) -> None:
        _factor(int(self.signs_out.shape[0]))
        _factor(int(self.signs_in.shape[0]))

    @classmethod
    def random(cls, m: int, n: int, seed: int = 0, device: torch.device | str = "cpu") -> Incoherence:
        """Draw the ±1 sign vectors from a CPU ``torch.Generator`` seeded with ``seed`` (so they are identical
        on every device)."""
        g = torch.Generator().manual_seed(seed)
        so = torch.randint(0, 2, (m,), generator=g).float() * 2 - 1
        si = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        return cls(so.to(device), si.to(device), seed)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.signs_out.shape[0]), int(self.signs_in.shape[0])

    def _s(self, which: Tensor, like: Tensor) -> Tensor:
        return which.to(device=like.device, dtype=like.dtype)

    def rotate_weight(self, W: Tensor) -> Tensor:
        """``U W Vᵀ`` for W (m × n); returns m × n in W's dtype."""
        Y = hadamard_transform(W * self._s(self.signs_in, W))  # W diag(s_in) Had_nᵀ / √n
        return hadamard_transform((Y * self._s(self.signs_out, W)[:, None]).T).T  # Had_m diag(s_out) Y / √m

    def unrotate_weight(self, Wr: Tensor) -> Tensor:
        """``Uᵀ Wr V`` for Wr (m × n) — the exact inverse of :meth:`rotate_weight`; returns m × n."""
        return self.unrotate_left(self.unrotate_right(Wr))

    def unrotate_left(self, Lr: Tensor) -> Tensor:
        """``Uᵀ Lr`` for Lr (m × r); returns m × r."""
        return hadamard_transform(Lr.T, transpose=True).T * self._s(self.signs_out, Lr)[:, None]

    def unrotate_right(self, Rr: Tensor) -> Tensor:
        """``Rr V`` for Rr (r × n); returns r × n."""
        return hadamard_transform(Rr, transpose=True) * self._s(self.signs_in, Rr)

    def rotate_hessian(self, H: Tensor) -> Tensor:
        """``V H Vᵀ`` for H (n × n); returns n × n (symmetric up to rounding)."""
        s = self._s(self.signs_in, H)
        Y = hadamard_transform(H * s)  # H Vᵀ
        return hadamard_transform((Y * s[:, None]).T).T  # V (H Vᵀ)

    def input_transform(self, x: Tensor) -> Tensor:
        """``x Vᵀ`` over the last dim of x (…, n); returns (…, n)."""
        return hadamard_transform(x * self._s(self.signs_in, x))

    def output_untransform(self, y: Tensor) -> Tensor:
        """``y U`` over the last dim of y (…, m); returns (…, m)."""
        return hadamard_transform(y, transpose=True) * self._s(self.signs_out, y)

    def storage_bits(self) -> int:
        """One bit per sign: m + n (the seed could regenerate them, but the signs are what is stored)."""
        m, n = self.shape
        return m + n

    def to(self, device: torch.device | str) -> Incoherence:
        return replace(self, signs_out=self.signs_out.to(device), signs_in=self.signs_in.to(device))
