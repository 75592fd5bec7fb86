"""The end-of-run table, the JSON report and the PNG plot of ``fastlm finetune``."""
from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "finetune_report.json"
PLOT_FILE = "finetune_plot.png"
FORMAT = 1   # the JSON report's layout version (``fastlm_finetune`` key)

# (label, key in the run summary, format, how to compare fastlm with unpatched)
_ROWS = [
    ("tokens/s (real tokens)", "tokens_per_s", "{:,.0f}", "ratio"),
    ("step time (median)", "step_time_s", "{:.3f} s", "ratio"),
    ("peak memory", "peak_memory_mib", "{:,.1f} MiB", "ratio"),
    ("train loss (last steps)", "train_loss", "{:.4f}", "diff"),
    ("eval loss before", "eval_loss_before", "{:.4f}", "diff"),
    ("eval loss after", "eval_loss", "{:.4f}", "diff"),
    ("perplexity after", "perplexity", "{:,.2f}", "ratio"),
    ("accuracy after", "accuracy", "{:.3f}", "diff"),
    ("padding in batches", "padding_fraction", "{:.1%}", None),
    ("train() time, with evals", "wall_time_s", "{:.1f} s", "ratio"),
]


def comparisons(runs: dict) -> dict:
    """fastlm / unpatched ratios (speed, memory, time) and fastlm - unpatched differences (losses)."""
    if "unpatched" not in runs:
        return {}
    fast, base = runs["fastlm"], runs["unpatched"]
    out = {}
    for _, key, _, how in _ROWS:
        a, b = fast.get(key), base.get(key)
        if how is None or a is None or b is None:
            continue
        if how == "ratio":
            out[f"{key}_ratio"] = a / b if b else None
        else:
            out[f"{key}_diff"] = a - b
    return out


def table(runs: dict, memory_measure: str, speedup: dict | None = None) -> str:
    """A fixed-width text table: one column per run, then the comparison; ``speedup`` (from
    :func:`fastlm.finetune.train.speedup`) adds the per-step speed-up line."""
    labels = [label for label in ("unpatched", "fastlm") if label in runs]
    header = ["", *(("unpatched (HF)" if lb == "unpatched" else "fastlm") for lb in labels)]
    if len(labels) == 2:
        header.append("fastlm vs unpatched")
    lines = []
    compared = comparisons(runs)
    for name, key, fmt, how in _ROWS:
        values = [runs[label].get(key) for label in labels]
        if all(v is None for v in values) and key in ("perplexity", "accuracy"):
            continue
        row = [name, *("n/a" if v is None else fmt.format(v) for v in values)]
        if len(labels) == 2:
            row.append(_compare(compared, key, how, fmt))
        lines.append(row)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    render = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(render(header))
    notes = [f"peak memory: {memory_measure}"]
    if speedup and speedup.get("median") is not None:
        notes.insert(0, f"fastlm speed-up per step, unpatched time / fastlm time on the same step (interleaved): "
                        f"median {speedup['median']:.2f}x, range {speedup['min']:.2f}-{speedup['max']:.2f}x "
                        f"over {speedup['steps']} steps")
    return "\n".join([render(header), rule, *map(render, lines), rule, *notes])


def _compare(compared: dict, key: str, how: str | None, fmt: str) -> str:
    if how == "ratio" and compared.get(f"{key}_ratio") is not None:
        return f"{compared[f'{key}_ratio']:.2f}x"
    if how == "diff" and f"{key}_diff" in compared:
        return f"{compared[f'{key}_diff']:+.4f}"
    return ""


def write_json(folder: Path, report: dict) -> Path:
    path = folder / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def write_plot(folder: Path, runs: dict, title: str) -> Path:
    """Loss curves (train per step, eval points) and per-step throughput, one line per run."""
    import matplotlib

    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"unpatched": ("tab:red", "s"), "fastlm": ("tab:blue", "o")}
    for label, run in sorted(runs.items(), reverse=True):
        color, marker = styles[label]
        curves = run["curves"]
        if curves["loss"]:
            steps, losses = zip(*curves["loss"])
            loss_ax.plot(steps, losses, color=color, lw=1, alpha=0.8, label=f"{label} train")
        if curves["eval"]:
            steps, losses = [e[0] for e in curves["eval"]], [e[1] for e in curves["eval"]]
            loss_ax.plot(steps, losses, "--", marker=marker, markersize=8 if marker == "s" else 5,
                         color=color, label=f"{label} eval")
        speed = [tok / t for tok, t in zip(curves["tokens"], curves["step_time_s"]) if t > 0]
        speed_ax.plot(range(1, len(speed) + 1), speed, color=color, lw=1, label=label)
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    speed_ax.set(xlabel="optimizer step", ylabel="real tokens / s", title="training throughput")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = folder / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
