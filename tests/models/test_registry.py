"""qlr.models.registry: specs as data, block/linear lookup, unsupported architectures."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qlr.models.registry import (
    ARCH_SPECS,
    arch_spec,
    find_linears,
    get_blocks,
    iter_linears,
    select_layers,
    supported_architectures,
)

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_tiny_llama_spec_and_blocks(tiny_model) -> None:
    spec = arch_spec(tiny_model)
    assert spec is ARCH_SPECS["LlamaForCausalLM"]
    blocks = get_blocks(tiny_model, spec)
    assert len(blocks) == 2
    for path in (spec.embedding, spec.final_norm, spec.lm_head, spec.rotary):
        tiny_model.get_submodule(path)
    linears = find_linears(blocks[0], spec)
    assert list(linears) == list(spec.linears)
    assert linears["self_attn.q_proj"].weight.shape == (64, 64)
    assert linears["self_attn.k_proj"].weight.shape == (32, 64)  # 2 kv heads of 16
    assert linears["mlp.down_proj"].weight.shape == (64, 128)
    assert linears["mlp.gate_proj"] is blocks[0].mlp.gate_proj


def test_linear_groups_follow_execution_order(tiny_model, byte_tokenizer) -> None:
    spec = arch_spec(tiny_model)
    block = get_blocks(tiny_model, spec)[0]
    seen: list[str] = []
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            seen.append(name)
            inputs[name] = args[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in find_linears(block, spec).items()]
    try:
        with torch.no_grad():
            tiny_model(byte_tokenizer("order", return_tensors="pt").input_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == list(spec.linears)
    for group in spec.linear_groups:  # the linears of one group read the same input
        for name in group[1:]:
            assert torch.equal(inputs[name], inputs[group[0]])


def test_iter_linears_names(tiny_model) -> None:
    names = [name for name, _ in iter_linears(tiny_model, arch_spec(tiny_model))]
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    for name in names:
        assert isinstance(tiny_model.get_submodule(name), nn.Linear)


@pytest.mark.parametrize(
    ("config_cls", "model_cls"), [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_same_layout_architectures(config_cls, model_cls) -> None:
    model = model_cls(config_cls(**SMALL))
    spec = arch_spec(model)
    assert spec.name == model_cls.__name__
    assert len(list(iter_linears(model, spec))) == 2 * 7
    model.get_submodule(spec.rotary)


def test_unsupported_architecture_errors() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(
        ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"
    ):
        arch_spec(gpt2)
    with pytest.raises(ValueError, match="'BertModel'"):
        arch_spec("BertModel")


def test_subclass_resolves_through_mro(tiny_model) -> None:
    class MyLlama(LlamaForCausalLM):
        pass

    model = MyLlama(tiny_model.config)
    assert arch_spec(model).name == "LlamaForCausalLM"


def test_find_linears_strictness(tiny_model) -> None:
    spec = arch_spec(tiny_model)
    block = get_blocks(tiny_model, spec)[1]
    block.self_attn.o_proj = nn.Identity()
    with pytest.raises(TypeError, match="o_proj"):
        find_linears(block, spec)
    assert "self_attn.o_proj" not in find_linears(block, spec, strict=False)
    broken = dataclasses.replace(spec, linear_groups=(("self_attn.nope",),))
    with pytest.raises(KeyError, match="self_attn.nope"):
        find_linears(block, broken)
    with pytest.raises(ValueError, match="no module"):
        get_blocks(tiny_model, dataclasses.replace(spec, blocks="model.blocks"))


def test_specs_are_read_only() -> None:
    spec = ARCH_SPECS["LlamaForCausalLM"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.blocks = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ARCH_SPECS["GPT2LMHeadModel"] = spec  # type: ignore[index]
    assert supported_architectures() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


def test_select_layers() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    assert select_layers(names, None) == names
    assert select_layers(names, "") == names
    assert select_layers(names, r"mlp") == names[1:]
    assert select_layers(names, r"layers\.0\.") == names[:2]
    assert select_layers(names, r"k_proj") == []
    with pytest.raises(ValueError, match="invalid layer regex"):
        select_layers(names, "(")
