"""Triton kernels for qlr's two storage formats: y = x @ Fᵀ straight from the packed codes, for CUDA tensors.

Shapes and arguments follow :mod:`qlr.kernels.reference` exactly: ``x`` is (B, n) float32, float16 or bfloat16, the
factor F is m × n (out × in) and the result is (B, m) in x's dtype, accumulated in float32.

* Scalar grids (:func:`grid_mm`): ``codes`` (m, ⌈n·bits/32⌉) int32 rows of little-endian ``bits``-bit codes (see
  :mod:`qlr.quant.packing`); ``scale`` (m, groups) float16 / float32, or int8 power-of-two exponents; ``zero``
  None (the constant ``zero_const``), a 1-D int32 stream of packed ``bits``-bit zero points over the flattened
  (m, groups) array, or float16 (m, groups); ``levels`` the NormalFloat table (then F = levels[code] · scale, no
  zero) or None (then F = (code − zero) · scale); ``group_len`` columns per group (0: the whole row), the last group
  possibly shorter.
* E8P lattice codes (:func:`e8p_mm`): ``codes`` (stages, m, n/8) int16 holding unsigned 16-bit patterns and
  ``scale`` (stages,) float16 / float32; F[:, 8j:8j+8] = Σ_s scale_s · codeword(codes[s, :, j]). A codeword is
  decoded in registers from the 256 × 8 absolute-pattern table (:func:`qlr.quant.e8p.e8p_abs_grid`, with
  dimension 0 pre-negated for odd patterns) plus the code's seven sign bits, the implied parity sign of
  dimension 0 and the ±1/4 shift; the 65,536-row codebook is never touched.

Two kernels per format, chosen by the batch size B:

* B ≤ ``GEMV_MAX_BATCH`` (16): fused decode + GEMV. Each program owns ``BLOCK_M`` output rows and the whole
  (padded) batch, walks the columns ``BLOCK_K`` at a time, decodes that tile of F in registers and accumulates
  x_tile · F_tileᵀ in float32 (broadcast multiply + reduction, no tensor cores; F stays float32, x is widened).
* larger B: dequantize-tile GEMM. Each program owns a ``BLOCK_B × BLOCK_M`` output tile, decodes a ``BLOCK_K ×
  BLOCK_M`` tile of Fᵀ into registers per step, rounds it to x's dtype (as the reference does) and feeds
  ``tl.dot`` with a float32 accumulator. Float32 inputs use TF32 tensor cores only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set (as torch.matmul does), else exact IEEE float32 products.

Decoded entries equal the reference's float32 values bit for bit (int8 exponents become exact powers of two,
subnormal 2**-127 and 2**-128 included); products differ from it only by float32 summation order (and, for two
E8P stages on the GPU, a possible fused multiply-add).

Supported (see :func:`supports_grid` / :func:`supports_e8p`): every grid width 1–8 bits (codes straddling two
words included), any n and any group length (groups whose length is a multiple of the column block read one scale
per row and tile; others gather the scale per element), all scale / zero storage kinds and NormalFloat levels;
E8P with 1–4 stages. Callers fall back to the reference when a ``supports_*`` function says no.

Interpreter: with ``TRITON_INTERPRET=1`` in the environment *when this module is imported* (Triton reads it when
the ``@triton.jit`` decorators run), the kernels run on CPU tensors through Triton's NumPy interpreter; this is
how the tests exercise them without a GPU. Nothing else is fixed at import: the E8P table is built per device on
first use. Under the interpreter, bfloat16 operands of ``tl.dot`` are widened to float32 first (the interpreter
would multiply their bit patterns as integers); the values are the same. Without Triton installed the module still
imports; :func:`available` and the ``supports_*`` functions then return False and the products raise
``NotImplementedError``.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

try:  # Triton is optional: CPU-only installs run the compiled C++ / reference kernels instead
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc

__all__ = ["available", "interpreted", "usable", "supports_grid", "supports_e8p", "grid_mm", "e8p_mm",
           "GEMV_MAX_BATCH"]

GEMV_MAX_BATCH = 16
"""Largest batch handled by the fused decode + GEMV kernels; larger batches use the tile GEMM kernels."""

_MAX_E8P_STAGES = 4
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_E8P_TABLES: dict[str, Tensor] = {}


def _interpret_flag() -> bool:
    """Whether ``@triton.jit`` builds interpreter functions now (newer Triton: its knobs; older: the env var)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# how the @triton.jit decorators below were built (they read TRITON_INTERPRET when they run)
_INTERPRET = triton is not None and _interpret_flag()


def available() -> bool:
    """Whether Triton could be imported (the kernels exist)."""
    return triton is not None


def interpreted() -> bool:
    """Whether the kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return available() and _INTERPRET


def usable(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: CUDA, or CPU under the interpreter."""
    if not available():
        return False
    return x.device.type == "cpu" if _INTERPRET else x.device.type == "cuda"


def supports_grid(bits: int, n: int, group_len: int, levels: Tensor | None = None) -> bool:
    """Whether :func:`grid_mm` handles this scalar-grid layout: 1 ≤ bits ≤ 8, n ≥ 1, group_len ≥ 0 (0 = whole
    row) and, for NormalFloat, a table of at least 2**bits levels. Scale dtypes float16 / float32 / int8 and every
    zero kind are always supported."""
    if not available() or not isinstance(bits, int) or not 1 <= bits <= 8 or n < 1 or group_len < 0:
        return False
    return levels is None or levels.numel() >= 1 << bits


def supports_e8p(stages: int, n: int) -> bool:
    """Whether :func:`e8p_mm` handles an E8P factor with ``stages`` stages and n columns: 1 ≤ stages ≤ 4 and n a
    positive multiple of 8."""
    return available() and 1 <= stages <= _MAX_E8P_STAGES and n >= 8 and n % 8 == 0


if triton is not None:

    # The kernels use only Triton builtins (no tl.zeros / tl.sum, which are @jit functions of triton.language
    # itself): those are built in whichever mode Triton was first imported, so relying on them would break the
    # interpreter whenever triton was imported before TRITON_INTERPRET was set (torch imports it early).
    @triton.jit
    def _sum_last(v):
        """Sum over the last of three axes (tl.sum, spelled so that the interpreter maps it to a NumPy sum)."""
        return tl.reduce(v, 2, tl.standard._sum_combine)

    @triton.jit
    def _bitfield(ptr, pos, msk, nwords, BITS: tl.constexpr):
        """The ``BITS``-bit fields starting at stream bits ``pos`` of the int32 words at ``ptr`` (int32)."""
        w = pos >> 5
        off = (pos & 31).to(tl.uint32)
        lo = tl.load(ptr + w, mask=msk, other=0).to(tl.uint32, bitcast=True)
        v = lo >> off
        if 32 % BITS != 0:  # a field may straddle into the next word; (hi << 1) << (31 − off) is hi << (32 − off)
            hi = tl.load(ptr + w + 1, mask=msk & (w + 1 < nwords), other=0).to(tl.uint32, bitcast=True)
            v = v | ((hi << 1) << (31 - off))
        return (v & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _pow2(e):
        """2**e as float32 for int32 exponents in [-149, 127], built from the bit pattern (exact)."""
        normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
        sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 30)).to(tl.float32, bitcast=True)
        return tl.where(e >= -126, normal, sub)

    @triton.jit
    def _grid_tile(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rr, kk, rm, km, k0, words, groups, zwords, glen,
                   zero_const, BITS: tl.constexpr, SCALE_EXP: tl.constexpr, ZERO_KIND: tl.constexpr,
                   HAS_LEVELS: tl.constexpr, UNIFORM: tl.constexpr):
        """F[rr, kk] as float32 (0 where masked). ``rr`` / ``kk`` are broadcastable 2-D row / column indices with
        masks ``rm`` / ``km``; ``UNIFORM``: every column of the tile starting at ``k0`` lies in group k0 // glen."""
        msk = rm & km
        rr64 = rr.to(tl.int64)
        code = _bitfield(codes_ptr + rr64 * words, kk * BITS, msk, words, BITS)
        if UNIFORM:
            g = k0 // glen
            gm = rm
        else:
            g = kk // glen
            gm = msk
        sidx = rr64 * groups + g
        if SCALE_EXP:
            s = _pow2(tl.load(scale_ptr + sidx, mask=gm, other=0).to(tl.int32))
        else:
            s = tl.load(scale_ptr + sidx, mask=gm, other=0).to(tl.float32)
        if HAS_LEVELS:
            v = tl.load(levels_ptr + code, mask=msk, other=0.0) * s
        else:
            if ZERO_KIND == 0:
                z = zero_const
            elif ZERO_KIND == 1:
                z = _bitfield(zero_ptr, sidx * BITS, gm, zwords, BITS).to(tl.float32)
            else:
                z = tl.load(zero_ptr + sidx, mask=gm, other=0).to(tl.float32)
            v = (code.to(tl.float32) - z) * s
        return tl.where(msk, v, 0.0)

    @triton.jit
    def _e8p_tile(codes_ptr, scale_ptr, table_ptr, rr, kk, msk, m, nb, STAGES: tl.constexpr):
        """F[rr, kk] as float32 (0 where masked) for E8P codes; ``rr`` / ``kk`` broadcastable 2-D indices."""
        j = kk >> 3
        d = kk & 7
        base = rr.to(tl.int64) * nb + j
        out = tl.full(msk.shape, 0.0, tl.float32)
        for s in tl.static_range(STAGES):
            c = tl.load(codes_ptr + s * m * nb + base, mask=msk, other=0).to(tl.int32) & 0xFFFF
            a = tl.load(table_ptr + (c >> 8) * 8 + d)  # dimension 0 pre-negated for odd patterns
            p = (c >> 1) & 0x7F  # parity of the seven stored signs gives dimension 0's sign
            p = p ^ (p >> 4)
            p = p ^ (p >> 2)
            p = p ^ (p >> 1)
            neg = tl.where(d == 0, p, c >> (8 - d)) & 1
            v = tl.where(neg != 0, -a, a) + tl.where((c & 1) != 0, 0.25, -0.25)
            out += tl.load(scale_ptr + s).to(tl.float32) * v
        return tl.where(msk, out, 0.0)

    # ---- the pieces every kernel shares: its output tile, the x tile of a step, the two products, the store ----
    @triton.jit
    def _out_tile(b0, m, B, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
        """This program's ``BLOCK_M`` output columns (rows of F) and its ``BLOCK_B`` batch rows from ``b0``, with
        their in-range masks: (rows, bs, rm, bm)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bs = b0 + tl.arange(0, BLOCK_B)
        return rows, bs, rows < m, bs < B

    @triton.jit
    def _x_tile(xrow, cols, bm, km):
        """x[bs, cols] in x's dtype (0 where masked); ``xrow`` points at the first column of each batch row."""
        return tl.load(xrow + cols[None, :], mask=bm[:, None] & km[None, :], other=0.0)

    @triton.jit
    def _gemv_step(acc, xt, w):
        """acc + xt · wᵀ for a decoded F tile ``w`` (BLOCK_M, BLOCK_K): float32 broadcast multiply and sum."""
        return acc + _sum_last(xt.to(tl.float32)[:, None, :] * w[None, :, :])

    @triton.jit
    def _gemm_step(acc, xt, wt, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + xt · wt for a decoded Fᵀ tile ``wt`` (BLOCK_K, BLOCK_M), rounded to x's dtype as the reference
        does, on tensor cores with a float32 accumulator."""
        wt = wt.to(xt.dtype)
        if UPCAST:  # the interpreter multiplies bfloat16 bit patterns as integers: use the float32 values
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _store_y(y_ptr, acc, bs, rows, bm, rm, stride_yb):
        """y[bs, rows] = acc in y's dtype, where in range."""
        yp = y_ptr + bs.to(tl.int64)[:, None] * stride_yb + rows[None, :]
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=bm[:, None] & rm[None, :])

    # ---- the kernels: fused decode + GEMV (one program per BLOCK_M rows, the whole batch) and decoded-tile GEMM
    @triton.jit
    def _grid_gemv_kernel(x_ptr, y_ptr, codes_ptr, scale_ptr, zero_ptr, levels_ptr, B, m, n, words, groups, zwords,
                          glen, zero_const, stride_xb, stride_yb, BITS: tl.constexpr, SCALE_EXP: tl.constexpr,
                          ZERO_KIND: tl.constexpr, HAS_LEVELS: tl.constexpr, UNIFORM: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, bs, rm, bm = _out_tile(0, m, B, BLOCK_B, BLOCK_M)
        xrow = x_ptr + bs.to(tl.int64)[:, None] * stride_xb
        acc = tl.full((BLOCK_B, BLOCK_M), 0.0, tl.float32)
        for k0 in range(0, n, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            km = cols < n
            w = _grid_tile(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rows[:, None], cols[None, :], rm[:, None],
                           km[None, :], k0, words, groups, zwords, glen, zero_const, BITS, SCALE_EXP, ZERO_KIND,
                           HAS_LEVELS, UNIFORM)
            acc = _gemv_step(acc, _x_tile(xrow, cols, bm, km), w)
        _store_y(y_ptr, acc, bs, rows, bm, rm, stride_yb)

    @triton.jit
    def _grid_gemm_kernel(x_ptr, y_ptr, codes_ptr, scale_ptr, zero_ptr, levels_ptr, B, m, n, words, groups, zwords,
                          glen, zero_const, stride_xb, stride_yb, BITS: tl.constexpr, SCALE_EXP: tl.constexpr,
                          ZERO_KIND: tl.constexpr, HAS_LEVELS: tl.constexpr, UNIFORM: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, bs, rm, bm = _out_tile(tl.program_id(1) * BLOCK_B, m, B, BLOCK_B, BLOCK_M)
        xrow = x_ptr + bs.to(tl.int64)[:, None] * stride_xb
        acc = tl.full((BLOCK_B, BLOCK_M), 0.0, tl.float32)
        for k0 in range(0, n, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            km = cols < n
            wt = _grid_tile(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rows[None, :], cols[:, None], rm[None, :],
                            km[:, None], k0, words, groups, zwords, glen, zero_const, BITS, SCALE_EXP, ZERO_KIND,
                            HAS_LEVELS, UNIFORM)  # (BLOCK_K, BLOCK_M) = Fᵀ tile
            acc = _gemm_step(acc, _x_tile(xrow, cols, bm, km), wt, PRECISION, UPCAST)
        _store_y(y_ptr, acc, bs, rows, bm, rm, stride_yb)

    @triton.jit
    def _e8p_gemv_kernel(x_ptr, y_ptr, codes_ptr, scale_ptr, table_ptr, B, m, n, nb, stride_xb, stride_yb,
                         STAGES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, bs, rm, bm = _out_tile(0, m, B, BLOCK_B, BLOCK_M)
        xrow = x_ptr + bs.to(tl.int64)[:, None] * stride_xb
        acc = tl.full((BLOCK_B, BLOCK_M), 0.0, tl.float32)
        for k0 in range(0, n, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            km = cols < n
            w = _e8p_tile(codes_ptr, scale_ptr, table_ptr, rows[:, None], cols[None, :], rm[:, None] & km[None, :],
                          m, nb, STAGES)
            acc = _gemv_step(acc, _x_tile(xrow, cols, bm, km), w)
        _store_y(y_ptr, acc, bs, rows, bm, rm, stride_yb)

    @triton.jit
    def _e8p_gemm_kernel(x_ptr, y_ptr, codes_ptr, scale_ptr, table_ptr, B, m, n, nb, stride_xb, stride_yb,
                         STAGES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, bs, rm, bm = _out_tile(tl.program_id(1) * BLOCK_B, m, B, BLOCK_B, BLOCK_M)
        xrow = x_ptr + bs.to(tl.int64)[:, None] * stride_xb
        acc = tl.full((BLOCK_B, BLOCK_M), 0.0, tl.float32)
        for k0 in range(0, n, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            km = cols < n
            wt = _e8p_tile(codes_ptr, scale_ptr, table_ptr, rows[None, :], cols[:, None], rm[None, :] & km[:, None],
                           m, nb, STAGES)  # (BLOCK_K, BLOCK_M) = Fᵀ tile
            acc = _gemm_step(acc, _x_tile(xrow, cols, bm, km), wt, PRECISION, UPCAST)
        _store_y(y_ptr, acc, bs, rows, bm, rm, stride_yb)


# ---- host side -----------------------------------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _check_x(x: Tensor, n: int) -> Tensor:
    if triton is None:
        raise RuntimeError(f"triton is not available: {_IMPORT_ERROR}")
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"x must be (B, {n}), got {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(x: Tensor) -> str:
    """tl.dot's input precision: only float32 inputs care; TF32 when torch.matmul would use it."""
    if x.dtype == torch.float32 and x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(x: Tensor) -> bool:
    """Whether tl.dot must see float32 copies of bfloat16 operands (a Triton interpreter limitation; the values
    and the float32 accumulation are the same as on the GPU)."""
    return _INTERPRET and x.dtype == torch.bfloat16


def _gemv_blocks(B: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_K) of a GEMV launch: about 4K live products per program."""
    bb = _next_pow2(B)
    bm = 16
    bk = max(32, min(256, 4096 // (bb * bm)))
    return bb, bm, min(bk, max(32, _next_pow2(n)))


def _gemm_blocks(B: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_K, num_warps, num_stages) of a tile-GEMM launch (every block ≥ 16 for tl.dot).
    BLOCK_K = 32 and two pipeline stages keep the decoded tile in registers without spilling on sm_80 / sm_90."""
    bb = 128 if B >= 128 else (64 if B >= 64 else 32)
    return bb, 64, 32, 8 if bb == 128 else 4, 2


def _fit_group(bk: int, glen: int, groups: int, lo: int) -> tuple[int, bool]:
    """Shrink the column block (not below ``lo``) so that it divides the group length when it can; returns it and
    whether each column tile then lies in a single group."""
    if groups == 1:
        return bk, True
    b = bk
    while b > lo and glen % b:
        b //= 2
    return (b, True) if glen % b == 0 else (bk, False)


def _device_ctx(x: Tensor) -> AbstractContextManager:
    """Launch on x's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext()


def grid_mm(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
            n: int, group_len: int, zero_const: float) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for a scalar-grid F, decoding straight from the packed codes (see the module
    docstring for the arguments); the result is in x's dtype, accumulated in float32.

    Raises ``NotImplementedError`` when :func:`supports_grid` is False for (bits, n, group_len, levels).
    """
    if not supports_grid(bits, n, group_len, levels):
        raise NotImplementedError(f"triton grid_mm does not support bits={bits}, n={n}, group_len={group_len}")
    x = _check_x(x, n)
    m, words = codes.shape
    glen = group_len or n
    groups = -(-n // glen)
    if words != -(-n * bits // 32) or tuple(scale.shape) != (m, groups):
        raise ValueError(f"codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit m={m}, n={n}, "
                         f"bits={bits}, group_len={group_len}")
    B = x.shape[0]
    y = torch.empty(B, m, dtype=x.dtype, device=x.device)
    if B == 0 or m == 0:
        return y
    codes, scale = codes.contiguous(), scale.contiguous()
    if scale.dtype not in (torch.float16, torch.float32, torch.int8):
        scale = scale.float()
    zero_kind, zero_t, zwords = 0, codes, 1  # zero_t is a placeholder pointer when unused
    if levels is None and zero is not None:
        zero_t = zero.contiguous()
        zero_kind = 1 if zero.dtype == torch.int32 else 2
        zwords = zero_t.numel()
    lv = codes if levels is None else levels.to(device=x.device, dtype=torch.float32).contiguous()
    common = dict(BITS=bits, SCALE_EXP=scale.dtype == torch.int8, ZERO_KIND=zero_kind, HAS_LEVELS=levels is not None)
    args = (x, y, codes, scale, zero_t, lv, B, m, n, words, groups, zwords, glen, float(zero_const), x.stride(0),
            y.stride(0))
    with _device_ctx(x):
        if B <= GEMV_MAX_BATCH:
            bb, bm, bk = _gemv_blocks(B, n)
            bk, uniform = _fit_group(bk, glen, groups, 32)
            _grid_gemv_kernel[(triton.cdiv(m, bm),)](*args, **common, UNIFORM=uniform, BLOCK_B=bb, BLOCK_M=bm,
                                                     BLOCK_K=bk, num_warps=4)
        else:
            bb, bm, bk, warps, pipe = _gemm_blocks(B)
            bk, uniform = _fit_group(bk, glen, groups, 16)
            _grid_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(B, bb))](
                *args, **common, UNIFORM=uniform, PRECISION=_precision(x), UPCAST=_upcast(x), BLOCK_B=bb,
                BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=pipe)
    return y


def _e8p_table(device: torch.device) -> Tensor:
    """The 256 × 8 float32 absolute patterns with dimension 0 negated for patterns of odd coordinate sum."""
    key = str(device)
    if key not in _E8P_TABLES:
        from qlr.quant.e8p import e8p_abs_grid

        t = e8p_abs_grid("cpu").clone()
        odd = t.sum(-1).round().to(torch.int64) % 2 == 1
        t[odd, 0] = -t[odd, 0]
        _E8P_TABLES[key] = t.contiguous().to(device)
    return _E8P_TABLES[key]


def e8p_mm(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for an E8P-coded F (codes (stages, m, n/8) int16, scale (stages,)), decoding the
    codewords in registers; the result is in x's dtype, accumulated in float32.

    Raises ``NotImplementedError`` when :func:`supports_e8p` is False.
    """
    if codes.dim() != 3:
        raise ValueError(f"E8P codes must be (stages, m, n/8), got {tuple(codes.shape)}")
    stages, m, nb = codes.shape
    n = nb * 8
    if not supports_e8p(stages, n):
        raise NotImplementedError(f"triton e8p_mm does not support stages={stages}, n={n}")
    x = _check_x(x, n)
    if scale.numel() != stages:
        raise ValueError(f"E8P scale must have {stages} entries, got {scale.numel()}")
    B = x.shape[0]
    y = torch.empty(B, m, dtype=x.dtype, device=x.device)
    if B == 0 or m == 0:
        return y
    codes = codes.contiguous()
    sc = scale.reshape(-1).float().contiguous()
    args = (x, y, codes, sc, _e8p_table(x.device), B, m, n, nb, x.stride(0), y.stride(0))
    with _device_ctx(x):
        if B <= GEMV_MAX_BATCH:
            bb, bm, bk = _gemv_blocks(B, n)
            _e8p_gemv_kernel[(triton.cdiv(m, bm),)](*args, STAGES=stages, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk,
                                                    num_warps=4)
        else:
            bb, bm, bk, warps, pipe = _gemm_blocks(B)
            _e8p_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(B, bb))](
                *args, STAGES=stages, PRECISION=_precision(x), UPCAST=_upcast(x), BLOCK_B=bb, BLOCK_M=bm,
                BLOCK_K=bk, num_warps=warps, num_stages=pipe)
    return y
