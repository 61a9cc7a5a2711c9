"""qlr.models.tiny: the byte tokenizer and the seeded tiny Llama."""

from __future__ import annotations

import pytest
import torch

from qlr.models.tiny import ByteTokenizer, tiny_llama


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Whale — Wal, ünïcode 🐋"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    enc = tok(text, return_tensors="pt")
    assert enc.input_ids.shape == (1, len(ids)) and enc.input_ids.dtype == torch.long
    assert torch.equal(enc["input_ids"][0], torch.tensor(ids))
    assert tok(text)["input_ids"] == ids


def test_byte_tokenizer_batch_padding() -> None:
    enc = ByteTokenizer()(["ab", "abcd"], return_tensors="pt")
    assert enc.input_ids.tolist() == [[97, 98, 0, 0], [97, 98, 99, 100]]
    assert enc.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="return_tensors"):
        ByteTokenizer()("x", return_tensors="np")


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()


def test_tiny_llama_forward_shape(byte_tokenizer) -> None:
    model = tiny_llama(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)
    ids = byte_tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="kv_heads"):
        tiny_llama(heads=4, kv_heads=3)
