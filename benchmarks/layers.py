"""Real SmolLM2-135M layers: activation-aware error and time of every method, plus the ODLRI paper's analysis.

    python benchmarks/layers.py --quick      # one early block, three linears, a few settings (minutes)
    python benchmarks/layers.py              # early, middle and late blocks, all 7 linears; bits 2 and 3; rank 0
                                             # (Q only), 5 and 10 % of min(m, n); L/R at 16 and 4 bits (~1 h)
    python benchmarks/layers.py --resume     # continue a killed run from its finished linears
    python benchmarks/layers.py --only odlri odlri-e8p   # rerun these methods' rows inside results/layers.json
    python benchmarks/layers.py --outer-iters 15 --inner-iters 10   # the paper's iteration counts (hours here)

H comes from the FP model on State of the Union calibration text (float64, per linear group). For each selected
linear (q, k, v, o, gate, up, down) and setting, every method in ``qlr.methods()`` is run; Q-only methods at rank 0.
SRR runs with both scalings, each on the footing of the QERA variant with the same scaling (rows ``srr``: diag,
as ``qera-approx``; ``srr-full``: H^{1/2}, as ``qera-exact``; all four at the grid's group size 64).
At 2 bits CALDERA and ODLRI also run in the paper's lattice setting (E8P Q, E8P-4 L/R when L/R are 4-bit; rows
named ``caldera-e8p``/``odlri-e8p``). Joint methods run ``--outer-iters`` × ``--inner-iters`` iterations (default
3 × 3 to fit a 2-core CPU; the error history of every row is kept). Writes benchmarks/results/layers.json
(``--quick``: layers_quick.json) with the run metadata. Timing ratios are against RTN on the same layer and bits in
the same run. Every process runs one thread unless ``--threads`` says otherwise, so two runs can share two cores.
Finished linears are saved to ``layers.partial.json`` as they complete; ``--resume`` skips them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlr  # noqa: E402
from common import RESULTS, run_meta, write_result  # noqa: E402
from qlr.calibration.blocks import calibrate_block, capture_block_inputs, run_block  # noqa: E402
from qlr.data import calibration_batches, load_text  # noqa: E402
from qlr.models.loading import load_model  # noqa: E402
from qlr.models.registry import block_linears, get_blocks  # noqa: E402


def collect_hessians(blocks_wanted: list[int], calib_samples: int, seqlen: int, seed: int) -> dict:
    """{(block, linear): (W, H, mean_abs)} from the FP model, for the requested blocks."""
    model, tok = load_model("smollm2-135m")
    ids = calibration_batches(tok, load_text("sotu"), calib_samples, seqlen, seed)
    state = capture_block_inputs(model, ids)
    out = {}
    for b, block in enumerate(get_blocks(model)):
        if b > max(blocks_wanted):
            break
        if b in blocks_wanted:
            stats = calibrate_block(block, block_linears(block), state.hidden, state.calls[b])
            for name, (H, mean_abs, _) in stats.finalize().items():
                W = block.get_submodule(name).weight.detach().float().clone()
                out[(b, name)] = (W, H, mean_abs)
        with torch.no_grad():
            state.hidden = run_block(block, state.hidden, state.calls[b])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--outer-iters", type=int, default=3)
    p.add_argument("--inner-iters", type=int, default=3)
    p.add_argument("--resume", action="store_true", help="skip the linears a killed run already finished")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="rerun only these methods (e.g. after changing one) "
                   "and replace their rows in the existing result file; the k sweep is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    blocks = [0] if args.quick else [0, 15, 29]
    linears = (["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"] if args.quick else
               ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"])
    bits_list = [2] if args.quick else [2, 3]
    fracs = [0.05] if args.quick else [0.05, 0.1]
    lr_bits_list = [4] if args.quick else [16, 4]
    joint = dict(outer_iters=args.outer_iters, inner_iters=args.inner_iters, patience=0)
    t0 = time.perf_counter()
    data = collect_hessians(blocks, args.calib_samples, args.seqlen, args.seed)
    print(f"calibration: {time.perf_counter() - t0:.0f}s", flush=True)
    out_name = "layers_quick" if args.quick else "layers"
    partial = RESULTS / f"{out_name}.partial.json"
    rows: list[dict] = []
    if args.resume and partial.exists():
        saved = json.loads(partial.read_text())
        if saved.get("settings", {}) | {"resume": args.resume} != vars(args):
            sys.exit(f"--resume: {partial} was written with other settings {saved.get('settings')}; "
                     "rerun with those, or without --resume to start over")
        rows = saved["rows"]
        print(f"resuming: {len({(r['block'], r['linear']) for r in rows})} linears done", flush=True)
    done = {(r["block"], r["linear"]) for r in rows if not r["k_sweep"]}
    previous: dict = {}
    if args.only:
        if not (RESULTS / f"{out_name}.json").exists():
            sys.exit(f"--only replaces rows of results/{out_name}.json, which does not exist yet: run the whole grid")
        previous = json.loads((RESULTS / f"{out_name}.json").read_text())
        rows = [r for r in previous["rows"] if r["k_sweep"] or r["method"] not in args.only]
        done = set()
    wanted = (lambda method: method in args.only) if args.only else (lambda method: True)

    def run(b: int, name: str, method: str, bits: int, rank: int, lr_bits: int, frac: float = 0.0, **opts) -> dict:
        W, H, mean_abs = data[(b, name)]
        t = time.perf_counter()
        kw = {} if method in ("rtn", "gptq") else dict(rank=rank, lr_bits=lr_bits)
        label = method
        sweep = bool(opts.pop("k_sweep", False))  # a row of the ODLRI k sweep, not of the main grid
        if method.endswith("-e8p"):  # the lattice setting of caldera/odlri (their default at 2 bits)
            method = method.removesuffix("-e8p")
            opts = dict(opts, q_quantizer="e8p", lr_quantizer="e8p4" if lr_bits == 4 else "uniform")
        elif method in ("caldera", "odlri"):  # the scalar grid: GPTQ/LDLQ Q step, group-wise L/R
            opts = dict(opts, q_quantizer="gptq", lr_quantizer="uniform")
        elif method.startswith("srr"):  # srr (diag scaling) pairs with qera-approx, srr-full with qera-exact
            method = "srr"
            opts = dict(opts, scaling="full" if label == "srr-full" else "diag", group_size=64)  # QERA's g64
        dec = qlr.decompose(W, H, method, bits=bits, mean_abs=mean_abs, name=f"{b}.{name}", **kw, **opts)
        secs = time.perf_counter() - t
        row = {"block": b, "linear": name, "shape": list(W.shape), "method": label, "bits": bits,
               "k_sweep": sweep, "rank": dec.rank, "rank_frac": frac, "lr_bits": lr_bits if dec.rank else None,
               "options": opts, "act_err": dec.act_err,  # undamped H, original domain
               "bits_per_weight": dec.bits_per_weight, "seconds": secs, "history": dec.history}
        for k in ("q_ratio", "lr_ratio", "q_scale", "final_q_scale", "preserve_k", "energy_frac"):
            if k in dec.diagnostics:
                row[k] = dec.diagnostics[k]
        rows.append(row)
        print(f"{b:2d} {name:18s} {label:12s} b{bits} r{dec.rank:<4d} lr{lr_bits:<2d} err {row['act_err']:.4f} "
              f"bpw {row['bits_per_weight']:.3f} {row['seconds']:.1f}s", flush=True)
        return row

    for (b, name) in data:
        if name not in linears or (b, name) in done:
            continue
        m, n = data[(b, name)][0].shape
        for bits in bits_list:
            key = (b, name, "rtn", bits)
            base = next((r for r in rows if (r["block"], r["linear"], r["method"], r["bits"]) == key), None)
            base = base or run(b, name, "rtn", bits, 0, 16)
            if wanted("gptq"):
                run(b, name, "gptq", bits, 0, 16)
            for frac in fracs:
                rank = max(8, round(frac * min(m, n)) // 8 * 8)
                for lr_bits in lr_bits_list:
                    for method in ("lorc", "lqer", "qera-exact", "qera-approx", "srr", "srr-full", "loftq"):
                        if wanted(method):
                            run(b, name, method, bits, rank, lr_bits, frac)
                    joint_methods = ("caldera", "odlri") + (("caldera-e8p", "odlri-e8p") if bits == 2 else ())
                    for method in joint_methods:
                        if wanted(method):
                            run(b, name, method, bits, rank, lr_bits, frac, **joint)
            for row in rows:
                if row["block"] == b and row["linear"] == name and row["bits"] == bits:
                    row["time_vs_rtn"] = row["seconds"] / max(base["seconds"], 1e-9)
        write_result(partial.stem, {"rows": rows, "settings": vars(args)})  # this linear is finished
    if not args.only:  # ODLRI's k on one layer (the paper: k = 16 at r = 256 best, k = r worse)
        b0, name0 = next(iter(data))
        W, H, _ = data[(b0, name0)]
        rank = max(8, round(0.1 * min(W.shape)) // 8 * 8)
        for k in (1, 4, 8, 16, rank):
            for method in ("odlri", "odlri-e8p"):
                run(b0, name0, method, 2, rank, 4, 0.1, odlri_k=min(k, rank), k_sweep=True, **joint)
    result = {"rows": rows, "meta": run_meta(args.seed), "settings": vars(args)}
    if args.only:  # the untouched rows keep the first run's metadata
        result |= {"settings": previous["settings"], "meta_first_run": previous.get("meta"),
                   "rerun": {"methods": args.only, "settings": vars(args)}}
    write_result(out_name, result)
    partial.unlink(missing_ok=True)
    print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
