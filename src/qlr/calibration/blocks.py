"""Block-by-block calibration: the inputs of every decoder block, and the statistics of its linears.

    capture_block_inputs   block 0's input hidden states and every block's call arguments, per mini-batch
    calibrate_block        run one block on its inputs with input hooks on its linears → H = E[x xᵀ] (float64)
                           and mean |x| per linear (:class:`BlockStats`; linears reading one tensor share H)
    run_block              the block's outputs, which become the next block's inputs

:mod:`qlr.calibration.pipeline` strings these together with the per-layer compression.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models.registry import get_blocks
from .hessian import HessianAccumulator

__all__ = ["BlockInputs", "BlockStats", "Calls", "capture_block_inputs", "calibrate_block", "run_block",
           "model_device"]

Calls = list[tuple[tuple[Any, ...], dict[str, Any]]]
"""One block's call arguments for every mini-batch: (the positional arguments after the hidden states, the keyword
arguments)."""


class _Stop(Exception):
    """Raised by the last block's recorder to end a capturing forward pass early."""


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
    calls: list[Calls]


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
                model(input_ids[i * batch_size:(i + 1) * batch_size].to(model_device(model)), use_cache=False)
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def run_block(block: nn.Module, hidden: list[Tensor], calls: Calls) -> list[Tensor]:
    """The block's output hidden states for every mini-batch (``hidden[i]`` called with ``calls[i]``)."""
    outs = []
    for hs, (args, kw) in zip(hidden, calls, strict=True):
        out = block(hs, *args, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class BlockStats:
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


def calibrate_block(block: nn.Module, linears: Mapping[str, nn.Module], hidden: list[Tensor], calls: Calls
                    ) -> BlockStats:
    """Run ``block`` (no gradients) on every mini-batch of ``hidden`` with ``calls``, with input hooks on
    ``linears`` (block-relative name → linear); returns their statistics (call :meth:`BlockStats.finalize`).
    The hooks are removed afterwards, also when the forward fails."""
    stats = BlockStats(linears)
    handles = stats.hooks()
    handles.append(block.register_forward_pre_hook(lambda *_: stats.new_pass()))
    try:
        with torch.no_grad():
            run_block(block, hidden, calls)
    finally:
        for h in handles:
            h.remove()
    return stats
