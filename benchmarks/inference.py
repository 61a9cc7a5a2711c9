"""Inference speed and memory of compressed layers and models against dense fp32, both sides in the same run.

    python benchmarks/inference.py --threads 2                        # layers + SmolLM2 (builds a 2.5 bpw run)
    python benchmarks/inference.py --threads 2 --run runs/smol-odlri   # the model part on an existing checkpoint
    python benchmarks/inference.py --layers-only --quick               # a smoke run: small layers, few repeats

Layer level: ``QLRLinear.forward`` vs ``nn.Linear`` (fp32, holding the same dequantized weight) on Llama-7B shapes
(out × in: 4096 × 4096, 11008 × 4096, 4096 × 11008) for E8P Q + E8P-4 L/R r64 with the Hadamard rotation (the
lattice default) and int2/int3/int4 g64/g128 Q with 4-bit g64 L/R r64 or Q only; at 1 token (decode) and 512 tokens
(prefill); also the pure-torch reference path (``QLR_KERNELS=torch``, what qlr ran before its compiled kernels) at
1 token. Codes are random: speed does not depend on their values.

Model level (SmolLM2-135M, compressed at the default 2.5 bits/weight vs the FP model): greedy ``generate`` tokens/s at
batch 1, prefill tokens/s at 512 tokens, perplexity-evaluation wall time on held-out Moby-Dick windows, and the
resident memory of a loaded model (RSS growth from loading, and peak RSS, each in a fresh process).

Writes benchmarks/results/inference.json; ``benchmarks/report.py`` turns it into tables and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_meta, write_result  # noqa: E402
from qlr.decompose.base import Decomposition  # noqa: E402
from qlr.kernels import cpu  # noqa: E402
from qlr.nn import QLRLinear  # noqa: E402
from qlr.quant.e8p import LatticeQuantizedTensor  # noqa: E402
from qlr.quant.grid import QuantizedTensor, QuantSpec  # noqa: E402
from qlr.quant.hadamard import Incoherence  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024)]
# name: (Q format, L/R format, rank)
FORMATS: dict[str, tuple[str, str | None, int]] = {
    "e8p+e8p4-r64": ("e8p", "e8p4", 64),
    "int2-g64+int4-r64": ("int2-g64", "int4-g64", 64),
    "int3-g128+int4-r64": ("int3-g128", "int4-g64", 64),
    "int4-g128+int4-r64": ("int4-g128", "int4-g64", 64),
    "int2-g64": ("int2-g64", None, 0),
    "int3-g128": ("int3-g128", None, 0),
    "int4-g128": ("int4-g128", None, 0),
}


# ---- building layers -------------------------------------------------------------------------------------------
def _factor(fmt: str, m: int, n: int, g: torch.Generator) -> QuantizedTensor | LatticeQuantizedTensor:
    if fmt.startswith("e8p"):
        stages = 2 if fmt == "e8p4" else 1
        codes = torch.randint(-(2**15), 2**15, (stages, m, n // 8), generator=g).to(torch.int16)
        return LatticeQuantizedTensor.from_codes(codes, [0.5, 0.0625][:stages])
    bits, group = (int(p[1:] if p[0] == "g" else p[3:]) for p in fmt.split("-"))
    spec = QuantSpec(bits=bits, group_size=group)
    groups = spec.groups(n)
    codes = torch.randint(0, 2**bits, (m, n), generator=g).to(torch.uint8)
    scale = (torch.rand(m, groups, generator=g) * 0.01 + 0.001).half().float()
    zero = torch.randint(0, 2**bits, (m, groups), generator=g).float()
    return QuantizedTensor(codes, scale, zero, spec)


def build_layer(fmt: str, m: int, n: int, seed: int = 0) -> QLRLinear:
    """A QLRLinear of shape m × n (out × in) in format ``fmt`` (see FORMATS) with random codes."""
    q_fmt, lr_fmt, r = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    q = _factor(q_fmt, m, n, g)
    if r:
        lq, rq = _factor(lr_fmt, m, r, g), _factor(lr_fmt, r, n, g)
        L, R = lq.dequantize(), rq.dequantize()
    else:
        lq = rq = None
        L, R = torch.zeros(m, 0), torch.zeros(0, n)
    rot = Incoherence.random(m, n, seed=seed) if q_fmt == "e8p" else None
    dec = Decomposition("bench", None, q, L, R, lq=lq, rq=rq, rotation=rot, shape=(m, n))
    return QLRLinear.from_decomposition(dec)


# ---- timing ----------------------------------------------------------------------------------------------------
def timed(fn: Any, min_time: float, max_reps: int = 1000) -> float:
    """Median seconds of ``fn()`` over repeats filling about ``min_time`` seconds (after one warm-up call)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class kernels_off:  # noqa: N801 - a context manager used like a function
    """Run the pure-torch reference path inside the block (``QLR_KERNELS=torch``)."""

    def __enter__(self) -> None:
        self.old = os.environ.get("QLR_KERNELS")
        os.environ["QLR_KERNELS"] = "torch"

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            os.environ.pop("QLR_KERNELS", None)
        else:
            os.environ["QLR_KERNELS"] = self.old


@torch.no_grad()
def bench_layers(shapes: list[tuple[int, int]], formats: list[str], min_time: float, prefill: int,
                 reference: bool) -> list[dict[str, Any]]:
    rows = []
    for m, n in shapes:
        for fmt in formats:
            mod = build_layer(fmt, m, n)
            dense = torch.nn.Linear(n, m, bias=False)
            dense.weight.copy_(mod.dequantize_weight())
            x1, xp = torch.randn(1, n), torch.randn(prefill, n)
            row: dict[str, Any] = {"shape": [m, n], "format": fmt, "bits_per_weight": mod.bits_per_weight}
            row["dense_1_ms"] = 1e3 * timed(lambda: dense(x1), min_time)
            row["qlr_1_ms"] = 1e3 * timed(lambda: mod(x1), min_time)
            row["dense_prefill_ms"] = 1e3 * timed(lambda: dense(xp), min_time, max_reps=10)
            row["qlr_prefill_ms"] = 1e3 * timed(lambda: mod(xp), min_time, max_reps=10)
            if reference:
                with kernels_off():
                    row["reference_1_ms"] = 1e3 * timed(lambda: mod(x1), min_time / 2, max_reps=20)
            err = (mod(xp) - dense(xp)).norm() / dense(xp).norm()
            row["rel_err_vs_dense"] = float(err)
            row["speedup_1"] = row["dense_1_ms"] / row["qlr_1_ms"]
            row["prefill_ratio"] = row["qlr_prefill_ms"] / row["dense_prefill_ms"]
            rows.append(row)
            ref = f", reference {row['reference_1_ms']:.2f} ms" if reference else ""
            print(f"{m}x{n} {fmt:20s} {row['bits_per_weight']:.2f} bpw  1 token: dense {row['dense_1_ms']:.2f} ms, "
                  f"qlr {row['qlr_1_ms']:.2f} ms ({row['speedup_1']:.2f}x faster){ref};  {prefill} tokens: "
                  f"qlr/dense {row['prefill_ratio']:.2f}", flush=True)
    return rows


# ---- model level -----------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_probe(which: str) -> dict[str, float]:
    """In this (fresh) process: RSS after imports, after loading ``which`` ("fp" or a checkpoint), and the peak."""
    import qlr
    from qlr.models.loading import load_model

    with torch.no_grad():  # warm up torch's own allocations first, so they are not counted as the model's
        torch.nn.Linear(64, 64)(torch.randn(8, 64))
    base = _rss_kib("VmRSS")
    model = load_model("smollm2-135m")[0] if which == "fp" else qlr.load(which)
    with torch.no_grad():  # one short forward touches every weight (memory-mapped files count once read)
        model(torch.zeros(1, 64, dtype=torch.long))
    loaded = _rss_kib("VmRSS")
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"rss_base_mib": base / 1024, "rss_loaded_mib": loaded / 1024, "model_rss_mib": (loaded - base) / 1024,
            "peak_rss_mib": _rss_kib("VmHWM") / 1024, "tensor_bytes_mib": params / 2**20}


def _memory(which: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--_memory", which], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(fns: dict[str, Any], reps: int) -> dict[str, float]:
    """Median seconds of each ``fns[name]()`` over ``reps`` rounds that call every function once in turn (after one
    warm-up round), so that slow drifts of the machine hit every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def bench_model(run: Path, windows: int, new_tokens: int, reps: int) -> dict[str, Any]:
    import qlr
    from qlr.data import load_text
    from qlr.eval.perplexity import perplexity
    from qlr.models.loading import load_model

    fp, tok = load_model("smollm2-135m")
    comp = qlr.load(run)
    models = {"fp": fp, "qlr": comp}
    text = load_text("moby-dick")
    prompt = tok("Call me Ishmael. Some years ago, never mind how long precisely, having little money",
                 return_tensors="pt").input_ids
    ids512 = tok(text[:20000], return_tensors="pt").input_ids[:, :512]

    def gen(model: torch.nn.Module, k: int = new_tokens) -> None:
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=tok.eos_token_id)

    out: dict[str, Any] = {"run": str(run), "new_tokens": new_tokens, "windows": windows, "reps": reps,
                           "prompt_tokens": prompt.shape[1]}
    t_gen = interleaved({k: (lambda m=m: gen(m)) for k, m in models.items()}, reps)
    t_pre = interleaved({k: (lambda m=m: m(ids512)) for k, m in models.items()}, reps)
    ppl: dict[str, float] = {}

    def evaluate(name: str) -> None:
        ppl[name] = perplexity(models[name], tok, text, max_windows=windows, progress=False)

    t_ppl = interleaved({k: (lambda k=k: evaluate(k)) for k in models}, max(1, reps // 2))
    for k in models:
        out[k] = {"generate_tok_s": new_tokens / t_gen[k], "prefill_tok_s": 512 / t_pre[k], "ppl_eval_s": t_ppl[k],
                  "ppl": ppl[k]}
    with kernels_off():  # the pure-torch path, once, with fewer tokens (it is slow)
        k = max(4, new_tokens // 4)
        t_ref = timed(lambda: gen(comp, k), 0.0, max_reps=1)
        out["qlr_reference"] = {"generate_tok_s": k / t_ref, "prefill_tok_s": 512 / timed(lambda: comp(ids512), 0.0,
                                                                                            max_reps=1)}
    for name in ("fp", "qlr", "qlr_reference"):
        r = out[name]
        extra = f"  perplexity eval {r['ppl_eval_s']:6.1f} s (ppl {r['ppl']:.2f})" if "ppl" in r else ""
        print(f"{name:14s} generate {r['generate_tok_s']:6.1f} tok/s  prefill {r['prefill_tok_s']:7.1f} tok/s{extra}",
              flush=True)
    out["fp"]["memory"] = _memory("fp")
    out["qlr"]["memory"] = _memory(str(run))
    for name in ("fp", "qlr"):
        mem = out[name]["memory"]
        print(f"{name:14s} loaded model RSS {mem['model_rss_mib']:.0f} MiB, peak {mem['peak_rss_mib']:.0f} MiB, "
              f"tensors {mem['tensor_bytes_mib']:.0f} MiB")
    q, f = out["qlr"], out["fp"]
    out["ratios"] = {"generate": q["generate_tok_s"] / f["generate_tok_s"],
                     "prefill": q["prefill_tok_s"] / f["prefill_tok_s"],
                     "ppl_eval_time": q["ppl_eval_s"] / f["ppl_eval_s"],
                     "memory": q["memory"]["model_rss_mib"] / f["memory"]["model_rss_mib"],
                     "generate_vs_reference": q["generate_tok_s"] / out["qlr_reference"]["generate_tok_s"]}
    print("ratios (qlr / fp):", {k: round(v, 3) for k, v in out["ratios"].items()})
    return out


def default_run(path: Path) -> Path:
    """Compress SmolLM2 at the default 2.5 bits/weight (ODLRI, E8P lattice) with few iterations, unless ``path``
    already holds a checkpoint. Speed does not depend on how well the codes were fitted."""
    import qlr

    if (path / "qlr_config.json").exists():
        return path
    model = qlr.compress("smollm2-135m", method="odlri", bits=2, budget=2.5, lr_bits=4, calib_samples=16,
                         outer_iters=1, inner_iters=1)
    from qlr.models.loading import load_model

    qlr.save(model, path, load_model("smollm2-135m")[1])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1024 × 1024 layers, short timings")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--model-only", action="store_true")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--run", type=Path, default=None, help="compressed SmolLM2 checkpoint (default: build one)")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-reference", action="store_true", help="skip the pure-torch path timings")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a._memory:
        print(json.dumps(memory_probe(a._memory)))
        return
    result: dict[str, Any] = {"meta": run_meta(), "kernels": cpu.available(), "threads": a.threads}
    min_time = 0.3 if a.quick else 1.5
    if not a.model_only:
        result["layers"] = bench_layers(QUICK_SHAPES if a.quick else SHAPES, a.formats, min_time,
                                        prefill=128 if a.quick else 512, reference=not a.no_reference)
    if not a.layers_only:
        run = a.run or default_run(Path("runs/bench-inference-smollm2-bpw2.5"))
        result["model"] = bench_model(run, a.windows, a.new_tokens, reps=2 if a.quick else 5)
    name = "inference_quick" if a.quick else "inference"
    old = RESULTS / f"{name}.json"
    if old.exists():  # a partial run (--layers-only / --model-only / --formats) keeps the rest of the last run
        prev = json.loads(old.read_text())
        if "layers" in result and prev.get("layers"):
            fresh = {(tuple(r["shape"]), r["format"]) for r in result["layers"]}
            kept = [r for r in prev["layers"] if (tuple(r["shape"]), r["format"]) not in fresh]
            result["layers"] = sorted(kept + result["layers"], key=lambda r: (
                [list(s) for s in SHAPES].index(r["shape"]) if r["shape"] in [list(s) for s in SHAPES] else 99,
                list(FORMATS).index(r["format"]) if r["format"] in FORMATS else 99))
        result = {**{k: prev[k] for k in ("layers", "model") if k in prev}, **result}
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
