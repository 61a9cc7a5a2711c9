"""Build, cache and load qlr's compiled CPU kernels (``csrc/qlr_cpu.cpp``), and call them on tensors.

The kernels are plain C++ with a C ABI (no torch headers), so they compile in seconds with the system's C++
compiler and do not depend on the torch build (a CUDA torch a user brings works the same). On first use the
source is compiled with ``-O3 -march=native -fopenmp`` into ``$QLR_CACHE/kernels/<key>/`` where the key hashes the
source, the flags, the compiler's version and the machine, and is loaded with :mod:`ctypes`; later processes reuse
the cached library. The OpenMP runtime resolves to the ``libgomp.so.1`` torch already loaded, so both share one
thread pool. ``QLR_KERNELS=torch`` turns the compiled path off; a failed build warns once and qlr runs the pure
torch reference (:mod:`qlr.kernels.reference`) instead, never a silent wrong answer.

The wrappers here take float32 CPU tensors that are contiguous in their last dim and do no dtype conversion: the
custom ops in :mod:`qlr.kernels.ops` handle dtypes, devices, batching and tiling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["lib", "available", "build_error", "grid_gemv", "grid_decode", "e8p_gemv", "e8p_decode", "hadamard",
           "GEMV_MAX_BATCH", "QFactor", "QLayer", "FactorPlan", "grid_factor", "e8p_factor", "dense_factor",
           "layer_plan", "SCALE_KINDS"]

GEMV_MAX_BATCH = 8
"""Largest number of input rows the fused decode + GEMV kernels take in one call."""

_SOURCE = Path(__file__).with_name("csrc") / "qlr_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-fno-math-errno"]
_ABI = 1
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False

_i, _l, _f, _p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "qlr_abi_version": ([], _i),
    "qlr_max_threads": ([], _i),
    "qlr_grid_gemv": ([_p, _i, _i, _i, _i, _i, _p, _i, _p, _i, _f, _p, _p, _i, _l, _p, _l, _i, _i], _i),
    "qlr_grid_decode": ([_p, _i, _i, _i, _i, _i, _p, _i, _p, _i, _f, _p, _i, _i, _p, _i], _i),
    "qlr_e8p_init": ([_p], _i),
    "qlr_e8p_gemv": ([_p, _i, _p, _i, _i, _p, _i, _l, _p, _l, _i, _i], _i),
    "qlr_e8p_decode": ([_p, _i, _p, _i, _i, _i, _i, _p, _i], _i),
    "qlr_layer_forward": ([_p, _p, _i, _p, _i], _i),
    "qlr_hadamard_out": ([_p, _l, _p, _i, _l, _i, _i, _p, _p, _p, _f, _i], _i),
}


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("QLR_CACHE") or "~/.cache/qlr").expanduser() / "kernels"


def _build_key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    cpu = ""
    try:  # -march=native: a library built for one CPU must not be reused on another
        with open("/proc/cpuinfo") as f:
            cpu = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(), platform.machine().encode(),
                 cpu.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out_dir = _cache_root() / _build_key(cxx)
    so = out_dir / "libqlr_cpu.so"
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # build aside, then rename atomically
            tmp_so = Path(tmp) / so.name
            res = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", str(tmp_so)], capture_output=True, text=True,
                                 timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {res.stderr.strip().splitlines()[-1] if res.stderr else ''}")
            os.replace(tmp_so, so)
    handle = ctypes.CDLL(str(so))
    for name, (args, ret) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = args, ret
    if handle.qlr_abi_version() != _ABI:
        raise RuntimeError(f"{so} has ABI {handle.qlr_abi_version()}, expected {_ABI}")
    from qlr.quant.e8p import e8p_abs_grid

    grid = e8p_abs_grid("cpu").contiguous()
    handle.qlr_e8p_init(grid.data_ptr())
    return handle


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when disabled (``QLR_KERNELS=torch``) or when
    the build failed (then one warning says why)."""
    global _lib, _error, _tried
    if os.environ.get("QLR_KERNELS", "").lower() == "torch":
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:  # any build/load failure means: run the torch reference
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(f"qlr: compiled CPU kernels unavailable ({_error}); using the slower pure-torch path",
                              RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled CPU kernels are in use."""
    return lib() is not None


def build_error() -> str | None:
    """Why the kernels are unavailable (None when they loaded or were not tried yet)."""
    return _error


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"qlr kernel {what} rejected its arguments (internal error)")


def _threads() -> int:
    return max(1, torch.get_num_threads())


def grid_gemv(x: Tensor, codes: Tensor, scale: Tensor, scale_kind: int, zero: Tensor | None, zero_kind: int,
              zero_const: float, levels: Tensor | None, bits: int, n: int, glen: int, out: Tensor,
              accumulate: bool = False) -> Tensor:
    """out (B, m) (+)= x (B, n) @ Qᵀ for a scalar-grid Q, B ≤ :data:`GEMV_MAX_BATCH`; float32, last dim
    contiguous."""
    m, words = codes.shape
    _check(lib().qlr_grid_gemv(codes.data_ptr(), words, bits, m, n, glen, scale.data_ptr(), scale_kind, _ptr(zero),
                               zero_kind, zero_const, _ptr(levels), x.data_ptr(), x.shape[0], x.stride(0),
                               out.data_ptr(), out.stride(0), int(accumulate), _threads()), "grid_gemv")
    return out


def grid_decode(codes: Tensor, scale: Tensor, scale_kind: int, zero: Tensor | None, zero_kind: int,
                zero_const: float, levels: Tensor | None, bits: int, n: int, glen: int, r0: int, r1: int,
                out: Tensor) -> Tensor:
    """Rows [r0, r1) of a scalar-grid Q as float32 into ``out`` ((r1 − r0) × n, contiguous)."""
    m, words = codes.shape
    _check(lib().qlr_grid_decode(codes.data_ptr(), words, bits, m, n, glen, scale.data_ptr(), scale_kind,
                                 _ptr(zero), zero_kind, zero_const, _ptr(levels), r0, r1, out.data_ptr(),
                                 _threads()), "grid_decode")
    return out


def e8p_gemv(x: Tensor, codes: Tensor, scales: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """out (B, m) (+)= x (B, n) @ Qᵀ for E8P codes (stages, m, n/8) with float32 scales (stages,)."""
    stages, m, nb = codes.shape
    _check(lib().qlr_e8p_gemv(codes.data_ptr(), stages, scales.data_ptr(), m, nb * 8, x.data_ptr(), x.shape[0],
                              x.stride(0), out.data_ptr(), out.stride(0), int(accumulate), _threads()), "e8p_gemv")
    return out


def e8p_decode(codes: Tensor, scales: Tensor, r0: int, r1: int, out: Tensor) -> Tensor:
    """Rows [r0, r1) of an E8P-coded matrix as float32 into ``out`` ((r1 − r0) × n, contiguous)."""
    stages, m, nb = codes.shape
    _check(lib().qlr_e8p_decode(codes.data_ptr(), stages, scales.data_ptr(), m, nb * 8, r0, r1, out.data_ptr(),
                                _threads()), "e8p_decode")
    return out


def hadamard(x: Tensor, b: int, Hb: Tensor | None, pre: Tensor | None, post: Tensor | None, scale: float,
             out: Tensor | None = None) -> Tensor:
    """out (B, n) float32 ← (Had_n (x ∘ pre)) · scale ∘ post, Had_n = H_b ⊗ H_{n/b} (Hb given row-major as the
    b × b matrix to apply); in place on x when ``out`` is None. Rows contiguous."""
    B, n = x.shape
    out = x if out is None else out
    _check(lib().qlr_hadamard_out(x.data_ptr(), x.stride(0), out.data_ptr(), B, out.stride(0), n, b, _ptr(Hb),
                                  _ptr(pre), _ptr(post), scale, _threads()), "hadamard")
    return out


# ---- a whole layer in one call ---------------------------------------------------------------------------------
class QFactor(ctypes.Structure):
    """Mirror of the C ``QFactor``: one stored factor (rows × cols) as the fused layer kernel reads it."""

    _fields_ = [("kind", _i), ("rows", _i), ("cols", _i),
                ("codes", _p), ("words", _i), ("bits", _i), ("glen", _i),
                ("scale", _p), ("scale_kind", _i), ("zero", _p), ("zero_kind", _i), ("zero_const", _f),
                ("levels", _p),
                ("e8p_codes", _p), ("stages", _i), ("e8p_scales", _p),
                ("dense", _p)]


class QLayer(ctypes.Structure):
    """Mirror of the C ``QLayer``: everything ``qlr_layer_forward`` needs for one QLRLinear."""

    _fields_ = [("m", _i), ("n", _i), ("r", _i), ("q", QFactor), ("l", QFactor), ("rf", QFactor),
                ("perm", _p), ("s_in", _p), ("s_out", _p), ("b_in", _i), ("b_out", _i), ("h_in", _p), ("h_out", _p),
                ("bias", _p), ("bias_kind", _i)]


FactorPlan = tuple[QFactor, list[Tensor]]
"""A filled :class:`QFactor` and the tensors its pointers refer to (kept alive with it)."""

SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}
"""Scale dtype → the kernels' scale kind (float32, float16, int8 power-of-two exponents)."""
_BIAS_KINDS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def grid_factor(codes: Tensor, scale: Tensor, zero: Tensor | None, levels: Tensor | None, bits: int, n: int,
                group_len: int, zero_const: float) -> FactorPlan | None:
    """A scalar-grid factor (arguments as :func:`qlr.kernels.ops.grid_mm` takes them); None if unsupported."""
    if scale.dtype not in SCALE_KINDS:
        return None
    keep = [codes.contiguous(), scale.contiguous()]
    f = QFactor(kind=1, rows=codes.shape[0], cols=n, codes=keep[0].data_ptr(), words=codes.shape[1], bits=bits,
                glen=min(group_len or n, n), scale=keep[1].data_ptr(), scale_kind=SCALE_KINDS[scale.dtype],
                zero_const=zero_const)
    if zero is not None:
        keep.append(zero.contiguous())
        f.zero, f.zero_kind = keep[-1].data_ptr(), 1 if zero.dtype == torch.int32 else 2
    if levels is not None:
        keep.append(levels.float().contiguous())
        f.levels = keep[-1].data_ptr()
    return f, keep


def e8p_factor(codes: Tensor, scale: Tensor) -> FactorPlan:
    """An E8P factor: codes (stages, rows, cols/8) int16, scales (stages,)."""
    keep = [codes.contiguous(), scale.float().contiguous()]
    stages, rows, nb = codes.shape
    return QFactor(kind=2, rows=rows, cols=nb * 8, e8p_codes=keep[0].data_ptr(), stages=stages,
                   e8p_scales=keep[1].data_ptr()), keep


def dense_factor(t: Tensor) -> FactorPlan | None:
    """A dense float16 / float32 factor (rows × cols); None for other dtypes."""
    if t.dtype not in (torch.float16, torch.float32):
        return None
    keep = [t.contiguous()]
    return QFactor(kind=3 if t.dtype == torch.float16 else 4, rows=t.shape[0], cols=t.shape[1],
                   dense=keep[0].data_ptr()), keep


def layer_plan(m: int, n: int, r: int, q: FactorPlan | None, lf: FactorPlan | None, rf: FactorPlan | None,
               perm: Tensor | None, signs: tuple[Tensor, Tensor] | None, bias: Tensor | None) -> tuple[QLayer, list]:
    """A filled :class:`QLayer` and the tensors it points into. ``perm`` maps stored column j of Q to input column
    perm[j]; ``signs`` = (signs_out (m,), signs_in (n,)) ±1 when the layer is stored rotated."""
    from qlr.quant.hadamard import _base_on, _factor

    keep: list = []
    layer = QLayer(m=m, n=n, r=r)
    for name, fp in (("q", q), ("l", lf), ("rf", rf)):
        if fp is not None:
            setattr(layer, name, fp[0])
            keep.append(fp)
    if perm is not None:
        keep.append(perm.to(torch.int64).contiguous())
        layer.perm = keep[-1].data_ptr()
    if signs is not None:
        s_out, s_in = (s.float().contiguous() for s in signs)
        (b_in, _), (b_out, _) = _factor(n), _factor(m)
        keep += [s_out, s_in]
        layer.s_out, layer.s_in, layer.b_in, layer.b_out = s_out.data_ptr(), s_in.data_ptr(), b_in, b_out
        if b_in > 1:
            keep.append(_base_on(b_in, torch.float32, torch.device("cpu")).contiguous())
            layer.h_in = keep[-1].data_ptr()
        if b_out > 1:
            keep.append(_base_on(b_out, torch.float32, torch.device("cpu")).T.contiguous())
            layer.h_out = keep[-1].data_ptr()
    if bias is not None:
        if bias.dtype not in _BIAS_KINDS:
            bias = bias.float()
        keep.append(bias.contiguous())
        layer.bias, layer.bias_kind = keep[-1].data_ptr(), _BIAS_KINDS[bias.dtype]
    return layer, keep
