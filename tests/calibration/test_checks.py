"""Whole-model runs check the plan, the weights and the budget before calibrating; later errors name the layer."""

import re

import pytest
import torch

import qlr
import qlr.api
import qlr.calibration.pipeline as pl
from qlr.calibration.pipeline import CompressionPlan, check_model, compress_blocks


def _ids(n=2, t=32):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration starts (tokenising windows or running the model on them)."""

    def boom(*a, **k):
        raise AssertionError("calibration started before the inputs were checked")

    monkeypatch.setattr(qlr.api, "calibration_batches", boom)
    monkeypatch.setattr(pl, "capture_block_inputs", boom)


def _feasible(message: str) -> float:
    return float(re.search(r"smallest feasible budget for this model is ([0-9.]+)", message).group(1))


@pytest.mark.parametrize("method, opts", [("odlri", {}), ("caldera", dict(q_quantizer="gptq", lr_quantizer="uniform")),
                                          ("lorc", {}), ("rtn", {})])
def test_budget_below_q_cost_states_the_smallest_feasible_budget(tiny_model, byte_tokenizer, sample_text,
                                                                 no_calibration, method, opts):
    with pytest.raises(ValueError, match="below what Q alone costs") as err:
        qlr.compress(tiny_model, method, bits=2, budget=1.0, tokenizer=byte_tokenizer, calibration=[sample_text],
                     progress=False, **opts)
    floor = _feasible(str(err.value))
    assert 2.0 < floor < 3.0
    plan = CompressionPlan(method=method, bits=2, budget=floor, options=opts)
    linears = check_model(tiny_model, plan)  # the stated value is feasible: every layer fits, with rank 0 or more
    for lin in linears.values():
        assert plan.q_bits_per_weight(lin.out_features, lin.in_features) <= floor
    with pytest.raises(ValueError, match="below what Q alone costs"):
        check_model(tiny_model, CompressionPlan(method=method, bits=2, budget=floor - 0.002, options=opts))


def test_zero_and_meta_weights_are_named_before_calibration(tiny_model, byte_tokenizer, sample_text, no_calibration):
    up = tiny_model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        up.weight.zero_()
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: W is all zeros"):
        qlr.compress(tiny_model, "odlri", bits=2, rank=8, tokenizer=byte_tokenizer, calibration=[sample_text],
                     progress=False)
    # excluding it is the way out
    check_model(tiny_model, CompressionPlan(method="odlri", rank=8, layers=r"self_attn"))
    tiny_model.model.layers[0].self_attn.k_proj.weight = torch.nn.Parameter(torch.empty(32, 64, device="meta"))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.k_proj: W is on the meta device"):
        compress_blocks(tiny_model, _ids(), CompressionPlan(method="rtn", bits=3), progress=False)


def test_zero_h_names_the_layer(tiny_model):
    # up_proj all zero (not selected) makes down_proj's inputs act(gate)·0 = 0: H of down_proj is all zero
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.zero_()
    plan = CompressionPlan(method="odlri", bits=2, rank=8, layers=r"down_proj", options=dict(outer_iters=2,
                                                                                             inner_iters=2))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj: H is all zeros"):
        compress_blocks(tiny_model, _ids(), plan, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="awq"), "available methods"),
    (dict(rank=2.5), "fractional rank must be in"),
    (dict(rank=8.0), "pass the integer 8"),
    (dict(budget=-1.0), "budget must be a positive number"),
    (dict(layers="mlp("), "not a valid regular expression"),
    (dict(outer_iterz=3), "no option"),
    (dict(rank=12, q_quantizer="e8p", lr_quantizer="e8p4"), "multiple of 8"),
    (dict(rank=100), r"model\.layers\.0\.self_attn\.q_proj: rank=100 is larger than min"),
])
def test_bad_plans_fail_before_calibration(tiny_model, byte_tokenizer, sample_text, no_calibration, kwargs, match):
    kwargs = {"method": "odlri", "rank": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        qlr.compress(tiny_model, tokenizer=byte_tokenizer, calibration=[sample_text], progress=False, **kwargs)


def test_unreadable_calibration_fails_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the calibration text was checked")

    monkeypatch.setattr(qlr.api, "load_model", no_load)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=re.escape(str(binary))):
        qlr.compress("smollm2-135m", "rtn", 3, calibration=str(binary))


def test_keep_leaves_an_undecomposable_layer_in_full_precision(tmp_path, tiny_model, byte_tokenizer, sample_text):
    with torch.no_grad():  # down_proj of block 0 then reads act(gate)·0 = 0: its H is all zero
        tiny_model.model.layers[0].mlp.up_proj.weight.zero_()
    kw = dict(tokenizer=byte_tokenizer, calibration=[sample_text * 2], calib_samples=2, seqlen=32, progress=False,
              layers=r"mlp\.down_proj")
    with pytest.raises(ValueError, match="on_error must be 'fail' or 'keep'"):
        qlr.compress(tiny_model, "lorc", bits=3, rank=4, on_error="skip", **kw)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj: H is all zeros"):
        qlr.compress(tiny_model, "lorc", bits=3, rank=4, **kw)  # the default: an error naming it
    weight = tiny_model.model.layers[0].mlp.down_proj.weight.clone()
    model = qlr.compress(tiny_model, "lorc", bits=3, rank=4, on_error="keep", **kw)
    kept = model.qlr_info["full_precision_layers"]
    assert list(kept) == ["model.layers.0.mlp.down_proj"] and "H is all zeros" in kept[
        "model.layers.0.mlp.down_proj"]["full_precision"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, weight)  # untouched
    assert list(model.qlr_info["layer_metrics"]) == ["model.layers.1.mlp.down_proj"]
    lr_bpw = model.qlr_info["layer_metrics"]["model.layers.1.mlp.down_proj"]["bits_per_weight"]
    assert model.qlr_info["bits_per_weight"] == pytest.approx((32 + lr_bpw) / 2)  # all-in: fp32 counts 32
    qlr.save(model, tmp_path / "ck")
    from qlr.io import inspect

    info = inspect(tmp_path / "ck")
    assert info["num_layers"] == 1 and [r["name"] for r in info["full_precision_layers"]] == [
        "model.layers.0.mlp.down_proj"]
    assert info["full_precision_layers"][0]["shape"] == [64, 128] and info["full_precision_layers"][0]["dtype"] == (
        "float32")
    again = qlr.load(tmp_path / "ck")
    assert isinstance(again.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, weight)
