"""The QPEFT tables and plots from benchmarks/results/finetune_*.json (written by benchmarks/finetune.py); used by
report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _budget(d: dict[str, Any]) -> float:
    """The budget a run was compressed for (older results: their stored bits/weight rounded to the nearest half bit;
    the comparison table marks a run stored above its budget)."""
    if d.get("budget"):
        return float(d["budget"])
    return round(d["bits_per_weight_before"] * 2) / 2


def _label(d: dict[str, Any]) -> str:
    """The start's method with the training options that change what is trained or how (bf16, Q's scales)."""
    opts = [o for o, on in (("bf16", d.get("amp") == "bf16"), ("+ Q scales", d.get("train_scales"))) if on]
    return f"{d.get('method')} ({', '.join(opts)})" if opts else str(d.get("method"))


def _key(item: tuple[str, dict[str, Any]]) -> tuple:
    name, d = item
    return _budget(d), d["steps"], d.get("method") or "", name


def finetune_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: a comparison of the starts at equal steps per budget, then every run with the factors stored three
    ways."""
    out = ["## Fine-tuning L, R on a frozen Q (QPEFT)", "",
           "`python benchmarks/finetune.py RUN --steps N --lr LR --through-rounding --threads 2 [--amp bf16]`: "
           "train on State-of-the-Union windows (never the held-out text), score the same held-out Moby-Dick windows "
           "before and after. The checkpoints come from `qlr compress --method M --bits B --budget X "
           "--calib-samples 32`.", "",
           "### Starts compared at equal steps", "",
           "Per budget and step count, every start (`kd`, trained through the storage rounding, factors "
           "re-quantized: bits/weight unchanged).", "",
           "| budget | steps | start (method) | bits/weight | lr | before | after | change | after / FP | "
           "train time |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in sorted(rows.items(), key=_key):
        if not d.get("through_rounding") or d["objective"] != "kd":
            continue
        over = " (over budget)" if d["bits_per_weight_after"] > _budget(d) else ""
        out.append(f"| {_budget(d)} | {d['steps']} | {_label(d)} "
                   f"| {d['bits_per_weight_after']:.3f}{over} "
                   f"| {d['lr']:g} | {d['ppl_before']:,.2f} | "
                   f"**{d['ppl_after']:,.2f}** | {100 * d['ppl_change']:+.1f} % | "
                   f"{d['ppl_after'] / d['fp_ppl']:.2f}× | {d['train_seconds'] / 60:.1f} min |")
    out += ["", "### Every run", "",
            "\"re-quantized\" stores the trained factors in their original formats (bits/weight unchanged: the "
            "headline); \"fp16\" keeps them in fp16 (bits counted); \"float32\" is the trained model before storing. "
            "`_ste` rows trained through the factors' storage rounding (`--through-rounding`): there the float32 and "
            "re-quantized models are the same, and the fp16 column stores the float masters, which were never what "
            "the model computed.", "",
            "| result file | start (method) | objective | steps × batch × tokens | lr | amp | train time | FP ppl | "
            "before | after, re-quantized | change | after, fp16 factors | after, float32 | "
            "bits/weight (re-quantized / fp16) | commit |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, d in sorted(rows.items(), key=_key):
        out.append(f"| `{name}` | {d.get('method')} | {d['objective']} | "
                   f"{d['steps']} × {d['batch_size']} × {d['train_seqlen']} | {d['lr']:g} | {d.get('amp', 'none')} | "
                   f"{d['train_seconds'] / 60:.1f} min | {d['fp_ppl']:.2f} | {d['ppl_before']:,.2f} | "
                   f"**{d['ppl_after']:,.2f}** | {100 * d['ppl_change']:+.1f} % | {d['ppl_after_fp16']:,.2f} | "
                   f"{d['ppl_after_float_factors']:,.2f} | {d['bits_per_weight_after']:.3f} / "
                   f"{d['bits_per_weight_fp16']:.3f} | {d['meta']['commit']} |")
    out.append("")
    return "\n".join(out)


def plot_finetune(rows: dict[str, dict[str, Any]], path: Path) -> str | None:
    """Left: the training loss of every step, per run (colour: start; solid: budget < 3, dashed: ≥ 3).
    Right: held-out perplexity before → after, per run (log)."""
    if not rows:
        return "no fine-tuning results"
    from report import _plt

    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    items = sorted(rows.items(), key=_key)
    colours = {"odlri": "tab:green", "caldera": "tab:blue", "qera-exact": "tab:red", "loftq": "tab:orange"}
    for name, d in items:
        ax.plot(range(1, len(d["losses"]) + 1), d["losses"], lw=1, color=colours.get(d.get("method") or "", "0.4"),
                ls="-" if _budget(d) < 3 else "--", label=name.removeprefix("finetune_"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KL to the FP model for kd; log)")
    ax.set_title("QPEFT: loss per step")
    ax.legend(fontsize=6)
    for i, (name, d) in enumerate(items):
        bx.plot([i, i], [d["ppl_before"], d["ppl_after"]], color="0.6", lw=1)
        bx.scatter([i], [d["ppl_before"]], marker="o", color="tab:red", s=18, label="before" if i == 0 else None)
        bx.scatter([i], [d["ppl_after"]], marker="v", color="tab:blue", s=22, label="after" if i == 0 else None)
    fp = items[0][1]["fp_ppl"]
    bx.axhline(fp, color="k", ls=":", lw=1, label=f"FP {fp:.1f}")
    bx.set_yscale("log")
    bx.set_xticks(range(len(items)))
    bx.set_xticklabels([f"{d.get('method')} {_budget(d)}\n{d['steps']} st" for _, d in items], fontsize=7,
                       rotation=45, ha="right")
    bx.set_ylabel("held-out perplexity (log)")
    bx.set_title("QPEFT: perplexity before → after (re-quantized factors)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def step_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: seconds per QPEFT step per variant, and the speed-up over Q's codes in float32 (same process)."""
    out = ["### Step time", "",
           "`python benchmarks/finetune_step.py RUN --threads 2`: `kd` steps of 4 × 256 tokens (teacher forward "
           "included), trained through the rounding; each variant in its own process (peak resident memory, and "
           "in brackets once the student and teacher are loaded).", "",
           "| run | variant | s / step | speed-up vs codes, float32 | peak memory (MiB; loaded) | commit |",
           "|---|---|---:|---:|---:|---|"]
    for name, d in sorted(rows.items()):
        for variant, sec in d["seconds_per_step"].items():
            mem = (f"{d['peak_mib'][variant]:,.0f} ({d['loaded_mib'][variant]:,.0f})" if "peak_mib" in d
                   else "—")
            out.append(f"| `{Path(d['run']).name}` | {variant} | {sec:.2f} | "
                       f"{d['speedup_vs_codes_fp32'][variant]:.2f}× | {mem} | {d['meta']['commit']} |")
    out.append("")
    return "\n".join(out)
