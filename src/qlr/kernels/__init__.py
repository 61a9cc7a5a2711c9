"""Forward kernels for compressed factors: fused decode + GEMV and tiled decode + BLAS on CPU (compiled C++),
the fast Walsh–Hadamard rotation, and their pure-torch reference.

:mod:`qlr.kernels.ops` registers them as ``torch.ops.qlr.*`` custom ops; :mod:`qlr.kernels.reference` is the
plain-torch twin every fast path is tested against; :mod:`qlr.kernels.cpu` builds and loads the C++ library.
"""

from qlr.kernels import ops, reference
from qlr.kernels.cpu import available, build_error
from qlr.kernels.ops import e8p_mm, grid_mm, hadamard

__all__ = ["ops", "reference", "available", "build_error", "grid_mm", "e8p_mm", "hadamard"]
