"""Block-wise QPEFT, autocast and SRR's preserved-direction step rule."""

from __future__ import annotations

import copy

import pytest
import torch

from qlr.models.registry import get_blocks
from qlr.models.tiny import tiny_llama
from qlr.train import FinetuneConfig, finetune, trainable_layers
from tests.train.common import interrupted_then_resumed, q_codes


def _block_errors(student, fp, ids) -> list[float]:
    """‖f_b(X_b) − T_b‖² / ‖T_b‖² per block, with the student fed its own activations (the blockwise loss)."""
    errs = []
    with torch.no_grad():
        hs = ht = fp.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        emb = fp.model.rotary_emb(ht, pos)
        for sb, tb in zip(get_blocks(student), get_blocks(fp), strict=True):
            out_s, out_t = sb(hs, position_embeddings=emb), tb(ht, position_embeddings=emb)
            out_s = out_s[0] if isinstance(out_s, tuple) else out_s
            out_t = out_t[0] if isinstance(out_t, tuple) else out_t
            errs.append(float((out_s - out_t).pow(2).mean() / out_t.pow(2).mean()))
            hs, ht = out_s, out_t
    return errs


def test_blockwise_lowers_every_blocks_error_and_keeps_q(compressed):
    fp, student, ids = compressed
    model = copy.deepcopy(student)
    codes, before = q_codes(model), _block_errors(model, fp, ids)
    cfg = FinetuneConfig(steps=25, lr=3e-3, batch_size=4, warmup=2, mode="blockwise", storage="fp16")
    res = finetune(model, ids, cfg, teacher=fp, progress=False)
    after = _block_errors(model, fp, ids)
    assert len(res.losses) == 25 * len(get_blocks(model)) and res.tokens == len(res.losses) * 4 * 64
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(torch.equal(v, q_codes(model)[k]) for k, v in codes.items())
    # the block losses the trainer reports are the quantity checked above (first step of block 0: the same)
    assert res.losses[0] == pytest.approx(before[0], rel=0.5)


def test_blockwise_resume_equals_uninterrupted(compressed, tmp_path):
    fp, student, ids = compressed
    cfg = FinetuneConfig(steps=4, lr=3e-3, batch_size=4, warmup=1, mode="blockwise")
    whole = copy.deepcopy(student)
    finetune(whole, ids, cfg, teacher=fp, progress=False)
    again, res = interrupted_then_resumed(student, ids, cfg, fp, tmp_path, "block 1/")
    assert len(res.losses) == 4 * len(get_blocks(again))
    for (name, a), (_, b) in zip(whole.named_buffers(), again.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_preserved_directions_take_gamma_of_the_step(compressed):
    fp, student, ids = compressed
    name, first = next(iter(trainable_layers(student).items()))
    k = 3
    moved = {}
    for gamma in (1.0, 0.25):
        model = copy.deepcopy(student)
        L0 = model.get_submodule(name)._dense("l").float().clone()
        R0 = model.get_submodule(name)._dense("r").float().clone()
        cfg = FinetuneConfig(steps=1, lr=1e-3, batch_size=4, warmup=0, storage="none", preserve_grad_scale=gamma,
                             grad_clip=0.0)
        finetune(model, ids, cfg, teacher=fp, preserved={name: k}, progress=False)
        mod = model.get_submodule(name)
        moved[gamma] = (mod.l_train.detach() - L0, mod.r_train.detach() - R0)
    (dl1, dr1), (dl, dr) = moved[1.0], moved[0.25]
    torch.testing.assert_close(dl[:, :k], 0.25 * dl1[:, :k], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dr[:k], 0.25 * dr1[:k], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dl[:, k:], dl1[:, k:], rtol=0, atol=0)
    torch.testing.assert_close(dr[k:], dr1[k:], rtol=0, atol=0)
    assert dl1[:, :k].abs().max() > 0


def test_bf16_autocast_trains_through_rounding(compressed):
    fp, student, ids = compressed
    model = copy.deepcopy(student)
    bpw = {n: m.bits_per_weight for n, m in trainable_layers(model).items()}
    res = finetune(model, ids, FinetuneConfig(steps=10, lr=3e-3, batch_size=4, warmup=1, amp="bf16",
                                              through_rounding=True), teacher=fp, progress=False)
    assert sum(res.losses[-3:]) < 0.9 * sum(res.losses[:3])
    assert {n: m.bits_per_weight for n, m in trainable_layers(model).items()} == bpw


def test_config_checks():
    for bad in ({"amp": "fp8"}, {"mode": "layerwise"}, {"preserve_grad_scale": 0.0}, {"preserve_grad_scale": 2.0}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="mode=blockwise needs the full-precision teacher"):
        finetune(tiny_llama(seed=0), torch.zeros(2, 8, dtype=torch.long),
                 FinetuneConfig(objective="lm", mode="blockwise"), progress=False)


def test_blockwise_trains_q_scales_without_decay(compressed):
    """Block-wise training with train_scales moves Q's scales (and nothing else of Q); the multipliers sit in an
    AdamW group without weight decay, the factors in one with it."""
    from qlr.train.finetune import make_optimizer

    fp, student, ids = compressed
    model = copy.deepcopy(student)
    codes = q_codes(model)
    cfg = FinetuneConfig(steps=5, lr=3e-3, batch_size=4, warmup=1, mode="blockwise", train_scales=True,
                         weight_decay=0.1)
    finetune(model, ids, cfg, teacher=fp, progress=False)
    after = q_codes(model)
    moved = {k for k in codes if not torch.equal(after[k], codes[k])}
    assert moved and all(k.endswith(".q_scale") for k in moved)
    layers = trainable_layers(copy.deepcopy(student))
    for m in layers.values():
        m.train_factors()
        m.train_q_scales()
    groups = make_optimizer(layers.values(), cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(m.q_scale_train) for m in layers.values()}
