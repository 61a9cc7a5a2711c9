"""qlr's forward kernels as ``torch.library`` custom ops (so ``torch.compile`` and CUDA graphs see them).

* ``torch.ops.qlr.grid_mm(x, codes, scale, zero, levels, bits, n, group_len, zero_const)`` — x @ Fᵀ for a
  scalar-grid factor F (uniform int or NormalFloat, group-wise, any width 1–8 bits);
* ``torch.ops.qlr.e8p_mm(x, codes, scale)`` — x @ Fᵀ for an E8P lattice factor (one or two stages);
* ``torch.ops.qlr.hadamard(x, pre, post, transpose)`` — (Had_n (x ∘ pre) / √n) ∘ post, the randomized Hadamard
  rotation of activations (O(n log n) butterflies plus the small dense H_b factor).

Arguments follow :mod:`qlr.kernels.reference`; ``x`` is (B, n) in float32, float16 or bfloat16 and results come back
in x's dtype. On CPU with the compiled kernels (:mod:`qlr.kernels.cpu`): up to ``GEMV_MAX_BATCH`` rows run the fused
decode + GEMV straight from the packed codes (float32 accumulation); more rows decode tiles of F into a reused
float32 buffer and call BLAS. On CUDA with Triton installed the products run :mod:`qlr.kernels.triton_kernels`
(fused decode + GEMV, dequantize-tile GEMM). Elsewhere (no compiler, ``QLR_KERNELS=torch``, the rotation on CUDA)
the pure-torch reference runs. No dense float F is ever held whole.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from qlr.kernels import cpu, reference, triton_kernels
from qlr.quant.hadamard import _base_on, _factor

__all__ = ["grid_mm", "e8p_mm", "hadamard", "grid_dense", "e8p_dense", "use_compiled", "TILE_ELEMS",
           "TILE_MIN_ROWS"]

TILE_ELEMS = 1 << 20
"""Float32 elements of the decoded tile the CPU large-batch path multiplies with BLAS (4 MiB), unless that is fewer
than ``TILE_MIN_ROWS`` rows of F."""
TILE_MIN_ROWS = 384
"""Fewest rows of F per decoded tile: BLAS re-reads all of x for every tile, so wide factors need tall tiles."""

_lib = torch.library.Library("qlr", "DEF")
_lib.define("grid_mm(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? levels, int bits, int n, "
            "int group_len, float zero_const) -> Tensor")
_lib.define("e8p_mm(Tensor x, Tensor codes, Tensor scale) -> Tensor")
_lib.define("hadamard(Tensor x, Tensor? pre, Tensor? post, bool transpose) -> Tensor")

_local = threading.local()


def use_compiled(x: Tensor) -> bool:
    """Whether ``x`` goes through the compiled CPU kernels (never while torch.compile traces: it sees the ops)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu.lib() is not None


def _scratch(numel: int) -> Tensor:
    """A per-thread float32 buffer of at least ``numel`` elements, reused across calls (no page faults per call)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _local.buf = buf
    return buf[:numel]


def _decoded_tiles(m: int, n: int, decode) -> Iterator[tuple[int, int, Tensor]]:  # noqa: ANN001
    """Yield (r0, r1, F[r0:r1]) for F (m × n), a tile of rows at a time, each decoded by ``decode(r0, r1, out)``
    into one reused thread-local scratch buffer (valid until the next tile is yielded)."""
    rows = _tile_rows(m, n)
    buf = _scratch(rows * n)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        tile = buf[: (r1 - r0) * n].view(r1 - r0, n)
        decode(r0, r1, tile)
        yield r0, r1, tile


def _tile_rows(m: int, n: int) -> int:
    return max(1, min(m, max(TILE_MIN_ROWS, TILE_ELEMS // max(n, 1))))


def _tiled(x: Tensor, m: int, n: int, decode) -> Tensor:  # noqa: ANN001 - decode(r0, r1, out) fills out
    """x (B, n) @ Fᵀ → (B, m), decoding F a tile of rows at a time."""
    def xdtype(tile: Tensor) -> Tensor:
        return tile if x.dtype == torch.float32 else tile.to(x.dtype)

    if _tile_rows(m, n) == m:  # one tile holds F: no output slices to copy
        ((_, _, tile),) = _decoded_tiles(m, n, decode)
        return x @ xdtype(tile).T
    y = torch.empty(x.shape[0], m, dtype=x.dtype)
    for r0, r1, tile in _decoded_tiles(m, n, decode):
        y[:, r0:r1] = x @ xdtype(tile).T
    return y


def _tiled_t(g: Tensor, m: int, n: int, decode) -> Tensor:  # noqa: ANN001 - decode(r0, r1, out) fills out
    """g (B, m) @ F (m × n) → (B, n), decoding F a tile of rows at a time (the gradient of x @ Fᵀ)."""
    gf = g if g.dtype == torch.float32 else g.float()
    out = torch.zeros(g.shape[0], n, dtype=torch.float32)
    for r0, r1, tile in _decoded_tiles(m, n, decode):
        out.addmm_(gf[:, r0:r1], tile)
    return out if g.dtype == torch.float32 else out.to(g.dtype)


def _small(x: Tensor, m: int, gemv) -> Tensor:  # noqa: ANN001 - gemv(xf, out)
    xf = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
    out = torch.empty(x.shape[0], m, dtype=torch.float32)
    gemv(xf, out)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _grid_args(codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None) -> tuple:
    """(codes, scale, scale_kind, zero, zero_kind, levels) contiguous, as the compiled grid kernels take them."""
    zero_kind = 0 if zero is None else (1 if zero.dtype == torch.int32 else 2)
    return (codes.contiguous(), scale.contiguous(), cpu.SCALE_KINDS[scale.dtype],
            None if zero is None else zero.contiguous(), zero_kind,
            None if levels is None else levels.float().contiguous())


def _grid_mm_cpu(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
                 n: int, group_len: int, zero_const: float) -> Tensor:
    if not use_compiled(x) or scale.dtype not in cpu.SCALE_KINDS:
        return reference.grid_mm(x, codes, scale, zero, levels, bits, n, group_len, zero_const)
    codes, scale, sk, zero, zk, lv = _grid_args(codes, scale, zero, levels)
    m, glen = codes.shape[0], group_len or n
    if x.shape[0] <= cpu.GEMV_MAX_BATCH:
        return _small(x, m, lambda xf, out: cpu.grid_gemv(xf, codes, scale, sk, zero, zk, zero_const, lv, bits, n,
                                                          glen, out))
    return _tiled(x, m, n, lambda r0, r1, out: cpu.grid_decode(codes, scale, sk, zero, zk, zero_const, lv, bits, n,
                                                               glen, r0, r1, out))


def _e8p_mm_cpu(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    if not use_compiled(x):
        return reference.e8p_mm(x, codes, scale)
    codes, sc = codes.contiguous(), scale.float().contiguous()
    m, n = codes.shape[1], codes.shape[2] * 8
    if x.shape[0] <= cpu.GEMV_MAX_BATCH:
        return _small(x, m, lambda xf, out: cpu.e8p_gemv(xf, codes, sc, out))
    return _tiled(x, m, n, lambda r0, r1, out: cpu.e8p_decode(codes, sc, r0, r1, out))


def _hadamard_cpu(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    if not use_compiled(x):
        return reference.hadamard(x, pre, post, transpose)
    n = x.shape[-1]
    b, _ = _factor(n)
    Hb = None
    if b > 1:
        Hb = _base_on(b, torch.float32, torch.device("cpu"))
        Hb = Hb.T.contiguous() if transpose else Hb.contiguous()
    xf = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
    pre = None if pre is None else pre.float().contiguous()
    post = None if post is None else post.float().contiguous()
    y = cpu.hadamard(xf, b, Hb, pre, post, 1.0 / math.sqrt(n), out=torch.empty(x.shape, dtype=torch.float32))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _grid_mm_cuda(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
                  n: int, group_len: int, zero_const: float) -> Tensor:
    if triton_kernels.usable(x) and triton_kernels.supports_grid(bits, n, group_len, levels):
        return triton_kernels.grid_mm(x, codes, scale, zero, levels, bits, n, group_len, zero_const)
    return reference.grid_mm(x, codes, scale, zero, levels, bits, n, group_len, zero_const)


def _e8p_mm_cuda(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    if triton_kernels.usable(x) and triton_kernels.supports_e8p(codes.shape[0], codes.shape[2] * 8):
        return triton_kernels.e8p_mm(x, codes, scale)
    return reference.e8p_mm(x, codes, scale)


_lib.impl("grid_mm", _grid_mm_cpu, "CPU")
_lib.impl("e8p_mm", _e8p_mm_cpu, "CPU")
_lib.impl("hadamard", _hadamard_cpu, "CPU")
_lib.impl("grid_mm", _grid_mm_cuda, "CUDA")  # Triton kernels where triton is installed, else the reference
_lib.impl("e8p_mm", _e8p_mm_cuda, "CUDA")
# every other device (and the rotation on CUDA): the reference
_lib.impl("grid_mm", reference.grid_mm, "CompositeExplicitAutograd")
_lib.impl("e8p_mm", reference.e8p_mm, "CompositeExplicitAutograd")
_lib.impl("hadamard", reference.hadamard, "CompositeExplicitAutograd")


@torch.library.register_fake("qlr::grid_mm")
def _grid_mm_fake(x, codes, scale, zero, levels, bits, n, group_len, zero_const):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.register_fake("qlr::e8p_mm")
def _e8p_mm_fake(x, codes, scale):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], codes.shape[1])


@torch.library.register_fake("qlr::hadamard")
def _hadamard_fake(x, pre, post, transpose):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


# ---- autograd: gradients flow to x only (codes, scales and signs are stored constants) -------------------------
def _save_inputs(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.args = inputs[1:]


def _grid_mm_t(g: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int,
               n: int, group_len: int, zero_const: float) -> Tensor:
    """g (B, m) @ F → (B, n): compiled tile decoding + BLAS on CPU, else the reference."""
    if g.device.type != "cpu" or not use_compiled(g) or scale.dtype not in cpu.SCALE_KINDS:
        return reference.grid_mm_t(g, codes, scale, zero, levels, bits, n, group_len, zero_const)
    codes, scale, sk, zero, zk, lv = _grid_args(codes, scale, zero, levels)
    glen = group_len or n
    return _tiled_t(g, codes.shape[0], n, lambda r0, r1, out: cpu.grid_decode(codes, scale, sk, zero, zk, zero_const,
                                                                             lv, bits, n, glen, r0, r1, out))


def _e8p_mm_t(g: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """g (B, m) @ F → (B, n) for E8P codes: compiled tile decoding + BLAS on CPU, else the reference."""
    if g.device.type != "cpu" or not use_compiled(g):
        return reference.e8p_mm_t(g, codes, scale)
    codes, sc = codes.contiguous(), scale.float().contiguous()
    return _tiled_t(g, codes.shape[1], codes.shape[2] * 8, lambda r0, r1, out: cpu.e8p_decode(codes, sc, r0, r1, out))


def _grid_mm_backward(ctx, grad):  # noqa: ANN001, ANN202
    return (_grid_mm_t(grad.contiguous(), *ctx.args),) + (None,) * len(ctx.args)


def _e8p_mm_backward(ctx, grad):  # noqa: ANN001, ANN202
    return (_e8p_mm_t(grad.contiguous(), *ctx.args),) + (None,) * len(ctx.args)


def _hadamard_backward(ctx, grad):  # noqa: ANN001, ANN202
    pre, post, transpose = ctx.args  # y = post ∘ Had (pre ∘ x) / √n  ⇒  dx = pre ∘ Hadᵀ (post ∘ dy) / √n
    return torch.ops.qlr.hadamard(grad, post, pre, not transpose), None, None, None


torch.library.register_autograd("qlr::grid_mm", _grid_mm_backward, setup_context=_save_inputs)
torch.library.register_autograd("qlr::e8p_mm", _e8p_mm_backward, setup_context=_save_inputs)
torch.library.register_autograd("qlr::hadamard", _hadamard_backward, setup_context=_save_inputs)


def grid_mm(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int, n: int,
            group_len: int, zero_const: float) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for a scalar-grid F (``torch.ops.qlr.grid_mm``)."""
    return torch.ops.qlr.grid_mm(x, codes, scale, zero, levels, bits, n, group_len, zero_const)


def e8p_mm(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """x (B, n) @ Fᵀ → (B, m) for an E8P factor (``torch.ops.qlr.e8p_mm``)."""
    return torch.ops.qlr.e8p_mm(x, codes, scale)


def hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool = False) -> Tensor:
    """(Had_n (x ∘ pre) / √n) ∘ post over x (B, n) (``torch.ops.qlr.hadamard``)."""
    return torch.ops.qlr.hadamard(x, pre, post, transpose)


def grid_dense(codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int, n: int,
               group_len: int, zero_const: float) -> Tensor:
    """A whole (small) scalar-grid factor as float32 (m × n): the compiled decoder on CPU, else the reference. For
    the low-rank factors (m × r), which a large-batch forward multiplies with one BLAS call."""
    m = codes.shape[0]
    if not use_compiled(codes) or scale.dtype not in cpu.SCALE_KINDS:
        return reference.grid_decode(codes, scale, zero, levels, bits, n, group_len, zero_const, 0, m)
    codes, scale, sk, zero, zk, lv = _grid_args(codes, scale, zero, levels)
    out = torch.empty(m, n, dtype=torch.float32)
    return cpu.grid_decode(codes, scale, sk, zero, zk, zero_const, lv, bits, n, group_len or n, 0, m, out)


def e8p_dense(codes: Tensor, scale: Tensor) -> Tensor:
    """A whole (small) E8P factor as float32 (m × n): the compiled decoder on CPU, else the reference."""
    stages, m, nb = codes.shape
    if not use_compiled(codes):
        return reference.e8p_decode(codes, scale, 0, m)
    out = torch.empty(m, nb * 8, dtype=torch.float32)
    return cpu.e8p_decode(codes.contiguous(), scale.float().contiguous(), 0, m, out)
