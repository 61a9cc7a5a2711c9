"""Compressed checkpoints: save, verify, load and inspect a model whose linears are :class:`QLRLinear`.

A checkpoint is a directory::

    model.safetensors        every tensor of the model (QLRLinear buffers, other parameters, non-persistent
                             buffers such as rotary inv_freq); tied duplicates are stored once
    config.json              the transformers config plus a ``quantization_config`` holding every QLR layer's
                             metadata, so ``AutoModelForCausalLM.from_pretrained(directory)`` reads the checkpoint
                             too (see :mod:`qlr.integrations.transformers`); only for transformers models
    qlr_config.json          format/qlr versions, method/bits/rank/budget/layers/options, calibration hash, the
                             run fingerprint, the base model's transformers config and class, each QLR layer's
                             ``qlr_meta()`` and metrics, the layers kept in full precision, the tie map, and the
                             sha256 + byte size of every other file
    manifest.sha256          ``sha256sum`` lines for qlr_config.json and every file it lists (``sha256sum -c``
                             checks the whole checkpoint), so that an edit of qlr_config.json is detected too
    run_log.json             timings of the run (``seconds`` fields); not hashed, not verified
    generation_config.json   when the model has one
    tokenizer files          when a tokenizer is given to :func:`save`

Nothing is pickled. The same model and run description give byte-identical files (except run_log.json): JSON
keys are sorted and timings kept out. :func:`save` writes into a sibling staging directory and moves the result
into place, so an interrupted save leaves the target as it was. :func:`load` verifies the manifest, sizes and
hashes, rebuilds the transformers model on the meta device, swaps in empty QLRLinear modules from their metadata
(checking every stored tensor's shape and dtype against it), fills everything with
``load_state_dict(assign=True)`` and re-ties shared weights (e.g. SmolLM2's embeddings and lm_head).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlr._version import __version__
from qlr.hashing import file_sha256
from qlr.models.surgery import replace_linear
from qlr.nn.qlinear import QLRLinear
from qlr.reconcile import layer_inconsistencies

__all__ = ["save", "load", "load_tokenizer", "inspect", "verify", "FORMAT_VERSION",
           "CONFIG_NAME", "WEIGHTS_NAME", "MANIFEST_NAME", "RUN_LOG_NAME"]

FORMAT_VERSION = 2  # 2: manifest.sha256, run_log.json, sorted JSON keys, full_precision_layers
CONFIG_NAME = "qlr_config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.sha256"
RUN_LOG_NAME = "run_log.json"
GENERATION_NAME = "generation_config.json"
HF_CONFIG_NAME = "config.json"
_RERUN = "re-run `qlr compress` to recreate the checkpoint"
_INFO_KEYS = ("method", "bits", "rank", "budget", "layers", "options", "calibration_sha256", "run_fingerprint",
              "full_precision_layers", "layer_metrics")
_TIMING_KEYS = ("seconds",)  # kept out of the hashed files, in run_log.json


# ---- module paths ----------------------------------------------------------------------------------------------
def _unfused_paths(model: nn.Module) -> list[str]:
    """Paths of fused expert modules that qlr split into per-expert linears (``load`` splits them again)."""
    from .models.moe import UnfusedExperts

    return [name for name, mod in model.named_modules() if isinstance(mod, UnfusedExperts)]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# ---- small file helpers ----------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None or isinstance(x, float):
        return x
    if isinstance(x, Tensor) and x.numel() == 1:
        return _jsonable(x.item())
    return str(x)


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is not a directory; a qlr checkpoint is a directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: {str(directory)!r} is not a complete qlr checkpoint; "
                                f"{_RERUN}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); {_RERUN}") from e
    if not isinstance(cfg, dict) or "format_version" not in cfg or "files" not in cfg:
        raise ValueError(f"{str(path)!r} is not a qlr checkpoint config (no format_version/files); {_RERUN}")
    if cfg["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format version {cfg['format_version']}, newer than this qlr "
                         f"({__version__}) reads ({FORMAT_VERSION}); upgrade qlr")
    return cfg


def _read_manifest(directory: Path) -> dict[str, str]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing, so nothing vouches for {CONFIG_NAME}; {_RERUN}")
    entries: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64 or not name:
                raise ValueError(f"malformed line {line[:80]!r}")
            entries[name] = digest
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a sha256sum manifest ({e}); {_RERUN}") from None
    return entries


def verify(directory: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check the checkpoint's integrity and return its parsed config.

    First the manifest: ``manifest.sha256`` must hold the sha256 of ``qlr_config.json`` (always checked: an
    edited or corrupted qlr_config.json is refused) and agree with it on every other file. Then every data file
    listed in the config: present, right byte size, and (with ``hashes``) right sha256. Checkpoints of format 1
    (before the manifest) are read without the manifest check. Raises FileNotFoundError / ValueError naming the
    bad file."""
    directory = Path(directory)
    cfg = _read_config(directory)
    if cfg["format_version"] >= 2:
        manifest = _read_manifest(directory)
        cpath = directory / CONFIG_NAME
        if manifest.get(CONFIG_NAME) != file_sha256(cpath):
            raise ValueError(f"{str(cpath)!r} fails its manifest check: its sha256 is not the one recorded in "
                             f"{MANIFEST_NAME} (edited or corrupted after it was saved); {_RERUN}")
        listed = {name: rec.get("sha256") for name, rec in cfg["files"].items()}
        if {k: v for k, v in manifest.items() if k != CONFIG_NAME} != listed:
            raise ValueError(f"{str(directory / MANIFEST_NAME)!r} and {CONFIG_NAME} disagree on the checkpoint's "
                             f"files; {_RERUN}")
    for name, rec in cfg["files"].items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is missing from the checkpoint; {_RERUN}")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ValueError(f"{str(path)!r} has {size} bytes but the checkpoint recorded {rec['bytes']} "
                             f"(truncated or replaced); {_RERUN}")
        if hashes and file_sha256(path) != rec["sha256"]:
            raise ValueError(f"{str(path)!r} fails its sha256 check (corrupted or modified); {_RERUN}")
    return cfg


# ---- save ------------------------------------------------------------------------------------------------------
def _split_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """All tensors to write (name → contiguous CPU tensor), the tie map (dropped name → kept name) and the names
    of non-persistent buffers included."""
    state = dict(model.state_dict())
    persistent = set(state)
    extra = [n for n, _ in model.named_buffers() if n not in persistent]
    named_buffers = dict(model.named_buffers())
    for n in extra:
        state[n] = named_buffers[n]
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    # tensors that share memory without being identical views cannot be stored once; store copies
    return {k: v.clone() if _shares(v, tensors, k) else v for k, v in tensors.items()}, tied, extra


def _shares(t: Tensor, tensors: dict[str, Tensor], name: str) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return t.numel() > 0 and any(o.numel() and o.untyped_storage().data_ptr() == ptr
                                 for k, o in tensors.items() if k != name)


def save(model: nn.Module, directory: str | Path, *, tokenizer: Any = None,
         info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a transformers model whose compressed linears are :class:`QLRLinear`) to ``directory``.

    Args:
        model: the model; every tensor is saved (tied weights once).
        directory: created if needed; it must be empty or hold an earlier qlr checkpoint (which is replaced).
        tokenizer: optional tokenizer, saved with ``save_pretrained`` into the same directory.
        info: optional run description: ``method``, ``bits``, ``rank``, ``budget``, ``layers``, ``options``
            (dict), ``calibration_sha256`` (str), ``run_fingerprint`` (dict), ``full_precision_layers`` ({layer
            name: {"full_precision": why, "shape", "dtype", ...}} for selected layers left uncompressed) and
            ``layer_metrics`` ({layer name: {"act_err": float, ...}}); other keys are kept under ``"extra"``.
            ``seconds`` fields (timings) go to run_log.json instead, so that the hashed files depend only on the
            model and the run's settings.

    Returns:
        The checkpoint directory.

    Everything is written to a staging directory next to ``directory`` (``.<name>.qlr-saving``) and moved into
    place at the end, qlr_config.json and manifest.sha256 last; an interrupted save leaves ``directory`` as it
    was, and the next save clears the staging directory.
    """
    directory = Path(directory)
    info = dict(info or {})
    if directory.exists():
        if not directory.is_dir():
            raise NotADirectoryError(f"{str(directory)!r} exists and is not a directory")
        if not (directory / CONFIG_NAME).is_file() and any(directory.iterdir()):
            raise ValueError(f"{str(directory)!r} is not empty and is not a qlr checkpoint; refusing to write "
                             "into it (choose an empty or new directory)")
    target = directory.resolve()
    staging = target.with_name(f".{target.name}.qlr-saving")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted save
    staging.mkdir(parents=True)

    tensors, tied, extra = _split_state(model)
    # one metadata key: safetensors writes its metadata map in an order that varies per process
    save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
    written = [WEIGHTS_NAME]
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(str(staging))
        written.append(GENERATION_NAME)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        for p in tokenizer.save_pretrained(str(staging)):
            rel = Path(p).resolve().relative_to(staging).as_posix()
            if (staging / rel).is_file() and rel not in written:
                written.append(rel)

    metrics = info.get("layer_metrics", {}) or {}
    timings: dict[str, Any] = {k: info[k] for k in _TIMING_KEYS if k in info}
    layer_timings: dict[str, Any] = {}
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, QLRLinear):
            lm = {"bits_per_weight": mod.bits_per_weight, **metrics.get(name, {})}
            for k in _TIMING_KEYS:
                if k in lm:
                    layer_timings.setdefault(name, {})[k] = lm.pop(k)
            layers.append({"name": name, "meta": mod.qlr_meta(), "metrics": lm})
    if _write_hf_config(model, staging, layers):
        written.append(HF_CONFIG_NAME)
    hf_config = getattr(model, "config", None)
    cfg = {
        "format_version": FORMAT_VERSION,
        "qlr_version": __version__,
        "method": info.get("method"),
        "bits": info.get("bits"),
        "rank": info.get("rank"),
        "budget": info.get("budget"),
        "layers_pattern": info.get("layers"),
        "options": info.get("options", {}),
        "calibration_sha256": info.get("calibration_sha256"),
        "run_fingerprint": info.get("run_fingerprint"),
        "extra": {k: v for k, v in info.items() if k not in _INFO_KEYS and k not in _TIMING_KEYS},
        "model_class": type(model).__name__,
        "config_class": type(hf_config).__name__ if hf_config is not None else None,
        "model_config": hf_config.to_dict() if hf_config is not None else None,
        "tied": tied,
        "nonpersistent_buffers": extra,
        "unfused_experts": _unfused_paths(model),
        "layers": layers,
        "full_precision_layers": {name: {k: v for k, v in rec.items() if k not in _TIMING_KEYS}
                                  for name, rec in (info.get("full_precision_layers") or {}).items()},
        "files": {n: {"bytes": (staging / n).stat().st_size, "sha256": file_sha256(staging / n)} for n in written},
    }
    (staging / CONFIG_NAME).write_text(json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n")
    sums = {**{n: rec["sha256"] for n, rec in cfg["files"].items()}, CONFIG_NAME: file_sha256(staging / CONFIG_NAME)}
    (staging / MANIFEST_NAME).write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    if timings or layer_timings:
        (staging / RUN_LOG_NAME).write_text(json.dumps(_jsonable({**timings, "layers": layer_timings}), indent=2,
                                                       sort_keys=True) + "\n")
    _move_into_place(staging, target)
    return directory


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace the checkpoint in ``target`` (absent, empty, or an earlier qlr checkpoint) by ``staging``'s files.

    The earlier checkpoint's files go first (qlr_config.json last, so that an interruption still leaves something
    :func:`save` recognises and may replace); then ``staging`` is renamed to ``target``, or, when files that are not
    the checkpoint's share ``target``, its files are moved in one by one, qlr_config.json and the manifest last."""
    if target.is_dir():
        old = target / CONFIG_NAME
        if old.is_file():
            try:
                names = list(json.loads(old.read_text()).get("files", {}))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                names = []
            for name in (*names, RUN_LOG_NAME, MANIFEST_NAME):
                (target / name).unlink(missing_ok=True)
            old.unlink()
        if not any(target.iterdir()):
            target.rmdir()
    if not target.exists():
        os.replace(staging, target)
        return
    order = {CONFIG_NAME: 1, MANIFEST_NAME: 2}
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: order.get(p.name, 0))
    for p in files:
        dest = target / p.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
    shutil.rmtree(staging)


def _write_hf_config(model: nn.Module, directory: Path, layers: list[dict[str, Any]]) -> bool:
    """Write the Hugging Face ``config.json`` (the model's config plus the qlr ``quantization_config``, see
    :mod:`qlr.integrations.transformers`) when ``model`` has a transformers config; returns whether it did."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not callable(getattr(hf_config, "to_dict", None)):
        return False
    d = hf_config.to_diff_dict() if callable(getattr(hf_config, "to_diff_dict", None)) else hf_config.to_dict()
    d["architectures"] = [type(model).__name__]  # as save_pretrained writes them
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:  # the float parameters' dtype, as save_pretrained writes it (QLRLinear has buffers only)
        d["dtype"] = str(dtype).removeprefix("torch.")
    d.pop("quantization_config", None)
    if layers:
        from qlr.integrations.transformers import QLRConfig

        d["quantization_config"] = QLRConfig(layers={lay["name"]: lay["meta"] for lay in layers},
                                             unfused_experts=_unfused_paths(model)).to_dict()
    (directory / HF_CONFIG_NAME).write_text(json.dumps(_jsonable(d), indent=2, sort_keys=True) + "\n")
    return True


# ---- load ------------------------------------------------------------------------------------------------------
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _layer_module(directory: Path, layer: dict[str, Any]) -> QLRLinear:
    """An empty (meta-device) QLRLinear from a layer's metadata; ValueError naming the layer and the file when the
    metadata cannot describe one."""
    try:
        return QLRLinear.from_meta(layer["meta"], device="meta")
    except (KeyError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
        raise ValueError(f"{str(directory / CONFIG_NAME)!r}: layer {layer.get('name')}: its metadata does not "
                         f"describe a valid QLRLinear ({' '.join(str(e).split())}); {_RERUN}") from None


def _check_layer_tensors(directory: Path, name: str, module: QLRLinear,
                         stored: dict[str, tuple[str, list[int]]]) -> None:
    """Every buffer ``module``'s metadata implies is in the weights file ({key: (safetensors dtype, shape)}) with
    that dtype and shape; ValueError naming the layer, the tensor and both files otherwise."""
    for buf, t in module._buffers.items():
        key = f"{name}.{buf}"
        want = (_ST_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape))
        got = stored.get(key)
        if got is None:
            raise ValueError(f"{str(directory / WEIGHTS_NAME)!r} lacks tensor {key!r}, which layer {name}'s "
                             f"metadata in {CONFIG_NAME} describes; {_RERUN}")
        if tuple(got) != want:
            raise ValueError(f"layer {name}: {str(directory / WEIGHTS_NAME)!r} stores {buf} as {got[0]} {got[1]}, "
                             f"but its metadata in {CONFIG_NAME} describes {want[0]} {want[1]} (edited metadata or a "
                             f"mismatched weights file); {_RERUN}")


def _build_model(cfg: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, cfg.get("model_class") or "", None)
    ccls = getattr(transformers, cfg.get("config_class") or "", None)
    if cls is None or ccls is None or cfg.get("model_config") is None:
        raise ValueError(f"cannot rebuild model class {cfg.get('model_class')!r} with config class "
                         f"{cfg.get('config_class')!r}: not found in transformers {transformers.__version__}")
    config = ccls.from_dict(cfg["model_config"])
    with torch.device("meta"):
        return cls(config)


def load(directory: str | Path, device: str | torch.device = "cpu", *, check_hashes: bool = True) -> nn.Module:
    """Rebuild the compressed model saved by :func:`save`, on ``device``, in eval mode, ready for ``generate()``.

    Raises FileNotFoundError for a missing directory/file and ValueError, on one line, for a truncated, corrupted
    or edited checkpoint (see :func:`verify`) and for layer metadata that does not describe the stored tensors
    (naming the layer, the tensor and the files). ``check_hashes=False`` skips the data files' sha256 (not their
    sizes, nor the manifest check of qlr_config.json).
    """
    directory = Path(directory)
    cfg = verify(directory, hashes=check_hashes)
    wpath = directory / WEIGHTS_NAME
    try:
        state = load_file(str(wpath), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{str(wpath)!r} cannot be read as safetensors ({e}); {_RERUN}") from e
    model = _build_model(cfg)
    if cfg.get("unfused_experts"):
        from .models.moe import unfuse_experts

        unfuse_experts(model, cfg["unfused_experts"])
    shapes = {k: (_ST_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape)) for k, t in state.items()}
    for layer in cfg["layers"]:
        module = _layer_module(directory, layer)
        _check_layer_tensors(directory, layer["name"], module, shapes)
        try:
            replace_linear(model, layer["name"], module)
        except AttributeError as e:
            raise ValueError(f"{str(directory / CONFIG_NAME)!r}: layer {layer['name']}: {e}; {_RERUN}") from None

    extra = {n: state.pop(n) for n in cfg.get("nonpersistent_buffers", []) if n in state}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape does not fit the model described in the config
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).strip())
        raise ValueError(f"{str(wpath)!r} does not match the model described in {CONFIG_NAME}: {first}; "
                         f"{_RERUN}") from None
    tied = cfg.get("tied", {})
    missing = sorted(set(result.missing_keys) - set(tied))
    if missing or result.unexpected_keys:
        raise ValueError(f"{str(wpath)!r} does not match the model described in {CONFIG_NAME}: missing "
                         f"{missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}; {_RERUN}")
    for name, t in extra.items():
        owner, attr = _owner(model, name)
        owner.register_buffer(attr, t, persistent=False)
    for name, src in tied.items():
        src_owner, src_attr = _owner(model, src)
        owner, attr = _owner(model, name)
        setattr(owner, attr, getattr(src_owner, src_attr))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"after loading {str(directory)!r}, tensors {left[:5]} have no data; {_RERUN}")
    if cfg["layers"] and getattr(model, "config", None) is not None:
        # so that save_pretrained writes a config that from_pretrained can read back
        from .integrations.transformers import QLRConfig

        model.config.quantization_config = QLRConfig(layers={lay["name"]: lay["meta"] for lay in cfg["layers"]},
                                                     unfused_experts=cfg.get("unfused_experts", []))
    gpath = directory / GENERATION_NAME
    if gpath.is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model.eval()


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved with the checkpoint (``AutoTokenizer.from_pretrained`` on the verified directory)."""
    directory = Path(directory)
    cfg = verify(directory)
    if not any(n.startswith("tokenizer") for n in cfg["files"]):
        raise FileNotFoundError(f"{str(directory)!r} holds no tokenizer (save(..., tokenizer=...) was not given "
                                "one); load the base model's tokenizer instead")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


# ---- inspect ---------------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name → dtype, shape, data_offsets), without the data."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is too short to be a safetensors file; {_RERUN}")
        (n,) = struct.unpack("<Q", raw)
        body = f.read(n)
    try:
        if len(body) != n:
            raise ValueError("header truncated")
        header = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} has an unreadable safetensors header ({e}); {_RERUN}") from e
    header.pop("__metadata__", None)
    return header


def inspect(directory: str | Path, *, check_hashes: bool = True) -> dict[str, Any]:
    """Describe a checkpoint without loading the model, after checking that it is consistent.

    Returns a dict with the run description (method, bits, rank, budget, options, versions, model class),
    ``layers`` (one row per QLR layer: name, shape, rank, formats of Q/L/R, bits per weight from the metadata and
    measured from the stored bytes, and the recorded metrics such as act_err), ``full_precision_layers`` (selected
    layers the run kept uncompressed: name, shape, dtype, why) and the totals ``bits_per_weight_meta``
    (Σ storage_bits / Σ m·n over QLR layers, from the metadata) and ``bits_per_weight_measured`` (Σ byte sizes of
    those layers' safetensors tensors, bias excluded, × 8 / Σ m·n). The two differ only by the act-order
    permutations, which the metadata counts at ⌈log2 n⌉ bits per index and the file stores as int16/int32 (sign
    vectors are counted as the packed int32 words they are stored in).

    Raises ValueError, on one line, when the checkpoint fails :func:`verify` or is inconsistent: a stored tensor
    whose dtype/shape differs from what a layer's metadata describes; metadata whose computed storage bits differ
    from the recorded ``storage_bits``; measured bits that differ from the computed ones by more than the
    permutation storage; recorded metrics (rank, shape, bits/weight beyond the packing padding) that disagree with
    the metadata; a layer whose Q code width differs from the run's ``bits``; for a run recorded with one of
    qlr's methods, a layer whose rank differs from what that method with the run's rank/budget/options gives its
    shape, or options the method refuses; a full-precision layer missing from the file.
    """
    directory = Path(directory)
    cfg = verify(directory, hashes=check_hashes)
    wpath = directory / WEIGHTS_NAME
    header = _safetensors_header(wpath)
    stored = {k: (h.get("dtype"), list(h.get("shape", []))) for k, h in header.items()}
    rows, problems, tot_meta, tot_meas, tot_w = [], [], 0, 0, 0
    for layer in cfg["layers"]:
        name = layer["name"]
        mod = _layer_module(directory, layer)
        _check_layer_tensors(directory, name, mod, stored)
        m, n = mod.out_features, mod.in_features
        bits_meta = mod.storage_bits()
        keys = [f"{name}.{b}" for b in mod._buffers if b != "bias"]
        bits_meas = sum((header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) * 8 for k in keys)
        problems += layer_inconsistencies(cfg, layer, mod, bits_meta, bits_meas)
        tot_meta, tot_meas, tot_w = tot_meta + bits_meta, tot_meas + bits_meas, tot_w + m * n
        rows.append({"name": name, "shape": [m, n], "rank": mod.rank, "desc": mod.extra_repr(),
                     "bits_per_weight_meta": bits_meta / (m * n), "bits_per_weight_measured": bits_meas / (m * n),
                     **{k: v for k, v in layer.get("metrics", {}).items() if k != "bits_per_weight"}})
    kept = []
    qlr_names = {layer["name"] for layer in cfg["layers"]}
    for name, rec in (cfg.get("full_precision_layers") or {}).items():
        got = stored.get(f"{name}.weight")
        if name in qlr_names or got is None or not isinstance(rec.get("shape"), list) or got[1] != rec["shape"]:
            problems.append(f"layer {name} is recorded as kept in full precision, but the file holds no "
                            f"{rec.get('shape')} weight for it")
        kept.append({"name": name, "shape": rec.get("shape"), "dtype": rec.get("dtype"),
                     "reason": rec.get("full_precision")})
    problems = list(dict.fromkeys(problems))  # a bad plan is reported once, not once per layer
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{str(directory)!r} is inconsistent: {problems[0]}{more}; {_RERUN}")
    total_bytes = sum(rec["bytes"] for rec in cfg["files"].values())
    tensor_bytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
    return {
        "directory": str(directory),
        "format_version": cfg["format_version"], "qlr_version": cfg.get("qlr_version"),
        "model_class": cfg.get("model_class"), "method": cfg.get("method"), "bits": cfg.get("bits"),
        "rank": cfg.get("rank"), "budget": cfg.get("budget", (cfg.get("extra") or {}).get("budget")),
        "options": cfg.get("options"), "calibration_sha256": cfg.get("calibration_sha256"),
        "num_layers": len(rows), "num_weights": tot_w,
        "bits_per_weight_meta": tot_meta / tot_w if tot_w else math.nan,
        "bits_per_weight_measured": tot_meas / tot_w if tot_w else math.nan,
        "total_bytes": total_bytes, "layers": rows, "full_precision_layers": kept,
        # resident tensor memory of the loaded model (tensors load as stored; tied ones once), and what the
        # compressed linears would take as fp32 nn.Linear weights
        "memory_bytes": tensor_bytes, "linear_bytes": tot_meas // 8, "linear_fp32_bytes": 4 * tot_w,
    }
