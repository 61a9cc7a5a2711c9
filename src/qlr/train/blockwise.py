"""Block-wise QPEFT (``FinetuneConfig(mode="blockwise")``): fit each decoder block's L, R to its teacher block.

For decoder block b, with X_b the compressed model's own input to block b (the token windows run through the
blocks 0..b-1 already trained) and T_b the teacher's output of block b on the teacher's own input, the block's
factors minimise, by AdamW over ``steps`` mini-batches,

    ‖f_b(X_b; L, R) − T_b‖² / ‖T_b‖²          (normalised MSE over the mini-batch's positions and channels),

so each block learns to correct the error that reaches it, and to reproduce the full-precision trajectory. The
activations are computed block by block (one block's worth of hidden states per model in memory), and a teacher
block is moved to the student's device only for its own turn: a model that cannot be held twice on the device
can still be trained. The training state is saved after every block; a resumed run recomputes the activations
through the finished blocks and continues with the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration.blocks import capture_block_inputs
from ..models.registry import get_blocks
from ..nn.qlinear import QLRLinear
from .finetune import FinetuneConfig, PreservedStep, _load_state, _save_state, autocast, make_optimizer, optimizer_step

__all__ = ["train_blocks"]


def _block_out(block: nn.Module, hidden: Tensor, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Tensor:
    args, kw = call
    out = block(hidden, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


def train_blocks(student: nn.Module, teacher: nn.Module, ids: Tensor, cfg: FinetuneConfig,
                 layers: dict[str, QLRLinear], rule: PreservedStep, work_dir: Path | None, resume: bool,
                 progress: bool, log: Callable[[str], None] | None) -> tuple[list[float], int]:
    """Train the factors of ``layers`` (already made trainable) block by block (module docstring).

    Args:
        student, teacher: the compressed model and its full-precision original (same architecture).
        ids: training windows (N, T); mini-batches are fixed chunks of ``cfg.batch_size`` windows, and step s of
            block b trains on the chunk drawn by a generator seeded with (seed, b, s).
    Returns:
        (the loss of every step, block after block; the tokens trained on).
    """
    s_blocks, t_blocks = get_blocks(student), get_blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise ValueError(f"the teacher has {len(t_blocks)} decoder blocks and the compressed model "
                         f"{len(s_blocks)}: blockwise training needs the model it was compressed from")
    device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    start, losses = 0, []
    if resume and work_dir is not None:
        start, losses = _load_state(work_dir, layers, make_optimizer(layers.values(), cfg), cfg)
    with torch.no_grad():
        s_in = capture_block_inputs(student, ids, cfg.batch_size)
        t_hidden = capture_block_inputs(teacher, ids, cfg.batch_size).hidden
    hidden, calls = s_in.hidden, s_in.calls
    tokens = 0
    bar = tqdm(total=len(s_blocks) * cfg.steps, initial=start * cfg.steps, desc="finetune (blockwise)",
               disable=not progress, unit="step")
    try:
        for b, (sb, tb) in enumerate(zip(s_blocks, t_blocks, strict=True)):
            if t_device != device:
                tb.to(device)
            with torch.no_grad(), autocast(device, cfg.amp):
                target = [_block_out(tb, h.to(device), call).float() for h, call in zip(t_hidden, calls[b],
                                                                                          strict=True)]
            if t_device != device:
                tb.to(t_device)
            members = {id(m) for m in sb.modules()}
            block_layers = {n: m for n, m in layers.items() if id(m) in members}
            if b >= start and block_layers:
                tokens += _train_block(sb, hidden, target, calls[b], block_layers, cfg, rule, b, losses, bar)
                if log is not None:
                    log(f"block {b + 1}/{len(s_blocks)}: loss {losses[-1]:.4f}")
                if work_dir is not None:
                    _save_state(work_dir, b + 1, layers, torch.optim.AdamW([torch.zeros(1)]), losses, cfg)
            elif b >= start:
                bar.update(cfg.steps)
            with torch.no_grad(), autocast(device, cfg.amp):
                hidden = [_block_out(sb, h, call).float() for h, call in zip(hidden, calls[b], strict=True)]
            t_hidden = target
    finally:
        bar.close()
    return losses, tokens


def _train_block(block: nn.Module, hidden: list[Tensor], target: list[Tensor],
                 calls: list[tuple[tuple[Any, ...], dict[str, Any]]], layers: dict[str, QLRLinear],
                 cfg: FinetuneConfig, rule: PreservedStep, b: int, losses: list[float], bar: Any) -> int:
    params = [p for m in layers.values() for p in m.trained_tensors().values()]
    opt = make_optimizer(layers.values(), cfg)
    block_rule = rule.restricted(layers)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
    tokens = 0
    for step in range(cfg.steps):
        i = int(torch.randint(len(hidden), (1,), generator=gen))
        with autocast(hidden[i].device, cfg.amp):
            out = _block_out(block, hidden[i], calls[i]).float()
        loss = (out - target[i]).pow(2).mean() / target[i].pow(2).mean().clamp_min(1e-12)
        losses.append(optimizer_step(opt, loss, params, step, cfg, block_rule))
        tokens += hidden[i].shape[0] * hidden[i].shape[1]
        bar.set_postfix(block=b, loss=f"{losses[-1]:.4f}")
        bar.update(1)
    return tokens
