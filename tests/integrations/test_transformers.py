"""transformers plug-in: a qlr checkpoint directory loads with ``AutoModelForCausalLM.from_pretrained`` into the
same model as :func:`qlr.load` (identical logits and generated tokens), survives ``save_pretrained``, and a damaged
``quantization_config`` is refused with a ValueError naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qlr
from qlr import io
from qlr.models.surgery import replace_linear
from qlr.nn import QLRLinear
from tests.test_io import _rtn_decomposition, tiny_compressed_llama

transformers = pytest.importorskip("transformers")
from qlr.integrations.transformers import QLRConfig, QLRHfQuantizer  # noqa: E402  (needs transformers)

AutoModelForCausalLM = transformers.AutoModelForCausalLM


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    model, _ = tiny_compressed_llama()
    directory = io.save(model, tmp_path_factory.mktemp("hf") / "tiny", info={"method": "rtn"})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    return directory, ids


def _load(directory: Path, **kwargs: Any) -> nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys (inv_freq, tied lm_head)
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_config_json_written_and_hashed(ckpt: tuple[Path, torch.Tensor]) -> None:
    directory, _ = ckpt
    cfg = json.loads((directory / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "qlr" and qc["format_version"] == 1 and qc["qlr_version"] == qlr.__version__
    assert len(qc["layers"]) == 14 and qc["unfused_experts"] == []
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "config.json" in io.verify(directory)["files"]


def test_from_pretrained_equals_qlr_load(ckpt: tuple[Path, torch.Tensor]) -> None:
    directory, ids = ckpt
    ref, model = io.load(directory), _load(directory)
    assert sum(isinstance(m, QLRLinear) for m in model.modules()) == 14
    assert not any(isinstance(m, nn.Linear) and n.startswith("model.layers") for n, m in model.named_modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):  # same tensors, stored dtypes
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(_logits(ref, ids), _logits(model, ids))
    q = model.hf_quantizer
    assert isinstance(q, QLRHfQuantizer) and q.is_serializable() and q.is_trainable is False
    assert not model.training


def test_save_pretrained_round_trip(ckpt: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    directory, ids = ckpt
    model = _load(directory)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((directory / "config.json").read_text())["quantization_config"]
    again = _load(tmp_path / "again")
    assert torch.equal(_logits(again, ids), _logits(io.load(directory), ids))


def test_generate_same_tokens(ckpt: tuple[Path, torch.Tensor]) -> None:
    directory, ids = ckpt
    prompt = ids[:, :4]
    kw = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    a, b = io.load(directory).generate(prompt, **kw), _load(directory).generate(prompt, **kw)
    assert torch.equal(a, b) and a.shape == (2, 10)


def test_dtype_casts_float_parameters_only(ckpt: tuple[Path, torch.Tensor]) -> None:
    directory, ids = ckpt
    ref, model = io.load(directory), _load(directory, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        if ".layers." in name:  # QLRLinear buffers keep their stored dtypes and values
            assert a.dtype == b.dtype and torch.equal(a, b), name
    out = _logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref_out = _logits(ref, ids)
    assert (out.float() - ref_out).abs().max() < 0.05 * ref_out.abs().max()


def test_conv1d_layers(tmp_path: Path) -> None:
    """GPT-2 keeps its linears as transformers ``Conv1D`` (weight in × out); they are swapped just the same."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for i, name in enumerate(["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]):
        conv = model.get_submodule(name)
        replace_linear(model, name, QLRLinear.from_decomposition(_rtn_decomposition(conv.weight.data.T, i),
                                                                    bias=conv.bias))
    io.save(model, tmp_path / "gpt2")
    loaded = _load(tmp_path / "gpt2")
    assert isinstance(loaded.transformer.h[0].mlp.c_fc, QLRLinear)
    ids = torch.arange(10)[None]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def _edited(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


_Q = "model.layers.0.mlp.up_proj"
_BAD = {
    "layer meta lacks a key": (lambda q: q["layers"][_Q].pop("rank"), r"layer 'model\.layers\.0\.mlp\.up_proj'.*rank"),
    "unknown key": (lambda q: q.update(typo=1), r"unknown keys \['typo'\]"),
    "newer format": (lambda q: q.update(format_version=2), "upgrade qlr"),
    "layers not a mapping": (lambda q: q.update(layers=[]), "layers must be a non-empty"),
    "no such module": (lambda q: q["layers"].update({"model.layers.7.mlp.up_proj": q["layers"][_Q]}),
                       "not a module of LlamaForCausalLM"),
    "not a linear": (lambda q: q["layers"].update({"model.norm": q["layers"][_Q]}), "LlamaRMSNorm, not an nn.Linear"),
    "wrong shape": (lambda q: q["layers"].update({_Q: q["layers"]["model.layers.0.mlp.down_proj"]}),
                    "64 → 128 in the model but 128 → 64"),
    "unknown codec": (lambda q: q["layers"][_Q]["q"].update(codec="zzz"), "no codec 'zzz'"),
    "tensors absent": (lambda q: q["layers"][_Q].update(rotation={"seed": 0}), r"lack 2 QLRLinear tensors.*signs_"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_malformed_quantization_config(ckpt: tuple[Path, torch.Tensor], tmp_path: Path, case: str) -> None:
    edit, match = _BAD[case]
    d = _edited(ckpt[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match=r"config\.json.*(bytes|sha256)"):  # qlr.load notices the edit
        io.load(d)


def test_unfused_experts_called_before_swap(ckpt: tuple[Path, torch.Tensor], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    moe = pytest.importorskip("qlr.models.moe")
    calls = []

    def fake_unfuse(model: nn.Module, paths: list[str]) -> list[str]:
        calls.append((list(paths), type(model.get_submodule(_Q)).__name__))
        return list(paths)

    monkeypatch.setattr(moe, "unfuse_experts", fake_unfuse)
    _load(ckpt[0])
    assert calls == []  # only when the key is non-empty
    d = _edited(ckpt[0], tmp_path / "moe", lambda q: q.update(unfused_experts=["model.layers.0.mlp"]))
    _load(d)
    assert calls == [(["model.layers.0.mlp"], "Linear")]


def test_config_class_checks(ckpt: tuple[Path, torch.Tensor]) -> None:
    meta = json.loads((ckpt[0] / "config.json").read_text())["quantization_config"]["layers"][_Q]
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        QLRConfig(layers={_Q: meta}, quant_method="gptq")
    with pytest.raises(ValueError, match="unfused_experts must be a list"):
        QLRConfig(layers={_Q: meta}, unfused_experts="model.layers.0.mlp")
    cfg = QLRConfig(layers={_Q: meta})
    assert QLRConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict() and "1 QLRLinear" in repr(cfg)
    with pytest.raises(ValueError, match="pre-quantized"):  # qlr cannot compress inside from_pretrained
        QLRHfQuantizer(cfg, pre_quantized=False)


def test_import_qlr_registers_lazily(ckpt: tuple[Path, torch.Tensor]) -> None:
    """The documented flow in a fresh interpreter: ``import qlr`` (which does not import transformers), then
    ``AutoModelForCausalLM.from_pretrained``."""
    code = ("import sys, qlr; assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(ckpt[0])!r})\n"
            "print(type(m.model.layers[0].mlp.up_proj).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "QLRLinear"


def test_qlr_load_then_save_pretrained_round_trips(ckpt: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    directory, ids = ckpt
    model = qlr.load(directory)
    model.save_pretrained(tmp_path / "hf")
    again = _load(tmp_path / "hf")
    assert torch.equal(_logits(again, ids), _logits(model, ids))
