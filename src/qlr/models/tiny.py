"""A tiny random Llama and a byte-level tokenizer, for tests and examples (no download, no files).

``tiny_llama()`` builds a ``LlamaForCausalLM`` from a config with seeded random initialisation, and
``ByteTokenizer`` maps UTF-8 bytes to ids ``0..255``. Together they exercise every code path that a real
Llama-layout model does (GQA attention, gated MLP, RMSNorm, rotary embeddings) in milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["ByteEncoding", "ByteTokenizer", "tiny_llama"]


def tiny_llama(
    seed: int = 0,
    vocab: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 2048,
) -> LlamaForCausalLM:
    """Build a small randomly initialised ``LlamaForCausalLM`` in eval mode.

    The global torch RNG is left untouched: initialisation runs under ``torch.random.fork_rng``, so the
    same ``seed`` always gives the same weights. Linear weights have shapes ``(out_features, in_features)``,
    e.g. ``q_proj`` is ``(hidden, hidden)`` and ``k_proj`` is ``(kv_heads * hidden // heads, hidden)``.
    Word embeddings are untied so that ``lm_head`` is an independent linear.
    """
    if hidden % heads != 0 or heads % kv_heads != 0:
        raise ValueError(
            f"need hidden % heads == 0 and heads % kv_heads == 0, got {hidden=}, {heads=}, {kv_heads=}"
        )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@dataclass
class ByteEncoding:
    """Result of ``ByteTokenizer.__call__``; supports ``enc.input_ids`` and ``enc["input_ids"]``.

    ``input_ids`` and ``attention_mask`` are ``LongTensor (batch, seq)`` for ``return_tensors="pt"``,
    otherwise a list of ids (one text) or a list of lists (several texts).
    """

    input_ids: torch.Tensor | list[int] | list[list[int]]
    attention_mask: torch.Tensor | list[int] | list[list[int]]

    def __getitem__(self, key: str) -> torch.Tensor | list[int] | list[list[int]]:
        return getattr(self, key)

    def keys(self) -> list[str]:
        """Field names, like a ``BatchEncoding``."""
        return ["input_ids", "attention_mask"]


class ByteTokenizer:
    """UTF-8 byte tokenizer: each byte is one token id in ``0..255``.

    Id 0 (the NUL byte, which never occurs in normal text) doubles as ``eos_token_id`` and ``pad_token_id``.
    There is no BOS token; ``add_special_tokens`` is accepted and ignored. Decoding replaces invalid UTF-8.
    """

    vocab_size: int = 256
    eos_token_id: int = 0
    pad_token_id: int = 0
    bos_token_id: int | None = None
    model_max_length: int = 1 << 30

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs: object) -> list[int]:
        """Token ids of ``text``: ``list(text.encode("utf-8"))``."""
        return list(text.encode("utf-8"))

    def decode(
        self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False, **kwargs: object
    ) -> str:
        """Inverse of ``encode``; accepts a list of ints or a 1-D tensor."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        add_special_tokens: bool = False,
        **kwargs: object,
    ) -> ByteEncoding:
        """Encode one text or a batch; with ``return_tensors="pt"`` the ids are ``LongTensor (batch, seq)``.

        A batch of texts of different lengths is right-padded with ``pad_token_id`` (mask 0) when tensors
        are requested.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t) for t in texts]
        masks = [[1] * len(x) for x in ids]
        if return_tensors is None:
            return ByteEncoding(ids[0], masks[0]) if single else ByteEncoding(ids, masks)
        if return_tensors != "pt":
            raise ValueError(f"ByteTokenizer supports return_tensors='pt' or None, got {return_tensors!r}")
        width = max((len(x) for x in ids), default=0)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        return ByteEncoding(input_ids, attention_mask)
