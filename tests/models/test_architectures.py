"""Every tested architecture family: compress → save → load gives the logits of the FP model with each
compressed weight replaced by its dequantized Q + L R (an independent dense reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import logging as hf_logging

import qlr
from qlr.models.moe import unfuse_experts
from qlr.models.registry import find_blocks, iter_linears
from qlr.nn.qlinear import QLRLinear
from tests.models.archs import ARCHS, MOE, tiny_causal_lm, token_ids

hf_logging.set_verbosity_error()


def _dense_reference(fp: torch.nn.Module, compressed: torch.nn.Module) -> torch.nn.Module:
    """``fp`` (experts split the same way) with every weight that ``compressed`` holds as a QLRLinear replaced
    by that layer's dequantized W = Q + L R; Conv1D weights are stored transposed."""
    ref = copy.deepcopy(fp)
    unfuse_experts(ref)
    for name, mod in compressed.named_modules():
        if isinstance(mod, QLRLinear):
            target = ref.get_submodule(name)
            w = mod.dequantize_weight()
            with torch.no_grad():
                target.weight.copy_(w.T if type(target).__name__ == "Conv1D" else w)
    return ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_matches_dense_reference(arch, tmp_path):
    model = tiny_causal_lm(arch)
    fp = copy.deepcopy(model)
    ids = token_ids()
    unfuse_experts(model)  # compress does this too; count each expert's linears
    n_linears = len(list(iter_linears(model)))
    qlr.compress(model, "qera-exact", 4, rank=8, group_size=32, calibration=ids, progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, QLRLinear)]
    assert len(compressed) == n_linears > 0
    assert all(n.startswith(find_blocks(model)[0] + ".") for n in compressed)

    qlr.save(model, tmp_path / "ck")
    loaded = qlr.load(tmp_path / "ck")
    ref = _dense_reference(fp, model)
    with torch.no_grad():
        want = ref(ids[:2]).logits
        got_mem = model(ids[:2]).logits
        got = loaded(ids[:2]).logits
        base = fp(ids[:2]).logits
    torch.testing.assert_close(got, got_mem, rtol=0, atol=0)  # save → load is exact
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # 4-bit + rank 8 changes the model measurably, but not beyond recognition
    rel = ((got - base).norm() / base.norm()).item()
    assert 1e-4 < rel < 0.2


@pytest.mark.parametrize("arch", MOE)
def test_moe_routers_stay_full_precision_and_each_expert_is_compressed(arch):
    model = tiny_causal_lm(arch)
    qlr.compress(model, "rtn", 4, group_size=32, calibration=token_ids(), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, QLRLinear)]
    assert sum(".experts.3.down_proj" in n for n in names) == 2  # one per block
    assert not any(n.endswith((".gate", ".router", "shared_expert_gate")) for n in names)


@pytest.mark.parametrize("arch", ["mixtral", "gpt2"])
def test_transformers_from_pretrained_reads_split_experts_and_conv1d(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(arch)
    qlr.compress(model, "rtn", 4, group_size=32, calibration=token_ids(), progress=False)
    qlr.save(model, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    ids = token_ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, qlr.load(tmp_path / "ck")(ids).logits, rtol=0, atol=0)
