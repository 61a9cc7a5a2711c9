"""The exports table from benchmarks/results/export_gguf_*.json and export_peft_*.json (written by
benchmarks/export_gguf.py and benchmarks/export_peft.py); used by report.py."""

from __future__ import annotations

from typing import Any


def _commit(d: dict[str, Any]) -> str:
    return str(d.get("meta", {}).get("commit", "?"))


def export_tables(gguf: dict[str, dict[str, Any]], peft: dict[str, dict[str, Any]]) -> str:
    """Markdown: qlr's own perplexity against the engine's on the same tokens, per exported run."""
    out = ["## Exports: the same model in other engines", "",
           "Each row: a qlr run exported with `qlr export RUN --format gguf|peft`, then the held-out Moby-Dick "
           "windows (512 tokens each, every position scored, the checkpoint's own token ids) scored by qlr "
           "(`qlr eval`'s perplexity) and by the engine. Target: within 1 %. Bits/weight as the engine stores "
           "them (GGUF blocks, GPTQ codes + scales + packed zeros + g_idx, adapters in fp16/f32).", "",
           "| result file | engine | windows | qlr ppl | engine ppl | difference | engine w/o adapter | "
           "bits/weight qlr → engine | commit |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for name, d in sorted(gguf.items()):
        bpw = d.get("bits_per_weight", {})
        out.append(f"| `{name}` | llama.cpp (base GGUF + LoRA GGUF) | {d.get('windows', '?')} | "
                   f"{d['ppl_qlr']:.3f} | {d['ppl_llama_cpp']:.3f} | {100 * d['relative_difference']:+.2f} % | "
                   f"{d.get('ppl_llama_cpp_no_lora', float('nan')):.2f} | {bpw.get('qlr', float('nan')):.3f} → "
                   f"{bpw.get('llama_cpp_base', float('nan')):.3f} + {bpw.get('llama_cpp_adapter', float('nan')):.3f}"
                   f" | {_commit(d)} |")
    for name, d in sorted(peft.items()):
        rep = d.get("report", {})
        engine = ("transformers + PEFT on the base dequantized by this script (no GPTQ kernel)"
                  if d.get("backend") == "dequant" else
                  f"GPTQModel 3-bit torch kernel + PEFT ({d.get('checkpoint_format')}, {d.get('dtype', 'float16')})")
        out.append(f"| `{name}` | {engine} | {d.get('max_windows', '?')} | {d['ppl_qlr']:.3f} | "
                   f"{d['ppl_exported']:.3f} | {100 * d['relative_difference']:+.3f} % | — | "
                   f"{rep.get('qlr_bits_per_weight', float('nan')):.3f} → "
                   f"{rep.get('gptq_bits_per_weight', float('nan')):.3f} + "
                   f"{rep.get('adapter_bits_per_weight', float('nan')):.3f} | {_commit(d)} |")
    out += ["", "Runs (SmolLM2-135M, calibration 8 × 512 State-of-the-Union tokens unless noted):",
            "- `smol-qera-4s-g32-r32`: `qlr compress --model smollm2-135m --method qera-approx --bits 4 --rank 32 "
            "--group-size 32 --opt symmetric=true --calib-samples 8` (Q4_0 in GGUF); `_kvf32`: llama.cpp with an "
            "f32 KV cache; `_hfmeta`: GGUF metadata built from the HF tokenizer instead of copied (2 windows).",
            "- `smol-qera-4s-g32-bpw5.5`: the same with `--budget 5.5` instead of `--rank` (per-layer ranks).",
            "- `smol-qera-8s-g32-r16`: `--bits 8 --rank 16` (Q8_0).",
            "- `smol-lorc4`: `--method lorc --bits 4 --rank 16 --group-size 64 --calib-samples 8 --seqlen 256` "
            "(GPTQ v1 base).",
            "- `run_gptq_v2_f32` / `run_sym_gptq_f32`: `--method qera-exact --bits 3 --rank 16 --group-size 64 "
            "--calib-samples 8 --seqlen 256` (asymmetric: exported as gptq_v2; with `--opt symmetric=true`: GPTQ "
            "v1), loaded by GPTQModel 7.7.0 on CPU torch 2.13 (`pip install --no-deps gptqmodel` plus its small "
            "runtime packages and optimum in a separate venv) with PEFT 0.21: `python benchmarks/export_peft.py "
            "RUN --backend gptq --checkpoint-format FMT --max-windows 8`.",
            "- Then `python benchmarks/export_gguf.py RUN --windows 8 --threads 2` or "
            "`python benchmarks/export_peft.py RUN --text moby-dick --seqlen 512 --max-windows 8`.", ""]
    return "\n".join(out)
