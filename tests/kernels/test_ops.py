"""The qlr.kernels ops (compiled CPU kernels and the pure-torch reference) equal a dense product with the factor
decoded by the quantizers' own ``dequantize()`` — an independent decoder — for every storage format, odd shapes,
batch sizes on both sides of the GEMV/BLAS switch, and float16/bfloat16 inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from qlr.kernels import cpu, ops
from qlr.nn import GridCodec, LatticeCodec
from qlr.quant.e8p import LatticeQuantizedTensor
from qlr.quant.grid import QuantSpec
from qlr.quant.hadamard import hadamard_matrix
from tests.kernels.factors import random_grid


def dense_ref(x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ Wᵀ in float64 and the float32 rounding bound's scale |x| @ |W|ᵀ."""
    return x.double() @ W.double().T, x.double().abs() @ W.double().abs().T


def assert_matches(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, rel: float = 2e-6) -> None:
    ref, mag = dense_ref(x, W)
    err = ((y.double() - ref).abs() / (mag + 1e-30)).max().item()
    assert err < rel * math.sqrt(W.shape[1]), f"relative error {err:.2e}"


GRID_CASES = {
    "int2_g64": (QuantSpec(bits=2, group_size=64), "int", 64, 256),
    "int3_g32": (QuantSpec(bits=3, group_size=32), "int", 40, 160),
    "int4_g128": (QuantSpec(bits=4, group_size=128), "int", 24, 384),
    "int3_g64_tail": (QuantSpec(bits=3, group_size=64), "int", 17, 200),  # last group of 8 columns
    "int2_row": (QuantSpec(bits=2, group_size=0), "int", 9, 96),  # one group per row
    "int4_g48": (QuantSpec(bits=4, group_size=48), "int", 13, 144),  # groups of whole 8-chunks, not 32-blocks
    "int3_g12_odd_n": (QuantSpec(bits=3, group_size=12), "int", 11, 100),  # codes straddle words, n % 8 ≠ 0
    "int6_g32": (QuantSpec(bits=6, group_size=32), "int", 8, 64),
    "int5_g40": (QuantSpec(bits=5, group_size=40), "int", 7, 120),
    "int8_g64_pow2": (QuantSpec(bits=8, group_size=64, scale_bits=8), "int", 10, 192),
    "sym2_g64": (QuantSpec(bits=2, group_size=64, symmetric=True), "int", 12, 128),
    "sym3_g32_fp32": (QuantSpec(bits=3, group_size=32, symmetric=True, scale_bits=32), "int", 12, 96),
    "frac_zero_int4": (QuantSpec(bits=4, group_size=32), "frac", 6, 64),
    "nf4_g64": (QuantSpec(bits=4, group_size=64, fmt="nf"), "int", 12, 128),
    "nf3_g24_odd": (QuantSpec(bits=3, group_size=24, fmt="nf"), "int", 5, 72),
}


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_grid_mm(case: str, batch: int, kernels: str) -> None:
    spec, zero, m, n = GRID_CASES[case]
    qt = random_grid(m, n, spec, zero)
    codec = GridCodec()
    bufs, meta = codec.encode(qt)
    assert (meta["zero"] == "fp16") == (zero == "frac")
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(1))
    assert_matches(codec.matmul(x, bufs, meta), x, qt.dequantize())


@pytest.mark.parametrize("stages, scale_bits", [(1, 16), (2, 32), (2, 16)])
@pytest.mark.parametrize("batch", [1, 5, 8, 9, 17])
@pytest.mark.parametrize("m, n", [(7, 8), (33, 40), (16, 136)])
def test_e8p_mm(m: int, n: int, batch: int, stages: int, scale_bits: int, kernels: str) -> None:
    g = torch.Generator().manual_seed(m * n + stages)
    codes = torch.randint(-(2**15), 2**15, (stages, m, n // 8), generator=g).to(torch.int16)
    scales = [0.75, 0.125][:stages]
    lt = LatticeQuantizedTensor.from_codes(codes, scales, scale_bits=scale_bits)
    codec = LatticeCodec()
    bufs, meta = codec.encode(lt)
    x = torch.randn(batch, n, generator=g)
    assert_matches(codec.matmul(x, bufs, meta), x, lt.dequantize())


def test_large_batch_uses_several_tiles(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """512 rows (the BLAS path) with tiles of 7 rows of F, the last one partial."""
    monkeypatch.setattr(ops, "TILE_ELEMS", 7 * 200)
    monkeypatch.setattr(ops, "TILE_MIN_ROWS", 1)
    monkeypatch.setattr(ops.reference, "TILE_ROWS", 7)
    qt = random_grid(30, 200, QuantSpec(bits=3, group_size=64))
    bufs, meta = GridCodec().encode(qt)
    x = torch.randn(512, 200)
    assert_matches(GridCodec().matmul(x, bufs, meta), x, qt.dequantize())
    codes = torch.randint(-(2**15), 2**15, (2, 30, 25)).to(torch.int16)
    lt = LatticeQuantizedTensor.from_codes(codes, [0.5, 0.125])
    bufs, meta = LatticeCodec().encode(lt)
    assert_matches(LatticeCodec().matmul(x, bufs, meta), x, lt.dequantize())


@pytest.mark.parametrize("batch", [1, 4, 300])
def test_multithreaded_shapes(batch: int, kernels: str) -> None:
    """Factors big enough for the OpenMP paths (≥ 64k multiply-adds), with two threads."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        qt = random_grid(256, 512, QuantSpec(bits=2, group_size=64))
        bufs, meta = GridCodec().encode(qt)
        x = torch.randn(batch, 512)
        assert_matches(GridCodec().matmul(x, bufs, meta), x, qt.dequantize())
        lt = LatticeQuantizedTensor.from_codes(torch.randint(-(2**15), 2**15, (2, 256, 64)).to(torch.int16),
                                               [0.5, 0.125])
        bufs, meta = LatticeCodec().encode(lt)
        assert_matches(LatticeCodec().matmul(x, bufs, meta), x, lt.dequantize())
    finally:
        torch.set_num_threads(n_threads)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("batch", [2, 33])
def test_low_precision_inputs(dtype: torch.dtype, rel: float, batch: int, kernels: str) -> None:
    """Outputs in the input's dtype, equal to the float64 product of the same (rounded) input up to that dtype's
    rounding of the result."""
    qt = random_grid(24, 128, QuantSpec(bits=2, group_size=64))
    bufs, meta = GridCodec().encode(qt)
    x = torch.randn(batch, 128).to(dtype)
    y = GridCodec().matmul(x, bufs, meta)
    assert y.dtype == dtype
    ref, mag = dense_ref(x, qt.dequantize())
    assert ((y.double() - ref).abs() / mag).max() < rel


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", [8, 64, 96, 80, 172, 12 * 32, 1024])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_hadamard(n: int, batch: int, transpose: bool, kernels: str) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, generator=g)
    pre, post = (torch.randint(0, 2, (n,), generator=g).float() * 2 - 1 for _ in range(2))
    Had = hadamard_matrix(n, torch.float64)
    Had = Had.T if transpose else Had
    ref = ((x.double() * pre.double()) @ Had.T) / math.sqrt(n) * post.double()
    y = ops.hadamard(x, pre, post, transpose)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * math.log2(n) * x.abs().max().item())
    # one-sided variants
    torch.testing.assert_close(ops.hadamard(x, None, None, transpose).double(),
                               x.double() @ Had.T / math.sqrt(n), rtol=0, atol=1e-5 * math.log2(n) * 4)


@pytest.mark.parametrize("tiled", [False, True])
def test_gradients_flow_to_x_only(kernels: str, tiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd through each op equals autograd through the dense product (codes and signs are constants); with
    ``tiled`` the backward decodes F in several row tiles (7 rows each), the last one partial."""
    if tiled:
        monkeypatch.setattr(ops, "TILE_ELEMS", 7 * 96)
        monkeypatch.setattr(ops, "TILE_MIN_ROWS", 1)
        monkeypatch.setattr(ops.reference, "TILE_ROWS", 7)
    qt = random_grid(20, 96, QuantSpec(bits=3, group_size=32))
    bufs, meta = GridCodec().encode(qt)
    lt = LatticeQuantizedTensor.from_codes(torch.randint(-(2**15), 2**15, (2, 96, 12)).to(torch.int16), [0.5, 0.125])
    lbufs, lmeta = LatticeCodec().encode(lt)
    pre, post = (torch.randint(0, 2, (96,)).float() * 2 - 1 for _ in range(2))
    Had = hadamard_matrix(96, torch.float32) / math.sqrt(96)
    x = torch.randn(11, 96, requires_grad=True)  # more rows than the fused small-batch path takes
    w = torch.randn(11, 20)

    def f_ops(x: torch.Tensor) -> torch.Tensor:
        h = ops.hadamard(LatticeCodec().matmul(x, lbufs, lmeta), pre, post, True)
        return (GridCodec().matmul(h, bufs, meta) * w).sum()

    def f_dense(x: torch.Tensor) -> torch.Tensor:
        h = ((x @ lt.dequantize().T) * pre) @ Had * post
        return ((h @ qt.dequantize().T) * w).sum()

    (g_ops,) = torch.autograd.grad(f_ops(x), x)
    (g_ref,) = torch.autograd.grad(f_dense(x), x)
    torch.testing.assert_close(g_ops, g_ref, rtol=1e-4, atol=1e-4)


def test_ops_pass_torch_library_checks() -> None:
    """Schemas, fake (meta) kernels for torch.compile, and autograd registration."""
    qt = random_grid(12, 64, QuantSpec(bits=2, group_size=32))
    bufs, meta = GridCodec().encode(qt)
    zero, levels, bits, n, glen, zc = GridCodec()._args(bufs, meta)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.qlr.grid_mm.default, (x, bufs["codes"], bufs["scale"], zero, levels, bits, n,
                                                          glen, zc))
    codes = torch.randint(-(2**15), 2**15, (1, 12, 8)).to(torch.int16)
    torch.library.opcheck(torch.ops.qlr.e8p_mm.default, (x, codes, torch.tensor([0.5])))
    torch.library.opcheck(torch.ops.qlr.hadamard.default, (x, torch.ones(64), None, True))


def test_build_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: one RuntimeWarning naming the cause, then the torch reference gives the right answer."""
    monkeypatch.delenv("QLR_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    qt = random_grid(8, 64, QuantSpec(bits=2, group_size=32))
    bufs, meta = GridCodec().encode(qt)
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        y = GridCodec().matmul(x, bufs, meta)
    assert_matches(y, x, qt.dequantize())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GridCodec().matmul(x, bufs, meta)  # no second warning
    assert not cpu.available() and "compiler" in cpu.build_error()
