"""Tables and a plot from benchmarks/results/inference.json (written by benchmarks/inference.py); used by report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"speedup_1": 1.5, "prefill_ratio": 1.25, "generate": 1.2, "ppl_eval_time": 1.3, "memory": 0.4}


def _meta_line(data: dict[str, Any]) -> str:
    m = data.get("meta", {})
    return (f"commit {m.get('commit', '?')}, {m.get('date', '?')}, {data.get('threads', '?')} threads, torch "
            f"{m.get('torch', '?')}, compiled kernels: {'yes' if data.get('kernels') else 'no'}")


def inference_tables(data: dict[str, Any], fname: str) -> str:
    """Markdown: the layer table (decode and prefill against fp32 nn.Linear) and the SmolLM2 table."""
    out = [f"## Inference speed and memory (`results/{fname}`)", "",
           "`python benchmarks/inference.py --threads 2`; both sides of every ratio in the same run "
           f"({_meta_line(data)}). Dense = `nn.Linear` in fp32 holding the same (dequantized) weight; reference = "
           "the pure-torch path (`QLR_KERNELS=torch`), i.e. what a qlr layer cost before the compiled kernels. "
           "Codes are random (speed does not depend on their values); bits/weight all-in.", ""]
    layers = data.get("layers")
    if layers:
        out += ["### Layers (out × in), 1 token (decode) and 512 tokens (prefill)", "",
                "| shape | format | bits/weight | dense 1 tok | qlr 1 tok | **speed-up** | reference 1 tok | "
                "qlr / dense, 512 tok |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in layers:
            ref = f"{r['reference_1_ms']:.2f} ms" if "reference_1_ms" in r else "—"
            out.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['format']} | {r['bits_per_weight']:.2f} | "
                       f"{r['dense_1_ms']:.2f} ms | {r['qlr_1_ms']:.2f} ms | **{r['speedup_1']:.2f}×** | {ref} | "
                       f"{r['prefill_ratio']:.2f} |")
        wide = [r for r in layers if min(r["shape"]) >= 4096]
        if wide:
            worst = min(wide, key=lambda r: r["speedup_1"])
            worst_pre = max(wide, key=lambda r: r["prefill_ratio"])
            out += ["", f"Targets on the 4096-wide layers: every format ≥ {TARGETS['speedup_1']}× faster than dense "
                    f"at 1 token (slowest here: {worst['format']} {worst['shape'][0]}×{worst['shape'][1]}, "
                    f"{worst['speedup_1']:.2f}×); 512 tokens ≤ {TARGETS['prefill_ratio']}× the dense time "
                    f"(worst here: {worst_pre['prefill_ratio']:.2f}×)."]
        out.append("")
    model = data.get("model")
    if model:
        fp, q, ref = model["fp"], model["qlr"], model.get("qlr_reference", {})
        out += [f"### SmolLM2-135M at the default 2.5 bits/weight (`{model['run']}`) vs the FP model", "",
                f"Greedy `generate` of {model['new_tokens']} tokens after a {model['prompt_tokens']}-token prompt "
                f"(batch 1); prefill = one forward of 512 tokens; perplexity evaluation = {model['windows']} "
                f"held-out Moby-Dick windows of 512 tokens; medians of {model.get('reps', '?')} interleaved rounds. "
                "Memory: resident-set growth from loading the model and running one short forward, in a fresh "
                "process (peak = the whole process).", "",
                "| model | generate tok/s | prefill tok/s | perplexity eval | perplexity | model RSS | peak RSS |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in (("FP (fp32)", fp), ("qlr", q)):
            mem = r.get("memory", {})
            out.append(f"| {name} | {r['generate_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['ppl_eval_s']:.1f} s | "
                       f"{r['ppl']:.2f} | {mem.get('model_rss_mib', float('nan')):.0f} MiB | "
                       f"{mem.get('peak_rss_mib', float('nan')):.0f} MiB |")
        if ref:
            out.append(f"| qlr, pure-torch path | {ref['generate_tok_s']:.1f} | {ref['prefill_tok_s']:.0f} | — | — | — "
                       "| — |")
        rt = model["ratios"]
        out += ["", "| ratio (qlr / FP) | measured | target |", "|---|---:|---:|",
                f"| generate tokens/s | {rt['generate']:.2f}× | ≥ {TARGETS['generate']}× |",
                f"| prefill tokens/s | {rt['prefill']:.2f}× | — |",
                f"| perplexity-evaluation wall time | {rt['ppl_eval_time']:.2f}× | ≤ {TARGETS['ppl_eval_time']}× |",
                f"| loaded model memory (RSS) | {rt['memory']:.2f}× | ≤ {TARGETS['memory']}× |",
                f"| generate vs the pure-torch path | {rt['generate_vs_reference']:.1f}× | — |", ""]
    return "\n".join(out)


def plot_inference(data: dict[str, Any], path: Path) -> str | None:
    """Two panels: speed-up over dense at 1 token, and the qlr / dense time at 512 tokens, per layer and format."""
    layers = data.get("layers")
    if not layers:
        return "no layer results"
    from report import _plt

    plt = _plt()
    shapes = sorted({tuple(r["shape"]) for r in layers}, key=lambda s: (s[0] * s[1], s))
    formats = list(dict.fromkeys(r["format"] for r in layers))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(1, len(shapes))
    for k, shape in enumerate(shapes):
        rows = {r["format"]: r for r in layers if tuple(r["shape"]) == shape}
        xs = [i + (k - (len(shapes) - 1) / 2) * width for i in range(len(formats))]
        label = f"{shape[0]}×{shape[1]}"
        axes[0].bar(xs, [rows[f]["speedup_1"] if f in rows else 0 for f in formats], width, label=label)
        axes[1].bar(xs, [rows[f]["prefill_ratio"] if f in rows else 0 for f in formats], width, label=label)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].axhline(TARGETS["speedup_1"], color="tab:red", ls="--", lw=1, label=f"target {TARGETS['speedup_1']}×")
    axes[0].set_ylabel("speed-up over fp32 nn.Linear (higher is better)")
    axes[0].set_title("1 token (decode, batch 1)")
    axes[1].axhline(1.0, color="black", lw=0.8)
    axes[1].axhline(TARGETS["prefill_ratio"], color="tab:red", ls="--", lw=1,
                    label=f"limit {TARGETS['prefill_ratio']}×")
    axes[1].set_ylabel("qlr time / dense time (lower is better)")
    axes[1].set_title("512 tokens (prefill)")
    axes[1].set_ylim(0, max(1.7, max(r["prefill_ratio"] for r in layers) + 0.4))  # room for the legend
    for ax in axes:
        ax.set_xticks(range(len(formats)))
        ax.set_xticklabels(formats, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(f"QLRLinear vs dense, {data.get('threads', '?')} CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
