"""Integration: the pipeline on the real SmolLM2-135M (a few layers of block 0, a small calibration slice)."""

import math

import pytest
import torch

import qlr
from qlr.nn import QLRLinear


@pytest.mark.integration
def test_compress_save_load_smollm2(tmp_path):
    from qlr.models.loading import load_model

    model, tok = load_model("smollm2-135m")
    ids = torch.tensor([tok("Call me Ishmael. Some years ago, never mind how long precisely.")["input_ids"]])
    model = qlr.compress(model, "odlri", bits=2, rank=16, tokenizer=tok, calibration="sotu", calib_samples=4,
                         seqlen=128, layers=r"layers\.0\.self_attn\.(q|k)_proj", outer_iters=2, inner_iters=2,
                         progress=False)
    met = model.qlr_info["layer_metrics"]
    assert list(met) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert all(0 < m["act_err"] < 0.1 for m in met.values())  # 2-bit + rank 16 on real layers
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLRLinear)
    with torch.no_grad():
        out = model(ids).logits
    qlr.save(model, tmp_path / "ck", tok)
    again = qlr.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    assert math.isfinite(float(out.float().mean()))
