"""PEFT LoRA adapters on qlr models: the wrapped forward, training only the adapter, save → load, and merging
into the factors (also through a Hadamard-rotated layer)."""

from __future__ import annotations

import copy

import pytest
import torch

import qlr
from qlr.models.tiny import tiny_llama
from qlr.nn.qlinear import QLRLinear

peft = pytest.importorskip("peft")
from qlr.integrations.peft import get_peft_model, load_adapter, merge_into_factors  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """FP tiny Llama, a CALDERA (grid Q, no rotation) and an ODLRI (E8P Q, Hadamard-rotated) compression of it."""
    fp = tiny_llama(seed=0)
    ids = torch.tensor(list((b"a stitch in time saves nine; " * 40)[:1024])).reshape(16, 64)
    out = {"fp": fp, "ids": ids}
    for method, kw in (("caldera", {"group_size": 32}), ("odlri", {})):
        m = copy.deepcopy(fp)
        qlr.compress(m, method, 2, rank=4, calibration=ids, progress=False, outer_iters=1, inner_iters=1, **kw)
        out[method] = m
    assert out["odlri"].model.layers[0].self_attn.q_proj.meta["rotation"] is not None
    return out


def _config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False, **kw)


@pytest.mark.parametrize("method", ["caldera", "odlri"])
def test_adapter_forward_is_base_plus_scaled_lora(models, method):
    base = copy.deepcopy(models[method])
    layer = copy.deepcopy(base.model.layers[1].self_attn.v_proj)
    pm = get_peft_model(base, _config())
    wrapped = pm.base_model.model.model.layers[1].self_attn.v_proj
    x = torch.randn(5, layer.in_features)
    A, B = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    with torch.no_grad():
        want = layer(x) + 2.0 * (x @ A.T) @ B.T
        torch.testing.assert_close(wrapped(x), want, rtol=1e-5, atol=1e-5)
        assert B.abs().sum() > 0


def test_only_the_adapter_trains_and_codes_stay(models):
    base = copy.deepcopy(models["caldera"])
    codes = {n: b.clone() for n, b in base.named_buffers()}
    pm = get_peft_model(base, _config())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = models["ids"]
    losses = []
    for _ in range(8):
        out = pm(input_ids=ids[:4], labels=ids[:4])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    for n, b in pm.base_model.model.named_buffers():
        key = n.replace(".base_layer", "")
        assert torch.equal(b, codes[key]), n


@pytest.mark.parametrize("method", ["caldera", "odlri"])
def test_save_load_and_merge(models, method, tmp_path):
    ids = models["ids"][:2]
    pm = get_peft_model(copy.deepcopy(models[method]), _config())
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(models[method]), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    layer = merged.model.layers[1].self_attn.v_proj
    assert isinstance(layer, QLRLinear) and layer.rank == 4 + 3 and layer.meta["l"]["codec"] == "dense"
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 2e-3 * scale  # the factors are stored in fp16
    qlr.save(merged, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(qlr.load(tmp_path / "merged")(ids).logits, got, rtol=0, atol=0)


def test_an_adapter_trained_on_the_fp_model_loads(models, tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(models["fp"]), _config())
    pm.save_pretrained(tmp_path / "fp_adapter")
    loaded = load_adapter(copy.deepcopy(models["caldera"]), tmp_path / "fp_adapter")
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "QLRLoraLinear"


def test_merge_into_factors_rank0_and_bad_shapes(models):
    layer = copy.deepcopy(models["odlri"].model.layers[0].mlp.down_proj)
    x = torch.randn(4, layer.in_features)
    A, B = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    with torch.no_grad():
        want = layer(x) + 0.5 * (x @ A.T) @ B.T
    merge_into_factors(layer, A, B, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    with pytest.raises(ValueError, match="needs A"):
        merge_into_factors(layer, B, A)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        load_adapter(models["fp"], "/nonexistent")
