"""Checkpoints: save → load gives bit-identical logits, tied weights survive, inspect agrees with itself, and
damaged checkpoints are refused with a message naming the file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qlr import io
from qlr.decompose.base import Decomposition
from qlr.nn import QLRLinear
from qlr.quant.grid import QuantizedTensor, QuantSpec, quantize_rtn
from qlr.quant.hadamard import Incoherence

transformers = pytest.importorskip("transformers")


def _rtn_decomposition(W: torch.Tensor, i: int) -> Decomposition:
    """Q = RTN(W) (variants by layer index), L R = rank-4 SVD of the residual."""
    W = W.float()
    m, n = W.shape
    rot = Incoherence.random(m, n, seed=i) if i % 4 == 3 else None
    Ws = rot.rotate_weight(W) if rot is not None else W
    spec = QuantSpec(bits=(2, 3, 4)[i % 3], group_size=32, symmetric=i % 5 == 1)
    if i % 3 == 1:  # act-order
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(i))
        q0 = quantize_rtn(Ws[:, perm], spec)
        q = QuantizedTensor(q0.codes, q0.scale, q0.zero, spec, perm)
    else:
        q = quantize_rtn(Ws, spec)
    U, S, Vh = torch.linalg.svd(Ws - q.dequantize(), full_matrices=False)
    L, R = U[:, :4] * S[:4], Vh[:4]
    lq = rq = None
    if i % 2:
        lq, rq = quantize_rtn(L, QuantSpec(bits=4, group_size=4)), quantize_rtn(R, QuantSpec(bits=4, group_size=32))
        L, R = lq.dequantize(), rq.dequantize()
    return Decomposition("rtn", None, q, L, R, lq=lq, rq=rq, rotation=rot, shape=(m, n), history=[0.01 * i])


def tiny_compressed_llama(decomposition=_rtn_decomposition) -> tuple[nn.Module, dict[str, float]]:
    """A tiny tied-embedding Llama (with attention biases) whose 14 decoder linears are replaced by QLRLinear
    modules built from ``decomposition(W, layer index)``; returns the model and each layer's recorded error."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True,
                                   max_position_embeddings=64, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith("model.layers")]
    act_err = {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        dec = decomposition(lin.weight.data, i)
        io.replace_linear(model, name, QLRLinear.from_decomposition(dec, bias=lin.bias))
        act_err[name] = dec.history[-1]
    return model, act_err


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, torch.Tensor]:
    model, act_err = tiny_compressed_llama()
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    info = {"method": "rtn", "bits": 2, "rank": 4, "options": {"group_size": 32},
            "calibration_sha256": "0" * 64, "layer_metrics": {k: {"act_err": v} for k, v in act_err.items()},
            "note": "test"}
    io.save(model, directory, info=info)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, directory, ids


def test_save_load_bit_identical(saved: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, directory, ids = saved
    loaded = io.load(directory)
    with torch.no_grad():
        ref, out = model(ids).logits, loaded(ids).logits
    assert torch.equal(ref, out)
    assert not loaded.training
    n_qlr = sum(isinstance(m, QLRLinear) for m in loaded.modules())
    assert n_qlr == 14
    assert not any(isinstance(m, nn.Linear) and n.startswith("model.layers") for n, m in loaded.named_modules())


def test_tied_weights_survive(saved: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, directory, ids = saved
    with safe_open(str(directory / io.WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # stored once
    assert "model.rotary_emb.inv_freq" in keys  # non-persistent buffers travel too
    loaded = io.load(directory)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        loaded.model.embed_tokens.weight[0, 0] += 1.0  # still one tensor after load
    assert loaded.lm_head.weight[0, 0] == loaded.model.embed_tokens.weight[0, 0]
    loaded = io.load(directory)
    a = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids[:, :4]))
    b = loaded.generate(ids[:, :4], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids[:, :4]))
    assert torch.equal(a, b) and a.shape == (2, 10)


def test_config_contents(saved: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, directory, _ = saved
    cfg = json.loads((directory / io.CONFIG_NAME).read_text())
    assert cfg["format_version"] == io.FORMAT_VERSION and cfg["method"] == "rtn" and cfg["rank"] == 4
    assert cfg["model_class"] == "LlamaForCausalLM" and cfg["model_config"]["hidden_size"] == 64
    assert cfg["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert cfg["extra"] == {"note": "test"} and cfg["calibration_sha256"] == "0" * 64
    assert set(cfg["files"]) >= {io.WEIGHTS_NAME}
    assert cfg["files"][io.WEIGHTS_NAME]["bytes"] == (directory / io.WEIGHTS_NAME).stat().st_size
    layer = cfg["layers"][0]
    assert layer["metrics"]["act_err"] == 0.0 and layer["metrics"]["bits_per_weight"] > 2


def test_inspect_two_bpw_figures_agree(saved: tuple[nn.Module, Path, torch.Tensor]) -> None:
    model, directory, _ = saved
    report = io.inspect(directory)
    qlr = [m for m in model.modules() if isinstance(m, QLRLinear)]
    weights = sum(m.in_features * m.out_features for m in qlr)
    assert report["num_layers"] == 14 and report["num_weights"] == weights
    assert report["bits_per_weight_meta"] == pytest.approx(sum(m.storage_bits() for m in qlr) / weights)
    assert report["bits_per_weight_measured"] == pytest.approx(report["bits_per_weight_meta"], rel=0.02)
    for row, mod in zip(report["layers"], qlr):
        # the only difference: an act-order permutation is stored as int16, counted at ⌈log2 n⌉ bits per index
        n = mod.in_features
        perm_extra = n * (16 - math.ceil(math.log2(n))) if mod.meta["q"]["perm"] else 0
        measured_bits = round(row["bits_per_weight_measured"] * n * mod.out_features)
        assert measured_bits == mod.storage_bits() + perm_extra
        assert "act_err" in row
    # memory once loaded = the loaded model's tensors (tied ones once); the linears' share as stored
    loaded = io.load(directory)
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers())}
    assert report["memory_bytes"] == sum(seen.values())
    assert report["linear_bytes"] == sum(t.numel() * t.element_size() for m in qlr for n, t in m.named_buffers()
                                         if n != "bias")
    assert report["linear_fp32_bytes"] == 4 * weights
    json.dumps(report)


def _copy(directory: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(directory, dst)
    return dst


def test_tampered_file_refused(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path)
    path = d / io.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256.*compress"):
        io.load(d)
    with pytest.raises(ValueError, match="sha256"):
        io.inspect(d)


def test_truncated_file_refused(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path)
    path = d / io.WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*bytes.*truncated.*compress"):
        io.load(d)


def test_missing_and_broken_checkpoints(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(tmp_path / "nope")
    d = _copy(saved[1], tmp_path)
    (d / io.WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*missing"):
        io.load(d)
    (d / io.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"qlr_config\.json.*not valid JSON"):
        io.inspect(d)
    (d / io.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"qlr_config\.json.*missing.*compress"):
        io.load(d)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        io.load_tokenizer(saved[1])


def test_save_refuses_foreign_directory_and_overwrites_checkpoint(tmp_path: Path) -> None:
    lin = nn.Sequential(nn.Linear(4, 4))
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        io.save(lin, tmp_path)
    d = tmp_path / "ck"
    io.save(lin, d)
    io.save(lin, d)  # replacing an earlier checkpoint is fine
    assert io.verify(d)["files"]


def test_tokenizer_round_trip(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    model, act_err = tiny_compressed_llama()
    io.save(model, tmp_path / "ck", tokenizer=tok)
    back = io.load_tokenizer(tmp_path / "ck")
    assert back("hello world foo")["input_ids"] == [1, 2, 0]


def test_replace_linear() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    new = nn.Identity()
    old = io.replace_linear(model, "0.0", new)
    assert isinstance(old, nn.Linear) and model[0][0] is new
    with pytest.raises(AttributeError, match="no submodule"):
        io.replace_linear(model, "0.5", new)
