import torch

from qlr.decompose.metrics import activation_aware_error
from qlr.quant.gptq import gptq_quantize, prepare_hessian
from qlr.quant.grid import QuantSpec, quantize_rtn


def test_gptq_beats_rtn(layer):
    W, H = layer["W"], layer["H"]
    for bits in (2, 3):
        spec = QuantSpec(bits=bits, group_size=32)
        e_rtn = activation_aware_error(W, quantize_rtn(W, spec).dequantize(), H)
        e_gptq = activation_aware_error(W, gptq_quantize(W, H, spec).dequantize(), H)
        assert e_gptq < 0.9 * e_rtn


def test_act_order_returns_original_column_order(layer):
    W, H = layer["W"], layer["H"]
    q = gptq_quantize(W, H, QuantSpec(bits=4, group_size=32), act_order=True)
    assert q.perm is not None
    assert activation_aware_error(W, q.dequantize(), H) < 0.05


def test_singular_and_rounding_indefinite_hessian_still_works():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)  # rank 4 < 32: singular
    H = X @ X.T
    H[5, :] = 0
    H[:, 5] = 0  # a dead channel
    H -= 1e-9 * torch.eye(32, dtype=torch.float64)  # slightly indefinite
    q = gptq_quantize(W, H, QuantSpec(bits=3, group_size=16))
    assert torch.isfinite(q.dequantize()).all()
    fac = prepare_hessian(H, 0.0)
    assert torch.isfinite(fac.U).all()


def test_deterministic(layer):
    W, H = layer["W"], layer["H"]
    a = gptq_quantize(W, H, QuantSpec(bits=2, group_size=32))
    b = gptq_quantize(W, H, QuantSpec(bits=2, group_size=32))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
