"""The work directory: a resumed run must be the same run (fingerprint), and its finished layers intact."""

import json

import pytest
import torch

from qlr.calibration.pipeline import CompressionPlan, compress_blocks
from qlr.calibration.workdir import FINGERPRINT_NAME, layer_file, run_fingerprint
from qlr.models.tiny import tiny_llama
from tests.conftest import interrupt_after_layers

PLAN = CompressionPlan(method="lorc", bits=3, rank=4)


def _ids(n=2, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _interrupted(work, monkeypatch, plan=PLAN, n_layers=3, model=None):
    """Run until ``n_layers`` layers are written, then stop as a killed run would."""
    interrupt_after_layers(monkeypatch, n_layers)
    with pytest.raises(KeyboardInterrupt):
        compress_blocks(model or tiny_llama(seed=0), _ids(), plan, work_dir=work, progress=False)
    monkeypatch.undo()


def test_fingerprint_covers_model_plan_data_and_settings():
    model, ids = tiny_llama(seed=0), _ids()
    base = run_fingerprint(model, ids, PLAN, seed=0, batch_size=8)
    assert base == run_fingerprint(tiny_llama(seed=0), ids.clone(), CompressionPlan("lorc", 3, 4), seed=0,
                                   batch_size=8)
    assert set(base) == {"qlr_version", "model_class", "model_config_sha256", "model_weights_sha256", "method",
                         "bits", "rank", "budget", "layers", "options", "calibration_ids_sha256",
                         "calibration_shape", "seed", "batch_size", "device"}
    json.dumps(base)
    other = tiny_llama(seed=0)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3  # not a selected linear, but it shapes the calibration inputs
    changed = {
        "model_weights_sha256": run_fingerprint(other, ids, PLAN, seed=0, batch_size=8),
        "model_config_sha256": run_fingerprint(tiny_llama(seed=0, max_positions=64), ids, PLAN, seed=0,
                                               batch_size=8),
        "calibration_ids_sha256": run_fingerprint(model, _ids(seed=1), PLAN, seed=0, batch_size=8),
        "options": run_fingerprint(model, ids, CompressionPlan("lorc", 3, 4, options={"damp": 0.1}), seed=0,
                                   batch_size=8),
        "layers": run_fingerprint(model, ids, CompressionPlan("lorc", 3, 4, layers="mlp"), seed=0, batch_size=8),
        "batch_size": run_fingerprint(model, ids, PLAN, seed=0, batch_size=1),
    }
    for key, fp in changed.items():
        assert [k for k in base if base[k] != fp[k]] == [key]


@pytest.mark.parametrize("change, shown", [
    (dict(plan=CompressionPlan(method="lorc", bits=2, rank=4)), "used bits=3; this one bits=2"),
    (dict(plan=CompressionPlan(method="lqer", bits=3, rank=6)), "used method=lorc, rank=4; this one method=lqer, "
                                                                "rank=6"),
    (dict(model=tiny_llama(seed=5)), "used model_weights_sha256="),
    (dict(ids=_ids(seed=3)), "used calibration_ids_sha256="),
    (dict(seed=1), "used seed=0; this one seed=1"),
    (dict(batch_size=1), "used batch_size=8; this one batch_size=1"),
])
def test_resume_refuses_a_different_run(tmp_path, monkeypatch, change, shown):
    _interrupted(tmp_path / "w", monkeypatch)
    kw = {"plan": PLAN, "model": tiny_llama(seed=0), "ids": _ids(), "seed": 0, "batch_size": 8, **change}
    with pytest.raises(ValueError, match="^cannot resume") as err:
        compress_blocks(kw["model"], kw["ids"], kw["plan"], work_dir=tmp_path / "w", resume=True, seed=kw["seed"],
                        batch_size=kw["batch_size"], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and shown in msg and f"the run in {tmp_path / 'w'} " in msg
    assert isinstance(kw["model"].model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing was reused


def test_layer_files_are_checked(tmp_path, monkeypatch):
    work = tmp_path / "w"
    _interrupted(work, monkeypatch)
    path = layer_file(work, "model.layers.0.self_attn.q_proj")
    good = path.read_bytes()

    def resume():
        compress_blocks(tiny_llama(seed=0), _ids(), PLAN, work_dir=work, resume=True, progress=False)

    data = bytearray(good)
    data[-3] ^= 0x10  # a bit of a tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"resume file {path} fails its checksum .*; delete {path} to recompute"):
        resume()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"resume file {path} is corrupt .*; delete {path} to recompute"):
        resume()
    _interrupted(tmp_path / "other", monkeypatch, plan=CompressionPlan(method="lorc", bits=2, rank=4))
    path.write_bytes(layer_file(tmp_path / "other", "model.layers.0.self_attn.q_proj").read_bytes())
    with pytest.raises(ValueError, match=f"resume file {path} was written by another run"):
        resume()
    path.write_bytes(good)
    (work / FINGERPRINT_NAME).unlink()
    with pytest.raises(ValueError, match="holds 3 layer file.* but no run fingerprint"):
        resume()


def test_fresh_run_discards_earlier_layers(tmp_path, monkeypatch):
    work = tmp_path / "w"
    rtn2, rtn3 = (CompressionPlan(method="rtn", bits=b, layers="mlp") for b in (2, 3))
    _interrupted(work, monkeypatch, plan=rtn2, n_layers=5)
    _interrupted(work, monkeypatch, plan=rtn3, n_layers=2)  # resume=False: another run starts over there
    assert len(list((work / "layers").glob("*.safetensors"))) == 2
    model = tiny_llama(seed=0)
    compress_blocks(model, _ids(), rtn3, work_dir=work, resume=True, progress=False)
    assert {m.meta["q"]["bits"] for m in model.modules() if hasattr(m, "meta")} == {3}
