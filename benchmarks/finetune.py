"""QPEFT: held-out perplexity of a compressed SmolLM2 before and after fine-tuning its L, R on a frozen Q.

    python benchmarks/finetune.py runs/smol-odlri-bpw2.5 --steps 100 --threads 2

Loads RUN (a qlr checkpoint) and the FP model it was compressed from, then trains with
:func:`qlr.train.finetune` (default ``kd``: match the FP model's next-token distribution) on windows of the State of
the Union corpus (``--text``, the calibration corpus: the held-out Moby-Dick is never trained on), and scores the
same held-out Moby-Dick windows as ``benchmarks/model.py`` (``--windows`` × ``--seqlen`` tokens) before and after.
The trained factors are scored three ways: as float32 (not storable at the run's budget), stored in fp16 (more
bits/weight, counted) and re-quantized into their original formats (bits/weight unchanged: the headline).
Writes ``results/finetune_<run>_<objective>_s<steps>.json`` with the loss of every step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlr  # noqa: E402
from common import run_meta, write_result  # noqa: E402
from qlr.data import calibration_batches, load_text  # noqa: E402
from qlr.eval.perplexity import perplexity  # noqa: E402
from qlr.io import inspect  # noqa: E402
from qlr.models.loading import load_model  # noqa: E402
from qlr.train import FinetuneConfig, finetune, trainable_layers  # noqa: E402


def _bpw(model: torch.nn.Module) -> float:
    from qlr.nn.qlinear import QLRLinear

    layers = [m for m in model.modules() if isinstance(m, QLRLinear)]
    return sum(m.storage_bits() for m in layers) / sum(m.in_features * m.out_features for m in layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="qlr checkpoint directory")
    p.add_argument("--model", default=None, help="FP model (default: the one recorded in the checkpoint)")
    p.add_argument("--objective", choices=("kd", "lm"), default="kd")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--train-windows", type=int, default=512, help="distinct training windows to draw from")
    p.add_argument("--text", default="sotu", help="training text (never the evaluation text)")
    p.add_argument("--windows", type=int, default=40, help="held-out evaluation windows")
    p.add_argument("--seqlen", type=int, default=512, help="evaluation window length")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--through-rounding", action="store_true",
                   help="train through the factors' storage rounding (straight-through gradients)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast the forward passes (FinetuneConfig.amp)")
    p.add_argument("--q-cache", action="store_true", help="decode Q once for training (FinetuneConfig.q_cache)")
    p.add_argument("--train-scales", action="store_true",
                   help="also train Q's scales (FinetuneConfig.train_scales)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps / 10)")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = inspect(a.run)  # verifies the checkpoint
    config = json.loads((a.run / "qlr_config.json").read_text())
    recorded = config.get("extra") or {}
    base = a.model or recorded.get("model") or "smollm2-135m"
    fp, tok = load_model(base)
    student = qlr.load(a.run)
    held_out = load_text("moby-dick")
    if a.text == "moby-dick":
        raise SystemExit("the training text must not be the held-out evaluation text")
    t0 = time.perf_counter()
    before = perplexity(student, tok, held_out, seqlen=a.seqlen, max_windows=a.windows)
    fp_ppl = perplexity(fp, tok, held_out, seqlen=a.seqlen, max_windows=a.windows)
    eval_s = time.perf_counter() - t0
    bpw_before = _bpw(student)
    ids = calibration_batches(tok, load_text(a.text), a.train_windows, a.train_seqlen, a.seed + 1)
    cfg = FinetuneConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, objective=a.objective,
                         storage="none", seed=a.seed, warmup=max(1, a.steps // 10) if a.warmup is None else a.warmup,
                         through_rounding=a.through_rounding, amp=a.amp, q_cache=a.q_cache,
                         train_scales=a.train_scales)
    res = finetune(student, ids, cfg, teacher=fp if a.objective == "kd" else None)
    # trained through the rounding, the float32 model is the re-quantized one (tested): not scored twice
    after_float = (None if a.through_rounding
                   else perplexity(student, tok, held_out, seqlen=a.seqlen, max_windows=a.windows))
    stored = {}
    for storage in ("fp16", "requantize"):  # the same trained factors, stored two ways
        model = copy.deepcopy(student)
        for mod in trainable_layers(model).values():
            mod.store_factors(storage)
            mod.store_q_scales()
        stored[storage] = (perplexity(model, tok, held_out, seqlen=a.seqlen, max_windows=a.windows), _bpw(model))
    after, bpw_after = stored["requantize"]
    after_float = after if after_float is None else after_float
    row = {"meta": run_meta(a.seed), "run": str(a.run), "base": base, "method": info.get("method"),
           "budget": config.get("budget") or recorded.get("budget"),
           "objective": a.objective, "through_rounding": a.through_rounding, "amp": a.amp, "q_cache": a.q_cache,
           "train_scales": a.train_scales,
           "steps": a.steps, "lr": a.lr, "warmup": cfg.warmup,
           "batch_size": a.batch_size,
           "train_seqlen": a.train_seqlen, "train_text": a.text, "train_windows": int(ids.shape[0]),
           "tokens": res.tokens, "train_seconds": res.seconds, "eval_seconds_before": eval_s,
           "eval_windows": a.windows, "eval_seqlen": a.seqlen, "eval_text": "moby-dick",
           "fp_ppl": fp_ppl, "ppl_before": before, "ppl_after": after, "ppl_change": after / before - 1,
           "bits_per_weight_before": bpw_before, "bits_per_weight_after": bpw_after,
           "ppl_after_float_factors": after_float, "ppl_after_fp16": stored["fp16"][0],
           "bits_per_weight_fp16": stored["fp16"][1], "layers": res.layers,
           "trainable_parameters": res.trainable_parameters, "losses": res.losses}
    name = f"finetune_{a.run.name}_{a.objective}{'_ste' if a.through_rounding else ''}_s{a.steps}{a.tag}"
    path = write_result(name, row)
    print(f"{a.run.name}: perplexity {before:.2f} -> {after:.2f} ({100 * row['ppl_change']:+.1f} %; FP {fp_ppl:.2f}) "
          f"at {bpw_after:.3f} bits/weight (factors re-quantized); fp16 factors {stored['fp16'][0]:.2f} at "
          f"{stored['fp16'][1]:.3f}; float32 factors {after_float:.2f}; {a.steps} steps, {res.tokens} tokens, "
          f"{res.seconds / 60:.1f} min -> {path}")


if __name__ == "__main__":
    main()
