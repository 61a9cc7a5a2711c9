"""An offline zero-shot *proxy* task: last-word prediction on held-out sentences (LAMBADA-style).

This is not LAMBADA or any published benchmark, and its numbers are not comparable to published results;
every name and output key says "proxy". It needs no dataset download: sentences come from the evaluation
text. For each selected sentence the context is the sentence without its last word; the model must
continue with exactly that word (accuracy, teacher-forced greedy match of all its tokens, as in
lm-evaluation-harness's ``is_greedy``) and we also report the word's mean log-likelihood.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qlr.eval.perplexity import model_device

__all__ = ["LastWordProxyResult", "last_word_proxy", "last_word_sentences"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FINAL_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{2,})[.!?]$")


@dataclass(frozen=True)
class LastWordProxyResult:
    """Scores of the last-word proxy task (a proxy, not a published benchmark).

    ``proxy_last_word_accuracy``: fraction of sentences whose last word the model's greedy continuation
    reproduces exactly. ``proxy_last_word_logprob``: mean over sentences of the word's summed token
    log-probability (nats). ``n_sentences``: how many sentences were scored.
    """

    proxy_last_word_accuracy: float
    proxy_last_word_logprob: float
    n_sentences: int
    task: str = "proxy:last-word"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports; keys carry the ``proxy`` label."""
        return asdict(self)


def last_word_sentences(
    text: str, n_sentences: int = 200, seed: int = 0, min_context_words: int = 8
) -> list[tuple[str, str]]:
    """A deterministic subset of ``(context, last_word)`` pairs from ``text``.

    Whitespace is collapsed and the text split after ``.``, ``!`` or ``?``. A sentence qualifies when it ends
    in an alphabetic word of two or more letters followed by its end mark and has at least
    ``min_context_words`` words before it. ``n_sentences`` of the qualifying sentences are drawn by a
    ``torch.Generator`` seeded with ``seed`` and returned in text order.
    """
    pairs: list[tuple[str, str]] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        match = _FINAL_WORD.match(sentence)
        if match and len(match.group("context").split()) >= min_context_words:
            pairs.append((match.group("context"), match.group("word")))
    if not pairs:
        raise ValueError("no sentence in the text qualifies for the last-word proxy")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(pairs), generator=generator)[:n_sentences].sort().values
    return [pairs[i] for i in chosen.tolist()]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def last_word_proxy(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    n_sentences: int = 200,
    seed: int = 0,
    min_context_words: int = 8,
    max_context_tokens: int = 256,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LastWordProxyResult:
    """Score the last-word proxy task on sentences from ``text`` (see the module docstring).

    Context and the target ``" " + word`` are tokenized separately and concatenated; the context keeps its
    last ``max_context_tokens`` tokens. Sequences, sorted by length, are right-padded into batches of
    ``batch_size``; each is scored exactly as if alone (causal attention, positions from 0). For target
    tokens ``y_1..y_k`` the logits at the positions before them give ``log p(y_j | context, y_<j)``; the
    sentence counts as correct when every ``y_j`` is the argmax. The model runs in eval mode; its previous
    mode is restored.
    """
    pairs = last_word_sentences(text, n_sentences, seed, min_context_words)
    device = torch.device(device) if device is not None else model_device(model)
    items: list[tuple[list[int], list[int]]] = []
    for context, word in pairs:
        ctx = _encode(tokenizer, context)[-max_context_tokens:]
        items.append((ctx, _encode(tokenizer, " " + word)))
    items.sort(key=lambda item: len(item[0]) + len(item[1]))  # less padding; the scores are order-free
    was_training = model.training
    model.eval()
    correct, logprob_sum = 0, 0.0
    try:
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="proxy:last-word", disable=not progress, leave=False):
            batch = items[start : start + batch_size]
            seqs = [ctx + tgt for ctx, tgt in batch]
            width = max(len(s) for s in seqs)
            input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                attention_mask[row, : len(seq)] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
            ).logits  # (batch, width, vocab)
            for row, (ctx, tgt) in enumerate(batch):
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(tgt) - 1, device=logits.device)
                target = torch.tensor(tgt)
                row_lp = torch.log_softmax(logits[row, positions].float(), dim=-1).cpu()  # (len(tgt), vocab)
                logprob_sum += float(row_lp.gather(1, target[:, None]).sum())
                correct += int(torch.equal(row_lp.argmax(dim=-1), target))
    finally:
        model.train(was_training)
    n = len(items)
    return LastWordProxyResult(correct / n, logprob_sum / n, n)
