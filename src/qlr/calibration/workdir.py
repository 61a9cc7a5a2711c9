"""The work directory of a compression run: its fingerprint and its finished layers, both checked on resume.

    <work_dir>/run.json                      the run fingerprint (:func:`run_fingerprint`), written when a run starts
    <work_dir>/layers/<name>.safetensors     one finished QLRLinear: its buffers, its ``qlr_meta()``, its metrics,
                                             the digest of the run that wrote it and a checksum of all of these

A resumed run (``resume=True``) computes its own fingerprint and refuses, in one line naming every difference, to
continue a run whose fingerprint differs (:func:`open_work_dir`); each reloaded layer is checked against its own
checksum and the run digest (:func:`load_layer`). A fresh run (``resume=False``) removes the layer files and the
fingerprint it finds there (nothing else) before writing its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__

__all__ = ["run_fingerprint", "fingerprint_digest", "open_work_dir", "save_layer", "load_layer", "layer_file",
           "FINGERPRINT_NAME"]

FINGERPRINT_NAME = "run.json"
_START_OVER = "delete it to start over, or resume with the earlier settings"


def _update_tensor(digest: Any, name: str, t: Tensor) -> None:
    """Feed a tensor's name, dtype, shape and raw bytes (in its dtype, on the CPU) into ``digest``."""
    digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    if t.numel() and t.device.type != "meta":
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())


def ids_sha256(input_ids: Tensor) -> str:
    """sha256 of token ids (as int64, with their shape)."""
    digest = hashlib.sha256()
    _update_tensor(digest, "ids", input_ids.long())
    return digest.hexdigest()


def _config_sha256(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return None
    d = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(model: nn.Module, input_ids: Tensor, plan: Any, *, seed: int, batch_size: int
                    ) -> dict[str, Any]:
    """Everything that decides the layers a run produces, as a flat JSON-able dict:

    - the model: its class, a sha256 of its transformers config (without ``_name_or_path`` and
      ``transformers_version``, so a moved copy of the same model matches) and a sha256 of every tensor of its
      ``state_dict`` (name, dtype, shape and bytes; one pass over the weights), taken before any layer is
      replaced: the selected linears and everything that shapes their calibration inputs (embeddings, norms, the
      other linears);
    - the plan (``plan``, a :class:`~qlr.calibration.pipeline.CompressionPlan`): method, bits, rank, budget, layer
      pattern and method options;
    - the calibration token ids actually used (sha256 and shape), the seed, the mini-batch size (it changes the
      floating-point summation order of H and the block outputs) and the device type;
    - the qlr version.
    """
    weights = hashlib.sha256()
    for name, t in model.state_dict().items():
        _update_tensor(weights, name, t)
    return {
        "qlr_version": _qlr_version(),
        "model_class": type(model).__name__,
        "model_config_sha256": _config_sha256(model),
        "model_weights_sha256": weights.hexdigest(),
        "method": plan.method, "bits": plan.bits, "rank": plan.rank, "budget": plan.budget,
        "layers": plan.layers, "options": json.loads(json.dumps(plan.options, sort_keys=True, default=str)),
        "calibration_ids_sha256": ids_sha256(input_ids), "calibration_shape": list(input_ids.shape),
        "seed": seed, "batch_size": batch_size,
        "device": next((p.device.type for p in model.parameters()), "cpu"),
    }


def _qlr_version() -> str:
    return __version__


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the fingerprint's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _show(key: str, value: Any) -> str:
    if isinstance(value, str) and key.endswith("sha256"):
        value = value[:12]  # enough to see that they differ
    elif not isinstance(value, str):
        value = json.dumps(value, sort_keys=True)
    return f"{key}={value}"


def _diff(work_dir: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    was = ", ".join(_show(k, old.get(k)) for k in keys)
    now = ", ".join(_show(k, new.get(k)) for k in keys)
    return (f"cannot resume: the run in {work_dir} used {was}; this one {now}. Its finished layers belong to that "
            f"run: {_START_OVER}")


def open_work_dir(work_dir: Path, fingerprint: Mapping[str, Any], resume: bool) -> str:
    """Prepare ``work_dir`` for a run with ``fingerprint``; returns the fingerprint's digest.

    With ``resume``, a fingerprint already there must equal this one (else ValueError listing every difference,
    on one line); a directory holding layer files but no fingerprint is refused. Without ``resume``, earlier layer
    files and fingerprint are removed. The fingerprint is written atomically before any layer is."""
    path = work_dir / FINGERPRINT_NAME
    layers = work_dir / "layers"
    found = sorted(layers.glob("*.safetensors")) if layers.is_dir() else []
    if resume and path.is_file():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot resume: {path} is unreadable ({err}); delete {work_dir} to start over"
                             ) from None
        if dict(old) != dict(fingerprint):
            raise ValueError(_diff(work_dir, old, fingerprint))
        return fingerprint_digest(fingerprint)
    if resume and found:
        raise ValueError(f"cannot resume: {work_dir} holds {len(found)} layer file(s) but no run fingerprint "
                         f"({FINGERPRINT_NAME}), so nothing says which run they belong to; delete {work_dir} to "
                         "start over")
    if not resume:
        for p in (*found, *(layers.glob("*.tmp") if layers.is_dir() else ())):
            p.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(fingerprint), sort_keys=True, indent=1))
    tmp.replace(path)
    return fingerprint_digest(fingerprint)


def layer_file(work_dir: Path, name: str) -> Path:
    return work_dir / "layers" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")


def _checksum(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key in ("run", "qlr_meta", "metrics"):
        digest.update(f"{key}={meta[key]}\0".encode())
    for name in sorted(tensors):
        _update_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def save_layer(work_dir: Path, name: str, module: nn.Module, metrics: Mapping[str, Any], run: str) -> None:
    """Write a finished layer (atomically: a killed run never leaves a half-written layer file behind)."""
    from safetensors.torch import save_file

    path = layer_file(work_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    meta = {"run": run, "qlr_meta": json.dumps(module.qlr_meta(), sort_keys=True),
            "metrics": json.dumps(dict(metrics), sort_keys=True)}
    meta["sha256"] = _checksum(tensors, meta)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_layer(work_dir: Path, name: str, run: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]] | None:
    """The finished layer ``name`` written by the run with digest ``run`` (None when not there yet), checked
    against its checksum; ValueError naming the file, and how to recover, when it is damaged or from another run."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..nn.qlinear import QLRLinear

    path = layer_file(work_dir, name)
    if not path.is_file():
        return None
    recover = f"delete {path} to recompute that layer"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # unreadable: truncated, not safetensors, ...
        raise ValueError(f"resume file {path} is corrupt ({' '.join(str(err).split())}); {recover}") from None
    if not all(k in meta for k in ("run", "qlr_meta", "metrics", "sha256")):
        raise ValueError(f"resume file {path} has no checksum (written by an older qlr?); {recover}")
    if meta["run"] != run:
        raise ValueError(f"resume file {path} was written by another run (fingerprint {meta['run'][:12]}, this run "
                         f"{run[:12]}); {recover}")
    if _checksum(tensors, meta) != meta["sha256"]:
        raise ValueError(f"resume file {path} fails its checksum (corrupted or modified); {recover}")
    try:
        module = QLRLinear.from_meta(json.loads(meta["qlr_meta"]), device="cpu")
        module.load_state_dict(tensors, assign=True)
    except Exception as err:
        raise ValueError(f"resume file {path} does not hold a valid layer ({' '.join(str(err).split())}); "
                         f"{recover}") from None
    return module.to(device), json.loads(meta["metrics"])
