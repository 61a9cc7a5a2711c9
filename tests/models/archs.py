"""Tiny random causal LMs of every architecture family qlr is tested on, built from transformers config classes
(no download): 2 decoder layers, hidden 64, vocabulary 128."""

from __future__ import annotations

import torch
import transformers
from torch import nn

_LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)

ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _LLAMA_LIKE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_LLAMA_LIKE, "num_local_experts": 4,
                                                         "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
}
"""name → (config class, model class, config keyword arguments)."""

MOE = ("mixtral", "qwen2_moe")


def tiny_causal_lm(arch: str, seed: int = 0, **overrides: object) -> nn.Module:
    """A seeded random model of family ``arch`` (a key of :data:`ARCHS`), eval mode, global RNG untouched;
    ``overrides`` replace config arguments (e.g. ``vocab_size=256``)."""
    config_cls, model_cls, kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
    return model.eval()


def token_ids(batch: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Random ids (batch, length) in the tiny vocabulary."""
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_tied_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (hidden 64, vocabulary 256) with tied embeddings and attention biases, seeded, eval mode:
    the shape the checkpoint and export tests build their hand-made compressed models on."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=True, max_position_embeddings=64, attention_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.eval()
