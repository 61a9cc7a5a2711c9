"""qlr's perplexity vs the exported GPTQ base + PEFT LoRA adapter's, on held-out text (target: within 1 %).

    python benchmarks/export_peft.py runs/my-run --text moby-dick --seqlen 512 --max-windows 16

Exports RUN with ``qlr.export.export(run, "peft", out)`` (``--out``, default a temporary directory), then scores
the same windows (:func:`qlr.eval.perplexity.perplexity`, as ``qlr eval``) with

* qlr's own model (``qlr.load``), and
* the export through transformers + PEFT: with a GPTQ backend installed (gptqmodel) the base loads as GPTQ via
  ``AutoModelForCausalLM.from_pretrained`` (``--dtype``, default float32), or with GPT-QModel's own
  ``GPTQModel.load`` (float16) when the config has per-layer ``dynamic`` overrides, which transformers ignores;
  otherwise (``--backend dequant`` or no backend) this script dequantizes the GPTQ tensors itself, from the
  documented layout, into a plain transformers model (``--dtype``).
  Either way the adapter is applied by ``peft.PeftModel.from_pretrained``.

Writes ``benchmarks/results/export_peft_<run>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import run_meta, write_result


def _stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Column c of ``words`` is a little-endian bit stream (word w bit b = stream bit 32·w + b); value k is
    stream bits [k·bits, (k+1)·bits). Returns (count, cols) int64."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    bit = (u[:, None, :] >> torch.arange(32)[None, :, None]) & 1
    stream = bit.reshape(-1, u.shape[1])[: count * bits].reshape(count, bits, u.shape[1])
    return (stream << torch.arange(bits)[None, :, None]).sum(1)


def _dequantize(state: dict, prefix: str, bits: int, v1: bool) -> torch.Tensor:
    """W (out × in) = scales[g_idx[i], o] · (q[i, o] − z[g_idx[i], o]); v1 stores z − 1."""
    qweight, qzeros = state[prefix + ".qweight"], state[prefix + ".qzeros"]
    g = state[prefix + ".g_idx"].long()
    q = _stream(qweight, bits, qweight.shape[0] * 32 // bits).float()
    z = _stream(qzeros.T.contiguous(), bits, qweight.shape[1]).T.float() + (1 if v1 else 0)
    return (state[prefix + ".scales"].float()[g] * (q - z[g])).T.contiguous()


def plain_model(base: Path) -> torch.nn.Module:
    """A float32 transformers model holding the dequantized GPTQ base (no GPTQ backend needed)."""
    import re

    import transformers
    from safetensors.torch import load_file

    cfg = json.loads((base / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    state = load_file(str(base / "model.safetensors"))
    overrides = {k[2:]: v for k, v in qc.get("dynamic", {}).items() if k.startswith("+:")}
    weights = {}
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            bits = next((v.get("bits", qc["bits"]) for k, v in overrides.items() if re.match(k, prefix)), qc["bits"])
            weights[prefix + ".weight"] = _dequantize(state, prefix, bits, qc["checkpoint_format"] == "gptq")
        elif leaf not in ("qzeros", "scales", "g_idx"):
            weights[key] = t.float()
    result = model.load_state_dict(weights, strict=False)
    missing = set(result.missing_keys) - {"lm_head.weight"}
    if missing or result.unexpected_keys:
        raise ValueError(f"exported base does not match the model: missing {sorted(missing)[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="qlr checkpoint directory")
    p.add_argument("--text", default="moby-dick", help="built-in corpus or a local text file (as qlr eval)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    p.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"])
    p.add_argument("--backend", default="auto", choices=["auto", "gptq", "dequant"],
                   help="how the exported base is loaded: gptq (needs gptqmodel), dequant (this script's reader)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="activation dtype of the exported model (float32, as qlr eval; GPTQ scales stay fp16). "
                        "float16 is the engine's GPU dtype, ~15x slower on CPU with gptqmodel's Torch kernel")
    a = p.parse_args()

    import peft
    import transformers

    import qlr
    from qlr.data import load_text
    from qlr.eval.perplexity import perplexity
    from qlr.export import export
    from qlr.io import load_tokenizer

    tmp = tempfile.TemporaryDirectory() if a.out is None else None
    out = Path(a.out or tmp.name) / "export"
    report = export(a.run, "peft", out, checkpoint_format=a.checkpoint_format)
    text = load_text(a.text)
    tok = load_tokenizer(a.run)
    kw = dict(seqlen=a.seqlen, max_windows=a.max_windows)
    ppl_qlr = perplexity(qlr.load(a.run), tok, text, **kw)

    backend = a.backend
    if backend == "auto":
        try:
            import gptqmodel  # noqa: F401

            backend = "gptq"
        except ImportError:
            backend = "dequant"
    dtype = getattr(torch, a.dtype)
    if backend == "gptq" and "dynamic" in json.loads((out / "base" / "config.json").read_text())["quantization_config"]:
        # per-layer bits/group sizes or linears left fp16: transformers' GPTQ path (optimum's GPTQQuantizer) ignores
        # `dynamic` and builds every decoder linear at the global bits, so load with GPT-QModel's own loader, which
        # honours it. Its Torch kernel takes fp16/bf16 only, and it refuses sym=False in v1 (use gptq_v2).
        from gptqmodel import BACKEND, GPTQModel

        if dtype != torch.float16:
            print(f"per-layer GPTQ config (dynamic): GPTQModel.load runs the base in float16, not {a.dtype}")
        dtype = torch.float16
        base = GPTQModel.load(str(out / "base"), device="cpu", backend=BACKEND.TORCH, dtype=dtype).model
        backend = "gptqmodel.load"
    elif backend == "gptq":
        base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), device_map="cpu", dtype=dtype)
    else:
        base = plain_model(out / "base").to(dtype)
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")) if report["adapter"] else base
    ppl_exp = perplexity(model.eval(), tok, text, **kw)
    rel = ppl_exp / ppl_qlr - 1
    print(f"{a.run}: {report['layers_exported']} linears exported ({a.checkpoint_format}), max |ΔW| "
          f"{report['max_abs_diff']:.3g}; {a.text}, {a.max_windows} windows × {a.seqlen} tokens\n")
    print("| model | bits/weight | perplexity |\n|---|---|---|")
    print(f"| qlr (Q + L R) | {report['qlr_bits_per_weight']:.3f} | {ppl_qlr:.4f} |")
    print(f"| GPTQ base + PEFT LoRA ({backend}, {str(dtype)[6:]}) | {report['engine_bits_per_weight']:.3f} "
          f"(GPTQ {report['gptq_bits_per_weight']:.3f} + adapter {report['adapter_bits_per_weight']:.3f}) | "
          f"{ppl_exp:.4f} |")
    print(f"\nrelative difference {100 * rel:+.3f} % ({'within' if abs(rel) <= 0.01 else 'OUTSIDE'} the 1 % target)")
    path = write_result(f"export_peft_{Path(a.run).name}", {
        "meta": run_meta(), "run": a.run, "text": a.text, "seqlen": a.seqlen, "max_windows": a.max_windows,
        "backend": backend, "dtype": str(dtype)[6:], "checkpoint_format": a.checkpoint_format, "ppl_qlr": ppl_qlr,
        "ppl_exported": ppl_exp, "relative_difference": rel,
        "report": {k: v for k, v in report.items() if k != "layers"}})
    print(f"-> {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
