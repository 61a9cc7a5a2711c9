"""qlr.models.moe: fused experts split into per-expert linears compute the same function; calibration gives each
expert the H of the tokens routed to it; an expert no token reaches borrows its siblings' statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import logging as hf_logging

from qlr.calibration.blocks import calibrate_block, capture_block_inputs, run_block
from qlr.models.moe import UnfusedExperts, find_fused_experts, unfuse_experts
from qlr.models.registry import block_linears, get_blocks
from tests.models.archs import MOE, tiny_causal_lm, token_ids

hf_logging.set_verbosity_error()


@pytest.mark.parametrize("arch", MOE)
def test_unfused_model_has_the_same_logits(arch):
    model = tiny_causal_lm(arch)
    fp = copy.deepcopy(model)
    paths = unfuse_experts(model)
    assert paths == find_fused_experts(fp) and len(paths) == 2 and find_fused_experts(model) == []
    experts = model.get_submodule(paths[0])
    assert isinstance(experts, UnfusedExperts) and experts.num_experts == 4
    fused = fp.get_submodule(paths[0])
    inter = experts.expert(2).up_proj.out_features
    torch.testing.assert_close(experts.expert(2).up_proj.weight, fused.gate_up_proj[2, inter:])
    torch.testing.assert_close(experts.expert(2).gate_proj.weight, fused.gate_up_proj[2, :inter])
    ids = token_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp(ids).logits, rtol=1e-5, atol=1e-5)


def test_meta_model_unfuses_without_data():
    with torch.device("meta"):
        model = tiny_causal_lm("mixtral")
    unfuse_experts(model)
    assert model.get_submodule("model.layers.1.mlp.experts.3.down_proj").weight.device.type == "meta"


def test_unknown_expert_layout_is_refused():
    model = tiny_causal_lm("mixtral")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():  # a down_proj that no longer matches gate_up_proj
        experts.down_proj = torch.nn.Parameter(experts.down_proj[:, :, :-1].clone())
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts \(MixtralExperts\): down_proj has shape"):
        unfuse_experts(model)


def _expert_stats(model, ids):
    unfuse_experts(model)
    state = capture_block_inputs(model, ids, batch_size=2)
    block = get_blocks(model)[0]
    stats = calibrate_block(block, block_linears(block), state.hidden, state.calls[0])
    return state, block, stats


def test_each_expert_h_comes_from_its_routed_tokens():
    model = tiny_causal_lm("mixtral")
    ids = token_ids(4, 16)
    state, block, stats = _expert_stats(model, ids)
    # brute force: the router's choices and the MoE input, recomputed by hand for every token
    x_moe, routed = [], []
    hook = block.mlp.register_forward_pre_hook(lambda _m, a: x_moe.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        run_block(block, state.hidden, state.calls[0])
        hook.remove()
        for x in x_moe:
            routed.append(block.mlp.gate(x)[2])  # (tokens, top-k) expert ids
    x_all, top = torch.cat(x_moe), torch.cat(routed)
    finals = stats.finalize()
    for e in range(4):
        xe = x_all[(top == e).any(-1)].double()
        H, mean_abs, note = finals[f"mlp.experts.{e}.gate_proj"]
        assert note is None
        torch.testing.assert_close(H, xe.T @ xe / xe.shape[0], rtol=1e-5, atol=1e-6)
        assert stats.owner[f"mlp.experts.{e}.up_proj"] == stats.owner[f"mlp.experts.{e}.gate_proj"]
    qkv = {stats.owner[f"self_attn.{p}_proj"] for p in "qkv"}
    assert len(qkv) == 1 and stats.owner["self_attn.o_proj"] != qkv.pop()


def test_expert_without_tokens_borrows_sibling_statistics():
    model = tiny_causal_lm("mixtral")
    router = model.model.layers[0].mlp.gate
    with torch.no_grad():
        router.weight[3] = -1e4 * router.weight[3].sign().clamp(min=0.5)  # expert 3 never wins ...
        router.weight[3] = 0.0
        router.weight[3, 0] = -1e6  # ... for any input with a positive first feature; make it impossible:
    orig = router.forward

    def never_three(x):
        logits, weights, idx = orig(x)
        idx = torch.where(idx == 3, torch.zeros_like(idx), idx)
        return logits, weights, idx

    router.forward = never_three
    _, _, stats = _expert_stats(model, token_ids(4, 16))
    finals = stats.finalize()
    H3, _, note = finals["mlp.experts.3.down_proj"]
    assert note is not None and "pooled from 3 sibling" in note
    sibs = [stats.acc[stats.owner[f"mlp.experts.{e}.down_proj"]] for e in range(3)]
    want = sum(a.sum_xx for a in sibs) / sum(a.count for a in sibs)
    torch.testing.assert_close(H3, want)
