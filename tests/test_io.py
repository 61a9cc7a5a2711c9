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
from qlr.hashing import file_sha256
from qlr.models.surgery import replace_linear
from qlr.nn import QLRLinear
from qlr.quant.grid import QuantizedTensor, QuantSpec, quantize_rtn
from qlr.quant.hadamard import Incoherence
from tests.models.archs import tiny_tied_llama

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
    torch.manual_seed(0)  # the decompositions below may draw from the global generator
    model = tiny_tied_llama()
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith("model.layers")]
    act_err = {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        dec = decomposition(lin.weight.data, i)
        replace_linear(model, name, QLRLinear.from_decomposition(dec, bias=lin.bias))
        act_err[name] = dec.history[-1]
    return model, act_err


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, torch.Tensor]:
    model, act_err = tiny_compressed_llama()
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    # a hand-made model (2/3/4-bit Q, rank-4 L R): no qlr method made it, so no method/bits for inspect to check
    info = {"method": None, "bits": None, "rank": 4, "options": {"group_size": 32},
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
    assert cfg["format_version"] == io.FORMAT_VERSION and cfg["method"] is None and cfg["rank"] == 4
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


# ---- integrity of qlr_config.json, deterministic bytes, consistency of the metadata -----------------------------


def _resign(directory: Path) -> None:
    """Rewrite manifest.sha256 for the current qlr_config.json (what a deliberate edit of both would do)."""
    lines = (directory / io.MANIFEST_NAME).read_text().splitlines()
    fixed = [f"{file_sha256(directory / io.CONFIG_NAME)}  {io.CONFIG_NAME}" if line.endswith(f"  {io.CONFIG_NAME}")
             else line for line in lines]
    (directory / io.MANIFEST_NAME).write_text("\n".join(fixed) + "\n")


def _edit_config(directory: Path, edit, resign: bool = True) -> None:
    cfg = json.loads((directory / io.CONFIG_NAME).read_text())
    edit(cfg)
    (directory / io.CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    if resign:
        _resign(directory)


def test_manifest_covers_the_config(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path) -> None:
    d = _copy(saved[1], tmp_path)
    manifest = dict(line.split("  ")[::-1] for line in (d / io.MANIFEST_NAME).read_text().splitlines())
    assert manifest[io.CONFIG_NAME] == file_sha256(d / io.CONFIG_NAME)
    assert set(manifest) == {io.CONFIG_NAME, *json.loads((d / io.CONFIG_NAME).read_text())["files"]}
    _edit_config(d, lambda c: c["layers"][0]["metrics"].update(act_err=0.0001), resign=False)
    for fn in (io.verify, io.load, io.inspect, io.load_tokenizer):
        with pytest.raises(ValueError, match=r"qlr_config\.json' fails its manifest check: .*edited or corrupted"):
            fn(d)
    (d / io.MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.sha256' is missing"):
        io.load(d)


def test_same_model_same_bytes_and_timings_apart(tmp_path: Path) -> None:
    model, act_err = tiny_compressed_llama()
    info = {"method": None, "seconds": 12.5, "calib_samples": 4,
            "layer_metrics": {k: {"act_err": v, "seconds": 0.25, "history": [v]} for k, v in act_err.items()}}
    io.save(model, tmp_path / "a", info=info)
    io.save(model, tmp_path / "b", info={**info, "seconds": 99.0})
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert io.RUN_LOG_NAME in names and names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        same = (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert same == (name != io.RUN_LOG_NAME), name
    text = (tmp_path / "a" / io.CONFIG_NAME).read_text()
    assert '"seconds"' not in text and json.loads(text)["extra"] == {"calib_samples": 4}
    log = json.loads((tmp_path / "a" / io.RUN_LOG_NAME).read_text())
    assert log["seconds"] == 12.5 and set(log["layers"]) == set(act_err)
    with safe_open(str(tmp_path / "a" / io.WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # one key: a map's order would vary per process


def test_interrupted_save_leaves_the_old_checkpoint(saved: tuple[nn.Module, Path, torch.Tensor], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = _copy(saved[1], tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_hf_config", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save(saved[0], d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    monkeypatch.undo()
    io.save(saved[0], d)  # the next save clears the staging directory and replaces the checkpoint
    assert not list(tmp_path.glob(".copy.qlr-saving")) and io.verify(d)


@pytest.fixture(scope="module")
def lattice_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama compressed with ODLRI at 2 bits: E8P lattice Q (``stages`` in its metadata), rank 8."""
    import qlr
    from qlr.models.tiny import ByteTokenizer, tiny_llama

    model = qlr.compress(tiny_llama(seed=0), "odlri", bits=2, rank=8, tokenizer=ByteTokenizer(),
                         calibration=["Call me Ishmael. " * 40], calib_samples=2, seqlen=32, progress=False,
                         layers=r"layers\.0\.self_attn", outer_iters=1, inner_iters=1)
    directory = tmp_path_factory.mktemp("lattice") / "ck"
    qlr.save(model, directory)
    return directory


def _first_e8p(cfg: dict) -> dict:
    return next(layer for layer in cfg["layers"] if layer["meta"]["q"]["codec"] == "e8p")


def test_edited_codec_metadata_is_one_clear_error(lattice_ckpt: Path, tmp_path: Path) -> None:
    d = _copy(lattice_ckpt, tmp_path)
    name = _first_e8p(json.loads((d / io.CONFIG_NAME).read_text()))["name"]
    _edit_config(d, lambda c: _first_e8p(c)["meta"]["q"].update(stages=2))
    with pytest.raises(ValueError) as err:
        io.load(d)
    msg = str(err.value)
    assert "\n" not in msg and f"layer {name}: " in msg and "model.safetensors' stores q_codes as I16 [1, " in msg
    assert "its metadata in qlr_config.json describes I16 [2, " in msg
    with pytest.raises(ValueError, match=f"layer {name}: .* stores q_codes"):
        io.inspect(d)
    _edit_config(d, lambda c: _first_e8p(c)["meta"]["q"].update(codec="nope"))
    with pytest.raises(ValueError, match=f"layer {name}: its metadata does not describe a valid QLRLinear"):
        io.load(d)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["layers"][0]["meta"].update(storage_bits=c["layers"][0]["meta"]["storage_bits"] + 8),
     r"its metadata computes \d+ storage bits but records"),
    (lambda c: c["layers"][0]["metrics"].update(rank=4), "metadata rank 8, recorded metrics rank 4"),
    (lambda c: c["layers"][0]["metrics"].update(bits_per_weight=2.0), "but the run recorded 2.0000"),
    (lambda c: c.update(bits=3), "Q has 2-bit codes, the run says bits=3"),
    (lambda c: c.update(rank=16), "rank 8, but method odlri with rank=16, budget=None gives 16"),
    (lambda c: c.update(method="rtn", options={}), "rank 8, but method rtn .* gives 0"),
    (lambda c: c.update(method="rtn"), r"the recorded plan .* is not a valid qlr plan: .*outer_iters.*; re-run"),
    (lambda c: c["full_precision_layers"].update({"model.layers.0.mlp.up_proj": {"shape": [64, 64]}}),
     "recorded as kept in full precision, but the file holds no"),
])
def test_inspect_reconciles_metadata(lattice_ckpt: Path, tmp_path: Path, edit, match) -> None:
    assert io.inspect(lattice_ckpt)["num_layers"] == 4
    d = _copy(lattice_ckpt, tmp_path)
    _edit_config(d, edit)
    with pytest.raises(ValueError, match=match) as err:
        io.inspect(d)
    assert "is inconsistent: " in str(err.value) and "\n" not in str(err.value)
