"""Perplexity of a qlr checkpoint in qlr and in llama.cpp (base GGUF + LoRA GGUF from ``qlr.export.gguf``).

    python benchmarks/export_gguf.py RUN_DIR [--text moby-dick] [--seqlen 512] [--windows 8] [--out DIR]

Both sides score the *same* token ids: the text is tokenized once by the checkpoint's tokenizer, cut into
non-overlapping ``seqlen`` windows (tail dropped, as ``qlr.eval.perplexity``), each window evaluated from an empty
context and every position scored (``seqlen − 1`` predictions per window). No BOS is added unless ``--bos``
(then each window's first token is replaced by BOS on both sides, as llama.cpp's ``llama-perplexity`` does).
Unlike ``llama-perplexity``, which scores only the second half of each window, all positions are scored.
llama.cpp runs through llama-cpp-python: ``Llama(model.gguf, lora_path=lora.gguf, logits_all=True)``, ``eval``
and ``scores``. Also reported: llama.cpp without the adapter (how much L R is worth there) and whether
llama.cpp's own tokenizer gives the same ids as the checkpoint's on the first part of the text.
Writes benchmarks/results/export_gguf_<run name>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_result  # noqa: E402
from qlr import io  # noqa: E402
from qlr.data import load_text, tokenize  # noqa: E402
from qlr.eval.perplexity import window_nll  # noqa: E402
from qlr.export.gguf import export  # noqa: E402


def llama_cpp_nll(model_path: Path, lora_path: Path | None, windows: torch.Tensor, threads: int,
                  kv_f32: bool = False) -> float:
    """Summed next-token NLL (nats) of every window, each from an empty context, by llama.cpp."""
    from llama_cpp import Llama

    seqlen = windows.shape[1]
    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}  # GGML_TYPE_F32 (llama.cpp's default KV cache is f16)
    llm = Llama(str(model_path), lora_path=str(lora_path) if lora_path else None, logits_all=True, n_ctx=seqlen,
                n_batch=seqlen, n_ubatch=seqlen, n_threads=threads, verbose=False, **kv)
    total = 0.0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float64)[:-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(seqlen - 1), w[1:]]).sum())
    llm.close()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--text", default="moby-dick", help="built-in corpus or local text file (held out)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="export directory (default: RUN_DIR-gguf)")
    p.add_argument("--force", action="store_true", help="export again even if OUT/model.gguf exists")
    p.add_argument("--bos", action="store_true", help="replace each window's first token by BOS on both sides")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", default=None, help="result file suffix (default: the run's name, + _kvf32)")
    p.add_argument("--kv-f32", action="store_true", help="llama.cpp KV cache in f32 instead of its default f16")
    p.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="GGUF dtype of uncompressed 2-D tensors")
    a = p.parse_args()

    out = a.out or a.run_dir.with_name(a.run_dir.name + "-gguf")
    t0 = time.perf_counter()
    if a.force or not (out / "model.gguf").is_file():
        report = export(a.run_dir, out, dtype=a.dtype)
    else:
        import json

        report = json.loads((out / "qlr_export.json").read_text())
    t_export = time.perf_counter() - t0

    tok = io.load_tokenizer(a.run_dir)
    text = load_text(a.text)
    ids = tokenize(tok, text)
    n = min(a.windows, ids.numel() // a.seqlen)
    windows = ids[: n * a.seqlen].view(n, a.seqlen).clone()
    if a.bos:
        windows[:, 0] = tok.bos_token_id
    count = n * (a.seqlen - 1)

    model = io.load(a.run_dir)
    t0 = time.perf_counter()
    nll_qlr = sum(window_nll(model, w[None])[0] for w in windows)
    t_qlr = time.perf_counter() - t0
    del model

    lora = out / "lora.gguf" if (out / "lora.gguf").is_file() else None
    t0 = time.perf_counter()
    nll_cpp = llama_cpp_nll(out / "model.gguf", lora, windows, a.threads, a.kv_f32)
    t_cpp = time.perf_counter() - t0
    nll_base = llama_cpp_nll(out / "model.gguf", None, windows, a.threads, a.kv_f32) if lora else nll_cpp

    from llama_cpp import Llama

    vocab_only = Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    head = tok.decode(ids[:2000].tolist())
    cpp_ids = vocab_only.tokenize(head.encode("utf-8"), add_bos=False, special=False)
    ref_ids = tokenize(tok, head).tolist()
    same = sum(x == y for x, y in zip(cpp_ids, ref_ids)) / max(len(ref_ids), 1)

    ppl_qlr, ppl_cpp, ppl_base = (math.exp(x / count) for x in (nll_qlr, nll_cpp, nll_base))
    rel = (ppl_cpp - ppl_qlr) / ppl_qlr
    bpw = report["bits_per_weight"]
    print(f"{a.run_dir.name}: {n} windows x {a.seqlen} tokens of {a.text} ({count} scored tokens)")
    print(f"  qlr        perplexity {ppl_qlr:.4f}   ({bpw['qlr']:.3f} bits/weight, {t_qlr:.1f}s)")
    print(f"  llama.cpp  perplexity {ppl_cpp:.4f}   (base+lora {bpw['llama_cpp_total']:.3f} bits/weight, "
          f"{t_cpp:.1f}s)   relative difference {100 * rel:+.3f} %")
    if lora:
        print(f"  llama.cpp without the LoRA adapter: {ppl_base:.4f} ({bpw['llama_cpp_base']:.3f} bits/weight)")
    print(f"  llama.cpp tokenizer agrees with the checkpoint's on {100 * same:.2f} % of the first "
          f"{len(ref_ids)} tokens ({len(cpp_ids)} vs {len(ref_ids)} ids)")
    print(f"  max |qlr − GGUF| (gguf.quants.dequantize): {report['max_abs_diff']}")
    name = a.name or a.run_dir.name + ("_kvf32" if a.kv_f32 else "")
    path = write_result(f"export_gguf_{name}", {
        "meta": run_meta(), "run_dir": str(a.run_dir), "out": str(out), "text": a.text, "seqlen": a.seqlen,
        "windows": n, "bos": a.bos, "kv_f32": a.kv_f32, "threads": a.threads, "ppl_qlr": ppl_qlr,
        "ppl_llama_cpp": ppl_cpp,
        "ppl_llama_cpp_no_lora": ppl_base, "relative_difference": rel, "tokenizer_agreement": same,
        "seconds": {"export": t_export, "qlr": t_qlr, "llama_cpp": t_cpp},
        "bits_per_weight": bpw, "max_abs_diff": report["max_abs_diff"], "lora": report.get("lora")})
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
