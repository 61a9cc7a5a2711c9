"""The QPEFT table and loss plot from benchmarks/results/finetune_*.json (written by benchmarks/finetune.py); used
by report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def finetune_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: held-out perplexity before and after fine-tuning, per run, with the factors stored three ways."""
    out = ["## Fine-tuning L, R on a frozen Q (QPEFT)", "",
           "`python benchmarks/finetune.py RUN --steps N --lr LR --threads 2`: train on State-of-the-Union windows "
           "(never the held-out text), score the same held-out Moby-Dick windows before and after. \"re-quantized\" "
           "stores the trained factors in their original formats (bits/weight unchanged: the headline); \"fp16\" "
           "keeps them in fp16 (bits counted); \"float32\" is the trained model before storing.", "",
           "`_ste` rows trained through the factors' storage rounding (`--through-rounding`): there the float32 and "
           "re-quantized models are the same, and the fp16 column stores the float masters, which were never what "
           "the model computed.", "",
           "| result file | start (method) | objective | steps × batch × tokens | train time | FP ppl | before | "
           "after, re-quantized | "
           "change | after, fp16 factors | after, float32 | bits/weight (re-quantized / fp16) | commit |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, d in sorted(rows.items()):
        out.append(f"| `{name}` | {d.get('method')} | {d['objective']} | "
                   f"{d['steps']} × {d['batch_size']} × {d['train_seqlen']} | "
                   f"{d['train_seconds'] / 60:.1f} min | {d['fp_ppl']:.2f} | {d['ppl_before']:.2f} | "
                   f"**{d['ppl_after']:.2f}** | {100 * d['ppl_change']:+.1f} % | {d['ppl_after_fp16']:.2f} | "
                   f"{d['ppl_after_float_factors']:.2f} | {d['bits_per_weight_after']:.3f} / "
                   f"{d['bits_per_weight_fp16']:.3f} | {d['meta']['commit']} |")
    out.append("")
    return "\n".join(out)


def plot_finetune(rows: dict[str, dict[str, Any]], path: Path) -> str | None:
    """The training loss of every step, per run."""
    if not rows:
        return "no fine-tuning results"
    from report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in sorted(rows.items()):
        ax.plot(range(1, len(d["losses"]) + 1), d["losses"], lw=1, label=f"{name} ({d['objective']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KL to the FP model for kd)")
    ax.set_title("QPEFT: loss per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
