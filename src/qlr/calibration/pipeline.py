"""Sequential, block-by-block compression of a causal LM (GPTQ's streaming loop, llm-compressor's pipeline).

    inputs ← hidden states entering block 0 (captured with a hook; embedding and rotary run once)
    for each decoder block:
        run the FP block on the inputs with input hooks → H = E[x xᵀ] (float64) and mean |x| per linear group
        decompose each selected linear (or reload it from the resume directory) and swap in a QLRLinear
        run the *compressed* block on the inputs → the next block's inputs (errors propagate, as in GPTQ)

Peak memory: the model, one block's inputs/outputs for the calibration batch, and one block's H matrices.
Finished layers are written to ``work_dir`` as they complete; a rerun with ``resume=True`` reloads them instead of
recomputing, and yields the same model as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..decompose.base import decompose, get_method, make_config, resolve_rank, validate_weight
from ..io import replace_linear
from ..models.registry import arch_spec, get_blocks
from ..nn.qlinear import QLRLinear
from ..quant.grid import QuantSpec
from .hessian import HessianAccumulator

__all__ = ["CompressionPlan", "capture_block_inputs", "compress_blocks", "resolve_rank", "budget_rank",
           "select_linears", "check_model"]


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


def select_linears(model: nn.Module, plan: CompressionPlan) -> dict[str, nn.Linear]:
    """The decoder linears ``plan`` compresses, by model-relative name, in pipeline order. Raises ValueError when
    the pattern selects none (or the architecture is unsupported)."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    pattern = re.compile(plan.layers) if plan.layers else None
    out: dict[str, nn.Linear] = {}
    for b, block in enumerate(blocks):
        prefix = f"{spec.blocks}.{b}."
        for grp in spec.linear_groups:
            for n in grp:
                if pattern is not None and not pattern.search(prefix + n):
                    continue
                mod = block.get_submodule(n)
                if isinstance(mod, nn.Linear):
                    out[prefix + n] = mod
    if not out:
        raise ValueError(f"the layer pattern {plan.layers!r} selects no decoder linear; names look like "
                         f"'{spec.blocks}.0.{spec.linears[0]}'")
    return out


def check_model(model: nn.Module, plan: CompressionPlan) -> dict[str, nn.Linear]:
    """Everything that can be checked before calibration, cheaply, with errors naming the layer: the plan
    (:meth:`CompressionPlan.check`), the layer selection, each selected weight (:func:`~qlr.decompose.base.
    validate_weight`: meta, empty, non-finite, all-zero) and the ranks and budget for their shapes
    (:meth:`CompressionPlan.check_shapes`). Returns the selected linears."""
    plan.check()
    linears = select_linears(model, plan)
    for name, lin in linears.items():
        try:
            validate_weight(lin.weight.detach())
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    plan.check_shapes({name: (lin.out_features, lin.in_features) for name, lin in linears.items()})
    return linears


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, batch_size: int = 8
                         ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Hidden states entering the first decoder block for ``input_ids`` (B, T), in mini-batches, with the keyword
    arguments the model passes to its blocks (attention mask, position embeddings, ...)."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    inputs: list[Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hs.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        kwargs_list.append(kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i:i + batch_size].to(_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_block(block: nn.Module, inputs: list[Tensor], kwargs_list: list[dict[str, Any]]) -> list[Tensor]:
    outs = []
    for hs, kw in zip(inputs, kwargs_list, strict=True):
        out = block(hs, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _layer_file(work_dir: Path, name: str) -> Path:
    return work_dir / "layers" / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")


def _save_layer(work_dir: Path, name: str, module: QLRLinear, metrics: dict[str, Any]) -> None:
    path = _layer_file(work_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp),
              metadata={"qlr_meta": json.dumps(module.qlr_meta()), "metrics": json.dumps(metrics)})
    tmp.replace(path)  # atomic: a killed run never leaves a half-written layer behind


def _load_layer(work_dir: Path, name: str, device: torch.device) -> tuple[QLRLinear, dict[str, Any]] | None:
    path = _layer_file(work_dir, name)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        module = QLRLinear.from_meta(json.loads(meta["qlr_meta"]), device="cpu")
        module.load_state_dict(load_file(str(path)), assign=True)
    except Exception as err:  # corrupt partial file: say which, and how to recover
        raise ValueError(f"resume file {path} is corrupt ({err}); delete it to recompute that layer") from err
    return module.to(device), json.loads(meta["metrics"])


def compress_blocks(model: nn.Module, input_ids: Tensor, plan: CompressionPlan, *, batch_size: int = 8,
                    work_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                    seed: int = 0, log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Compress ``model`` in place, block by block (see module docstring). Returns per-layer metrics
    {name: {act_err, bits_per_weight, rank, seconds, history, ...}}.

    Before any calibration work, :func:`check_model` validates the plan, the selection, every selected weight and
    the ranks/budget for their shapes. Errors found later (a layer's calibration statistics H, checked by
    :func:`~qlr.decompose.decompose`) are raised as ValueError prefixed with the layer name, e.g.
    ``"model.layers.0.mlp.up_proj: H is all zeros ..."``."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    wd = Path(work_dir) if work_dir is not None else None
    if resume and wd is None:
        raise ValueError("resume=True needs a work directory holding the finished layers")
    selected = check_model(model, plan)  # before any calibration work; errors name the layer
    inputs, kwargs_list = capture_block_inputs(model, input_ids, batch_size)
    metrics: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(blocks), desc="blocks", disable=not progress, unit="block")
    for b, block in enumerate(blocks):
        prefix = f"{spec.blocks}.{b}."
        groups = [[n for n in grp if prefix + n in selected] for grp in spec.linear_groups]
        todo = {n: grp[0] for grp in groups if grp for n in grp}  # linear -> the group member H is captured at
        if todo:
            reloaded = {}
            if resume:
                for n in todo:
                    got = _load_layer(wd, prefix + n, _device(model))  # type: ignore[arg-type]
                    if got is not None:
                        reloaded[n] = got
            need = {todo[n] for n in todo if n not in reloaded}
            stats: dict[str, HessianAccumulator] = {}
            handles = []
            for head in need:
                lin = block.get_submodule(head)
                stats[head] = HessianAccumulator(lin.in_features, device=lin.weight.device)
                handles.append(lin.register_forward_pre_hook(
                    lambda _m, args, acc=stats[head]: acc.add(args[0].detach())))
            if need:
                with torch.no_grad():
                    _run_block(block, inputs, kwargs_list)
            for h in handles:
                h.remove()
            finals = {head: acc.finalize() for head, acc in stats.items()}
            layer_bar = tqdm(list(todo), desc=f"block {b}", leave=False, disable=not progress, unit="layer")
            for n in layer_bar:
                name = prefix + n
                lin = block.get_submodule(n)
                if n in reloaded:
                    module, met = reloaded[n]
                else:
                    H, mean_abs = finals[todo[n]]
                    W = lin.weight.detach().float()
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
                        layer_bar.close()  # before the caller prints the error
                        bar.close()
                        raise ValueError(f"{name}: {err}") from err
                    except torch.linalg.LinAlgError as err:
                        layer_bar.close()
                        bar.close()
                        raise ValueError(f"{name}: a factorisation failed in {plan.method} ({err}); the "
                                         "calibration statistics of this layer are degenerate: try more "
                                         "calibration samples or more damping (e.g. damp=0.05)") from err
                    secs = time.perf_counter() - t0
                    bias = lin.bias.detach() if lin.bias is not None else None
                    module = QLRLinear.from_decomposition(dec, bias).to(lin.weight.device)
                    diag = {k: v for k, v in dec.diagnostics.items() if k in ("q_ratio", "lr_ratio", "q_scale",
                                                                                 "final_q_scale", "best_iter",
                                                                                 "preserve_k", "init_lr_ratio")}
                    met = {"act_err": min(dec.history), "bits_per_weight": dec.bits_per_weight,
                           "rank": dec.rank, "shape": [m_, n_], "seconds": secs, "history": dec.history, **diag}
                    if wd is not None:
                        _save_layer(wd, name, module, met)
                    if log is not None:
                        log(f"{name}: act_err {met['act_err']:.4f}, {met['bits_per_weight']:.3f} bpw, "
                            f"rank {met['rank']}, {secs:.1f}s")
                replace_linear(model, name, module)
                metrics[name] = met
                layer_bar.set_postfix(err=f"{met['act_err']:.4f}")
        with torch.no_grad():
            inputs = _run_block(block, inputs, kwargs_list)
        bar.update(1)
    bar.close()
    return metrics
