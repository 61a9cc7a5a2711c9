"""qlr.reconcile: a layer's metadata, recorded metrics, stored bytes and the run's plan must agree."""

from __future__ import annotations

import torch

from qlr.decompose.base import Decomposition
from qlr.nn import QLRLinear
from qlr.quant.grid import QuantSpec, quantize_rtn
from qlr.reconcile import layer_inconsistencies


def _layer() -> tuple[QLRLinear, dict]:
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(W, QuantSpec(bits=3, group_size=32))
    dec = Decomposition(method="rtn", config=None, q=q, L_s=torch.zeros(16, 0), R_s=torch.zeros(0, 64))
    mod = QLRLinear.from_decomposition(dec)
    return mod, {"name": "blk.0.proj", "meta": mod.qlr_meta(), "metrics": {"rank": 0, "shape": [16, 64]}}


def _bytes_bits(mod: QLRLinear) -> int:
    return sum(b.numel() * b.element_size() * 8 for name, b in mod.named_buffers() if name != "bias")


def test_a_consistent_layer_has_no_problems():
    mod, layer = _layer()
    assert layer_inconsistencies({"method": "rtn", "bits": 3}, layer, mod, mod.storage_bits(), _bytes_bits(mod)) == []


def test_each_disagreement_is_named():
    mod, layer = _layer()
    bits = mod.storage_bits()
    cfg = {"method": "rtn", "bits": 3}
    assert layer_inconsistencies({"method": "rtn", "bits": 2}, layer, mod, bits, bits) == [
        "layer blk.0.proj: Q has 3-bit codes, the run says bits=2"]
    layer["metrics"]["rank"] = 4
    assert layer_inconsistencies(cfg, layer, mod, bits, bits) == [
        "layer blk.0.proj: metadata rank 0, recorded metrics rank 4"]
    layer["metrics"]["rank"] = 0
    (problem,) = layer_inconsistencies(cfg, layer, mod, bits, bits + 32)
    assert problem.startswith("layer blk.0.proj: measured ") and "explains 0 bits of the difference, not 32" in problem
    layer["meta"]["storage_bits"] = bits + 1
    assert layer_inconsistencies(cfg, layer, mod, bits, bits) == [
        f"layer blk.0.proj: its metadata computes {bits} storage bits but records {bits + 1}"]
    (bad_plan,) = layer_inconsistencies({"method": "rtn", "bits": 3, "options": {"nope": 1}}, _layer()[1], mod, bits,
                                        bits)
    assert "is not a valid qlr plan" in bad_plan
