"""qlr.eval.perplexity against a hand computation on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from qlr.data import tokenize
from qlr.eval.perplexity import perplexity


def _hand_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean over windows and positions of -log p(x[t+1] | x[:t+1])), computed directly."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(windows).logits.double(), dim=-1)  # (n, T, V)
    targets = windows[:, 1:]
    token_lp = logprobs[:, :-1].gather(2, targets[..., None]).squeeze(-1)  # (n, T-1)
    return math.exp(-token_lp.mean().item())


def test_perplexity_matches_hand_computation(tiny_model, byte_tokenizer, sample_text: str) -> None:
    ids = tokenize(byte_tokenizer, sample_text)
    ppl = perplexity(tiny_model, byte_tokenizer, sample_text, seqlen=128, max_windows=1, progress=False)
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(_hand_ppl(tiny_model, ids[None, :128]), rel=1e-5)
    assert 100 < ppl < 600  # a random 256-way model is close to uniform


def test_windows_batches_and_tensor_input(tiny_model, byte_tokenizer, sample_text: str) -> None:
    text = sample_text * 2
    ids = tokenize(byte_tokenizer, text)
    windows = ids[: (ids.numel() // 100) * 100].view(-1, 100)
    expected = _hand_ppl(tiny_model, windows)
    for batch_size in (1, 3, 64):
        got = perplexity(tiny_model, byte_tokenizer, text, seqlen=100, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    got = perplexity(tiny_model, None, ids, seqlen=100, max_windows=2, progress=False)
    assert got == pytest.approx(_hand_ppl(tiny_model, windows[:2]), rel=1e-5)


def test_perplexity_detects_a_better_model(tiny_model, byte_tokenizer, sample_text: str) -> None:
    # Make lm_head strongly favour the byte 'e': perplexity must change, so the metric reads the model.
    base = perplexity(tiny_model, byte_tokenizer, sample_text, seqlen=64, progress=False)
    with torch.no_grad():
        tiny_model.lm_head.weight[ord("e")] += 5.0 * tiny_model.model.norm(tiny_model.lm_head.weight).mean(0)
    assert perplexity(tiny_model, byte_tokenizer, sample_text, seqlen=64, progress=False) != pytest.approx(
        base
    )


def test_perplexity_restores_mode_and_validates(tiny_model, byte_tokenizer) -> None:
    tiny_model.train()
    perplexity(tiny_model, byte_tokenizer, "x" * 40, seqlen=16, progress=False)
    assert tiny_model.training
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model, byte_tokenizer, "short", seqlen=16, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(tiny_model, byte_tokenizer, "short", seqlen=1, progress=False)
