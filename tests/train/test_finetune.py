"""qlr.train.finetune: only L and R train, Q's codes stay bit-identical, the loss falls, storage is honest and a
resumed run equals an uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch

from qlr.models.tiny import tiny_llama
from qlr.train import FinetuneConfig, finetune, trainable_layers
from tests.train.common import interrupted_then_resumed, q_codes


def test_trainable_factors_compute_the_same_layer(compressed):
    _, student, ids = compressed
    layer = copy.deepcopy(next(iter(trainable_layers(student).values())))
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.train_factors()
        after = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert layer.l_train.shape == (layer.out_features, layer.rank)
    assert layer.r_train.shape == (layer.rank, layer.in_features)


def test_gradients_reach_only_the_factors(compressed):
    _, student, ids = compressed
    model = copy.deepcopy(student)
    params = [p for mod in trainable_layers(model).values() for p in mod.train_factors()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model(ids[:2]).logits.float().logsumexp(-1).mean().backward()
    trained = {id(p) for p in params}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert all(p.grad.abs().sum() > 0 for p in params)


def test_kd_keeps_q_codes_and_bits_and_lowers_the_loss(compressed):
    fp, student, ids = compressed
    model = copy.deepcopy(student)
    codes, bpw = q_codes(model), {n: m.bits_per_weight for n, m in trainable_layers(model).items()}
    res = finetune(model, ids, FinetuneConfig(steps=12, lr=3e-3, batch_size=4, warmup=2), teacher=fp,
                   progress=False)
    assert len(res.losses) == 12 and res.tokens == 12 * 4 * 64 and res.trainable_parameters > 0
    after = q_codes(model)
    assert after.keys() == codes.keys() and all(torch.equal(after[k], codes[k]) for k in codes)
    for name, mod in trainable_layers(model).items():
        assert mod.l_train is None and mod.bits_per_weight == bpw[name]
        assert mod.meta["l"]["codec"] == "e8p" and mod.meta["l"]["stages"] == 2
    assert sum(res.losses[-3:]) < 0.8 * sum(res.losses[:3])
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


def test_lm_objective_fp16_storage_counts_its_bits(compressed):
    _, student, ids = compressed
    model = copy.deepcopy(student)
    bits0 = sum(m.storage_bits() for m in trainable_layers(model).values())
    res = finetune(model, ids, FinetuneConfig(steps=15, lr=1e-2, batch_size=8, objective="lm", storage="fp16",
                                              warmup=0), progress=False)
    assert res.losses[-1] < res.losses[0]
    layers = trainable_layers(model)
    assert all(m.meta["l"]["codec"] == "dense" and m.meta["r"]["codec"] == "dense" for m in layers.values())
    extra = sum(16 * m.rank * (m.in_features + m.out_features) - 4 * m.rank * (m.in_features + m.out_features)
                for m in layers.values())
    assert sum(m.storage_bits() for m in layers.values()) == pytest.approx(bits0 + extra, rel=0.01)


def test_resume_equals_uninterrupted(compressed, tmp_path):
    fp, student, ids = compressed
    cfg = FinetuneConfig(steps=8, lr=3e-3, batch_size=4, warmup=2, save_every=4)
    whole = copy.deepcopy(student)
    finetune(whole, ids, cfg, teacher=fp, progress=False)
    again, res = interrupted_then_resumed(student, ids, cfg, fp, tmp_path, "step 6/")
    assert len(res.losses) == 8
    for (name, a), (_, b) in zip(whole.named_buffers(), again.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="started with lr=0.003"):
        finetune(copy.deepcopy(student), ids, FinetuneConfig(steps=8, lr=1e-3, batch_size=4, warmup=2),
                 teacher=fp, work_dir=tmp_path, resume=True, progress=False)


def test_bad_inputs():
    with pytest.raises(ValueError, match="objective"):
        FinetuneConfig(objective="dpo")
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="no compressed layer"):
        finetune(model, torch.zeros(2, 8, dtype=torch.long), FinetuneConfig(objective="lm"), progress=False)
    with pytest.raises(ValueError, match="needs the full-precision teacher"):
        finetune(model, torch.zeros(2, 8, dtype=torch.long), FinetuneConfig(), progress=False)
    with pytest.raises(ValueError, match="gradient_checkpointing: Sequential has no activation-checkpointing"):
        finetune(torch.nn.Sequential(), torch.zeros(2, 8, dtype=torch.long),
                 FinetuneConfig(objective="lm", gradient_checkpointing=True), progress=False)


def test_training_through_rounding_stores_exactly_the_trained_model(compressed):
    fp, student, ids = compressed
    model = copy.deepcopy(student)
    bpw = {n: m.bits_per_weight for n, m in trainable_layers(model).items()}
    res = finetune(model, ids, FinetuneConfig(steps=6, lr=3e-3, batch_size=4, warmup=1, storage="none",
                                              through_rounding=True), teacher=fp, progress=False)
    assert len(res.losses) == 6
    with torch.no_grad():
        trained = model(ids[:2]).logits
        for mod in trainable_layers(model).values():
            mod.store_factors("requantize")
        stored = model(ids[:2]).logits
    torch.testing.assert_close(stored, trained, rtol=1e-4, atol=1e-4)
    assert {n: m.bits_per_weight for n, m in trainable_layers(model).items()} == bpw


def test_q_cache_trains_the_same_factors_and_is_dropped(compressed):
    """q_cache multiplies with Q decoded once: the same losses and trained factors as decoding the codes every
    call (up to float summation order), the codes untouched, and no cache left on the model afterwards."""
    fp, student, ids = compressed
    runs = []
    for q_cache in (False, True):
        model = copy.deepcopy(student)
        cfg = FinetuneConfig(steps=4, lr=1e-3, batch_size=2, warmup=1, storage="none", q_cache=q_cache)
        res = finetune(model, ids, cfg, teacher=fp, progress=False)
        runs.append((res.losses, {n: m.l_train.detach().clone() for n, m in trainable_layers(model).items()},
                     q_codes(model)))
        from qlr.nn import QLRLinear

        assert not any("_q_dense" in m.__dict__ for m in model.modules() if isinstance(m, QLRLinear))
    (l0, f0, c0), (l1, f1, c1) = runs
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-6)
    for name in f0:
        torch.testing.assert_close(f1[name], f0[name], rtol=1e-3, atol=1e-5)
    assert all(torch.equal(c1[k], c0[k]) for k in c0)


def _scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.q_scale.clone() for n, m in trainable_layers(model).items()}


def test_train_scales_moves_q_scales_only_and_resumes(compressed, tmp_path):
    """train_scales: Q's scales train beside L and R (no weight decay on the multipliers), Q's codes and the bits
    stay; the stored model is exactly the trained one (through the rounding); a resumed run equals an
    uninterrupted one, multipliers and their Adam moments included."""
    fp, student, ids = compressed
    cfg = FinetuneConfig(steps=8, lr=3e-3, batch_size=4, warmup=2, save_every=4, through_rounding=True,
                         train_scales=True, weight_decay=0.1)
    whole = copy.deepcopy(student)
    codes, scales0 = q_codes(whole), _scales(whole)
    bpw = {n: m.bits_per_weight for n, m in trainable_layers(whole).items()}
    res = finetune(whole, ids, FinetuneConfig(**{**cfg.__dict__, "storage": "none"}), teacher=fp, progress=False)
    layers = trainable_layers(whole)
    assert res.trainable_parameters == sum(p.numel() for m in layers.values() for p in m.trained_tensors().values())
    assert all(m.q_scale_train is not None and m.q_scale_train.shape == (1,) for m in layers.values())
    with torch.no_grad():
        trained = whole(ids[:2]).logits
        for mod in layers.values():
            mod.store_factors("requantize")
            mod.store_q_scales()
        stored = whole(ids[:2]).logits
    torch.testing.assert_close(stored, trained, rtol=1e-4, atol=1e-4)
    after = q_codes(whole)
    moved = [k for k in codes if not torch.equal(after[k], codes[k])]
    assert moved and all(k.endswith(".q_scale") for k in moved)
    assert {n: m.bits_per_weight for n, m in trainable_layers(whole).items()} == bpw
    assert sum(res.losses[-3:]) < sum(res.losses[:3])
    assert any(not torch.equal(s, scales0[n]) for n, s in _scales(whole).items())

    again, _ = interrupted_then_resumed(student, ids, cfg, fp, tmp_path, "step 6/")
    for (name, a), (_, b) in zip(whole.named_buffers(), again.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_recomputes_blocks_and_trains_the_same(compressed):
    """gradient_checkpointing: every decoder block runs again in the backward (its MLP is called twice), the losses
    and trained factors equal a run without it, and the model is left without checkpointing."""
    from qlr.models.registry import get_blocks

    fp, student, ids = compressed
    runs = []
    for gc in (False, True):
        model = copy.deepcopy(student)
        calls = []
        # inside the block (transformers checkpoints the block's forward, not its hooks)
        get_blocks(model)[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        cfg = FinetuneConfig(steps=3, lr=1e-3, batch_size=2, warmup=1, storage="none", gradient_checkpointing=gc)
        res = finetune(model, ids, cfg, teacher=fp, progress=False)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        runs.append((res.losses, len(calls), {n: m.l_train.detach().clone()
                                               for n, m in trainable_layers(model).items()}))
    (l0, c0, f0), (l1, c1, f1) = runs
    assert c0 == 3 and c1 == 6
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-6, atol=1e-7)
    for name in f0:
        torch.testing.assert_close(f1[name], f0[name], rtol=1e-6, atol=1e-7)


def test_refused_train_scales_leaves_the_model_as_it_was(compressed, monkeypatch):
    fp, student, ids = compressed
    model = copy.deepcopy(student)
    name, layer = next(iter(trainable_layers(model).items()))
    monkeypatch.setattr(layer, "q_scales_untrainable", lambda: "its Q stores power-of-two scales")
    with pytest.raises(ValueError, match=f"train_scales: layer {name}: its Q stores power-of-two"):
        finetune(model, ids, FinetuneConfig(steps=1, train_scales=True), teacher=fp, progress=False)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m.trained_tensors() and "_q_dense" not in m.__dict__ for m in trainable_layers(model).values())
