"""QPEFT: fine-tune the low-rank factors of a compressed model on Q's frozen codes.

Every :class:`~qlr.nn.QLRLinear` of rank > 0 gets float32 master copies of its stored L (m × r) and R (r × n)
(:meth:`~qlr.nn.QLRLinear.train_factors`), and with ``train_scales`` multipliers of Q's stored scales
(:meth:`~qlr.nn.QLRLinear.train_q_scales`); everything else — Q's codes, the rotation signs, biases, embeddings,
norms, the head — stays frozen. AdamW then minimises, over windows of token ids ``ids`` (N, T):

* ``objective="kd"`` (recovery after compression): the mean over positions of KL(p_T ‖ p_S), with p_T the frozen
  full-precision teacher's next-token distribution and p_S the compressed model's, both at ``temperature``;
* ``objective="lm"`` (task adaptation): the causal-LM cross-entropy of the user's own text.

At the end the factors are stored again (:meth:`~qlr.nn.QLRLinear.store_factors`): re-quantized into the formats
they came in (``storage="requantize"``, bits/weight unchanged) or kept as fp16 (``"fp16"``, the extra bits
counted). Step ``s`` trains on the windows drawn by a generator seeded with ``(seed, s)``, so a run resumed from a
saved step sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nn.qlinear import QLRLinear

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "make_optimizer", "trainable_layers"]

_STATE = "finetune_state.safetensors"
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_STATE_META = "finetune_state.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune`.

    Attributes:
        steps: optimizer steps.
        lr: peak AdamW learning rate of the factors and Q's scale multipliers (linear warm-up over ``warmup``
            steps, cosine decay to ``lr / 10``).
        batch_size: windows per step.
        objective: ``"kd"`` (match the teacher's next-token distribution) or ``"lm"`` (next-token cross-entropy).
        temperature: softmax temperature of both distributions under ``"kd"``.
        weight_decay: AdamW weight decay (decoupled).
        warmup: warm-up steps.
        grad_clip: global gradient-norm clip (0 = off).
        storage: how the trained factors are stored: ``"requantize"`` (their original formats), ``"fp16"``, or
            ``"none"`` (leave the float32 parameters in place; call ``QLRLinear.store_factors`` and
            ``QLRLinear.store_q_scales`` before saving).
        seed: seeds the window drawn at every step.
        gradient_checkpointing: recompute each block's activations in the backward pass (transformers models;
            ``mode="model"`` only: block-wise training holds one block's activations anyway).
        save_every: with a ``work_dir``, save the training state every this many steps (0 = only at the end).
        through_rounding: train through the factors' storage rounding (straight-through gradients; E8P scales
            fixed at their stored values), so that ``storage="requantize"`` stores exactly the model that was
            trained; costs a rounding of every factor at every step. None (the default): on exactly when
            ``storage="requantize"`` (rounding factors trained in float afterwards undoes most of what training
            gained when the trained change is smaller than the rounding step).
        amp: run the forward passes (student and teacher) under autocast in ``"bf16"`` or ``"fp16"`` (``"none"``:
            float32). The factors' masters, the optimizer and the loss stay float32; the storage rounding runs in
            float32.
        preserve_grad_scale: SRR's QPEFT rule: the preserved directions (the first ``preserved[name]`` rank-1 terms
            of a layer's L R, see :func:`finetune`) move by this factor γ ∈ (0, 1] of their AdamW step. Adam
            normalises a constant gradient scale away, so the step is scaled (under SGD the two are the same).
        q_cache: decode every compressed layer's frozen Q once, into a dense tensor in the forward's dtype (the
            ``amp`` dtype, else float32), and multiply with it instead of decoding the codes on every forward and
            backward (:meth:`QLRLinear.cache_q`): faster steps for m·n·(2 or 4) bytes per layer while training.
            Dropped at the end; the codes are untouched.
        train_scales: also train Q's scales, its codes staying frozen (:meth:`QLRLinear.train_q_scales`): one
            multiplier per stored scale (per row and group on a grid, per matrix on an E8P lattice), initialised
            at 1, no weight decay, the same learning rate; stored back into Q's scale buffers at the end (rounded
            to their dtype; bits/weight unchanged). In ``mode="model"`` each layer keeps a dense float32 Q while
            training (as ``q_cache``; 4 bytes per weight) plus Q ⊙ θ per forward until its backward; block-wise
            decodes Q at every forward instead, keeping its one-block-at-a-time memory.
        mode: ``"model"`` (the end-to-end objective above) or ``"blockwise"``: each decoder block in turn learns
            to reproduce the teacher block's outputs (normalised MSE), fed the compressed model's own activations
            through the blocks already trained; ``steps`` are then per block, and only one teacher block at a
            time needs to be on the student's device. ``"blockwise"`` needs the teacher and ignores
            ``objective``/``temperature``.
    """

    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 4
    objective: str = "kd"
    temperature: float = 1.0
    weight_decay: float = 0.0
    warmup: int = 10
    grad_clip: float = 1.0
    storage: str = "requantize"
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 0
    through_rounding: bool | None = None
    amp: str = "none"
    preserve_grad_scale: float = 1.0
    q_cache: bool = False
    mode: str = "model"
    train_scales: bool = False

    def __post_init__(self) -> None:
        if self.through_rounding is None:  # resolved here, so that a saved config says what ran
            object.__setattr__(self, "through_rounding", self.storage == "requantize")
        if self.objective not in ("kd", "lm"):
            raise ValueError(f"objective must be 'kd' or 'lm', got {self.objective!r}")
        if self.storage not in ("requantize", "fp16", "none"):
            raise ValueError(f"storage must be 'requantize', 'fp16' or 'none', got {self.storage!r}")
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {sorted(_AMP)}, got {self.amp!r}")
        if self.mode not in ("model", "blockwise"):
            raise ValueError(f"mode must be 'model' or 'blockwise', got {self.mode!r}")
        if not 0 < self.preserve_grad_scale <= 1:
            raise ValueError(f"preserve_grad_scale must be in (0, 1], got {self.preserve_grad_scale!r}")
        if not (self.lr > 0 and self.temperature > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError("lr and temperature must be > 0, weight_decay and grad_clip >= 0")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the loss of every step, the tokens it trained on and the wall time."""

    config: FinetuneConfig
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    layers: int = 0
    trainable_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "losses": self.losses, "tokens": self.tokens,
                "seconds": self.seconds, "layers": self.layers, "trainable_parameters": self.trainable_parameters}


def trainable_layers(model: nn.Module) -> dict[str, QLRLinear]:
    """The compressed layers with factors to train (rank > 0), by name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QLRLinear) and mod.rank > 0}


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch(ids: Tensor, step: int, cfg: FinetuneConfig) -> Tensor:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows = torch.randperm(ids.shape[0], generator=gen)[: cfg.batch_size]
    return ids[rows]


def autocast(device: torch.device, amp: str) -> Any:
    """The autocast context of ``FinetuneConfig.amp`` on ``device`` (a disabled one for ``"none"``)."""
    dtype = _AMP[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _loss(student: nn.Module, teacher: nn.Module | None, batch: Tensor, cfg: FinetuneConfig) -> Tensor:
    with autocast(batch.device, cfg.amp):
        logits = student(batch).logits[:, :-1].float()
    if cfg.objective == "lm":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert teacher is not None
    with torch.no_grad(), autocast(batch.device, cfg.amp):
        target = teacher(batch).logits[:, :-1].float()
    t = cfg.temperature
    log_p_s = F.log_softmax(logits / t, dim=-1).reshape(-1, logits.shape[-1])
    log_p_t = F.log_softmax(target / t, dim=-1).reshape(-1, logits.shape[-1])
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def _save_state(work_dir: Path, step: int, layers: dict[str, QLRLinear], opt: torch.optim.Optimizer,
                losses: list[float], cfg: FinetuneConfig) -> None:
    tensors: dict[str, Tensor] = {}
    for name, mod in layers.items():
        for kind, p in mod.trained_tensors().items():
            tensors[f"{name}.{kind}"] = p.detach().cpu().contiguous()
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"{name}.{kind}.{key}"] = st[key].detach().cpu().contiguous()
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / (_STATE + ".tmp")
    save_file(tensors, str(tmp))
    meta = {"step": step, "losses": losses, "config": asdict(cfg)}
    tmp_meta = work_dir / (_STATE_META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, sort_keys=True))
    tmp.replace(work_dir / _STATE)  # tensors first, then the step that describes them
    tmp_meta.replace(work_dir / _STATE_META)


def _load_state(work_dir: Path, layers: dict[str, QLRLinear], opt: torch.optim.Optimizer,
                cfg: FinetuneConfig) -> tuple[int, list[float]]:
    meta_path, state_path = work_dir / _STATE_META, work_dir / _STATE
    if not meta_path.is_file() or not state_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text())
    # how often to save, how Q is multiplied and whether activations are recomputed do not change the run
    free = ("save_every", "q_cache", "gradient_checkpointing")
    saved = {k: v for k, v in meta["config"].items() if k not in free}
    want = {k: v for k, v in asdict(cfg).items() if k not in free}
    if saved != want:
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {want[k]!r})" for k in want if saved.get(k) != want[k])
        raise ValueError(f"cannot resume fine-tuning from {work_dir}: it was started with {diff}; use the same "
                         "settings or a new work directory")
    tensors = load_file(str(state_path))
    step = int(meta["step"])
    with torch.no_grad():
        for name, mod in layers.items():
            for kind, p in mod.trained_tensors().items():
                p.copy_(tensors[f"{name}.{kind}"])
                if f"{name}.{kind}.exp_avg" in tensors:
                    opt.state[p] = {"step": torch.tensor(float(step)),
                                    "exp_avg": tensors[f"{name}.{kind}.exp_avg"].to(p),
                                    "exp_avg_sq": tensors[f"{name}.{kind}.exp_avg_sq"].to(p)}
    return step, list(meta["losses"])


class PreservedStep:
    """SRR's rule for the preserved directions: after each optimizer step, the first ``k`` columns of L and rows
    of R of every listed layer keep only the fraction ``gamma`` of their step, θ ← θ₀ + γ (θ − θ₀)."""

    def __init__(self, layers: Mapping[str, QLRLinear], preserved: Mapping[str, int] | None, gamma: float) -> None:
        self.gamma = gamma
        self.items = [] if gamma == 1 or not preserved else [
            (mod.l_train, mod.r_train, min(int(preserved[name]), mod.rank))
            for name, mod in layers.items() if int(preserved.get(name, 0)) > 0]
        self._saved: list[tuple[Tensor, Tensor]] = []

    def restricted(self, layers: Mapping[str, QLRLinear]) -> PreservedStep:
        """The same rule over the given layers only."""
        keep = {id(m.l_train) for m in layers.values()}
        rule = PreservedStep({}, None, self.gamma)
        rule.items = [it for it in self.items if id(it[0]) in keep]
        return rule

    @torch.no_grad()
    def before(self) -> None:
        self._saved = [(L[:, :k].clone(), R[:k].clone()) for L, R, k in self.items]

    @torch.no_grad()
    def after(self) -> None:
        for (L, R, k), (l0, r0) in zip(self.items, self._saved, strict=True):
            L[:, :k].lerp_(l0, 1 - self.gamma)  # γ L + (1 − γ) L₀
            R[:k].lerp_(r0, 1 - self.gamma)
        self._saved = []


def finetune(model: nn.Module, ids: Tensor, config: FinetuneConfig | None = None, *,
             teacher: nn.Module | None = None, work_dir: str | Path | None = None, resume: bool = False,
             preserved: Mapping[str, int] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the L, R factors of ``model``'s compressed layers on the token windows ``ids`` (N, T), in place.

    Args:
        model: a causal LM whose compressed linears are :class:`~qlr.nn.QLRLinear` (from :func:`qlr.compress` or
            :func:`qlr.load`); it must return ``.logits`` (B, T, vocab).
        ids: training windows (N, T) of token ids; never the text you evaluate on.
        config: :class:`FinetuneConfig` (default settings when None).
        teacher: the full-precision model, required for ``objective="kd"`` and ``mode="blockwise"`` (frozen, used
            under no_grad).
        work_dir: where the training state is saved (every ``save_every`` steps, after every block in blockwise
            mode, and at the end); with ``resume=True`` training continues from the saved step, with the same
            batches as an uninterrupted run.
        preserved: {layer name: k}: the first k rank-1 terms of that layer's L R are preserved directions (SRR's
            ``preserve_k``), whose steps ``config.preserve_grad_scale`` scales; layers not listed have none.
        progress: show a progress bar with the loss.
        log: called with one line per 10 % of the steps.

    Returns:
        :class:`FinetuneResult`; the model's factors are stored back in their formats (``config.storage``).

    Raises:
        ValueError: no compressed layer with rank > 0, ``kd`` or ``blockwise`` without a teacher, ids not (N, T)
            with T >= 2, a resume state written with other settings, ``gradient_checkpointing`` on a model
            without transformers' checkpointing switch, or ``train_scales`` on a layer whose Q scales cannot train.
    """
    cfg = config or FinetuneConfig()
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be token windows of shape (N, T) with T >= 2, got {tuple(ids.shape)}")
    if (cfg.objective == "kd" or cfg.mode == "blockwise") and teacher is None:
        raise ValueError(f"{'mode=blockwise' if cfg.mode == 'blockwise' else 'objective=kd'} needs the "
                         "full-precision teacher model (teacher=...)")
    if resume and work_dir is None:
        raise ValueError("resume=True needs the work_dir the training state was saved in")
    if cfg.gradient_checkpointing and cfg.mode == "model" and _checkpoint_switch(model) is None:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no activation-checkpointing switch "
                         "(transformers models do); train without gradient_checkpointing")
    layers = trainable_layers(model)
    if not layers:
        raise ValueError("the model has no compressed layer with rank > 0: there are no L, R factors to train")
    if cfg.train_scales:
        for name, mod in layers.items():
            why = mod.q_scales_untrainable()
            if why is not None:
                raise ValueError(f"train_scales: layer {name}: {why}; train without train_scales")
    device = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}  # restored at the end
    for p in frozen:
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for mod in layers.values():
        params.extend(mod.train_factors(through_rounding=cfg.through_rounding))
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    compressed = [m for m in model.modules() if isinstance(m, QLRLinear)]
    if cfg.q_cache:
        for mod in compressed:
            mod.cache_q(_AMP[cfg.amp] or torch.float32)
    if cfg.train_scales:
        params.extend(mod.train_q_scales(cfg.through_rounding, cache=cfg.mode == "model")
                      for mod in layers.values())
    rule = PreservedStep(layers, preserved, cfg.preserve_grad_scale)
    wd = Path(work_dir) if work_dir is not None else None
    result = FinetuneResult(cfg, layers=len(layers), trainable_parameters=sum(p.numel() for p in params))
    t0 = time.perf_counter()
    was_training = model.training
    try:
        if cfg.mode == "blockwise":
            from .blockwise import train_blocks

            assert teacher is not None
            result.losses, result.tokens = train_blocks(model, teacher, ids, cfg, layers, rule, wd, resume,
                                                        progress, log)
        else:
            _train_model(model, teacher, ids, cfg, layers, params, rule, wd, resume, progress, log, result, device)
    finally:
        if cfg.gradient_checkpointing and cfg.mode == "model":
            _checkpointing(model, False)
        model.train(was_training)
        for mod in compressed:
            mod.cache_q(None)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    if cfg.storage != "none":
        for mod in layers.values():
            mod.store_factors(cfg.storage)
            mod.store_q_scales()
    result.seconds = time.perf_counter() - t0
    return result


def _checkpoint_switch(model: nn.Module) -> str | None:
    """The prefix of the model's activation-checkpointing methods (``<prefix>_enable``/``_disable``): transformers
    5's, else transformers 4's; None when it has neither."""
    for prefix in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(model, f"{prefix}_enable") and hasattr(model, f"{prefix}_disable"):
            return prefix
    return None


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Switch transformers' activation (gradient) checkpointing of the decoder blocks on or off (non-reentrant);
    :func:`finetune` has checked that the model has the switch."""
    prefix = _checkpoint_switch(model)
    if prefix is None:
        return
    if on:
        getattr(model, f"{prefix}_enable")(**{f"{prefix}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_disable")()


def make_optimizer(layers: Any, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the trained tensors of ``layers`` (QLRLinear): the factors with ``cfg.weight_decay``, Q's scale
    multipliers (which start at 1) without decay."""
    mods = list(layers)
    factors = [p for m in mods for k, p in m.trained_tensors().items() if k != "q_scale"]
    scales = [m.q_scale_train for m in mods if m.q_scale_train is not None]
    groups = [{"params": factors, "weight_decay": cfg.weight_decay}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, params: list[nn.Parameter], step: int,
                   cfg: FinetuneConfig, rule: PreservedStep) -> float:
    """One AdamW step on ``loss`` at step ``step`` of the schedule (warm-up, cosine): backward, the gradient-norm
    clip of ``params``, the step, and SRR's preserved-direction rule around it. Returns the loss as a float."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    rule.before()
    opt.step()
    rule.after()
    return float(loss.detach())


def _train_model(model: nn.Module, teacher: nn.Module | None, ids: Tensor, cfg: FinetuneConfig,
                 layers: dict[str, QLRLinear], params: list[nn.Parameter], rule: PreservedStep, wd: Path | None,
                 resume: bool, progress: bool, log: Callable[[str], None] | None, result: FinetuneResult,
                 device: torch.device) -> None:
    """The end-to-end loop (``mode="model"``): one AdamW over every factor, the loss of the whole model."""
    opt = make_optimizer(layers.values(), cfg)
    start, losses = _load_state(wd, layers, opt, cfg) if (resume and wd is not None) else (0, [])
    result.losses = losses
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
        model.train()  # transformers checkpoints only in training mode; LMs here have no active dropout at eval
    bar = tqdm(range(start, cfg.steps), desc=f"finetune ({cfg.objective})", disable=not progress, unit="step",
               initial=start, total=cfg.steps)
    try:
        for step in bar:
            batch = _batch(ids, step, cfg).to(device)
            losses.append(optimizer_step(opt, _loss(model, teacher, batch, cfg), params, step, cfg, rule))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if log is not None and (step + 1) % max(1, cfg.steps // 10) == 0:
                log(f"step {step + 1}/{cfg.steps}: loss {losses[-1]:.4f}")
            if wd is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save_state(wd, step + 1, layers, opt, losses, cfg)
    finally:
        bar.close()
    if wd is not None:
        _save_state(wd, cfg.steps, layers, opt, losses, cfg)
    result.tokens = (cfg.steps - start) * cfg.batch_size * ids.shape[1]
