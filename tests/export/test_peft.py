"""GPTQ base + PEFT LoRA export: the written GPTQ tensors decode (by an independent reader written here from the
documented layout, not by qlr's packer) to exactly qlr's Q; the words match AutoGPTQ's packing loop; a plain
transformers model with those weights plus the adapter through ``peft.PeftModel`` gives qlr's logits; runs GPTQ
cannot hold exactly are refused with the setting that exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qlr import io
from qlr.cli import main
from qlr.decompose.base import Decomposition
from qlr.export import export
from qlr.export.peft import gptq_layer
from qlr.models.surgery import replace_linear
from qlr.nn import QLRLinear
from qlr.quant.e8p import quantize_e8p
from qlr.quant.grid import QuantizedTensor, QuantSpec, quantize_rtn
from qlr.quant.hadamard import Incoherence
from tests.models.archs import tiny_tied_llama

transformers = pytest.importorskip("transformers")

UNCOMPRESSED = "model.layers.1.mlp.down_proj"  # left as nn.Linear: must be excluded in the GPTQ config


# ---- an independent GPTQ reader (from the layout in docs/notes, not qlr.quant.packing) ----------------------------
def read_stream(words: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """Column c of ``words`` (rows, cols) is a little-endian bit stream (word w bit b = stream bit 32·w + b); value
    k is stream bits [k·bits, (k+1)·bits). Returns (count, cols) int64."""
    u = words.numpy().view(np.uint32).astype(np.int64)  # (rows, cols)
    bit = (u[:, None, :] >> np.arange(32)[None, :, None]) & 1  # (rows, 32, cols)
    stream = bit.reshape(-1, u.shape[1])[: count * bits].reshape(count, bits, u.shape[1])
    return (stream << np.arange(bits)[None, :, None]).sum(axis=1)


def gptq_dequantize(state: dict[str, torch.Tensor], prefix: str, bits: int, fmt: str) -> torch.Tensor:
    """W (out × in, float32) = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o]); v1 ("gptq") stores z − 1."""
    qweight, qzeros = state[f"{prefix}.qweight"], state[f"{prefix}.qzeros"]
    scales, g_idx = state[f"{prefix}.scales"].float(), state[f"{prefix}.g_idx"].long()
    n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = torch.from_numpy(read_stream(qweight, bits, n_in)).float()  # (in, out)
    z = torch.from_numpy(read_stream(qzeros.T.contiguous(), bits, n_out)).T.float()  # (groups, out)
    if fmt == "gptq":
        z = z + 1
    return (scales[g_idx] * (q - z[g_idx])).T.contiguous()


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop (``pack_original``), transcribed: packs (in, out) codes along dim 0."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] * bits // 32, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


# ---- a tiny compressed run: every exportable variant ------------------------------------------------------------
def _variant(i: int) -> dict:
    return {"bits": (2, 3, 4, 8)[i % 4], "group_size": 0 if i == 5 else 32, "symmetric": i % 3 == 2,
            "act_order": i % 5 == 1, "rank": 0 if i == 4 else (8 if i % 2 == 0 else 4), "lr_quant": i % 4 == 3}


def _decomposition(W: torch.Tensor, i: int) -> Decomposition:
    v = _variant(i)
    W = W.float()
    m, n = W.shape
    spec = QuantSpec(bits=v["bits"], group_size=v["group_size"], symmetric=v["symmetric"])
    if v["act_order"]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(i))
        q0 = quantize_rtn(W[:, perm], spec)
        q = QuantizedTensor(q0.codes, q0.scale, q0.zero, spec, perm)
    else:
        q = quantize_rtn(W, spec)
    r = v["rank"]
    U, S, Vh = torch.linalg.svd(W - q.dequantize(), full_matrices=False)
    L, R = (U[:, :r] * S[:r]).half().float(), Vh[:r].half().float()
    lq = rq = None
    if v["lr_quant"] and r:
        lq, rq = quantize_rtn(L, QuantSpec(bits=4, group_size=4)), quantize_rtn(R, QuantSpec(bits=4, group_size=32))
        L, R = lq.dequantize(), rq.dequantize()
    return Decomposition("rtn", None, q, L, R, lq=lq, rq=rq, shape=(m, n), history=[0.0])


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def _tiny_run(directory: Path, decomposition=_decomposition, skip: tuple[str, ...] = (UNCOMPRESSED,)) -> dict:
    """Save a tiny tied-embedding Llama (attention biases) whose decoder linears (but ``skip``) are QLRLinear."""
    torch.manual_seed(0)  # the decompositions below may draw from the global generator
    model = tiny_tied_llama()
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith("model.layers")]
    qs = {}
    for i, name in enumerate(names):
        if name in skip:
            continue
        lin = model.get_submodule(name)
        dec = decomposition(lin.weight.data, i)
        replace_linear(model, name, QLRLinear.from_decomposition(dec, bias=lin.bias))
        qs[name] = dec
    io.save(model, directory, tokenizer=_tokenizer(), info={"method": "rtn", "bits": 2, "rank": 8})
    return qs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("run") / "tiny"
    return directory, _tiny_run(directory)


@pytest.fixture(scope="module", params=["gptq", "gptq_v2"])
def exported(request, run, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("export") / request.param
    report = export(run[0], "peft", out, checkpoint_format=request.param)
    return out, report, request.param


# ---- the base: exact Q, AutoGPTQ layout, config ------------------------------------------------------------------
def test_base_decodes_to_qlr_q_exactly(run, exported) -> None:
    _, decs = run
    out, _, fmt = exported
    state = load_file(str(out / "base" / "model.safetensors"))
    qc = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == fmt and qc["quant_method"] == "gptq"
    for i, (name, dec) in enumerate(decs.items()):
        bits = dec.q.spec.bits
        assert state[f"{name}.qweight"].dtype == torch.int32 and state[f"{name}.scales"].dtype == torch.float16
        assert state[f"{name}.g_idx"].dtype == torch.int32
        W = gptq_dequantize(state, name, bits, fmt)
        assert torch.equal(W, dec.q.dequantize()), name  # bit for bit: no second rounding
        assert f"{name}.weight" not in state
    assert state[f"{UNCOMPRESSED}.weight"].dtype == torch.float16
    assert "lm_head.weight" not in state  # tied to the embeddings: stored once
    assert state["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16


def test_words_match_autogptq_pack(run, exported) -> None:
    _, decs = run
    out, _, fmt = exported
    state = load_file(str(out / "base" / "model.safetensors"))
    for name, dec in decs.items():
        q, bits = dec.q, dec.q.spec.bits
        codes = q.codes.clone()
        zeros = q.zero.to(torch.int64) - (1 if fmt == "gptq" else 0)
        if q.perm is not None:  # back to the model's input order
            codes[:, q.perm] = q.codes.clone()
            g = torch.empty(codes.shape[1], dtype=torch.long)
            g[q.perm] = torch.arange(codes.shape[1]) // q.spec.group_len(codes.shape[1])
            assert torch.equal(state[f"{name}.g_idx"].long(), g)
        ref_w = autogptq_pack(codes.T.numpy(), bits)  # (in, out) codes → (in·bits/32, out)
        ref_z = autogptq_pack(zeros.numpy(), bits).T  # zeros (out, groups) packed along out → (groups, ·)
        assert np.array_equal(state[f"{name}.qweight"].numpy().view(np.uint32), ref_w), name
        assert np.array_equal(state[f"{name}.qzeros"].numpy().view(np.uint32), ref_z), name


def test_configs_and_files(run, exported) -> None:
    directory, decs = run
    out, report, fmt = exported
    base, adapter = out / "base", out / "adapter"
    qc = json.loads((base / "quantize_config.json").read_text())
    hf = json.loads((base / "config.json").read_text())
    assert hf["quantization_config"] == qc and hf["architectures"] == ["LlamaForCausalLM"]
    assert qc["bits"] in (2, 3, 4, 8) and qc["desc_act"] is True and qc["sym"] is False and qc["lm_head"] is False
    assert f"-:^{UNCOMPRESSED.replace('.', chr(92) + '.')}$" in qc["dynamic"]
    overrides = {k[3:-1].replace("\\.", "."): v for k, v in qc["dynamic"].items() if k.startswith("+:")}
    for name, dec in decs.items():  # every layer not at the global (bits, group_size) has an override
        o = overrides.get(name, {"bits": qc["bits"], "group_size": qc["group_size"]})
        assert (o["bits"], o["group_size"]) == (dec.q.spec.bits, dec.q.spec.group_size or -1), name
    assert (base / "tokenizer.json").is_file() and (base / "generation_config.json").is_file()
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    ranks = {n: d.L_s.shape[1] for n, d in decs.items() if d.L_s.shape[1]}
    assert acfg["r"] == max(ranks.values()) == acfg["lora_alpha"] and sorted(acfg["target_modules"]) == sorted(ranks)
    assert acfg["rank_pattern"] == acfg["alpha_pattern"] == {n: r for n, r in ranks.items() if r != acfg["r"]}
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for name, r in ranks.items():
        A, B = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        assert A.dtype == B.dtype == torch.float16
        assert tuple(A.shape) == (r, decs[name].shape[1]) and tuple(B.shape) == (decs[name].shape[0], r)
    assert json.loads((out / "qlr_export.json").read_text()) == json.loads(json.dumps(report))


def test_report_bits_and_difference(run, exported) -> None:
    _, decs = run
    _, report, _ = exported
    rows = {x["name"]: x for x in report["layers"]}
    for name, dec in decs.items():
        (m, n), b, r = dec.shape, dec.q.spec.bits, dec.L_s.shape[1]
        groups = dec.q.scale.shape[1]
        gptq_bits = n * m * b + groups * m * b + 16 * groups * m + 32 * n  # codes, zeros, fp16 scales, g_idx
        assert rows[name]["gptq_bits_per_weight"] == pytest.approx(gptq_bits / (m * n))
        assert rows[name]["adapter_bits_per_weight"] == pytest.approx(16 * r * (m + n) / (m * n))
        if dec.lq is None:
            assert rows[name]["max_abs_diff"] < 1e-6, name  # L, R already fp16 in qlr: nothing lost
    assert 0 <= report["max_abs_diff"] < 1e-3 * max(x["max_abs_weight"] for x in rows.values())
    assert report["engine_bits_per_weight"] > report["gptq_bits_per_weight"] > 2


# ---- through transformers + PEFT ---------------------------------------------------------------------------------
def plain_model_from_export(base: Path, fmt: str) -> nn.Module:
    """A plain (unquantized) transformers model whose weights are the exported GPTQ base, dequantized here."""
    cfg = json.loads((base / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg)).float().eval()
    state = load_file(str(base / "model.safetensors"))
    weights = {}
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            bits = qc["bits"]
            for k, v in qc.get("dynamic", {}).items():
                if k.startswith("+:") and k[3:-1].replace("\\.", ".") == prefix:
                    bits = v["bits"]
            weights[f"{prefix}.weight"] = gptq_dequantize(state, prefix, bits, fmt)
        elif leaf not in ("qzeros", "scales", "g_idx"):
            weights[key] = t.float()
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return model


def test_peft_adapter_on_dequantized_base_matches_qlr(run, exported) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'qlr[export]')")
    directory, decs = run
    out, _, fmt = exported
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = io.load(directory)
    for n, p in ref.named_parameters():  # the export stores these in fp16
        p.data = p.data.half().float()
    for mod in ref.modules():
        if isinstance(mod, QLRLinear) and mod.meta["bias"] is not None:
            mod.bias.data = mod.bias.data.half().float()
    plain = plain_model_from_export(out / "base", fmt)
    with torch.no_grad():
        want = ref(ids).logits
        without = plain(ids).logits
        model = peft.PeftModel.from_pretrained(plain, str(out / "adapter")).eval()
        got = model(ids).logits
    for name, dec in decs.items():
        r = dec.L_s.shape[1]
        if r:
            layer = model.base_model.model.get_submodule(name)
            assert layer.r["default"] == r and layer.scaling["default"] == 1.0
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-4 * scale, float((got - want).abs().max() / scale)
    assert (without - want).abs().max() > 10 * (got - want).abs().max()  # the adapter is what closes the gap


def test_gptq_backend_loads_base_and_adapter(run, exported) -> None:
    """The export in a real GPTQ engine: GPTQModel's torch kernel (it reads the per-layer ``dynamic`` bits and
    groups; transformers' own GPTQ path builds every linear at the global setting) with PEFT's GPTQ LoRA layer.
    Installs on CPU torch with ``pip install --no-deps gptqmodel`` plus its small runtime packages and optimum
    (see benchmarks/README.md)."""
    gptqmodel = pytest.importorskip("gptqmodel", reason="no GPTQ engine installed (gptqmodel)")
    peft = pytest.importorskip("peft")
    directory, _ = run
    out, _, fmt = exported
    if fmt == "gptq":
        pytest.skip("GPTQModel refuses v1 checkpoints with asymmetric grids unless gptqmodel wrote them "
                    "(this run mixes symmetric and asymmetric layers); gptq_v2 covers the layout")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    base = gptqmodel.GPTQModel.load(str(out / "base"), device="cpu", backend=gptqmodel.BACKEND.TORCH).model
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        got = model(ids).logits.float()
        want = io.load(directory)(ids).logits
    assert (got - want).abs().max() < 2e-2 * want.abs().max()


# ---- refusals ----------------------------------------------------------------------------------------------------
def _layer(q, L=None, R=None, rotation=None) -> QLRLinear:
    m, n = q.shape
    L = torch.zeros(m, 0) if L is None else L
    R = torch.zeros(0, n) if R is None else R
    return QLRLinear.from_decomposition(Decomposition("t", None, q, L, R, rotation=rotation, shape=(m, n)))


@pytest.mark.parametrize("case, fix", [
    ("e8p", "--opt q_quantizer=gptq --opt incoherence=false"),
    ("rotated", "--opt incoherence=false"),
    ("nf", "integer-grid method"),
    ("bits6", "--bits 2, 3, 4 or 8"),
])
def test_refuses_what_gptq_cannot_hold(case: str, fix: str) -> None:
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    if case == "e8p":
        mod = _layer(quantize_e8p(W))
    elif case == "rotated":
        rot = Incoherence.random(64, 64, seed=1)
        mod = _layer(quantize_rtn(rot.rotate_weight(W), QuantSpec(bits=4, group_size=32)), rotation=rot)
    elif case == "nf":
        mod = _layer(quantize_rtn(W, QuantSpec(bits=4, group_size=32, fmt="nf")))
    else:
        mod = _layer(quantize_rtn(W, QuantSpec(bits=6, group_size=32)))
    with pytest.raises(ValueError, match="cannot export lin to GPTQ") as e:
        gptq_layer(mod, name="lin", method="odlri")
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_v1_refuses_zero_point_zero_and_v2_holds_it() -> None:
    W = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))  # all positive: z = 0 everywhere
    q = quantize_rtn(W, QuantSpec(bits=2, group_size=32))
    assert int(q.zero.min()) == 0
    mod = _layer(q)
    with pytest.raises(ValueError, match="checkpoint_format=gptq_v2"):
        gptq_layer(mod, "gptq")
    g = gptq_layer(mod, "gptq_v2")
    state = {f"l.{k}": getattr(g, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert torch.equal(gptq_dequantize(state, "l", 2, "gptq_v2"), q.dequantize())


def test_cli_refuses_rotated_run_before_writing(tmp_path: Path, capsys) -> None:
    def rotated(W: torch.Tensor, i: int) -> Decomposition:
        rot = Incoherence.random(*W.shape, seed=i)
        q = quantize_rtn(rot.rotate_weight(W.float()), QuantSpec(bits=4, group_size=32))
        m, n = W.shape
        return Decomposition("t", None, q, torch.zeros(m, 0), torch.zeros(0, n), rotation=rot, shape=(m, n))

    _tiny_run(tmp_path / "rot", rotated, skip=())
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "rot"), "--format", "peft", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlr export: error: cannot export model.layers.0.self_attn.q_proj to GPTQ")
    assert "incoherence=false" in err and err.count("\n") == 1 and not out.exists()


# ---- the command line, end to end --------------------------------------------------------------------------------
def test_cli_compress_then_export(tmp_path: Path, model_dir: Path, sample_text: str, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(sample_text * 6)
    ck = tmp_path / "ck"
    assert main(["compress", "--model", str(model_dir), "--method", "lorc", "--bits", "4", "--rank", "8",
                 "--group-size", "32", "--calib-text", str(text), "--calib-samples", "2", "--seqlen", "64",
                 "--out", str(ck)]) == 0
    capsys.readouterr()
    out = tmp_path / "exp"
    assert main(["export", str(ck), "--format", "peft", "--out", str(out), "--opt", "checkpoint_format=gptq_v2"]) == 0
    printed = capsys.readouterr().out
    assert "| peft export | value |" in printed and "engine_bits_per_weight" in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "base" / "tokenizer.json").is_file()
    assert main(["export", str(ck), "--format", "peft", "--out", str(out)]) == 2  # not empty
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["export", str(ck), "--format", "peft", "--out", str(tmp_path / "x"), "--opt", "nope=1"]) == 2
    assert "checkpoint_format" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format"):
        export(ck, "onnx", tmp_path / "y")


def test_finetuned_factors_export_as_the_adapter(tmp_path: Path, model_dir: Path, sample_text: str, capsys) -> None:
    """QPEFT then export: the PEFT adapter on the exported GPTQ base reproduces the fine-tuned qlr model."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'qlr[export]')")
    text = tmp_path / "text.txt"
    text.write_text(sample_text * 6)
    ck, tuned, out = tmp_path / "ck", tmp_path / "tuned", tmp_path / "exp"
    assert main(["compress", "--model", str(model_dir), "--method", "lorc", "--bits", "4", "--rank", "8",
                 "--group-size", "32", "--opt", "symmetric=true", "--calib-text", str(text), "--calib-samples", "2",
                 "--seqlen", "64", "--out", str(ck)]) == 0
    assert main(["finetune", str(ck), "--objective", "lm", "--text", str(text), "--steps", "4", "--lr", "1e-2",
                 "--seqlen", "32", "--windows", "8", "--out", str(tuned)]) == 0
    assert main(["export", str(tuned), "--format", "peft", "--out", str(out)]) == 0
    capsys.readouterr()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    before, ref = io.load(ck), io.load(tuned)
    for model in (before, ref):  # the export stores these in fp16
        for p in model.parameters():
            p.data = p.data.half().float()
    with torch.no_grad():
        want, untrained = ref(ids).logits, before(ids).logits
        got = peft.PeftModel.from_pretrained(plain_model_from_export(out / "base", "gptq"),
                                             str(out / "adapter")).eval()(ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-4 * scale
    assert (untrained - want).abs().max() > 100 * (got - want).abs().max()  # the trained factors are exported
