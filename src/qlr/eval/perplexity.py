"""Perplexity over non-overlapping windows of a text."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qlr.data import tokenize

__all__ = ["model_device", "perplexity", "window_nll"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def window_nll(model: nn.Module, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) over a batch of windows, and the number of predicted tokens.

    ``input_ids``: ``LongTensor (batch, seq)`` on the model's device. Position ``t`` predicts token ``t+1``,
    so each window contributes ``seq - 1`` tokens; logits are upcast to float32 before the log-softmax.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits  # (batch, seq, vocab)
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum")
    return float(nll), targets.numel()


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen``-token windows of ``text``.

    The text (or pre-tokenized ``LongTensor (n_tokens,)``) is cut into ``n = n_tokens // seqlen`` windows
    (the tail is dropped), of which the first ``max_windows`` are used. Each window is scored independently
    with no context from earlier windows, and the mean is over all ``n * (seqlen - 1)`` predicted tokens:
    ``ppl = exp(sum NLL / (n * (seqlen - 1)))``. The model runs in eval mode under ``no_grad`` on
    ``device`` (default: where its parameters are); its previous train/eval mode is restored afterwards.
    """
    if seqlen < 2 or batch_size < 1:
        raise ValueError(f"need seqlen >= 2 and batch_size >= 1, got {seqlen=}, {batch_size=}")
    ids = text.reshape(-1).long() if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        starts = range(0, n_windows, batch_size)
        for start in tqdm(starts, desc=f"perplexity (seqlen {seqlen})", disable=not progress, leave=False):
            nll, count = window_nll(model, windows[start : start + batch_size].to(device))
            total_nll += nll
            total_tokens += count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
