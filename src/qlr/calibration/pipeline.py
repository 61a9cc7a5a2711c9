"""Sequential, block-by-block compression of a causal LM (GPTQ's streaming loop, llm-compressor's pipeline).

    split fused mixture-of-experts weights into per-expert linears (qlr.models.moe)
    inputs ← hidden states entering block 0, and every block's call arguments (masks, rotary tables, ...),
             recorded with the blocks' forwards stubbed out (embedding and mask/rotary set-up run once)
    for each decoder block (found from the module tree, qlr.models.registry):
        run the FP block on the inputs with input hooks → H = E[x xᵀ] (float64) and mean |x| per linear; linears
        that read the same tensor share one accumulator; an expert no token reached borrows its siblings' H
        decompose each selected linear (or reload it from the resume directory) and swap in a QLRLinear
        run the *compressed* block on the inputs → the next block's inputs (errors propagate, as in GPTQ)

Peak memory: the model, one block's inputs/outputs for the calibration batch, and one block's H matrices.
Finished layers are written to ``work_dir`` as they complete, next to the run's fingerprint; a rerun with
``resume=True`` checks that it is the same run (model weights and config, plan, calibration token ids, seed, batch
size, device, qlr version) and that each finished layer passes its checksum (:mod:`qlr.calibration.workdir`),
reloads them instead of recomputing, and yields the same model as an uninterrupted run.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..decompose.base import decompose, get_method, make_config, resolve_rank, validate_weight
from ..io import replace_linear
from ..models.moe import unfuse_experts
from ..models.registry import find_blocks, get_blocks, iter_linears, linear_weight
from ..nn.qlinear import QLRLinear
from ..quant.grid import QuantSpec
from .hessian import HessianAccumulator
from .workdir import load_layer, open_work_dir, run_fingerprint, save_layer

__all__ = ["BlockInputs", "CompressionPlan", "capture_block_inputs", "compress_blocks", "resolve_rank",
           "budget_rank", "select_linears", "check_model", "run_fingerprint"]


class _Stop(Exception):
    pass


def budget_rank(budget: float, q_bpw: float, m: int, n: int, lr_bits: int, lr_group: int) -> int:
    """The largest rank r whose L (m × r) and R (r × n) at ``lr_bits`` (group-wise asymmetric, counted by
    ``QuantSpec.storage_bits``; fp16 when ``lr_bits`` = 16) fit in ``budget − q_bpw`` bits per weight; 0 if none."""
    spec = None if lr_bits >= 16 else QuantSpec(bits=lr_bits, group_size=lr_group)

    def lr_bits_total(r: int) -> int:
        if spec is None:
            return 16 * r * (m + n)
        return spec.storage_bits(m, r) + spec.storage_bits(r, n)

    spare = (budget - q_bpw) * m * n
    best = 0
    for r in range(1, min(m, n) + 1):
        if lr_bits_total(r) > spare:
            break
        best = r
    return best


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
        if self.layers:
            try:
                re.compile(self.layers)
            except re.error as err:
                raise ValueError(f"the layer pattern {self.layers!r} is not a valid regular expression: {err}"
                                 ) from None

    def _layer_config(self, m: int, n: int) -> Any:
        cfg = make_config(self.method, bits=self.bits, **self.options)
        if hasattr(cfg, "resolve"):  # "auto" quantizers: what this shape gets (budget ranks are multiples of 8)
            cfg = cfg.resolve(m, n)
        return cfg

    def q_bits_per_weight(self, m: int, n: int) -> float:
        """What Q alone costs for an m × n weight under this plan, in bits per weight: its codes plus per-group
        scales/zeros (scalar grids) or 16 bits per 8 weights plus one fp16 scale (E8P), plus the incoherence
        sign vectors (m + n bits) when the rotation is on. The cost model :meth:`rank_for` spends a budget with;
        the smallest feasible ``budget`` for the layer."""
        from ..decompose.common import q_spec

        cfg = self._layer_config(m, n)
        lattice_q = getattr(cfg, "q_quantizer", "") == "e8p"
        signs = (m + n) if getattr(cfg, "use_incoherence", False) else 0
        # E8P: 16 bits per 8 weights plus one fp16 scale; scalar grids: codes + per-group scale/zero
        q_bits = 2 * m * n + 16 if lattice_q else q_spec(cfg).bits_per_weight(n) * m * n
        return (q_bits + signs) / (m * n)

    def rank_for(self, m: int, n: int) -> int | None:
        if self.method in ("rtn", "gptq"):
            return None  # Q-only methods
        if self.budget is not None:
            cfg = self._layer_config(m, n)
            q_bpw = self.q_bits_per_weight(m, n)
            lr_bits = getattr(cfg, "lr_bits", 16)
            if getattr(cfg, "lr_quantizer", "") == "e8p4":
                # 4 bits per entry + 2 fp16 scales per factor; the rank must be a multiple of 8
                spare = (self.budget - q_bpw) * m * n - 4 * 16
                return max(0, min(min(m, n), int(spare // (4 * (m + n)))) // 8 * 8)
            return budget_rank(self.budget, q_bpw, m, n, lr_bits, getattr(cfg, "lr_group_size", 64))
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
    pattern = re.compile(plan.layers) if plan.layers else None
    out = {name: mod for name, mod in iter_linears(model) if pattern is None or pattern.search(name)}
    if not out:
        first = next(iter_linears(model), ("model.layers.0.self_attn.q_proj", None))[0]
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


@dataclass
class BlockInputs:
    """What the decoder blocks are called with, for every calibration mini-batch.

    Attributes:
        hidden: the hidden states entering the current block, one (B, T, d) tensor per mini-batch (starts as
            block 0's inputs; the pipeline replaces it with each block's outputs).
        calls: ``calls[b][i]`` = (the other positional arguments, the keyword arguments) the model passed to block
            ``b`` for mini-batch ``i``: masks, position ids and embeddings, sliding-window flags, ALiBi, ... (caches
            removed). Recorded per block because models such as Gemma 2/3 give sliding-window and global layers
            different masks and rotary tables.
    """

    hidden: list[Tensor]
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]


def _no_cache(value: Any) -> Any:
    return None if "Cache" in type(value).__name__ and type(value).__module__.startswith("transformers") else value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> BlockInputs:
    """Block 0's input hidden states and every block's call arguments for ``input_ids`` (B, T), in mini-batches.

    The model runs with each block's forward replaced by a recorder that returns its input unchanged (in the
    output structure the real block has), so capturing costs the embedding and the per-layer mask/rotary set-up,
    not a forward pass; the last block stops the run before the final norm and head."""
    blocks = get_blocks(model)
    n_batches = math.ceil(input_ids.shape[0] / batch_size)
    result = BlockInputs(hidden=[], calls=[[] for _ in blocks])
    template: list[Any] = []  # what follows the hidden states in a block's tuple output (learned from block 0)

    previous = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's offloading wrappers

    def recorder(b: int, block: nn.Module) -> Callable[..., Any]:
        original = previous[b] or type(block).forward.__get__(block)

        def record(*args: Any, **kwargs: Any) -> Any:
            hs = args[0] if args else kwargs.pop("hidden_states")
            rest = tuple(_no_cache(a) for a in args[1:])
            kw = {k: _no_cache(v) for k, v in kwargs.items()}
            if "use_cache" in kw:
                kw["use_cache"] = False
            result.calls[b].append((rest, kw))
            if b == 0:
                result.hidden.append(hs.detach())
                if not template:
                    out = original(hs, *rest, **kw)
                    template.append(out[1:] if isinstance(out, tuple) else None)
            if b == len(blocks) - 1:
                raise _Stop
            return hs if template[0] is None else (hs, *template[0])

        return record

    for b, block in enumerate(blocks):
        block.forward = recorder(b, block)
    try:
        for i in range(n_batches):
            try:
                model(input_ids[i * batch_size:(i + 1) * batch_size].to(_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        for block, forward in zip(blocks, previous, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    if any(len(c) != n_batches for c in result.calls):
        raise ValueError(f"{type(model).__name__} did not call each decoder block once per forward pass; qlr's "
                         "block-by-block calibration cannot handle it")
    return result


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_block(block: nn.Module, hidden: list[Tensor], calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
               ) -> list[Tensor]:
    outs = []
    for hs, (args, kw) in zip(hidden, calls, strict=True):
        out = block(hs, *args, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class _BlockStats:
    """H and mean |x| of the selected linears of one block, from hooks during the block's forward passes.

    Linears that read the same tensor in the same pass (q/k/v, gate/up, an expert's gate/up) share one
    accumulator, so each distinct input's Gram matrix is formed once; a linear called on no token (an expert no
    calibration token was routed to) ends with an empty accumulator (see :meth:`finalize`)."""

    def __init__(self, linears: Mapping[str, nn.Module]) -> None:
        self.owner: dict[str, str] = {}
        self.acc: dict[str, HessianAccumulator] = {}
        self.first_pass: dict[str, int] = {}
        self.failed: dict[str, str] = {}  # set by finalize
        self.linears = dict(linears)
        self._pass = 0
        self._seen: dict[tuple[Any, ...], tuple[str, Tensor]] = {}

    def new_pass(self) -> None:
        self._pass += 1
        self._seen = {}  # drops the references that kept this pass's inputs (and their addresses) alive

    def add(self, name: str, x: Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        other = self._seen.get(key)
        if name not in self.owner:
            self.first_pass[name] = self._pass
            if other is not None and self.first_pass[other[0]] == self._pass:
                self.owner[name] = self.owner[other[0]]  # read the same input since their first call: share
                return
            self.owner[name] = name
            lin = self.linears[name]
            self.acc[name] = HessianAccumulator(x.shape[-1], device=lin.weight.device)
        if other is not None and self.owner[other[0]] == self.owner[name]:
            return  # already added by the linear sharing this accumulator
        self._seen.setdefault(key, (name, x))
        self.acc[self.owner[name]].add(x.detach())

    def hooks(self) -> list[Any]:
        return [lin.register_forward_pre_hook(lambda _m, args, n=name: self.add(n, args[0]))
                for name, lin in self.linears.items()]

    def finalize(self) -> dict[str, tuple[Tensor, Tensor, str | None]]:
        """{name: (H, mean_abs, fallback note or None)}. A linear that saw no token takes the pooled statistics of
        its siblings (the linears of the same block whose names differ only in numeric parts, e.g. the other
        experts' ``gate_proj``); with no sibling that saw tokens it is left out, and ``self.failed`` maps its name
        to why."""
        done = {owner: acc.finalize() for owner, acc in self.acc.items() if acc.count}
        out: dict[str, tuple[Tensor, Tensor, str | None]] = {}
        failed: dict[str, str] = {}
        for name in self.linears:
            owner = self.owner.get(name)
            if owner in done:
                out[name] = (*done[owner], None)
                continue
            pattern = re.sub(r"\.\d+\.", ".#.", f".{name}.")
            sib = {self.owner[o] for o in self.owner if o != name and self.owner[o] in done
                   and re.sub(r"\.\d+\.", ".#.", f".{o}.") == pattern}
            if not sib:
                failed[name] = ("no calibration token reached this layer, and no sibling layer to borrow statistics "
                                "from; use more calibration samples")
                continue
            count = sum(self.acc[o].count for o in sib)
            H = sum(self.acc[o].sum_xx for o in sib) / count
            mean_abs = (sum(self.acc[o].sum_abs for o in sib) / count).float()
            out[name] = ((H + H.T) / 2, mean_abs, f"no calibration token was routed here: H pooled from "
                                                  f"{len(sib)} sibling layer(s), {count} tokens")
        self.failed = failed
        return out


def _full_precision(lin: nn.Module, reason: str) -> dict[str, Any]:
    """The record of a layer kept as it was (``on_error="keep"``)."""
    weight = linear_weight(lin)
    return {"full_precision": reason, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "bits_per_weight": float(weight.element_size() * 8)}


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
    run decomposes them again."""
    if on_error not in ("fail", "keep"):
        raise ValueError(f"on_error must be 'fail' or 'keep', got {on_error!r}")
    wd = Path(work_dir) if work_dir is not None else None
    if resume and wd is None:
        raise ValueError("resume=True needs a work directory holding the finished layers")
    selected = check_model(model, plan)  # before any calibration work; errors name the layer
    run = ""
    if wd is not None:
        if fingerprint is None:
            fingerprint = run_fingerprint(model, input_ids, plan, seed=seed, batch_size=batch_size)
        run = open_work_dir(wd, fingerprint, resume)
    path, blocks = find_blocks(model)
    state = capture_block_inputs(model, input_ids, batch_size)
    metrics: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(blocks), desc="blocks", disable=not progress, unit="block")
    layer_bar = None

    def failed(name: str, lin: nn.Module, why: str, err: BaseException | None) -> None:
        if on_error == "keep":
            metrics[name] = _full_precision(lin, why)
            if log is not None:
                log(f"{name}: kept in full precision: {why}")
            return
        if layer_bar is not None:
            layer_bar.close()  # before the caller prints the error
        bar.close()
        raise ValueError(f"{name}: {why}") from err

    for b, block in enumerate(blocks):
        prefix = f"{path}.{b}."
        todo = [n[len(prefix):] for n in selected if n.startswith(prefix)]
        if todo:
            reloaded = {}
            if resume:
                for n in todo:
                    got = load_layer(wd, prefix + n, run, _device(model))  # type: ignore[arg-type]
                    if got is not None:
                        reloaded[n] = got
            need = {n: block.get_submodule(n) for n in todo if n not in reloaded}
            finals: dict[str, tuple[Tensor, Tensor, str | None]] = {}
            no_stats: dict[str, str] = {}
            if need:
                stats = _BlockStats(need)
                handles = stats.hooks()
                handles.append(block.register_forward_pre_hook(lambda *_: stats.new_pass()))
                try:
                    with torch.no_grad():
                        _run_block(block, state.hidden, state.calls[b])
                finally:
                    for h in handles:
                        h.remove()
                finals = stats.finalize()
                no_stats = stats.failed
            layer_bar = tqdm(todo, desc=f"block {b}", leave=False, disable=not progress, unit="layer")
            for n in layer_bar:
                name = prefix + n
                lin = block.get_submodule(n)
                if n in reloaded:
                    module, met = reloaded[n]
                elif n in no_stats:
                    failed(name, lin, no_stats[n], None)
                    continue
                else:
                    H, mean_abs, fallback = finals[n]
                    W = linear_weight(lin).float()
                    m_, n_ = W.shape
                    torch.manual_seed(seed)
                    t0 = time.perf_counter()
                    rank = plan.rank_for(m_, n_)
                    opts = dict(plan.options)
                    if rank is not None:
                        opts["rank"] = rank
                    try:
                        dec = decompose(W, H.to(W.device), plan.method, plan.bits, mean_abs=mean_abs.to(W.device),
                                        seed=seed, **opts)
                    except ValueError as err:  # bad calibration statistics of this layer: say which layer
                        failed(name, lin, str(err), err)
                        continue
                    except torch.linalg.LinAlgError as err:
                        failed(name, lin, f"a factorisation failed in {plan.method} ({err}); the calibration "
                                          "statistics of this layer are degenerate: try more calibration samples or "
                                          "more damping (e.g. damp=0.05)", err)
                        continue
                    secs = time.perf_counter() - t0
                    bias = lin.bias.detach() if lin.bias is not None else None
                    module = QLRLinear.from_decomposition(dec, bias).to(lin.weight.device)
                    diag = {k: v for k, v in dec.diagnostics.items() if k in ("q_ratio", "lr_ratio", "q_scale",
                                                                                 "final_q_scale", "best_iter",
                                                                                 "preserve_k", "init_lr_ratio")}
                    met = {"act_err": min(dec.history), "bits_per_weight": dec.bits_per_weight,
                           "rank": dec.rank, "shape": [m_, n_], "seconds": secs, "history": dec.history, **diag}
                    if fallback is not None:
                        met["h_fallback"] = fallback
                    if wd is not None:
                        save_layer(wd, name, module, met, run)
                    if log is not None:
                        log(f"{name}: act_err {met['act_err']:.4f}, {met['bits_per_weight']:.3f} bpw, "
                            f"rank {met['rank']}, {secs:.1f}s")
                replace_linear(model, name, module)
                metrics[name] = met
                layer_bar.set_postfix(err=f"{met['act_err']:.4f}")
            layer_bar = None
        with torch.no_grad():
            state.hidden = _run_block(block, state.hidden, state.calls[b])
        bar.update(1)
    bar.close()
    return metrics
