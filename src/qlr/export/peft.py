"""Export W ≈ Q + L R as a GPTQ checkpoint of Q (the base) plus a PEFT LoRA adapter holding L R.

``export(run_dir, out_dir)`` writes::

    out_dir/base/      config.json (with quantization_config), quantize_config.json, model.safetensors,
                       generation_config.json and tokenizer files when the run has them
    out_dir/adapter/   adapter_config.json, adapter_model.safetensors          (absent when every rank is 0)
    out_dir/qlr_export.json                                                      the report :func:`export` returns

**Base (GPTQ).** Every compressed linear (out × in = m × n) becomes four tensors, with ``pf = 32 / bits``:

    qweight  int32 (n·bits/32, m)   column o is one little-endian bit stream over the inputs: code of input i at
                                    stream bits [i·bits, (i+1)·bits), stream bit t in word t // 32 at bit t % 32
                                    (2/4/8 bits: word r holds inputs r·pf … r·pf+pf−1; 3 bits: 32 inputs per 3
                                    words, codes 10 and 21 straddle, as AutoGPTQ's ``pack``)
    qzeros   int32 (groups, m·bits/32)  the zero points, one bit stream per group along the outputs
    scales   fp16  (groups, m)
    g_idx    int32 (n,)              group of input i

    W[o, i] = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o])

The zero point z is stored per ``checkpoint_format``: ``"gptq"`` (v1, the default: read by every GPTQ engine)
stores z − 1 and readers add 1 back; ``"gptq_v2"`` stores z itself (GPTQModel, recent vLLM). v1 cannot hold
z = 0 (it would be −1: AutoGPTQ's overflow bug), so a run with such a group is refused in v1 with a pointer to
``gptq_v2``. Loading (checked with GPTQModel 7.7 on CPU): transformers' ``from_pretrained`` reads both formats but
ignores ``dynamic`` (per-layer bits, linears left fp16: it then fails on tensor shapes); ``GPTQModel.load`` honours
``dynamic`` but refuses v1 with ``sym=False`` from a quantizer other than GPTQModel, so use ``gptq_v2`` there.
Q's codes, scales and zeros are copied, never re-rounded: only a scalar integer grid (qlr's
``GridCodec``, ``fmt="int"``) at 2, 3, 4 or 8 bits, with fp16-representable scales and no incoherence rotation,
exports; an act-order permutation becomes ``g_idx`` (stored column j of qlr is input ``perm[j]``) with
``desc_act``. Everything else (E8P lattice codes, Hadamard rotation, NormalFloat levels, 5–7 bits) is refused
with a one-line ValueError naming the compression setting that does export. Every other tensor of the model
(embeddings, norms, lm_head, biases) is written in fp16; tied weights once.

**Adapter (PEFT LoRA).** ``lora_A = R`` (r × n) and ``lora_B = L`` (m × r), decoded from whatever codec holds
them and rounded to fp16 (the one lossy step; its effect on W is in the report). ``r`` is the largest rank,
``rank_pattern`` gives the others and ``lora_alpha``/``alpha_pattern`` equal each layer's rank, so PEFT's scale
alpha/r is 1 everywhere (engines that ignore alpha, as GPTQModel's EoRA loader, get the same product).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from qlr.nn.codecs import GridCodec, codec_for
from qlr.nn.qlinear import QLRLinear
from qlr.quant.packing import pack, unpack

__all__ = ["export", "gptq_layer", "lora_factors", "GPTQLayer", "CHECKPOINT_FORMATS", "GPTQ_BITS"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)
_EXPORTABLE = "--opt q_quantizer=gptq --opt incoherence=false"  # the odlri/caldera settings giving a scalar grid


@dataclass(frozen=True)
class GPTQLayer:
    """One linear in GPTQ layout (see the module docstring) and the float32 Q (m × n) it decodes to."""

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    bits: int
    group_size: int  # -1 = one group per row (qlr's group_size 0)
    sym: bool
    desc_act: bool
    Q: Tensor

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx")}

    def storage_bits(self) -> int:
        """Bits as a GPTQ engine stores them: packed codes and zeros, fp16 scales, int32 g_idx."""
        return 32 * (self.qweight.numel() + self.qzeros.numel() + self.g_idx.numel()) + 16 * self.scales.numel()


# ---- per-layer conversion --------------------------------------------------------------------------------------
def _factor_buffers(mod: QLRLinear, f: str) -> dict[str, Tensor]:
    p = f + "_"
    return {k[len(p):]: v for k, v in mod.named_buffers(recurse=False) if k.startswith(p)}


def _unsupported(mod: QLRLinear, method: str | None) -> str | None:
    """Why ``mod``'s Q cannot be written as GPTQ without re-rounding, with the setting that can; None if it can."""
    qm = mod.meta["q"]
    redo = f"qlr compress --method {method or 'odlri'} {_EXPORTABLE}"
    if qm is None:
        return "it has no Q (L R only); GPTQ needs a quantized base weight"
    if qm["codec"] == "e8p":
        return f"Q is E8P lattice-coded, which GPTQ cannot hold; recompress on the scalar grid: {redo}"
    if mod.meta["rotation"] is not None:
        return f"it is stored Hadamard-rotated (incoherence), which GPTQ cannot express; recompress with {redo}"
    if qm["codec"] != GridCodec.name:
        return f"Q uses the {qm['codec']!r} codec; only qlr's scalar integer grid exports ({redo})"
    if qm["fmt"] != "int":
        return ("Q is on NormalFloat levels (loftq), not an integer grid; recompress with an integer-grid method, "
                f"e.g. qlr compress --method odlri {_EXPORTABLE}, or --method qera-exact")
    if qm["bits"] not in GPTQ_BITS:
        return f"Q has {qm['bits']}-bit codes and GPTQ engines read 2, 3, 4 or 8; recompress with --bits 2, 3, 4 or 8"
    if qm["zero"] == "fp16":
        return "Q has non-integer zero points and GPTQ's are integers; recompress with the default integer grid"
    m, n = qm["shape"]
    if (n * qm["bits"]) % 32 or (m * qm["bits"]) % 32:
        return (f"its shape {m} × {n} does not fill whole 32-bit GPTQ words at {qm['bits']} bits (in and out "
                "features must be multiples of 32 / gcd(32, bits))")
    return None


def _scales(bufs: dict[str, Tensor], meta: dict[str, Any], name: str) -> Tensor:
    """Q's scales (m, groups) as fp16, checking that fp16 holds them exactly."""
    s = bufs["scale"]
    if meta["scale_bits"] == 16:
        return s
    s = torch.exp2(s.float()) if meta["scale_bits"] == 8 else s.float()
    if not torch.equal(s.half().float(), s):
        raise ValueError(f"cannot export {name} to GPTQ: Q's {meta['scale_bits']}-bit scales are not fp16 values "
                         "and GPTQ stores fp16 scales; recompress with 16-bit scales")
    return s.half()


def gptq_layer(mod: QLRLinear, checkpoint_format: str = "gptq", name: str = "layer",
               method: str | None = None) -> GPTQLayer:
    """Q of ``mod`` in GPTQ layout, bit for bit the same grid (no re-rounding).

    Raises ValueError (one line, naming ``name`` and the setting that does export) when Q is not a scalar integer
    grid GPTQ can hold, or when ``checkpoint_format="gptq"`` (v1, stores z − 1) meets a zero point of 0."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    why = _unsupported(mod, method)
    if why is not None:
        raise ValueError(f"cannot export {name} to GPTQ: {why}")
    meta, bufs = mod.meta["q"], _factor_buffers(mod, "q")
    spec = GridCodec.spec(meta)
    bits, (m, n) = spec.bits, meta["shape"]
    groups, glen = spec.groups(n), spec.group_len(n)
    codes = unpack(bufs["codes"], bits, n)  # (m, n), stored column order
    scale = _scales(bufs, meta, name)  # (m, groups) fp16
    if meta["zero"] == "packed":
        zero = unpack(bufs["zero"], bits, m * groups).reshape(m, groups)
    else:  # symmetric grid: the implicit zero point
        zero = torch.full((m, groups), (spec.maxq + 1) // 2, dtype=torch.uint8)
    g_stored = torch.arange(n) // glen
    perm = bufs.get("perm")
    if perm is None:
        codes_in, g_idx = codes, g_stored
    else:  # stored column j is input perm[j]
        perm = perm.long()
        codes_in = torch.empty_like(codes)
        codes_in[:, perm] = codes
        g_idx = torch.empty_like(g_stored)
        g_idx[perm] = g_stored
    if checkpoint_format == "gptq":
        low = int(zero.min())
        if low < 1:
            count = int((zero == 0).sum())
            raise ValueError(f"cannot export {name} as GPTQ v1: {count} group(s) have zero point 0, which v1 "
                             "stores as z − 1 = −1; pass --opt checkpoint_format=gptq_v2 (stores z as is)")
        stored_zero = zero - 1
    else:
        stored_zero = zero
    Q = (codes_in.float() - zero.float()[:, g_idx]) * scale.float()[:, g_idx]
    return GPTQLayer(qweight=pack(codes_in, bits).T.contiguous(),
                     qzeros=pack(stored_zero.T.contiguous(), bits),
                     scales=scale.T.contiguous(), g_idx=g_idx.to(torch.int32), bits=bits,
                     group_size=spec.group_size or -1, sym=meta["zero"] == "none", desc_act=perm is not None, Q=Q)


def lora_factors(mod: QLRLinear) -> tuple[Tensor, Tensor] | None:
    """(A, B) = (R (r × n), L (m × r)) in fp16, decoded from their codecs; None when the rank is 0. ``mod`` must
    not be rotated (R and L are then in the model's own domain)."""
    if mod.rank == 0 or mod.meta["l"] is None:
        return None
    out = []
    for f in ("r", "l"):
        meta, bufs = mod.meta[f], _factor_buffers(mod, f)
        codec = codec_for(name=meta["codec"])
        dense = codec.dense(bufs, meta)
        perm = codec.column_perm(bufs)
        if perm is not None:
            orig = torch.empty_like(dense)
            orig[:, perm.long()] = dense
            dense = orig
        out.append(dense.to(torch.float16).contiguous())
    return out[0], out[1]


# ---- whole model -----------------------------------------------------------------------------------------------
def _quant_config(layers: dict[str, GPTQLayer], excluded: list[str], checkpoint_format: str) -> dict[str, Any]:
    """GPTQModel-style quantization_config: the most common (bits, group_size) globally, ``dynamic`` overrides
    for the other layers ("+:" regex) and exclusions for linears qlr did not compress ("-:" regex)."""
    import re

    from .._version import __version__

    common = Counter((g.bits, g.group_size) for g in layers.values()).most_common(1)[0][0]
    dynamic: dict[str, dict[str, Any]] = {}
    for name, g in layers.items():
        if (g.bits, g.group_size) != common:
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": g.bits, "group_size": g.group_size}
    for name in excluded:
        dynamic[f"-:^{re.escape(name)}$"] = {}
    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": common[0], "group_size": common[1],
        "desc_act": any(g.desc_act for g in layers.values()), "sym": all(g.sym for g in layers.values()),
        "lm_head": False, "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
        "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "meta": {"quantizer": [f"qlr:{__version__}"]},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {str(out_dir)!r} exists and is not an empty directory; choose a new or empty one")


def _fp16_state(model: torch.nn.Module, skip: set[str]) -> dict[str, Tensor]:
    """Every persistent tensor not under a module in ``skip``: floats in fp16, tied duplicates dropped."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        t = t.detach().cpu()
        out[key] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
    return out


def export(run_dir: Path, out_dir: Path, *, checkpoint_format: str = "gptq",
           base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """Write the qlr checkpoint ``run_dir`` as ``out_dir/base`` (GPTQ) + ``out_dir/adapter`` (PEFT LoRA).

    Args:
        run_dir: a checkpoint written by :func:`qlr.save` / ``qlr compress``.
        out_dir: created; must not exist or be empty.
        checkpoint_format: ``"gptq"`` (v1, zero points stored as z − 1; default) or ``"gptq_v2"`` (z as is).
        base_model_name_or_path: what the adapter config names as its base (default: ``out_dir/base`` resolved).

    Returns:
        The report (also written to ``out_dir/qlr_export.json``): per layer and in total, bits/weight as qlr stores
        the layer vs as the engine stores it (GPTQ base and fp16 adapter), and the max |W_qlr − W_exported| over
        W = Q + L R (from the fp16 rounding of L and R; Q is exact).

    Raises:
        ValueError: a layer GPTQ cannot hold exactly (the message names the setting that exports), a bad option,
            or a non-empty ``out_dir``.
    """
    from qlr import io

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    _check_out(out_dir)
    cfg = io.verify(run_dir)
    if cfg.get("unfused_experts"):
        raise ValueError(f"{str(run_dir)!r} holds mixture-of-experts modules that qlr split into per-expert linears "
                         f"({cfg['unfused_experts'][:2]}); the GPTQ + PEFT export covers dense models only")
    model = io.load(run_dir, check_hashes=False)
    qlr_layers = {n: m for n, m in model.named_modules() if isinstance(m, QLRLinear)}
    if not qlr_layers:
        raise ValueError(f"{str(run_dir)!r} has no compressed linears to export")
    gptq = {n: gptq_layer(m, checkpoint_format, n, cfg.get("method")) for n, m in qlr_layers.items()}
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = [n for n, m in model.named_modules()
                if type(m) is torch.nn.Linear and m is not lm_head and n.rpartition(".")[2] != "lm_head"]

    base, adapter = out_dir / "base", out_dir / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    tensors = _fp16_state(model, set(qlr_layers))
    rows, lora, ranks = [], {}, {}
    for name, mod in qlr_layers.items():
        g = gptq[name]
        tensors.update(g.tensors(name))
        if mod.meta["bias"] is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().to(torch.float16).contiguous()
        W_exp = g.Q
        ab = lora_factors(mod)
        weights = mod.out_features * mod.in_features
        adapter_bits = 0
        if ab is not None:
            A, B = ab
            lora[f"base_model.model.{name}.lora_A.weight"] = A
            lora[f"base_model.model.{name}.lora_B.weight"] = B
            ranks[name] = mod.rank
            W_exp = W_exp + B.float() @ A.float()
            adapter_bits = 16 * (A.numel() + B.numel())
        W_qlr = mod.dequantize_weight()
        rows.append({"name": name, "shape": [mod.out_features, mod.in_features], "bits": g.bits,
                     "group_size": g.group_size, "rank": mod.rank, "weights": weights,
                     "qlr_bits_per_weight": mod.storage_bits() / weights,
                     "gptq_bits_per_weight": g.storage_bits() / weights,
                     "adapter_bits_per_weight": adapter_bits / weights,
                     "engine_bits_per_weight": (g.storage_bits() + adapter_bits) / weights,
                     "max_abs_diff": float((W_qlr - W_exp).abs().max()),
                     "max_abs_weight": float(W_qlr.abs().max())})
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})

    qcfg = _quant_config(gptq, excluded, checkpoint_format)
    hf = json.loads(model.config.to_json_string(use_diff=False))
    hf["architectures"] = [cfg.get("model_class") or type(model).__name__]
    hf["dtype"] = "float16"  # transformers 5's key; older configs also carry torch_dtype
    if "torch_dtype" in hf:
        hf["torch_dtype"] = "float16"
    hf["quantization_config"] = qcfg
    (base / "config.json").write_text(json.dumps(hf, indent=2))
    (base / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    copied = []
    for fname in cfg.get("files", {}):  # tokenizer files and generation_config.json, as qlr.save wrote them
        if fname not in (io.WEIGHTS_NAME, io.CONFIG_NAME, "config.json"):  # config.json: qlr's, replaced above
            (base / fname).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / fname, base / fname)
            copied.append(fname)

    if lora:
        adapter.mkdir(parents=True, exist_ok=True)
        r = max(ranks.values())
        others = {n: k for n, k in ranks.items() if k != r}
        acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model_name_or_path or str(base.resolve()), "revision": None,
                "r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": dict(others),
                "target_modules": sorted(ranks), "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
                "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}
        (adapter / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
        save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})

    total = sum(x["weights"] for x in rows)

    def mean(key: str) -> float:
        return sum(x[key] * x["weights"] for x in rows) / total

    report = {
        "format": "peft", "run": str(run_dir), "out": str(out_dir), "base": str(base),
        "adapter": str(adapter) if lora else None, "checkpoint_format": checkpoint_format,
        "zero_point_convention": "stored z - 1 (v1), readers add 1" if checkpoint_format == "gptq" else
        "stored z (v2)",
        "layers_exported": len(rows), "linears_left_fp16": excluded, "max_rank": max(ranks.values(), default=0),
        "qlr_bits_per_weight": mean("qlr_bits_per_weight"), "gptq_bits_per_weight": mean("gptq_bits_per_weight"),
        "adapter_bits_per_weight": mean("adapter_bits_per_weight"),
        "engine_bits_per_weight": mean("engine_bits_per_weight"),
        "max_abs_diff": max(x["max_abs_diff"] for x in rows),
        "lossy": "Q exact; L and R rounded to fp16; other tensors (embeddings, norms, lm_head, biases) cast to fp16",
        "copied_files": copied, "layers": rows,
    }
    (out_dir / "qlr_export.json").write_text(json.dumps(report, indent=2))
    return report
