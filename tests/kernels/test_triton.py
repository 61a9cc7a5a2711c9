"""The Triton kernels (:mod:`qlr.kernels.triton_kernels`) compute what :mod:`qlr.kernels.reference` computes.

Without a CUDA device they run on CPU tensors through Triton's interpreter: ``TRITON_INTERPRET=1`` is set before
the kernel module is imported (the ``@triton.jit`` decorators read it when they run), and the module is reloaded
if something imported it earlier in the other mode. Shapes are small and odd: groups straddling the column blocks,
a short last group, codes straddling int32 words, batches on both sides of the GEMV / tile-GEMM switch, every
scale and zero storage kind, NormalFloat levels, one and two E8P stages, and low-precision inputs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

_CUDA = torch.cuda.is_available()
_saved_env = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from qlr.kernels import triton_kernels as tk

    if tk.interpreted() == _CUDA:  # imported earlier in the other mode: rebuild the kernels
        tk = importlib.reload(tk)
finally:  # the decorators have run; do not leak the setting into the rest of the session
    if _saved_env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_env

from qlr.kernels import reference  # noqa: E402
from qlr.nn import GridCodec, LatticeCodec  # noqa: E402
from qlr.quant.e8p import LatticeQuantizedTensor  # noqa: E402
from qlr.quant.grid import QuantizedTensor, QuantSpec, nf_levels  # noqa: E402
from qlr.quant.packing import pack  # noqa: E402
from tests.kernels.factors import random_grid  # noqa: E402

DEVICE = torch.device("cuda" if _CUDA else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """Exact float32 products on the GPU too (the comparisons below are float32-tight)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def grid_args(qt: QuantizedTensor) -> tuple:
    """(codes, scale, zero, levels, bits, n, group_len, zero_const) on DEVICE, as qlr's GridCodec stores them."""
    codec = GridCodec()
    bufs, meta = codec.encode(qt)
    bufs = {k: v.to(DEVICE) for k, v in bufs.items()}
    return (bufs["codes"], bufs["scale"], *codec._args(bufs, meta)), meta


def assert_close(y: torch.Tensor, x: torch.Tensor, F: torch.Tensor, rel: float) -> None:
    """max |y − x Fᵀ| / (|x| |F|ᵀ) below ``rel``, the product taken in float64 from x as given."""
    ref = x.double() @ F.double().T
    mag = x.double().abs() @ F.double().abs().T
    err = ((y.double() - ref).abs() / (mag + 1e-30)).max().item()
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


def randx(batch: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


# name: (spec, zero storage, m, n); the column blocks are 16–256 wide, so the group lengths below fall on, across
# and inside block edges
GRID_CASES = {
    "int2_g64_tail": (QuantSpec(bits=2, group_size=64), "int", 19, 200),  # packed zeros, last group of 8
    "int3_g48": (QuantSpec(bits=3, group_size=48), "int", 21, 144),  # straddling codes, groups across blocks
    "sym4_g32_fp32": (QuantSpec(bits=4, group_size=32, symmetric=True, scale_bits=32), "int", 12, 96),  # const 0
    "int5_g40_frac": (QuantSpec(bits=5, group_size=40), "frac", 7, 120),  # fp16 zeros
    "int6_row_odd_n": (QuantSpec(bits=6, group_size=0), "int", 9, 100),  # one group per row, n not a block multiple
    "int8_g64_pow2": (QuantSpec(bits=8, group_size=64, scale_bits=8), "int", 10, 192),  # int8 exponent scales
    "int3_g12_odd_n": (QuantSpec(bits=3, group_size=12), "int", 11, 100),  # tiny groups, per-element scale gather
    "nf4_g64": (QuantSpec(bits=4, group_size=64, fmt="nf"), "int", 12, 128),
    "nf3_g24": (QuantSpec(bits=3, group_size=24, fmt="nf"), "int", 5, 72),
}


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_grid_mm(case: str, batch: int) -> None:
    spec, zero, m, n = GRID_CASES[case]
    args, meta = grid_args(random_grid(m, n, spec, zero))
    assert (meta["zero"] == "fp16") == (zero == "frac")
    assert tk.supports_grid(spec.bits, n, args[6], args[3])
    F = reference.grid_decode(*args, 0, m)
    x = randx(batch, n)
    y = tk.grid_mm(x, *args)
    assert y.shape == (batch, m) and y.dtype == torch.float32 and y.device == x.device
    assert_close(y, x, F, 1e-5)
    assert_close(reference.grid_mm(x, *args), x, F, 1e-5)  # the reference meets the same bound


@pytest.mark.parametrize("bits, group_len, m, n", [(1, 32, 6, 70), (7, 20, 5, 53)])
@pytest.mark.parametrize("batch", [2, 20])
def test_grid_mm_other_widths(bits: int, group_len: int, m: int, n: int, batch: int) -> None:
    """1- and 7-bit codes (the kernels take any width 1..8; the quantizer does not make these), packed zeros."""
    g = torch.Generator().manual_seed(bits)
    groups = -(-n // group_len)
    codes = pack(torch.randint(0, 2**bits, (m, n), generator=g).to(torch.uint8), bits).to(DEVICE)
    scale = (torch.rand(m, groups, generator=g) + 0.5).half().to(DEVICE)
    zero = pack(torch.randint(0, 2**bits, (m * groups,), generator=g).to(torch.uint8), bits).to(DEVICE)
    args = (codes, scale, zero, None, bits, n, group_len, 0.0)
    x = randx(batch, n)
    assert_close(tk.grid_mm(x, *args), x, reference.grid_decode(*args, 0, m), 1e-5)


@pytest.mark.parametrize("batch", [5, 40])
@pytest.mark.parametrize("case", ["int3_g48", "int5_g40_frac", "nf3_g24", "int8_g64_pow2"])
def test_grid_decode_is_exact(case: str, batch: int) -> None:
    """Unit-vector inputs read single entries of F: the kernels' decode is bit-exact (GEMV and GEMM paths)."""
    spec, zero, m, n = GRID_CASES[case]
    args, _ = grid_args(random_grid(m, n, spec, zero, seed=3))
    cols = torch.arange(batch) * 7 % n
    x = torch.eye(n)[cols].to(DEVICE)
    y = tk.grid_mm(x, *args)
    assert torch.equal(y, reference.grid_decode(*args, 0, m)[:, cols.to(DEVICE)].T)


@pytest.mark.parametrize("batch", [3, 20])
def test_grid_pow2_scale_extremes(batch: int) -> None:
    """int8 exponent scales over the whole float32 range the format can hold, subnormal 2**-127 and 2**-128
    included, decode exactly (codes ≥ 4 keep every product normal)."""
    g = torch.Generator().manual_seed(7)
    m, n, glen = 8, 40, 8
    exps = torch.tensor([-128, -127, -126, -125, -20, 0, 20, 100], dtype=torch.int8)
    scale = exps[torch.randperm(8 * 5, generator=g) % 8].reshape(m, 5).to(DEVICE)
    codes = pack(torch.randint(4, 256, (m, n), generator=g).to(torch.uint8), 8).to(DEVICE)
    args = (codes, scale, None, None, 8, n, glen, 0.0)
    cols = torch.arange(batch) * 3 % n
    y = tk.grid_mm(torch.eye(n)[cols].to(DEVICE), *args)
    assert torch.equal(y, reference.grid_decode(*args, 0, m)[:, cols.to(DEVICE)].T)


def test_grid_mm_large_batch() -> None:
    """Two 128-row batch tiles (the second partial) and several row tiles of the GEMM kernel; x a strided view."""
    spec, zero, m, n = GRID_CASES["int3_g48"]
    m = 70
    args, _ = grid_args(random_grid(m, n, spec, zero, seed=5))
    x = randx(150, n + 10)[:, 3:n + 3]  # row stride n + 10
    assert_close(tk.grid_mm(x, *args), x, reference.grid_decode(*args, 0, m), 1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("batch", [3, 33])
def test_grid_mm_low_precision(dtype: torch.dtype, rel: float, batch: int) -> None:
    """Outputs in x's dtype, equal to the float64 product of the same (rounded) input up to that dtype."""
    spec, zero, m, n = GRID_CASES["int2_g64_tail"]
    args, _ = grid_args(random_grid(m, n, spec, zero))
    x = randx(batch, n, dtype)
    y = tk.grid_mm(x, *args)
    assert y.dtype == dtype
    assert_close(y, x, reference.grid_decode(*args, 0, m), rel)


def e8p_args(stages: int, m: int, n: int, scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) on DEVICE for random E8P codes, as qlr's LatticeCodec stores them."""
    g = torch.Generator().manual_seed(m * n + stages)
    codes = torch.randint(0, 2**16, (stages, m, n // 8), generator=g)
    lt = LatticeQuantizedTensor.from_codes(codes, [0.75, 0.125][:stages], scale_bits=scale_bits)
    bufs, _ = LatticeCodec().encode(lt)
    return bufs["codes"].to(DEVICE), bufs["scale"].to(DEVICE)


@pytest.mark.parametrize("stages, scale_bits", [(1, 16), (2, 32)])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("m, n", [(7, 8), (33, 40), (20, 136)])
def test_e8p_mm(m: int, n: int, batch: int, stages: int, scale_bits: int) -> None:
    codes, scale = e8p_args(stages, m, n, scale_bits)
    assert tk.supports_e8p(stages, n)
    F = reference.e8p_decode(codes, scale, 0, m)
    x = randx(batch, n)
    y = tk.e8p_mm(x, codes, scale)
    assert y.shape == (batch, m) and y.dtype == torch.float32
    assert_close(y, x, F, 1e-5)


@pytest.mark.parametrize("batch", [6, 136])
def test_e8p_decode_is_exact(batch: int) -> None:
    """Every code's codeword (sign bits, implied parity sign, shift) equals the 65,536-row codebook's, bit for bit:
    all 65,536 codes in one factor, read back column by column with unit vectors."""
    m, n = 256, 256 * 8
    codes = torch.arange(2**16).reshape(1, m, n // 8)
    lt = LatticeQuantizedTensor.from_codes(codes, [0.5])
    bufs, _ = LatticeCodec().encode(lt)
    codes, scale = bufs["codes"].to(DEVICE), bufs["scale"].to(DEVICE)
    cols = torch.arange(batch) * 15 % n
    x = torch.eye(n)[cols].to(DEVICE)
    F = reference.e8p_decode(codes, scale, 0, m)
    assert torch.equal(tk.e8p_mm(x, codes, scale), F[:, cols.to(DEVICE)].T)


def test_e8p_every_code_decodes() -> None:
    """All 65,536 codes through the full product: x = ones sums each 8-column block, so every codeword counts."""
    m, n = 256, 256 * 8
    codes = torch.arange(2**16).reshape(1, m, n // 8)
    bufs, _ = LatticeCodec().encode(LatticeQuantizedTensor.from_codes(codes, [0.5]))
    codes, scale = bufs["codes"].to(DEVICE), bufs["scale"].to(DEVICE)
    x = randx(2, n)
    assert_close(tk.e8p_mm(x, codes, scale), x, reference.e8p_decode(codes, scale, 0, m), 1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("batch", [2, 40])
def test_e8p_mm_low_precision(dtype: torch.dtype, rel: float, batch: int) -> None:
    codes, scale = e8p_args(2, 33, 40, 16)
    x = randx(batch, 40, dtype)
    y = tk.e8p_mm(x, codes, scale)
    assert y.dtype == dtype
    assert_close(y, x, reference.e8p_decode(codes, scale, 0, 33), rel)


def test_supports_and_errors() -> None:
    assert tk.available() and tk.usable(torch.empty(1, device=DEVICE))
    assert tk.interpreted() == (not _CUDA)
    assert all(tk.supports_grid(b, 100, 32) for b in range(1, 9))
    assert not tk.supports_grid(9, 100, 32) and not tk.supports_grid(4, 0, 32)
    assert tk.supports_grid(4, 64, 64, nf_levels(4)) and not tk.supports_grid(4, 64, 64, nf_levels(3))
    assert tk.supports_e8p(2, 16) and not tk.supports_e8p(1, 12) and not tk.supports_e8p(5, 16)
    codes = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError):
        tk.grid_mm(randx(1, 16), codes, torch.ones(3, 1, device=DEVICE), None, None, 9, 16, 0, 0.0)
    with pytest.raises(ValueError):
        tk.grid_mm(randx(1, 20), codes, torch.ones(3, 1, device=DEVICE), None, None, 4, 16, 0, 8.0)
    y = tk.grid_mm(randx(0, 16), codes, torch.ones(3, 1, device=DEVICE), None, None, 4, 16, 0, 8.0)
    assert y.shape == (0, 3)


def test_imports_without_triton() -> None:
    """With triton unimportable the module still imports and reports itself unavailable."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from qlr.kernels import triton_kernels as tk\n"
            "assert not tk.available() and not tk.supports_grid(4, 64, 64) and not tk.supports_e8p(1, 8)\n"
            "import torch\n"
            "try:\n"
            "    tk.e8p_mm(torch.zeros(1, 8), torch.zeros(1, 1, 1, dtype=torch.int16), torch.ones(1))\n"
            "except NotImplementedError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('expected NotImplementedError')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr

