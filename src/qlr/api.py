"""The Python entry points: compress a model, save/load it, measure perplexity.

    model = qlr.compress("smollm2-135m", method="odlri", bits=2, rank=64, calibration="sotu")
    qlr.save(model, "runs/smol");  model = qlr.load("runs/smol")
    qlr.perplexity(model, tokenizer, text)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io as _io
from .calibration.pipeline import CompressionPlan, check_model, compress_blocks, run_fingerprint
from .data import calibration_batches, load_text, text_hash
from .models.loading import load_model

__all__ = ["compress", "save", "load", "load_tokenizer", "check_device", "finetune_checkpoint", "run_info"]


def compress(model_or_path: nn.Module | str | os.PathLike[str], method: str = "odlri", bits: int = 2,
             rank: int | float | None = None, *, calibration: str | list[str] = "sotu", tokenizer: Any = None,
             calib_samples: int = 64, seqlen: int = 512, layers: str | None = None, budget: float | None = None,
             device: str | torch.device | None = None, seed: int = 0, work_dir: str | Path | None = None,
             resume: bool = False, batch_size: int = 8, progress: bool = True, log: Any = None,
             on_error: str = "fail", **method_options: Any) -> nn.Module:
    """Compress every selected decoder linear of a causal LM into a :class:`~qlr.nn.QLRLinear` (W ≈ Q + L R).

    Args:
        model_or_path: a transformers model (then ``tokenizer`` is needed for text calibration), a built-in name
            (``"smollm2-135m"``), a local Hugging Face directory or a ``.gguf`` file.
        method, bits, rank: see :func:`qlr.decompose`; ``rank`` may be a fraction of min(m, n) (e.g. 0.05).
        calibration: a built-in corpus name ("sotu"), a path to local text, a list of strings, or token ids.
        calib_samples, seqlen: number and length of calibration windows (see :func:`qlr.data.calibration_batches`;
            a long corpus is tokenised once and its token ids cached, with ``progress`` showing the elapsed time).
        layers: regex selecting linears by model-relative name (default: every decoder linear; never embeddings
            or lm_head).
        budget: all-in bits per weight; picks each layer's rank so the layer lands at (at most) that cost.
        device: where to run (default: the model's device).
        work_dir: where the run's fingerprint and finished layers are written as they complete; with
            ``resume=True`` they are reloaded, and a work directory left by a run with another model (weights or
            config), plan, calibration token ids, seed, batch size, device or qlr version is refused with a
            one-line list of the differences (see :mod:`qlr.calibration.workdir`). Without ``resume``, the layer
            files found there are discarded.
        on_error: what a layer that cannot be decomposed (unusable calibration statistics, a failed
            factorisation) does to the run: ``"fail"`` (default) raises ValueError naming it; ``"keep"`` leaves it
            in full precision, listed in ``model.qlr_info["full_precision_layers"]`` (and so in the checkpoint
            and ``qlr inspect``). Selected weights that are themselves invalid are an error either way.
        **method_options: options of the method's config (e.g. ``outer_iters``, ``lr_bits``, ``odlri_k``).

    Returns:
        The model, layers replaced in place; ``model.qlr_info`` describes the run (plan, calibration hashes, the
        run fingerprint, all-in ``bits_per_weight`` over the selected layers, full-precision ones at their dtype's
        bits) and holds per-layer metrics; ``seconds`` fields are timings (:func:`save` keeps them out of the
        hashed checkpoint).

    Raises:
        ValueError: before any calibration work, for an invalid plan (method, options, bits, rank, budget, layer
            pattern), an unknown device, unreadable calibration text, a selected weight that is meta, empty,
            non-finite or all zero (the message names the layer), or a ``budget`` below what Q alone costs (the
            message states the smallest feasible budget), a ``resume`` whose work directory holds another run
            (the message lists every difference) or a damaged layer file (named, with how to recover); during the
            run, with ``on_error="fail"``, for a layer whose calibration statistics are unusable (named in the
            message).
    """
    plan = CompressionPlan(method=method, bits=bits, rank=rank, budget=budget, layers=layers,
                           options=dict(method_options))
    plan.check()
    if on_error not in ("fail", "keep"):
        raise ValueError(f"on_error must be 'fail' or 'keep', got {on_error!r}")
    if device is not None:
        device = check_device(device)
    text: str | None = None
    if not isinstance(calibration, torch.Tensor):  # read (and validate) the text before loading the model
        text = "\n\n".join(calibration) if isinstance(calibration, list) else load_text(calibration)
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if tokenizer is None and text is not None:
            raise ValueError("pass tokenizer= when giving a model object with text calibration")
    else:
        model, tok = load_model(model_or_path)
        tokenizer = tokenizer or tok
    if device is not None:
        model.to(device)
    check_model(model, plan)  # selection, weights, ranks and budget: before tokenising and calibrating
    if text is None:
        assert isinstance(calibration, torch.Tensor)
        ids, calib_hash = calibration.long(), text_hash(str(calibration.tolist()))
        if ids.dim() == 1:
            ids = ids[None]
    else:
        calib_hash = text_hash(text)
        ids = calibration_batches(tokenizer, text, calib_samples, seqlen, seed, progress=progress)
    fingerprint = run_fingerprint(model, ids, plan, seed=seed, batch_size=batch_size)
    t0 = time.perf_counter()
    metrics = compress_blocks(model, ids, plan, batch_size=batch_size, work_dir=work_dir, resume=resume,
                              progress=progress, seed=seed, log=log, on_error=on_error, fingerprint=fingerprint)
    kept = {name: met for name, met in metrics.items() if "full_precision" in met}
    n_w = sum(m["shape"][0] * m["shape"][1] for m in metrics.values())
    bpw = sum(m["bits_per_weight"] * m["shape"][0] * m["shape"][1] for m in metrics.values()) / max(n_w, 1)
    model.qlr_info = {
        "model": None if isinstance(model_or_path, nn.Module) else str(model_or_path),
        "method": method, "bits": bits, "rank": rank, "budget": budget, "layers": layers,
        "options": dict(method_options), "calibration_sha256": calib_hash,
        "calibration": calibration if isinstance(calibration, str) else "<in-memory>",
        "calib_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": seed,
        "run_fingerprint": fingerprint, "full_precision_layers": kept,
        "bits_per_weight": bpw, "seconds": time.perf_counter() - t0,
        "layer_metrics": {name: met for name, met in metrics.items() if name not in kept},
    }
    return model


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; ValueError for a malformed name or an accelerator that is not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return dev


def save(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save a compressed model (safetensors + qlr_config.json, plus the tokenizer when given)."""
    return _io.save(model, directory, tokenizer=tokenizer, info=getattr(model, "qlr_info", None))


def load(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a compressed checkpoint as a transformers model ready for ``generate()``."""
    return _io.load(directory, device=device)


def load_tokenizer(directory: str | Path) -> Any:
    return _io.load_tokenizer(directory)


def run_info(directory: str | Path) -> dict[str, Any]:
    """The run description of a saved checkpoint in the form :func:`save` takes (method, bits, rank, budget,
    layers, options, calibration hash, fingerprint, per-layer metrics without their bits/weight, and the extras
    such as the base ``model``), so that a derived checkpoint (e.g. after :func:`finetune_checkpoint`) keeps it."""
    import json

    cfg = _io.verify(directory)
    info: dict[str, Any] = {k: cfg.get(k) for k in ("method", "bits", "rank", "budget", "options",
                                                     "calibration_sha256", "run_fingerprint")}
    info["layers"] = cfg.get("layers_pattern")
    info["full_precision_layers"] = cfg.get("full_precision_layers") or {}
    info["layer_metrics"] = {lay["name"]: {k: v for k, v in lay.get("metrics", {}).items() if k != "bits_per_weight"}
                             for lay in cfg["layers"]}
    info.update(json.loads(json.dumps(cfg.get("extra") or {})))
    return info


def finetune_checkpoint(run: str | Path, out: str | Path, *, text: str = "sotu", windows: int = 512,
                        seqlen: int = 256, teacher: str | None = None, config: Any = None, resume: bool = False,
                        progress: bool = True, log: Any = None) -> tuple[nn.Module, Any]:
    """Fine-tune the L, R factors of the checkpoint ``run`` (QPEFT, :func:`qlr.train.finetune`) and save the
    result to ``out``. Returns (model, :class:`~qlr.train.FinetuneResult`).

    Args:
        run, out: the checkpoint to start from and the directory to write (its training state lives in
            ``OUT.partial`` until the save, so that ``resume=True`` continues a killed run).
        text: training text (a built-in corpus name or a local path; never the text you evaluate on).
        windows, seqlen: ``windows`` random windows of ``seqlen`` tokens drawn from ``text`` (seed ``config.seed``
            + 1, so not the calibration windows of a run with the same seed).
        teacher: the full-precision model for ``objective="kd"`` (default: the base model recorded in ``run``).
        config: a :class:`~qlr.train.FinetuneConfig` (default settings when None).
    """
    from .train import FinetuneConfig, finetune

    cfg = config or FinetuneConfig()
    info = run_info(run)
    model = _io.load(run)
    try:
        tokenizer = _io.load_tokenizer(run)
    except FileNotFoundError:
        tokenizer = None
    teacher_model = None
    base = teacher or info.get("model")
    needs_teacher = cfg.objective == "kd" or cfg.mode == "blockwise"
    if needs_teacher or tokenizer is None:
        if base is None:
            raise ValueError(f"{run} does not record its base model: pass teacher= (--teacher) with the "
                             "full-precision model it was compressed from")
        teacher_model, base_tok = load_model(base)
        tokenizer = tokenizer or base_tok
    corpus = load_text(text)
    ids = calibration_batches(tokenizer, corpus, windows, seqlen, cfg.seed + 1, progress=progress)
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    preserved = {name: int(met["preserve_k"]) for name, met in info["layer_metrics"].items()
                 if met.get("preserve_k")}  # SRR's preserved directions, for config.preserve_grad_scale
    result = finetune(model, ids, cfg, teacher=teacher_model if needs_teacher else None, work_dir=work,
                      resume=resume, preserved=preserved, progress=progress, log=log)
    record = result.to_dict()
    info["seconds"] = record.pop("seconds")
    record.update({"text": text, "text_sha256": text_hash(corpus), "windows": windows, "seqlen": seqlen,
                   "teacher": base if needs_teacher else None, "from": str(run)})
    info["finetune"] = record
    model.qlr_info = info
    _io.save(model, out, tokenizer=tokenizer, info=info)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return model, result
