"""Storage codecs for the factors of :class:`~qlr.nn.qlinear.QLRLinear` and their registry.

Each factor (Q, L, R) is stored by a *codec*, picked by a list of codecs where the first that accepts the object
wins (:func:`register_codec` adds one, e.g. for lattice codes):

* ``grid``  — a scalar-grid :class:`~qlr.quant.grid.QuantizedTensor`: packed int32 codes (m, ceil(n·b/32)),
  scales (m, groups) as fp16 / fp32 / int8 power-of-two exponents (``scale_bits`` 16 / 32 / 8), bit-packed integer
  zero points (flattened, only when the grid has them; fp16 when they are not integers) and an optional act-order
  permutation (int16 when n < 2¹⁵, else int32; stored column j is original column ``perm[j]``).
* ``e8p``   — an E8P lattice-coded :class:`~qlr.quant.e8p.LatticeQuantizedTensor`: the int16 codes
  (stages, m, n/8) as they are (one unsigned 16-bit code per 8 weights per stage is already the packed form) and
  the per-stage scales (stages,) in fp16 (``scale_bits`` 16) or fp32 (32). Rows are decoded by codebook lookup,
  Σ_s scale_s · codeword(codes[s, rows]), bit for bit what ``dequantize()`` gives.
* ``dense`` — a plain tensor stored in fp16 (L and R when they are not quantized).

A codec's buffers are named by suffix (``codes``, ``scale``, ``zero``, ``perm``, ``dense``); the module prefixes
them with the factor (``q_codes``, ``l_scale``, …).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from qlr.kernels import cpu, ops, reference
from qlr.quant.e8p import E8P_DIM, LatticeQuantizedTensor, quantize_e8p
from qlr.quant.grid import QuantizedTensor, QuantSpec, nf_levels, quantize_rtn
from qlr.quant.packing import MAX_BITS, pack

__all__ = ["Codec", "GridCodec", "LatticeCodec", "DenseCodec", "register_codec", "codec_for", "RowDecoder",
           "dtype_name", "dtype_from_name"]

RowDecoder = Callable[[int, int], Tensor]
"""``(start, stop) -> float32 rows [start, stop)`` of a factor, in stored column order."""


class Codec(Protocol):
    """How one factor (an m × n matrix) is stored as buffers and decoded."""

    name: str

    def accepts(self, obj: object) -> bool:
        """Whether this codec can store ``obj``."""
        ...

    def encode(self, obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Buffers (suffix → tensor) and JSON-able metadata (with ``"codec"`` and ``"shape"`` = [m, n])."""
        ...

    def empty(self, meta: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
        """Uninitialised buffers with the shapes and dtypes that :meth:`encode` would produce for ``meta``."""
        ...

    def decoder(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> RowDecoder:
        """A function ``(start, stop) -> float32 rows [start, stop) × n`` in stored column order."""
        ...

    def matmul(self, x: Tensor, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        """``x @ Fᵀ`` for x (B, n) in stored column order → (B, m) in x's dtype, straight from the buffers (a
        :mod:`qlr.kernels` op; never a dense float F held whole)."""
        ...

    def dense(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        """The whole factor as float32 (m × n) by the fastest decoder at hand: for small factors (L), which a
        large-batch forward multiplies with one BLAS call."""
        ...

    def column_perm(self, bufs: Mapping[str, Tensor]) -> Tensor | None:
        """(n,) stored-to-original column map (stored column j is original column perm[j]), or None."""
        ...

    def quantize_like(self, x: Tensor, meta: Mapping[str, Any], scales: Tensor | None = None) -> Any:
        """Round the float matrix ``x`` (shape ``meta["shape"]``) into this codec's format with ``meta``'s settings
        (bits, group size, stages, scale width); the result is what :meth:`encode` takes. ``scales``: keep these
        per-matrix scales (codecs with per-matrix scales) instead of choosing new ones. Used to store factors
        again after fine-tuning, and to round them in the forward pass while training through the rounding."""
        ...

    # optional: ``cpu_factor(bufs, meta) -> qlr.kernels.cpu.FactorPlan | None`` describes the factor to the fused
    # whole-layer CPU kernel; a codec without it (or returning None) runs through ``matmul`` only.

    def storage_bits(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
        """Bits taken by the buffers (packed words counted whole, so tail padding is included)."""
        ...


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"`` (as metadata records dtypes)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name`; ValueError for a name that is not a torch dtype."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in QLRLinear metadata")
    return dt


class GridCodec:
    """Scalar grids (:class:`~qlr.quant.grid.QuantizedTensor`: uniform int or NormalFloat, group-wise)."""

    name = "grid"

    def accepts(self, obj: object) -> bool:
        return isinstance(obj, QuantizedTensor)

    @staticmethod
    def spec(meta: Mapping[str, Any]) -> QuantSpec:
        return QuantSpec(bits=meta["bits"], group_size=meta["group_size"], symmetric=meta["symmetric"],
                         fmt=meta["fmt"], scale_bits=meta["scale_bits"])

    def encode(self, qt: QuantizedTensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        spec = qt.spec
        if spec.bits > MAX_BITS:
            raise ValueError(f"cannot pack {spec.bits}-bit codes (at most {MAX_BITS})")
        m, n = qt.codes.shape
        bufs: dict[str, Tensor] = {"codes": pack(qt.codes, spec.bits)}
        scale = qt.scale.float()
        if spec.scale_bits == 16:
            bufs["scale"] = scale.to(torch.float16)
        elif spec.scale_bits == 32:
            bufs["scale"] = scale.clone()
        else:  # power-of-two scales: store the exponent
            e = torch.log2(scale).round()
            if not torch.equal(torch.exp2(e), scale):
                raise ValueError("scale_bits=8 expects power-of-two scales")
            bufs["scale"] = e.to(torch.int8)
        zero_fmt = "none"
        if spec.fmt == "int":
            z = qt.zero.float()
            implicit = float((spec.maxq + 1) // 2)
            if spec.has_zero or not bool((z == implicit).all()):
                integral = bool((z == z.round()).all()) and float(z.min()) >= 0 and float(z.max()) <= spec.maxq
                if integral:
                    zero_fmt, bufs["zero"] = "packed", pack(z.reshape(-1).to(torch.uint8), spec.bits)
                else:
                    zero_fmt, bufs["zero"] = "fp16", z.to(torch.float16)
        if qt.perm is not None:
            bufs["perm"] = qt.perm.to(torch.int16 if n < 2**15 else torch.int32)
        meta = {"codec": self.name, "shape": [m, n], "bits": spec.bits, "group_size": spec.group_size,
                "symmetric": spec.symmetric, "fmt": spec.fmt, "scale_bits": spec.scale_bits, "zero": zero_fmt,
                "perm": qt.perm is not None}
        return bufs, meta

    def quantize_like(self, x: Tensor, meta: Mapping[str, Any], scales: Tensor | None = None) -> QuantizedTensor:
        if meta.get("perm"):
            raise ValueError("cannot re-quantize a factor stored with a column permutation")
        return quantize_rtn(x.detach().float(), self.spec(meta))

    def empty(self, meta: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
        spec = self.spec(meta)
        m, n = meta["shape"]
        groups = spec.groups(n)
        words = -(-n * spec.bits // 32)
        sdt = {16: torch.float16, 32: torch.float32, 8: torch.int8}[spec.scale_bits]
        bufs = {"codes": torch.empty(m, words, dtype=torch.int32, device=device),
                "scale": torch.empty(m, groups, dtype=sdt, device=device)}
        if meta["zero"] == "packed":
            bufs["zero"] = torch.empty(-(-m * groups * spec.bits // 32), dtype=torch.int32, device=device)
        elif meta["zero"] == "fp16":
            bufs["zero"] = torch.empty(m, groups, dtype=torch.float16, device=device)
        if meta["perm"]:
            bufs["perm"] = torch.empty(n, dtype=torch.int16 if n < 2**15 else torch.int32, device=device)
        return bufs

    def _args(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> tuple:
        """(zero, levels, bits, n, group_len, zero_const) as :mod:`qlr.kernels` takes them."""
        spec = self.spec(meta)
        n = meta["shape"][1]
        levels = nf_levels(spec.bits, bufs["codes"].device) if spec.fmt == "nf" else None
        zero = bufs["zero"] if meta["zero"] in ("packed", "fp16") else None
        return zero, levels, spec.bits, n, spec.group_len(n), float((spec.maxq + 1) // 2)

    def decoder(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> RowDecoder:
        codes, scale, args = bufs["codes"], bufs["scale"], self._args(bufs, meta)
        return lambda start, stop: reference.grid_decode(codes, scale, *args, start, stop)

    def matmul(self, x: Tensor, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return ops.grid_mm(x, bufs["codes"], bufs["scale"], *self._args(bufs, meta))

    def dense(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return ops.grid_dense(bufs["codes"], bufs["scale"], *self._args(bufs, meta))

    def cpu_factor(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> cpu.FactorPlan | None:
        return cpu.grid_factor(bufs["codes"], bufs["scale"], *self._args(bufs, meta))

    def column_perm(self, bufs: Mapping[str, Tensor]) -> Tensor | None:
        return bufs.get("perm")

    def storage_bits(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
        spec = self.spec(meta)
        n = meta["shape"][1]
        total = bufs["codes"].numel() * 32 + bufs["scale"].numel() * spec.scale_bits
        if "zero" in bufs:
            total += bufs["zero"].numel() * (32 if meta["zero"] == "packed" else 16)
        if "perm" in bufs:
            total += n * max(1, math.ceil(math.log2(n)))
        return total


class LatticeCodec:
    """E8P lattice codes (:class:`~qlr.quant.e8p.LatticeQuantizedTensor`; 2 bits per weight per stage).

    Buffers: ``codes`` (stages, m, n/8) int16 (each code's unsigned 16-bit pattern) and ``scale`` (stages,) fp16
    or fp32 per ``scale_bits``. Metadata: ``shape``, ``stages``, ``scale_bits``.
    """

    name = "e8p"
    _scale_dtypes = {16: torch.float16, 32: torch.float32}

    def accepts(self, obj: object) -> bool:
        return isinstance(obj, LatticeQuantizedTensor)

    def encode(self, lt: LatticeQuantizedTensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if lt.codes.dim() != 3 or lt.codes.dtype != torch.int16:
            raise ValueError(f"E8P codes must be (stages, m, n/8) int16, got {tuple(lt.codes.shape)} {lt.codes.dtype}")
        if lt.scale_bits not in self._scale_dtypes:
            raise ValueError(f"E8P scale_bits must be 16 or 32, got {lt.scale_bits}")
        stages = lt.stages
        if tuple(lt.scales.shape) != (stages,):
            raise ValueError(f"E8P scales must have shape ({stages},), got {tuple(lt.scales.shape)}")
        scale = lt.scales.detach().to(self._scale_dtypes[lt.scale_bits])
        if not torch.equal(scale.float(), lt.scales.detach().float()):
            raise ValueError(f"E8P scales {lt.scales.tolist()} are not exactly representable in "
                             f"{lt.scale_bits} bits")
        m, n = lt.shape
        bufs = {"codes": lt.codes.detach().clone(), "scale": scale.clone()}
        return bufs, {"codec": self.name, "shape": [m, n], "stages": stages, "scale_bits": lt.scale_bits}

    def quantize_like(self, x: Tensor, meta: Mapping[str, Any], scales: Tensor | None = None
                      ) -> LatticeQuantizedTensor:
        return quantize_e8p(x.detach().float(), stages=meta["stages"], scale_bits=meta["scale_bits"],
                            scale=None if scales is None else scales.float().tolist())

    def empty(self, meta: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
        m, n = meta["shape"]
        if n % E8P_DIM:
            raise ValueError(f"E8P metadata shape {m} × {n}: columns must be a multiple of {E8P_DIM}")
        stages = meta["stages"]
        return {"codes": torch.empty(stages, m, n // E8P_DIM, dtype=torch.int16, device=device),
                "scale": torch.empty(stages, dtype=self._scale_dtypes[meta["scale_bits"]], device=device)}

    def decoder(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> RowDecoder:
        codes, scale = bufs["codes"], bufs["scale"]
        return lambda start, stop: reference.e8p_decode(codes, scale, start, stop)

    def matmul(self, x: Tensor, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return ops.e8p_mm(x, bufs["codes"], bufs["scale"])

    def dense(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return ops.e8p_dense(bufs["codes"], bufs["scale"])

    def cpu_factor(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> cpu.FactorPlan | None:
        return cpu.e8p_factor(bufs["codes"], bufs["scale"])

    def column_perm(self, bufs: Mapping[str, Tensor]) -> Tensor | None:
        return None

    def storage_bits(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
        return bufs["codes"].numel() * 16 + bufs["scale"].numel() * int(meta["scale_bits"])


class DenseCodec:
    """A plain matrix kept in fp16 (L and R when they are not quantized)."""

    name = "dense"
    dtype = torch.float16

    def accepts(self, obj: object) -> bool:
        return isinstance(obj, Tensor)

    def encode(self, t: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"dense": t.detach().to(self.dtype).contiguous()}, {"codec": self.name, "shape": list(t.shape),
                                                                   "dtype": dtype_name(self.dtype)}

    def quantize_like(self, x: Tensor, meta: Mapping[str, Any], scales: Tensor | None = None) -> Tensor:
        return x.detach()

    def empty(self, meta: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
        return {"dense": torch.empty(*meta["shape"], dtype=dtype_from_name(meta["dtype"]), device=device)}

    def decoder(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> RowDecoder:
        return lambda start, stop: bufs["dense"][start:stop].float()

    def matmul(self, x: Tensor, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return x @ bufs["dense"].to(x.dtype).T

    def dense(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
        return bufs["dense"].float()

    def cpu_factor(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> cpu.FactorPlan | None:
        return cpu.dense_factor(bufs["dense"])

    def column_perm(self, bufs: Mapping[str, Tensor]) -> Tensor | None:
        return None

    def storage_bits(self, bufs: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
        return bufs["dense"].numel() * bufs["dense"].element_size() * 8


_CODECS: list[Codec] = [GridCodec(), LatticeCodec(), DenseCodec()]


def register_codec(codec: Codec) -> None:
    """Add a codec; it is tried before the built-in ones (first match wins) and is found by name on load."""
    if any(c.name == codec.name for c in _CODECS):
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    _CODECS.insert(0, codec)


def codec_for(obj: object = None, *, name: str | None = None) -> Codec:
    """The codec that stores ``obj`` (first match wins), or the codec called ``name``."""
    for c in _CODECS:
        if (name is not None and c.name == name) or (name is None and c.accepts(obj)):
            return c
    what = f"codec {name!r}" if name is not None else f"a codec for {type(obj).__name__}"
    raise NotImplementedError(f"QLRLinear has no {what}; known codecs: {[c.name for c in _CODECS]}. "
                              "Implement the Codec protocol in qlr.nn.codecs and register_codec() it.")
