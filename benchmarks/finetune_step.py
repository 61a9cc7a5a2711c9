"""QPEFT step time: Q multiplied from its codes vs decoded once (``q_cache``), float32 vs bf16 autocast, and the
cost of training Q's scales too, as ratios against the codes/float32 step measured in the same process.

    python benchmarks/finetune_step.py runs/smol-odlri-bpw2.5 --threads 2

Each variant runs in its own process: :func:`qlr.train.finetune` (``kd`` against the FP model, trained through the
rounding, 4 × 256 tokens per step) for ``--warm`` untimed steps and then ``--steps`` timed ones on a fresh copy of
RUN, and reports its peak resident memory, with the resident memory once the models are loaded (the difference is
what training adds). Writes ``results/finetune_step_<run>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlr  # noqa: E402
from common import run_meta, write_result  # noqa: E402
from qlr.data import calibration_batches, load_text  # noqa: E402
from qlr.models.loading import load_model  # noqa: E402
from qlr.train import FinetuneConfig, finetune  # noqa: E402

VARIANTS = {  # name: (amp, q_cache, train_scales)
    "codes, float32": ("none", False, False),
    "codes, bf16": ("bf16", False, False),
    "q-cache, float32": ("none", True, False),
    "q-cache, bf16": ("bf16", True, False),
    "q-cache + scales, float32": ("none", True, True),
    "q-cache + scales, bf16": ("bf16", True, True),
}


def _rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(a: argparse.Namespace) -> None:
    """One variant in this process: prints {"seconds": s/step, "loaded_mib": .., "peak_mib": ..} as JSON."""
    amp, q_cache, scales = VARIANTS[a.child]
    base = qlr.load(a.run)
    fp, tok = load_model("smollm2-135m")
    ids = calibration_batches(tok, load_text("sotu"), 64, 256, 1)
    loaded = _rss_mib()
    times = []
    for steps in (a.warm, a.warm + a.steps):  # the difference of the two runs: the timed steps alone
        model = copy.deepcopy(base)
        cfg = FinetuneConfig(steps=steps, lr=3e-4, batch_size=4, warmup=1, storage="none", amp=amp,
                             q_cache=q_cache, train_scales=scales, through_rounding=True)
        t0 = time.perf_counter()
        finetune(model, ids, cfg, teacher=fp, progress=False)
        times.append(time.perf_counter() - t0)
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": (times[1] - times[0]) / a.steps, "loaded_mib": loaded, "peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="qlr checkpoint directory")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warm", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child is not None:
        _child(a)
        return
    rows = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, str(a.run), "--steps", str(a.steps), "--warm", str(a.warm), "--child", name]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: {rows[name]['seconds']:.2f} s/step, peak {rows[name]['peak_mib']:.0f} MiB "
              f"({rows[name]['loaded_mib']:.0f} MiB loaded)", flush=True)
    ref = rows["codes, float32"]["seconds"]
    payload = {"meta": run_meta(), "run": str(a.run), "steps": a.steps, "warm": a.warm, "batch": [4, 256],
               "seconds_per_step": {k: v["seconds"] for k, v in rows.items()},
               "speedup_vs_codes_fp32": {k: ref / v["seconds"] for k, v in rows.items()},
               "peak_mib": {k: v["peak_mib"] for k, v in rows.items()},
               "loaded_mib": {k: v["loaded_mib"] for k, v in rows.items()}}
    print(write_result(f"finetune_step_{a.run.name}", payload))


if __name__ == "__main__":
    main()
