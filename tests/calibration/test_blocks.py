"""The pieces of the block-by-block pipeline: block calibration, per-layer compression, the resume store, and a
run that leaves the caller's global RNG alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlr.calibration.blocks import calibrate_block, capture_block_inputs, run_block
from qlr.calibration.hessian import HessianAccumulator
from qlr.calibration.pipeline import CompressionPlan, LayerFailed, ResumeStore, compress_blocks, compress_linear
from qlr.models.registry import block_linears, get_blocks
from qlr.models.tiny import tiny_llama
from qlr.nn import QLRLinear


def _ids(n=2, t=16, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_calibrate_block_matches_a_hand_accumulated_h_and_removes_its_hooks():
    model = tiny_llama(seed=0)
    state = capture_block_inputs(model, _ids(), batch_size=1)
    block = get_blocks(model)[0]
    linears = block_linears(block)
    stats = calibrate_block(block, linears, state.hidden, state.calls[0])
    assert not block._forward_pre_hooks and all(not lin._forward_pre_hooks for lin in linears.values())
    finals = stats.finalize()
    assert set(finals) == set(linears) and not stats.failed
    # q/k/v read one tensor: one accumulator; o_proj reads another
    assert len({stats.owner[f"self_attn.{p}_proj"] for p in "qkv"}) == 1
    assert stats.owner["self_attn.o_proj"] == "self_attn.o_proj"
    # down_proj's H by hand, from its inputs recorded in a second pass
    xs = []
    hook = linears["mlp.down_proj"].register_forward_pre_hook(lambda _m, a: xs.append(a[0]))
    with torch.no_grad():
        outs = run_block(block, state.hidden, state.calls[0])
    hook.remove()
    ref = HessianAccumulator(xs[0].shape[-1])
    for x in xs:
        ref.add(x)
    H, mean_abs = ref.finalize()
    assert torch.equal(finals["mlp.down_proj"][0], H) and torch.equal(finals["mlp.down_proj"][1], mean_abs)
    assert len(outs) == 2 and outs[0].shape == state.hidden[0].shape


def test_calibrate_block_removes_its_hooks_when_the_forward_fails():
    model = tiny_llama(seed=0)
    state = capture_block_inputs(model, _ids(), batch_size=2)
    block = get_blocks(model)[0]
    linears = block_linears(block)
    with pytest.raises(RuntimeError):
        calibrate_block(block, linears, [h[..., :-1] for h in state.hidden], state.calls[0])
    assert not block._forward_pre_hooks and all(not lin._forward_pre_hooks for lin in linears.values())


def test_compress_linear_returns_the_module_and_metrics_and_names_failures():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    X = torch.randn(256, 32)
    H, mean_abs = X.T.double() @ X.double() / 256, X.abs().mean(0)
    module, met = compress_linear(lin, H, mean_abs, CompressionPlan(method="lorc", bits=3, rank=4))
    assert isinstance(module, QLRLinear) and module.rank == 4 and torch.equal(module.bias, lin.bias.detach())
    assert met["rank"] == 4 and met["shape"] == [16, 32] and met["act_err"] == min(met["history"])
    with pytest.raises(LayerFailed, match="H is all zeros") as err:
        compress_linear(lin, torch.zeros(32, 32, dtype=torch.float64), mean_abs,
                        CompressionPlan(method="lorc", bits=3, rank=4))
    assert isinstance(err.value.__cause__, ValueError)


def test_resume_store_without_a_work_directory_keeps_nothing(tmp_path):
    store = ResumeStore.open(None, False, lambda: pytest.fail("no fingerprint without a work directory"))
    store.save("model.layers.0.mlp.up_proj", nn.Identity(), {})
    assert store.load("model.layers.0.mlp.up_proj", torch.device("cpu")) is None


def test_resume_store_round_trip(tmp_path):
    store = ResumeStore.open(tmp_path / "w", False, lambda: {"seed": 0})
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    X = torch.randn(64, 16)
    module, met = compress_linear(lin, X.T.double() @ X.double() / 64, X.abs().mean(0),
                                  CompressionPlan(method="rtn", bits=3))
    store.save("a.b", module, met)
    assert store.load("a.b", torch.device("cpu")) is None  # not resuming: nothing is read back
    again = ResumeStore.open(tmp_path / "w", True, lambda: {"seed": 0})
    back, back_met = again.load("a.b", torch.device("cpu"))
    assert back_met == met
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), module.state_dict().values()))
    with pytest.raises(ValueError, match="cannot resume"):
        ResumeStore.open(tmp_path / "w", True, lambda: {"seed": 1})


def test_compress_blocks_leaves_the_global_rng_alone():
    """Every random choice has its own generator: the caller's RNG state is untouched, and the result does not
    depend on it."""
    plan = CompressionPlan(method="odlri", bits=2, rank=8, options={"outer_iters": 2, "inner_iters": 2})
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        model = tiny_llama(seed=0)
        compress_blocks(model, _ids(), plan, progress=False, seed=5)
        assert torch.equal(torch.get_rng_state(), before)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
