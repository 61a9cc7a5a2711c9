"""Whole-model SmolLM2-135M: perplexity on held-out Moby-Dick for each method at equal all-in bits/weight.

    python benchmarks/model.py --quick            # a few configurations, few iterations (minutes per config)
    python benchmarks/model.py                    # the full grid
    python benchmarks/model.py --only odlri-2b-r64 --windows 40

Each configuration writes benchmarks/results/model_<name>.json (commit, machine, seed, exact settings, bits/weight,
perplexity, compression time, per-layer errors); finished configurations are skipped on a rerun (``--force`` redoes
them). Calibration: State of the Union text; evaluation: Moby-Dick (never mixed). ``benchmarks/report.py`` turns the
results into the README table and plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlr  # noqa: E402
from common import RESULTS, run_meta, write_result  # noqa: E402
from qlr.data import load_text  # noqa: E402
from qlr.eval.perplexity import perplexity  # noqa: E402
from qlr.models.loading import load_model  # noqa: E402

# name: (method, bits, rank, budget, options). Group 64 everywhere unless stated; L/R 4-bit for joint methods.
JOINT = dict(lr_bits=4, q_quantizer="gptq", lr_quantizer="uniform")  # the scalar grid (int2 g64, GPTQ Q step)
# the paper's setting: E8P lattice Q (2 bits/weight, block LDLQ) and two-stage E8P L/R (4 bits), Hadamard incoherence
E8P = dict(lr_bits=4, q_quantizer="e8p", lr_quantizer="e8p4")
CONFIGS: dict[str, tuple[str, int, int | float | None, float | None, dict]] = {
    "fp": ("fp", 16, None, None, {}),
    "rtn-2b": ("rtn", 2, None, None, {}),
    "gptq-2b": ("gptq", 2, None, None, {}),
    "rtn-3b": ("rtn", 3, None, None, {}),
    "gptq-3b": ("gptq", 3, None, None, {}),
    "caldera-2b-bpw2.5": ("caldera", 2, None, 2.5, JOINT),
    "odlri-2b-bpw2.5": ("odlri", 2, None, 2.5, JOINT),
    "caldera-2b-bpw3.5": ("caldera", 2, None, 3.5, JOINT),
    "odlri-2b-bpw3.5": ("odlri", 2, None, 3.5, JOINT),
    "caldera-2b-r64": ("caldera", 2, 64, None, JOINT),
    "odlri-2b-r64": ("odlri", 2, 64, None, JOINT),
    "caldera-e8p-bpw2.5": ("caldera", 2, None, 2.5, E8P),
    "odlri-e8p-bpw2.5": ("odlri", 2, None, 2.5, E8P),
    "caldera-e8p-bpw3.5": ("caldera", 2, None, 3.5, E8P),
    "odlri-e8p-bpw3.5": ("odlri", 2, None, 3.5, E8P),
    "caldera-e8p-r64": ("caldera", 2, 64, None, E8P),
    "odlri-e8p-r64": ("odlri", 2, 64, None, E8P),
    "odlri-e8p-bpw2.5-input": ("odlri", 2, None, 2.5, dict(E8P, odlri_domain="input")),
    "odlri-e8p-r64-input": ("odlri", 2, 64, None, dict(E8P, odlri_domain="input")),
    "caldera-3b-bpw3.5": ("caldera", 3, None, 3.5, JOINT),
    "odlri-3b-bpw3.5": ("odlri", 3, None, 3.5, JOINT),
    "qera-exact-2b-bpw2.5": ("qera-exact", 2, None, 2.5, dict(lr_bits=4)),
    "lqer-2b-bpw2.5": ("lqer", 2, None, 2.5, dict(lr_bits=4)),
    "srr-2b-bpw2.5": ("srr", 2, None, 2.5, dict(lr_bits=4)),
    "lorc-2b-bpw3.5": ("lorc", 2, None, 3.5, dict(lr_bits=4)),
    "qera-exact-3b-bpw3.5": ("qera-exact", 3, None, 3.5, dict(lr_bits=4)),
    "qera-exact-2b-bpw3.5": ("qera-exact", 2, None, 3.5, dict(lr_bits=4)),
    "lqer-2b-bpw3.5": ("lqer", 2, None, 3.5, dict(lr_bits=4)),
    "srr-2b-bpw3.5": ("srr", 2, None, 3.5, dict(lr_bits=4)),
    "loftq-2b-bpw3.5": ("loftq", 2, None, 3.5, dict(lr_bits=4)),
    # SRR as published against the QERA variant with the same scaling (diag ↔ approx, full ↔ exact), same Q grid
    "qera-approx-2b-bpw2.5": ("qera-approx", 2, None, 2.5, dict(lr_bits=4)),
    "srr-diag-2b-bpw2.5": ("srr", 2, None, 2.5, dict(lr_bits=4, scaling="diag")),
    "srr-full-2b-bpw2.5": ("srr", 2, None, 2.5, dict(lr_bits=4, scaling="full")),
    "qera-approx-2b-bpw3.5": ("qera-approx", 2, None, 3.5, dict(lr_bits=4)),
    "srr-diag-2b-bpw3.5": ("srr", 2, None, 3.5, dict(lr_bits=4, scaling="diag")),
    "srr-full-2b-bpw3.5": ("srr", 2, None, 3.5, dict(lr_bits=4, scaling="full")),
    # the SRR authors' own setting (3-bit Q, rank 64, 16-bit factors; run with --group-size 32)
    "qera-approx-3b-r64-lr16": ("qera-approx", 3, 64, None, dict(lr_bits=16)),
    "srr-diag-3b-r64-lr16": ("srr", 3, 64, None, dict(lr_bits=16, scaling="diag")),
}
QUICK = ["fp", "rtn-2b", "gptq-2b", "caldera-2b-bpw2.5", "odlri-2b-bpw2.5"]


def run(name: str, args: argparse.Namespace, text: str) -> dict:
    method, bits, rank, budget, opts = CONFIGS[name]
    opts = dict(opts)
    if method in ("caldera", "odlri"):
        opts.setdefault("outer_iters", args.outer_iters)
        opts.setdefault("inner_iters", args.inner_iters)
    model, tok = load_model("smollm2-135m")
    t0 = time.perf_counter()
    info: dict = {}
    if method != "fp":
        model = qlr.compress(model, method, bits, rank, tokenizer=tok, calibration="sotu",
                             calib_samples=args.calib_samples, seqlen=args.seqlen, budget=budget,
                             group_size=args.group_size, seed=args.seed, progress=not args.no_progress, **opts)
        info = model.qlr_info
    secs = time.perf_counter() - t0
    ppl = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.windows, progress=not args.no_progress)
    layers = info.get("layer_metrics", {})
    return {"name": name, "method": method, "bits": bits, "rank": rank, "budget": budget,
            "group_size": args.group_size, "options": opts, "calib_samples": args.calib_samples,
            "seqlen": args.seqlen, "eval_windows": args.windows, "eval_text": "moby-dick",
            "calibration": "sotu", "bits_per_weight": info.get("bits_per_weight", 16.0), "perplexity": ppl,
            "compress_seconds": secs,
            "layers": {k: {kk: v[kk] for kk in ("act_err", "bits_per_weight", "rank", "seconds", "shape", "history",
                                                 "q_ratio", "lr_ratio", "final_q_scale") if kk in v}
                       for k, v in layers.items()},
            "meta": run_meta(args.seed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", default=None, choices=sorted(CONFIGS))
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of --seqlen tokens")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--outer-iters", type=int, default=5)
    p.add_argument("--inner-iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix for result files (e.g. a settings variant)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    names = args.only or (QUICK if args.quick else list(CONFIGS))
    text = load_text("moby-dick")
    for name in names:
        out = RESULTS / f"model_{name}{args.tag}.json"
        if out.exists() and not args.force:
            print(f"{name}: done already ({out.name})")
            continue
        torch.manual_seed(args.seed)
        res = run(name, args, text)
        write_result(f"model_{name}{args.tag}", res)
        print(f"{name}: perplexity {res['perplexity']:.3f} at {res['bits_per_weight']:.3f} bits/weight, "
              f"compressed in {res['compress_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
