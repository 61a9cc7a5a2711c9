"""Sequential, block-by-block compression of a causal LM (GPTQ's streaming loop, llm-compressor's pipeline).

    split fused mixture-of-experts weights into per-expert linears (qlr.models.moe)
    inputs ← hidden states entering block 0, and every block's call arguments (masks, rotary tables, ...),
             recorded with the blocks' forwards stubbed out (embedding and mask/rotary set-up run once)
    for each decoder block (found from the module tree, qlr.models.registry):
        run the FP block on the inputs with input hooks → H = E[x xᵀ] (float64) and mean |x| per linear; linears
        that read the same tensor share one accumulator; an expert no token reached borrows its siblings' H
        decompose each selected linear (or reload it from the resume directory) and swap in a QLRLinear
        run the *compressed* block on the inputs → the next block's inputs (errors propagate, as in GPTQ)

The pieces: the block calibration (inputs, hooks, statistics) is :mod:`qlr.calibration.blocks`; one layer is
:func:`compress_linear`; finished layers go to and come back from a :class:`ResumeStore`; :func:`compress_blocks`
strings them together. Every random draw of a method has its own generator seeded from ``seed``: the caller's
global torch RNG is left alone.

Peak memory: the model, one block's inputs/outputs for the calibration batch, and one block's H matrices.
Finished layers are written to ``work_dir`` as they complete, next to the run's fingerprint; a rerun with
``resume=True`` checks that it is the same run (model weights and config, plan, calibration token ids, seed, batch
size, device, qlr version) and that each finished layer passes its checksum (:mod:`qlr.calibration.workdir`),
reloads them instead of recomputing, and yields the same model as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..decompose.base import decompose, get_method, make_config, resolve_rank, validate_weight
from ..models.moe import unfuse_experts
from ..models.registry import find_blocks, iter_linears, linear_weight, select_layers
from ..models.surgery import replace_linear
from ..nn.qlinear import QLRLinear
from .blocks import BlockInputs, Calls, calibrate_block, capture_block_inputs, model_device, run_block
from .workdir import load_layer, open_work_dir, run_fingerprint, save_layer

__all__ = ["BlockInputs", "CompressionPlan", "capture_block_inputs", "compress_blocks", "compress_linear",
           "LayerFailed", "ResumeStore", "resolve_rank", "select_linears", "check_model",
           "run_fingerprint"]


@dataclass
class CompressionPlan:
    """What to do to every selected linear: method, bits, rank (int, fraction or per-layer by ``budget``), and
    method options. ``layers`` is a regex over model-relative linear names (None = every decoder linear).

    :meth:`check` validates everything that does not depend on the model, :meth:`check_shapes` what does (ranks
    and the budget per weight shape); :func:`check_model` runs both on a model before any calibration."""

    method: str = "odlri"
    bits: int = 2
    rank: int | float | None = None
    budget: float | None = None
    layers: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError for an unknown method or option, unsupported ``bits``/options (the method's config
        validates them), a ``rank`` that is neither an integer >= 0 nor a fraction in (0, 1), a non-positive
        ``budget``, or a ``layers`` pattern that is not a valid regular expression."""
        get_method(self.method)
        if "rank" in self.options:
            raise ValueError("pass the rank as rank=/--rank, not as a method option")
        if self.rank is not None:
            resolve_rank(self.rank, 1 << 20, 1 << 20)  # type and range only; the shape comes later
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget)
                                            and self.budget > 0):
            raise ValueError(f"budget must be a positive number of bits per weight, got {self.budget!r}")
        make_config(self.method, bits=self.bits, **self.options)
        select_layers((), self.layers)  # a pattern that is not a valid regular expression

    def _layer_config(self, m: int, n: int) -> Any:
        cfg = make_config(self.method, bits=self.bits, **self.options)
        if hasattr(cfg, "resolve"):  # "auto" quantizers: what this shape gets (budget ranks are multiples of 8)
            cfg = cfg.resolve(m, n)
        return cfg

    def q_bits_per_weight(self, m: int, n: int) -> float:
        """What Q alone costs for an m × n weight under this plan, in bits per weight (codes, scales/zeros or
        lattice scales, and the incoherence sign vectors when the rotation is on), as the method's config prices
        it (:meth:`~qlr.decompose.base.MethodConfig.storage_bits` at rank 0): the smallest feasible ``budget``."""
        return self._layer_config(m, n).storage_bits(m, n, rank=0) / (m * n)

    def rank_for(self, m: int, n: int) -> int | None:
        """The rank of an m × n layer: None for a Q-only method (or no rank given), the largest rank whose all-in
        storage fits ``budget`` (the config's own pricing, :meth:`~qlr.decompose.base.MethodConfig.budget_rank`),
        or ``rank`` resolved for the shape."""
        cfg = self._layer_config(m, n)
        if not cfg.has_low_rank:
            return None
        if self.budget is not None:
            return cfg.budget_rank(m, n, self.budget)
        if self.rank is None:
            return None
        return resolve_rank(self.rank, m, n)  # an integer rank above min(m, n) is an error, not clamped

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ValueError, naming the layer, when the plan cannot be carried out on these weights
        ({name: (out, in)}): an integer rank above a layer's min(m, n), a rank the method refuses for a layer
        (e.g. not a multiple of 8 for E8P factors), or a ``budget`` below what Q alone costs.

        The budget is checked for the whole model: the smallest feasible budget is the largest per-layer
        Q-only cost (:meth:`q_bits_per_weight`), so that every layer fits; the message states it (rounded up to
        3 decimals) and the layer that sets it."""
        if self.budget is not None:
            costs = {name: self.q_bits_per_weight(m, n) for name, (m, n) in shapes.items()}
            if costs:
                worst = max(costs, key=costs.__getitem__)
                need = costs[worst]
                if self.budget < need:
                    floor = math.ceil(need * 1000) / 1000
                    scope = "this model" if not self.layers else "the selected layers"
                    raise ValueError(
                        f"budget {float(self.budget)} bits/weight is below what Q alone costs with method "
                        f"{self.method!r} at {self.bits} bits (codes, scales/zeros, rotation signs): the smallest "
                        f"feasible budget for {scope} is {floor:.3f} (set by {worst}, "
                        f"{shapes[worst][0]} × {shapes[worst][1]}); raise --budget/budget= to at least that")
        for name, (m, n) in shapes.items():
            try:
                rank = self.rank_for(m, n)
                if rank is None:
                    continue
                if rank > min(m, n):
                    raise ValueError(f"rank={rank} is larger than min(m, n) = {min(m, n)} for a {m} × {n} weight; "
                                     "use a smaller rank or a fractional rank")
                make_config(self.method, bits=self.bits, rank=rank, **self.options)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None


def select_linears(model: nn.Module, plan: CompressionPlan) -> dict[str, nn.Module]:
    """The decoder linears (``nn.Linear`` or ``Conv1D``) ``plan`` compresses, by model-relative name, block by
    block (see :func:`~qlr.models.registry.iter_linears`; routers are never selected). Raises ValueError when the
    pattern selects none, or when the decoder blocks cannot be found."""
    linears = dict(iter_linears(model))
    out = {name: linears[name] for name in select_layers(linears, plan.layers)}
    if not out:
        first = next(iter(linears), "model.layers.0.self_attn.q_proj")
        raise ValueError(f"the layer pattern {plan.layers!r} selects no decoder linear; names look like "
                         f"{first!r}")
    return out


def check_model(model: nn.Module, plan: CompressionPlan) -> dict[str, nn.Module]:
    """Everything that can be checked before calibration, cheaply, with errors naming the layer: the plan
    (:meth:`CompressionPlan.check`), the layer selection, each selected weight (:func:`~qlr.decompose.base.
    validate_weight`: meta, empty, non-finite, all-zero) and the ranks and budget for their shapes
    (:meth:`CompressionPlan.check_shapes`). Returns the selected linears.

    Fused mixture-of-experts weights are split into per-expert linears first (in place, same function; see
    :func:`~qlr.models.moe.unfuse_experts`), so that each expert is selected and calibrated on its own."""
    plan.check()
    unfuse_experts(model)
    linears = select_linears(model, plan)
    shapes = {}
    for name, lin in linears.items():
        weight = linear_weight(lin)
        try:
            validate_weight(weight)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        shapes[name] = tuple(weight.shape)
    plan.check_shapes(shapes)
    return linears


# ---- one layer -------------------------------------------------------------------------------------------------
class LayerFailed(Exception):
    """A layer that cannot be compressed (unusable calibration statistics, a failed factorisation); the message
    says why, without the layer name."""


_DIAGNOSTICS = ("q_ratio", "lr_ratio", "q_scale", "final_q_scale", "best_iter", "preserve_k", "init_lr_ratio")


def compress_linear(lin: nn.Module, H: Tensor, mean_abs: Tensor, plan: CompressionPlan, seed: int = 0
                    ) -> tuple[QLRLinear, dict[str, Any]]:
    """Decompose one linear (weight m × n, ``nn.Linear`` or ``Conv1D``) with its calibration statistics ``H``
    (n × n) and ``mean_abs`` (n,) as ``plan`` says (method, bits, options, the rank for its shape); returns the
    :class:`QLRLinear` (with the linear's bias, on the weight's device) and its metrics {act_err, bits_per_weight,
    rank, shape, seconds, history, method diagnostics}. Raises :class:`LayerFailed` when
    :func:`~qlr.decompose.decompose` rejects the statistics or a factorisation fails."""
    W = linear_weight(lin).float()
    m, n = W.shape
    t0 = time.perf_counter()
    rank = plan.rank_for(m, n)
    opts = dict(plan.options)
    if rank is not None:
        opts["rank"] = rank
    try:
        dec = decompose(W, H.to(W.device), plan.method, plan.bits, mean_abs=mean_abs.to(W.device), seed=seed, **opts)
    except ValueError as err:  # bad calibration statistics of this layer
        raise LayerFailed(str(err)) from err
    except torch.linalg.LinAlgError as err:
        raise LayerFailed(f"a factorisation failed in {plan.method} ({err}); the calibration statistics of this "
                          "layer are degenerate: try more calibration samples or more damping (e.g. damp=0.05)"
                          ) from err
    secs = time.perf_counter() - t0
    bias = lin.bias.detach() if lin.bias is not None else None
    module = QLRLinear.from_decomposition(dec, bias).to(lin.weight.device)
    diag = {k: v for k, v in dec.diagnostics.items() if k in _DIAGNOSTICS}
    metrics = {"act_err": dec.act_err, "bits_per_weight": dec.bits_per_weight, "rank": dec.rank,
               "shape": [m, n], "seconds": secs, "history": dec.history, **diag}
    return module, metrics


def _full_precision(lin: nn.Module, reason: str) -> dict[str, Any]:
    """The record of a layer kept as it was (``on_error="keep"``)."""
    weight = linear_weight(lin)
    return {"full_precision": reason, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "bits_per_weight": float(weight.element_size() * 8)}


# ---- the resume store ------------------------------------------------------------------------------------------
@dataclass
class ResumeStore:
    """Where a run's finished layers are written (``work_dir``; nowhere when None) and, when resuming, reloaded
    from; ``run`` is the digest of the run's fingerprint (see :mod:`qlr.calibration.workdir`)."""

    work_dir: Path | None = None
    run: str = ""
    resume: bool = False

    @classmethod
    def open(cls, work_dir: Path | None, resume: bool, fingerprint: Callable[[], Mapping[str, Any]]
             ) -> ResumeStore:
        """Prepare ``work_dir`` for the run whose fingerprint ``fingerprint()`` computes (called only when there
        is a work directory); ``resume`` refuses a directory of another run (:func:`open_work_dir`)."""
        if work_dir is None:
            return cls()
        return cls(work_dir, open_work_dir(work_dir, fingerprint(), resume), resume)

    def load(self, name: str, device: torch.device) -> tuple[nn.Module, dict[str, Any]] | None:
        """The finished layer ``name`` and its metrics when resuming and it is there (checked), else None."""
        if not self.resume or self.work_dir is None:
            return None
        return load_layer(self.work_dir, name, self.run, device)

    def save(self, name: str, module: nn.Module, metrics: Mapping[str, Any]) -> None:
        if self.work_dir is not None:
            save_layer(self.work_dir, name, module, metrics, self.run)


# ---- the pipeline ----------------------------------------------------------------------------------------------
def _compress_block(model: nn.Module, block: nn.Module, prefix: str, todo: list[str], hidden: list[Tensor],
                    calls: Calls, plan: CompressionPlan, store: ResumeStore, *, seed: int, on_error: str,
                    log: Callable[[str], None] | None, progress: bool) -> dict[str, dict[str, Any]]:
    """Compress the linears ``todo`` (block-relative names) of ``block`` (model path ``prefix``, e.g.
    ``"model.layers.3."``), calibrated on its inputs ``hidden``/``calls``, or reload them from ``store``, and swap
    them into ``model``; returns their metrics in ``todo`` order. A layer that fails raises ValueError naming it
    (``on_error="fail"``) or stays in full precision (``"keep"``)."""
    reloaded = {}
    for n in todo:
        got = store.load(prefix + n, model_device(model))
        if got is not None:
            reloaded[n] = got
    need = {n: block.get_submodule(n) for n in todo if n not in reloaded}
    finals: dict[str, tuple[Tensor, Tensor, str | None]] = {}
    no_stats: dict[str, str] = {}
    if need:
        stats = calibrate_block(block, need, hidden, calls)
        finals, no_stats = stats.finalize(), stats.failed
    metrics: dict[str, dict[str, Any]] = {}
    with tqdm(todo, desc=f"block {prefix.split('.')[-2]}", leave=False, disable=not progress, unit="layer") as bar:
        for n in bar:
            name, lin = prefix + n, block.get_submodule(n)
            try:
                module, met = reloaded[n] if n in reloaded else _new_layer(
                    name, lin, finals.get(n), no_stats.get(n), plan, store, seed, log)
            except LayerFailed as err:
                metrics[name] = _kept(name, lin, err, on_error, log)
                continue
            replace_linear(model, name, module)
            metrics[name] = met
            bar.set_postfix(err=f"{met['act_err']:.4f}")
    return metrics


def _new_layer(name: str, lin: nn.Module, stats: tuple[Tensor, Tensor, str | None] | None, no_stats: str | None,
               plan: CompressionPlan, store: ResumeStore, seed: int, log: Callable[[str], None] | None
               ) -> tuple[QLRLinear, dict[str, Any]]:
    """Compress one linear from its block statistics (H, mean |x|, fallback note), or raise :class:`LayerFailed`
    (``no_stats``: why it has none); the result is written to ``store`` and logged."""
    if stats is None:
        raise LayerFailed(no_stats)
    H, mean_abs, fallback = stats
    module, met = compress_linear(lin, H, mean_abs, plan, seed)
    if fallback is not None:
        met["h_fallback"] = fallback
    store.save(name, module, met)
    if log is not None:
        log(f"{name}: act_err {met['act_err']:.4f}, {met['bits_per_weight']:.3f} bpw, rank {met['rank']}, "
            f"{met['seconds']:.1f}s")
    return module, met


def _kept(name: str, lin: nn.Module, err: LayerFailed, on_error: str, log: Callable[[str], None] | None
          ) -> dict[str, Any]:
    """A failed layer: a ValueError naming it (``on_error="fail"``), or its full-precision record (``"keep"``)."""
    if on_error == "fail":
        raise ValueError(f"{name}: {err}") from err.__cause__
    if log is not None:
        log(f"{name}: kept in full precision: {err}")
    return _full_precision(lin, str(err))


def compress_blocks(model: nn.Module, input_ids: Tensor, plan: CompressionPlan, *, batch_size: int = 8,
                    work_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                    seed: int = 0, log: Callable[[str], None] | None = None, on_error: str = "fail",
                    fingerprint: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Compress ``model`` in place, block by block (see module docstring). Returns per-layer metrics
    {name: {act_err, bits_per_weight, rank, shape, seconds, history, ...}}.

    Before any calibration work, :func:`check_model` validates the plan, the selection, every selected weight and
    the ranks/budget for their shapes. A layer that cannot be decomposed later (its calibration statistics H are
    unusable, checked by :func:`~qlr.decompose.decompose`, or a factorisation fails) is, with ``on_error="fail"``
    (the default), a ValueError prefixed with the layer name, e.g. ``"model.layers.0.mlp.up_proj: H is all zeros
    ..."``; with ``on_error="keep"`` the layer stays as it was (full precision) and its metrics entry is
    ``{"full_precision": the error, "shape", "dtype", "bits_per_weight": the dtype's bits}``.

    With ``work_dir``, the run's fingerprint (:func:`~qlr.calibration.workdir.run_fingerprint`; ``fingerprint``
    when the caller computed it already, on this model before any change, with these ``input_ids``, ``plan``,
    ``seed`` and ``batch_size``) and every finished layer are written there; ``resume=True`` refuses a work
    directory whose fingerprint differs (naming every difference) and reloads the finished layers after checking
    their checksums (see :mod:`qlr.calibration.workdir`). Layers kept in full precision are not written: a resumed
    run decomposes them again.

    ``seed`` goes to every layer's :func:`~qlr.decompose.decompose`, whose random draws use their own generators:
    the caller's global torch RNG is neither read nor changed."""
    if on_error not in ("fail", "keep"):
        raise ValueError(f"on_error must be 'fail' or 'keep', got {on_error!r}")
    wd = Path(work_dir) if work_dir is not None else None
    if resume and wd is None:
        raise ValueError("resume=True needs a work directory holding the finished layers")
    selected = check_model(model, plan)  # before any calibration work; errors name the layer
    store = ResumeStore.open(wd, resume, lambda: fingerprint if fingerprint is not None else run_fingerprint(
        model, input_ids, plan, seed=seed, batch_size=batch_size))
    path, blocks = find_blocks(model)
    state = capture_block_inputs(model, input_ids, batch_size)
    metrics: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(blocks), desc="blocks", disable=not progress, unit="block") as bar:
        for b, block in enumerate(blocks):
            prefix = f"{path}.{b}."
            todo = [n[len(prefix):] for n in selected if n.startswith(prefix)]
            if todo:
                metrics.update(_compress_block(model, block, prefix, todo, state.hidden, state.calls[b], plan, store,
                                               seed=seed, on_error=on_error, log=log, progress=progress))
            with torch.no_grad():
                state.hidden = run_block(block, state.hidden, state.calls[b])
            bar.update(1)
    return metrics
