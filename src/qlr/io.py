"""Compressed checkpoints: save, verify, load and inspect a model whose linears are :class:`QLRLinear`.

A checkpoint is a directory::

    model.safetensors        every tensor of the model (QLRLinear buffers, other parameters, non-persistent
                             buffers such as rotary inv_freq); tied duplicates are stored once
    config.json              the transformers config plus a ``quantization_config`` holding every QLR layer's
                             metadata, so ``AutoModelForCausalLM.from_pretrained(directory)`` reads the checkpoint
                             too (see :mod:`qlr.integrations.transformers`); only for transformers models
    qlr_config.json          format/qlr versions, method/bits/rank/options, calibration hash, the base model's
                             transformers config and class, each QLR layer's ``qlr_meta()`` and metrics, the
                             tie map, and the sha256 + byte size of every other file
    generation_config.json   when the model has one
    tokenizer files          when a tokenizer is given to :func:`save`

Nothing is pickled. :func:`load` verifies sizes and hashes, rebuilds the transformers model on the meta device,
swaps in empty QLRLinear modules from their metadata, fills everything with ``load_state_dict(assign=True)`` and
re-ties shared weights (e.g. SmolLM2's embeddings and lm_head).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import qlr
from qlr.nn.qlinear import QLRLinear

__all__ = ["save", "load", "load_tokenizer", "inspect", "verify", "replace_linear", "FORMAT_VERSION",
           "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 1
CONFIG_NAME = "qlr_config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_NAME = "generation_config.json"
HF_CONFIG_NAME = "config.json"
_RERUN = "re-run `qlr compress` to recreate the checkpoint"
_INFO_KEYS = ("method", "bits", "rank", "options", "calibration_sha256", "layer_metrics")


# ---- module surgery --------------------------------------------------------------------------------------------
def replace_linear(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` (e.g. ``"model.layers.0.self_attn.q_proj"``); returns the old
    submodule. Raises AttributeError naming the path when it does not exist."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, attr) or not isinstance(getattr(parent, attr), nn.Module):
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}")
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def _unfused_paths(model: nn.Module) -> list[str]:
    """Paths of fused expert modules that qlr split into per-expert linears (``load`` splits them again)."""
    from .models.moe import UnfusedExperts

    return [name for name, mod in model.named_modules() if isinstance(mod, UnfusedExperts)]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# ---- small file helpers ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    from .data import file_sha256

    return file_sha256(path)


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
                         f"({qlr.__version__}) reads ({FORMAT_VERSION}); upgrade qlr")
    return cfg


def verify(directory: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check every data file listed in the checkpoint config: present, right byte size, and (with ``hashes``)
    right sha256. Returns the parsed config; raises FileNotFoundError / ValueError naming the bad file."""
    directory = Path(directory)
    cfg = _read_config(directory)
    for name, rec in cfg["files"].items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is missing from the checkpoint; {_RERUN}")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ValueError(f"{str(path)!r} has {size} bytes but the checkpoint recorded {rec['bytes']} "
                             f"(truncated or replaced); {_RERUN}")
        if hashes and _sha256(path) != rec["sha256"]:
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
        info: optional run description: ``method``, ``bits``, ``rank``, ``options`` (dict),
            ``calibration_sha256`` (str) and ``layer_metrics`` ({layer name: {"act_err": float, ...}}); other
            keys are kept under ``"extra"``.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    info = dict(info or {})
    if directory.exists():
        if not directory.is_dir():
            raise NotADirectoryError(f"{str(directory)!r} exists and is not a directory")
        old = directory / CONFIG_NAME
        if old.is_file():
            try:
                for name in json.loads(old.read_text()).get("files", {}):
                    (directory / name).unlink(missing_ok=True)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass
            old.unlink()
        elif any(directory.iterdir()):
            raise ValueError(f"{str(directory)!r} is not empty and is not a qlr checkpoint; refusing to write "
                             "into it (choose an empty or new directory)")
    directory.mkdir(parents=True, exist_ok=True)

    tensors, tied, extra = _split_state(model)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "qlr_format": str(FORMAT_VERSION)})
    written = [WEIGHTS_NAME]
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(str(directory))
        written.append(GENERATION_NAME)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        for p in tokenizer.save_pretrained(str(directory)):
            rel = Path(p).resolve().relative_to(directory.resolve()).as_posix()
            if (directory / rel).is_file() and rel not in written:
                written.append(rel)

    metrics = info.get("layer_metrics", {}) or {}
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, QLRLinear):
            lm = {"bits_per_weight": mod.bits_per_weight, **metrics.get(name, {})}
            layers.append({"name": name, "meta": mod.qlr_meta(), "metrics": lm})
    if _write_hf_config(model, directory, layers):
        written.append(HF_CONFIG_NAME)
    hf_config = getattr(model, "config", None)
    cfg = {
        "format_version": FORMAT_VERSION,
        "qlr_version": qlr.__version__,
        "method": info.get("method"),
        "bits": info.get("bits"),
        "rank": info.get("rank"),
        "options": info.get("options", {}),
        "calibration_sha256": info.get("calibration_sha256"),
        "extra": {k: v for k, v in info.items() if k not in _INFO_KEYS},
        "model_class": type(model).__name__,
        "config_class": type(hf_config).__name__ if hf_config is not None else None,
        "model_config": hf_config.to_dict() if hf_config is not None else None,
        "tied": tied,
        "nonpersistent_buffers": extra,
        "unfused_experts": _unfused_paths(model),
        "layers": layers,
        "files": {n: {"bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)} for n in written},
    }
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(_jsonable(cfg), indent=2))
    tmp.replace(directory / CONFIG_NAME)  # written last: a checkpoint without it is incomplete
    return directory


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

    Raises FileNotFoundError for a missing directory/file and ValueError for a truncated, corrupted or
    inconsistent checkpoint, naming the file.
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
    for layer in cfg["layers"]:
        replace_linear(model, layer["name"], QLRLinear.from_meta(layer["meta"], device="meta"))

    extra = {n: state.pop(n) for n in cfg.get("nonpersistent_buffers", []) if n in state}
    result = model.load_state_dict(state, strict=False, assign=True)
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
    """Describe a checkpoint without loading the model.

    Returns a dict with the run description (method, bits, rank, options, versions, model class), ``layers``
    (one row per QLR layer: name, shape, rank, formats of Q/L/R, bits per weight from the metadata and measured
    from the stored bytes, and the recorded metrics such as act_err) and the totals ``bits_per_weight_meta``
    (Σ storage_bits / Σ m·n over QLR layers, from the metadata) and ``bits_per_weight_measured`` (Σ byte sizes of
    those layers' safetensors tensors, bias excluded, × 8 / Σ m·n). The two differ only by the permutation and
    sign vectors, which the metadata counts at ⌈log2 n⌉ and 1 bit and the file stores as int16/int32 and int8.
    """
    directory = Path(directory)
    cfg = verify(directory, hashes=check_hashes)
    header = _safetensors_header(directory / WEIGHTS_NAME)
    rows, tot_meta, tot_meas, tot_w = [], 0, 0, 0
    for layer in cfg["layers"]:
        name, meta = layer["name"], layer["meta"]
        mod = QLRLinear.from_meta(meta, device="meta")
        m, n = mod.out_features, mod.in_features
        bits_meta = mod.storage_bits()
        keys = [f"{name}.{b}" for b in mod._buffers if b != "bias"]
        absent = [k for k in keys if k not in header]
        if absent:
            raise ValueError(f"{str(directory / WEIGHTS_NAME)!r} lacks {absent[:3]} listed in {CONFIG_NAME}; "
                             f"{_RERUN}")
        bits_meas = sum((header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) * 8 for k in keys)
        tot_meta, tot_meas, tot_w = tot_meta + bits_meta, tot_meas + bits_meas, tot_w + m * n
        rows.append({"name": name, "shape": [m, n], "rank": mod.rank, "desc": mod.extra_repr(),
                     "bits_per_weight_meta": bits_meta / (m * n), "bits_per_weight_measured": bits_meas / (m * n),
                     **{k: v for k, v in layer.get("metrics", {}).items() if k != "bits_per_weight"}})
    total_bytes = sum(rec["bytes"] for rec in cfg["files"].values())
    tensor_bytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
    return {
        "directory": str(directory),
        "format_version": cfg["format_version"], "qlr_version": cfg.get("qlr_version"),
        "model_class": cfg.get("model_class"), "method": cfg.get("method"), "bits": cfg.get("bits"),
        "rank": cfg.get("rank"), "options": cfg.get("options"), "calibration_sha256": cfg.get("calibration_sha256"),
        "num_layers": len(rows), "num_weights": tot_w,
        "bits_per_weight_meta": tot_meta / tot_w if tot_w else math.nan,
        "bits_per_weight_measured": tot_meas / tot_w if tot_w else math.nan,
        "total_bytes": total_bytes, "layers": rows,
        # resident tensor memory of the loaded model (tensors load as stored; tied ones once), and what the
        # compressed linears would take as fp32 nn.Linear weights
        "memory_bytes": tensor_bytes, "linear_bytes": tot_meas // 8, "linear_fp32_bytes": 4 * tot_w,
    }
