"""qlr.eval.proxy: sentence selection and last-word scoring (a proxy task, not LAMBADA)."""

from __future__ import annotations

import math

import pytest
import torch

from qlr.eval.proxy import last_word_proxy, last_word_sentences


def test_sentence_selection(sample_text: str) -> None:
    pairs = last_word_sentences(sample_text, n_sentences=100, seed=0, min_context_words=8)
    # all qualifying sentences, in text order ("...pistol and ball." has only 7 context words)
    assert [w for _, w in pairs] == ["world", "circulation", "can"]
    flat = " ".join(sample_text.split())
    for context, word in pairs:
        assert f"{context} {word}." in flat
    assert pairs[0][0].startswith("Some years ago")
    two = last_word_sentences(sample_text, n_sentences=2, seed=0)
    assert two == last_word_sentences(sample_text, n_sentences=2, seed=0)
    assert set(two) <= set(pairs) and len(two) == 2
    assert len({tuple(last_word_sentences(sample_text, 2, seed=s)) for s in range(8)}) > 1
    with pytest.raises(ValueError, match="no sentence"):
        last_word_sentences("Too short. Also short!", min_context_words=8)


def test_proxy_on_tiny_model(tiny_model, byte_tokenizer, sample_text: str) -> None:
    text = sample_text * 3
    result = last_word_proxy(tiny_model, byte_tokenizer, text, n_sentences=6, batch_size=4, progress=False)
    assert result.n_sentences == 6 and result.task == "proxy:last-word"
    assert 0.0 <= result.proxy_last_word_accuracy <= 1.0
    assert math.isfinite(result.proxy_last_word_logprob) and result.proxy_last_word_logprob < 0
    report = result.to_dict()
    assert report["task"] == "proxy:last-word"
    assert {"proxy_last_word_accuracy", "proxy_last_word_logprob", "n_sentences"} <= set(report)
    alone = last_word_proxy(tiny_model, byte_tokenizer, text, n_sentences=6, batch_size=1, progress=False)
    assert alone.proxy_last_word_accuracy == result.proxy_last_word_accuracy
    assert alone.proxy_last_word_logprob == pytest.approx(result.proxy_last_word_logprob, abs=1e-4)


def test_proxy_logprob_matches_hand_computation(tiny_model, byte_tokenizer, sample_text: str) -> None:
    ((context, word),) = last_word_sentences(sample_text, n_sentences=1, seed=0)
    result = last_word_proxy(tiny_model, byte_tokenizer, sample_text, n_sentences=1, progress=False)
    ctx, tgt = list(context.encode()), list(f" {word}".encode())
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_model(torch.tensor([ctx + tgt])).logits[0], dim=-1)
    expected = sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(tgt))
    assert result.proxy_last_word_logprob == pytest.approx(expected, abs=1e-4)
    assert result.proxy_last_word_accuracy == 0.0  # a random model does not spell the word


def test_proxy_accuracy_can_be_perfect(byte_tokenizer) -> None:
    class Oracle(torch.nn.Module):
        """Predicts the next byte of a fixed text: a perfect last-word model on that text."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.ids = torch.tensor(list(text.encode()))
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            logits = torch.full((*input_ids.shape, 256), -10.0)
            for row, seq in enumerate(input_ids.tolist()):
                for pos in range(len(seq)):
                    logits[row, pos, self.next_byte(seq[: pos + 1])] = 10.0
            return type("Out", (), {"logits": logits})()

        def next_byte(self, prefix: list[int]) -> int:
            data, n = self.ids.tolist(), len(prefix)
            for start in range(len(data) - n):
                if data[start : start + n] == prefix:
                    return data[start + n]
            return 0

    text = "the ship sailed out of the harbour at dawn and the whole crew watched the sea."
    result = last_word_proxy(Oracle(text), byte_tokenizer, text, n_sentences=1, progress=False)
    assert result.proxy_last_word_accuracy == 1.0
    assert result.proxy_last_word_logprob > -1e-3
