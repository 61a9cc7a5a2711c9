"""qlr.models.registry: decoder blocks and linears found from the module tree; overrides; clear failures."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
import torch
from torch import nn

import qlr.models.registry as registry
from qlr.models.registry import (
    ARCH_SPECS,
    ArchSpec,
    arch_spec,
    block_linears,
    find_blocks,
    get_blocks,
    is_linear,
    iter_linears,
    linear_weight,
    select_layers,
)
from tests.models.archs import tiny_causal_lm


def test_tiny_llama_blocks_and_linears(tiny_model) -> None:
    path, blocks = find_blocks(tiny_model)
    assert path == "model.layers" and blocks is tiny_model.model.layers
    linears = block_linears(blocks[0])
    assert list(linears) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert linears["self_attn.k_proj"].weight.shape == (32, 64)  # 2 kv heads of 16
    names = [name for name, _ in iter_linears(tiny_model)]
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    assert "lm_head" not in " ".join(names) and "embed" not in " ".join(names)


@pytest.mark.parametrize(("arch", "path", "first"), [
    ("gpt2", "transformer.h", "attn.c_attn"),
    ("gpt_neox", "gpt_neox.layers", "attention.query_key_value"),
    ("falcon", "transformer.h", "self_attention.query_key_value"),
    ("phi3", "model.layers", "self_attn.o_proj"),
])
def test_other_layouts(arch, path, first) -> None:
    model = tiny_causal_lm(arch)
    assert find_blocks(model)[0] == path
    assert first in block_linears(get_blocks(model)[0])


def test_conv1d_weight_is_read_out_by_in() -> None:
    model = tiny_causal_lm("gpt2")
    c_fc = get_blocks(model)[0].mlp.c_fc  # Conv1D(nf=4·64, nx=64) stores (64, 256)
    assert is_linear(c_fc) and c_fc.weight.shape == (64, 256)
    w = linear_weight(c_fc)
    assert w.shape == (256, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_fc(x), x @ w.T + c_fc.bias)


def test_routers_are_skipped() -> None:
    block = get_blocks(tiny_causal_lm("qwen2_moe"))[0]
    assert "mlp.shared_expert_gate" in block_linears(block, skip=None)
    assert "mlp.shared_expert_gate" not in block_linears(block)
    assert "mlp.shared_expert.down_proj" in block_linears(block)


def test_largest_list_wins_and_overrides(tiny_model, monkeypatch) -> None:
    class Wrapper(nn.Module):  # a small ModuleList of linears beside the real blocks
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.adapters = nn.ModuleList([nn.Linear(4, 4)])

    model = Wrapper(tiny_model)
    assert find_blocks(model)[0] == "inner.model.layers"
    monkeypatch.setattr(registry, "ARCH_SPECS", MappingProxyType({"Wrapper": ArchSpec("Wrapper", blocks="adapters")}))
    assert find_blocks(model)[0] == "adapters"
    assert arch_spec(model).blocks == "adapters" and arch_spec("Other") == ArchSpec("Other")
    monkeypatch.setattr(registry, "ARCH_SPECS",
                        MappingProxyType({"Wrapper": ArchSpec("Wrapper", blocks="inner.nope")}))
    with pytest.raises(ValueError, match="no module 'inner.nope'"):
        find_blocks(model)


def test_model_without_blocks_is_one_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Sequential"):
        find_blocks(model)


def test_specs_are_read_only() -> None:
    with pytest.raises(TypeError):
        ARCH_SPECS["X"] = ArchSpec("X")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ArchSpec("X").blocks = "y"  # type: ignore[misc]


def test_select_layers() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    assert select_layers(names, None) == names
    assert select_layers(names, "") == names
    assert select_layers(names, r"mlp") == names[1:]
    assert select_layers(names, r"layers\.0\.") == names[:2]
    assert select_layers(names, r"k_proj") == []
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        select_layers(names, "(")


@pytest.mark.parametrize("pattern", ["mlp(", "[q-a]_proj", "*"])
def test_invalid_layer_pattern_is_one_cli_error_line(pattern, tmp_path, capsys) -> None:
    """An invalid --layers regex: exit code 2 and one line saying which pattern and why, no traceback; the same
    message as select_layers gives (the one place that compiles the pattern)."""
    from qlr.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text. " * 50)
    rc = main(["compress", "--layers", pattern, "--calib-text", str(text), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    with pytest.raises(ValueError) as direct:
        select_layers([], pattern)
    assert err == f"qlr compress: error: {' '.join(str(direct.value).split())}\n"
    assert f"the layer pattern {pattern!r} is not a valid regular expression: " in err
