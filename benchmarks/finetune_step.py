"""QPEFT step time: Q multiplied from its codes vs decoded once (``q_cache``), float32 vs bf16 autocast, and the
cost of training Q's scales too, as ratios against the codes/float32 step measured in the same process.

    python benchmarks/finetune_step.py runs/smol-odlri-bpw2.5 --threads 2

Each variant runs :func:`qlr.train.finetune` (``kd`` against the FP model, trained through the rounding, 4 × 256
tokens per step) for ``--warm`` untimed steps and then ``--steps`` timed ones on a fresh copy of RUN. Writes
``results/finetune_step_<run>.json``.
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="qlr checkpoint directory")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warm", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    base = qlr.load(a.run)
    fp, tok = load_model("smollm2-135m")
    ids = calibration_batches(tok, load_text("sotu"), 64, 256, 1)
    rows = {}
    for name, (amp, q_cache, scales) in VARIANTS.items():
        times = []
        for steps in (a.warm, a.warm + a.steps):  # the difference of the two runs: the timed steps alone
            model = copy.deepcopy(base)
            cfg = FinetuneConfig(steps=steps, lr=3e-4, batch_size=4, warmup=1, storage="none", amp=amp,
                                 q_cache=q_cache, train_scales=scales, through_rounding=True)
            t0 = time.perf_counter()
            finetune(model, ids, cfg, teacher=fp, progress=False)
            times.append(time.perf_counter() - t0)
        rows[name] = (times[1] - times[0]) / a.steps
        print(f"{name}: {rows[name]:.2f} s/step", flush=True)
    ref = rows["codes, float32"]
    payload = {"meta": run_meta(), "run": str(a.run), "steps": a.steps, "warm": a.warm, "batch": [4, 256],
               "seconds_per_step": rows, "speedup_vs_codes_fp32": {k: ref / v for k, v in rows.items()}}
    print(write_result(f"finetune_step_{a.run.name}", payload))


if __name__ == "__main__":
    main()
