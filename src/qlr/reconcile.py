"""Consistency checks of a saved checkpoint: a layer's metadata, its recorded metrics, the bytes stored for it and
the run's plan (method, bits, rank/budget, options) must tell the same story. :func:`qlr.io.inspect` reports the
first problem found; each check here returns messages instead of raising."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qlr.nn.qlinear import QLRLinear

__all__ = ["layer_inconsistencies"]


def _q_bits(meta: Mapping[str, Any] | None) -> int | None:
    """Code width of a factor per its codec metadata: a grid's ``bits``, 2 per E8P stage; None for dense."""
    if not meta:
        return None
    if meta.get("codec") == "grid":
        return meta.get("bits")
    if meta.get("codec") == "e8p":
        return 2 * meta.get("stages", 0)
    return None


def _perm_overhead(mod: QLRLinear) -> int:
    """Bits by which the file exceeds :meth:`QLRLinear.storage_bits`: each act-order permutation index is stored
    as int16/int32 but counted at ⌈log2 n⌉ bits; everything else (packed words, sign words) is counted as stored."""
    extra = 0
    for f in ("q", "l", "r"):
        perm = getattr(mod, f"{f}_perm", None)
        if perm is not None:
            n = perm.numel()
            extra += n * (perm.element_size() * 8 - max(1, math.ceil(math.log2(n))))
    return extra


def _registered_methods() -> list[str]:
    from qlr.decompose.base import methods

    return methods()


def _plan_rank(cfg: Mapping[str, Any], m: int, n: int) -> tuple[str | None, int | None]:
    """(why the recorded plan cannot be rebuilt or None, the rank it gives an m × n layer: 0 for Q-only methods)."""
    from qlr.calibration.pipeline import CompressionPlan

    budget = cfg.get("budget", (cfg.get("extra") or {}).get("budget"))
    plan = CompressionPlan(method=cfg["method"], bits=cfg.get("bits"), rank=cfg.get("rank"), budget=budget,
                           options=dict(cfg.get("options") or {}))
    try:
        plan.check()
        rank = plan.rank_for(m, n)
    except (ValueError, TypeError) as e:
        return " ".join(str(e).split()), None
    return None, (0 if rank is None else rank)


def layer_inconsistencies(cfg: Mapping[str, Any], layer: Mapping[str, Any], mod: QLRLinear, bits_meta: int,
                          bits_meas: int) -> list[str]:
    """What is inconsistent between a layer's metadata, its recorded metrics, its stored bytes and the run's
    top-level method/bits/rank (see :func:`qlr.io.inspect`), one message per problem; empty when all agree.

    ``cfg``: the checkpoint's ``qlr_config.json``; ``layer``: its entry for this layer (name, meta, metrics);
    ``mod``: the layer rebuilt from the metadata; ``bits_meta``: ``mod.storage_bits()``; ``bits_meas``: the bytes
    its buffers (bias excluded) take in the weights file, × 8."""
    name, meta, met = layer["name"], layer["meta"], layer.get("metrics") or {}
    m, n, r = mod.out_features, mod.in_features, mod.rank
    out = []
    if meta.get("storage_bits") is not None and meta["storage_bits"] != bits_meta:
        out.append(f"layer {name}: its metadata computes {bits_meta} storage bits but records "
                   f"{meta['storage_bits']}")
    explained = _perm_overhead(mod)
    if bits_meas - bits_meta != explained:
        out.append(f"layer {name}: measured {bits_meas / (m * n):.4f} bits/weight from the file, computed "
                   f"{bits_meta / (m * n):.4f} from the metadata; the permutation storage explains "
                   f"{explained} bits of the difference, not {bits_meas - bits_meta}")
    if "rank" in met and met["rank"] != r:
        out.append(f"layer {name}: metadata rank {r}, recorded metrics rank {met['rank']}")
    if "shape" in met and list(met["shape"]) != [m, n]:
        out.append(f"layer {name}: metadata shape {m} × {n}, recorded metrics shape {met['shape']}")
    if isinstance(met.get("bits_per_weight"), (int, float)) and "act_err" in met:
        # the decomposition's exact count, without the tail padding of packed words: ≤ 31 bits per row of packed
        # grid codes, per packed zero-point buffer and per sign-vector buffer
        counted = round(met["bits_per_weight"] * m * n)
        padding = 62 if meta.get("rotation") else 0
        for f in ("q", "l", "r"):
            fm = meta.get(f) or {}
            if fm.get("codec") == "grid":
                padding += 31 * fm["shape"][0] + (31 if fm.get("zero") == "packed" else 0)
        if not 0 <= bits_meta - counted <= padding:
            out.append(f"layer {name}: computed {bits_meta / (m * n):.4f} bits/weight from the metadata, but the "
                       f"run recorded {met['bits_per_weight']:.4f}")
    if cfg.get("bits") is not None:
        qb = _q_bits(meta.get("q"))
        if qb is not None and qb != cfg["bits"]:
            out.append(f"layer {name}: Q has {qb}-bit codes, the run says bits={cfg['bits']}")
    if cfg.get("method") in _registered_methods():  # a label of the caller's own (io.save's info) is not checked
        why, want = _plan_rank(cfg, m, n)
        if why is not None:
            out.append(f"the recorded plan (method {cfg['method']!r}, bits {cfg.get('bits')}, rank "
                       f"{cfg.get('rank')}, options {cfg.get('options')}) is not a valid qlr plan: {why}")
        elif want != r:
            out.append(f"layer {name}: rank {r}, but method {cfg['method']} with rank={cfg.get('rank')}, "
                       f"budget={cfg.get('budget', (cfg.get('extra') or {}).get('budget'))} gives {want} for "
                       f"{m} × {n}")
    return out
