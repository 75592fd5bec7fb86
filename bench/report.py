"""Turn a results file of the bench harness into a markdown table and a plot.

    python bench/report.py bench/results/attention.csv             # latest run -> .md + .png beside it
    python bench/report.py bench/results/attention.json --all      # every run in the file
    python bench/report.py bench/results/attention.csv --baseline sdpa-efficient

The table has one row per (case, mode) and one column per provider; a cell reads
``median ms · rate (fraction of the measured ceiling) · speedup over the baseline``.
The rate is TFLOP/s when the bench counted flops, else GB/s; the baseline defaults to
the one the bench script recorded (``run(..., baseline=)``), else ``torch``.  Skipped
and failed providers are listed with their reasons under the table, and a second table
gives peak extra memory.
The plot (matplotlib, Agg backend, PNG) has one panel per mode: grouped bars of the
rate (or of the time when no work was counted) per case and measured provider, with
the measured ceiling as a dashed line.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

NUMERIC = ("ms_median", "ms_p20", "ms_p80", "ms_mean", "ms_min", "reps", "input_sets", "peak_mb",
           "flops", "bytes", "tflops", "gbps", "frac_matmul", "frac_copy",
           "ceiling_copy_gbps", "ceiling_matmul_tflops")


def _num(value):
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def load(path: str | Path) -> list[dict]:
    """Result rows from a harness ``.csv`` or ``.json`` file (all runs)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = []
        for run in json.loads(path.read_text()):
            ceilings = run.get("ceilings") or {}
            for row in run["rows"]:
                row = dict(row)
                row.setdefault("ceiling_copy_gbps", ceilings.get("copy_gbps"))
                row.setdefault("ceiling_matmul_tflops", ceilings.get("matmul_tflops"))
                rows.append(row)
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            if key in row:
                row[key] = _num(row[key])
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """The rows of the last run in the file."""
    if not rows:
        return rows
    last = rows[-1].get("run_id")
    return [r for r in rows if r.get("run_id") == last]


def _unique(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def _rate(row: dict) -> tuple[float | None, str, float | None]:
    if row.get("tflops") is not None:
        return row["tflops"], "TFLOP/s", row.get("frac_matmul")
    if row.get("gbps") is not None:
        return row["gbps"], "GB/s", row.get("frac_copy")
    return None, "", None


def _cell(row: dict | None, base: dict | None) -> str:
    if row is None:
        return ""
    if row.get("status") != "ok":
        return row.get("status", "")
    text = f"{_fmt(row['ms_median'])} ms"
    rate, unit, frac = _rate(row)
    if rate is not None:
        text += f" · {_fmt(rate)} {unit}" + (f" ({frac:.0%})" if frac is not None else "")
    if base is not None and base is not row and base.get("status") == "ok":
        text += f" · {base['ms_median'] / row['ms_median']:.2f}x"
    return text


def _header(rows: list[dict], ceilings: dict | None, env: dict | None) -> list[str]:
    first = {**rows[0], **(env or {})}
    bench = first.get("bench", "benchmark")
    lines = [f"### {bench}: {first.get('device', '?')}", "",
             f"torch {first.get('torch', '?')} · triton {first.get('triton', '?')} · "
             f"transformers {first.get('transformers', '?')} · CUDA {first.get('cuda', '?')} · "
             f"python {first.get('python', '?')} · commit {first.get('commit', '?')} · {first.get('timestamp', '?')}"]
    copy = (ceilings or {}).get("copy_gbps") or first.get("ceiling_copy_gbps")
    mm = (ceilings or {}).get("matmul_tflops") or first.get("ceiling_matmul_tflops")
    if copy or mm:
        dtype = (ceilings or {}).get("matmul_dtype", "")
        lines.append(f"ceilings measured in this run: copy {_fmt(copy or 0)} GB/s (read + write), "
                     f"matmul {_fmt(mm or 0)} TFLOP/s {dtype}".rstrip())
    return lines + [""]


def markdown(rows: list[dict], ceilings: dict | None = None, env: dict | None = None,
             baseline: str | None = None) -> str:
    """A markdown report of one run's rows (see the module docstring)."""
    if not rows:
        return "(no results)"
    # Providers with no measurement at all appear only in the "not measured" list.
    providers = _unique(r["provider"] for r in rows if r.get("status") == "ok")
    if baseline is None:
        baseline = rows[0].get("baseline") or None
    if baseline not in providers:
        baseline = "torch" if "torch" in providers else None
    keys = _unique((r["case"], r["mode"]) for r in rows)
    index = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    lines = _header(rows, ceilings, env)
    if baseline:
        lines += [f"cell: median ms · rate (fraction of ceiling) · speedup over `{baseline}`", ""]
    lines.append("| case | mode | " + " | ".join(providers) + " |")
    lines.append("|---|---|" + "---|" * len(providers))
    for case, mode in keys:
        base = index.get((case, mode, baseline)) if baseline else None
        cells = [_cell(index.get((case, mode, p)), base) for p in providers]
        lines.append(f"| {case} | {mode} | " + " | ".join(cells) + " |")
    mem = [r for r in rows if r.get("status") == "ok" and r.get("peak_mb") is not None]
    if mem:
        lines += ["", "peak extra memory, MiB (GPU: allocator peak over the inputs; "
                  "CPU: sampled RSS growth, a lower bound)", "",
                  "| case | mode | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
        for case, mode in keys:
            cells = []
            for p in providers:
                r = index.get((case, mode, p))
                ok_mem = r and r.get("status") == "ok" and r.get("peak_mb") is not None
                cells.append(_fmt(r["peak_mb"]) if ok_mem else "")
            lines.append(f"| {case} | {mode} | " + " | ".join(cells) + " |")
    notes = {}
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            notes.setdefault((r["provider"], r["status"], r.get("reason", "")), []).append(f"{r['case']}/{r['mode']}")
    if notes:
        lines += ["", "not measured:"]
        for (provider, status, reason), where in notes.items():
            scope = ("all cases" if len(where) == len(keys)
                     else ", ".join(where[:6]) + (" ..." if len(where) > 6 else ""))
            lines.append(f"- `{provider}` {status} ({scope}): {reason}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> Path:
    """Write a PNG of one run's rows (see the module docstring); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    modes = _unique(r["mode"] for r in rows)
    cases = _unique(r["case"] for r in rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    providers = _unique(r["provider"] for r in ok)
    if any(r.get("tflops") is not None for r in ok):
        metric, label, ceiling_key = "tflops", "TFLOP/s", "ceiling_matmul_tflops"
    elif any(r.get("gbps") is not None for r in ok):
        metric, label, ceiling_key = "gbps", "GB/s", "ceiling_copy_gbps"
    else:
        metric, label, ceiling_key = "ms_median", "median ms (lower is better)", None
    index = {(r["case"], r["mode"], r["provider"]): r for r in ok}
    # one panel per mode, stacked, so the width grows with cases x providers only
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 0.2 * len(cases) * max(len(providers), 1) + 3),
                                                     3.4 * len(modes)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    colors = plt.get_cmap("tab10" if len(providers) <= 10 else "tab20").colors
    for ax, mode in zip(axes[:, 0], modes):
        for j, p in enumerate(providers):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = index.get((case, mode, p))
                if r is not None and r.get(metric) is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[metric])
            ax.bar(xs, ys, width, label=p, color=colors[j % len(colors)])
        ceiling = next((r.get(ceiling_key) for r in ok if ceiling_key and r.get(ceiling_key)), None)
        if ceiling:
            ax.axhline(ceiling, ls="--", color="gray", lw=1)
            ax.text(-0.45, ceiling, f" ceiling {_fmt(ceiling)}", va="bottom", fontsize=7, color="gray")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_title(mode)
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    first = rows[0]
    fig.suptitle(f"{first.get('bench', '')} · {first.get('device', '')} · torch {first.get('torch', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a bench/results/<name>.csv or .json file")
    p.add_argument("--all", action="store_true", help="every run in the file (default: the latest run)")
    p.add_argument("--baseline", default=None,
                   help="provider the speedups are relative to (default: the recorded one, else torch)")
    p.add_argument("--md", default=None, help="markdown output (default: <path stem>.md beside the input)")
    p.add_argument("--png", default=None, help="plot output (default: <path stem>.png beside the input)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    rows = load(args.path)
    if not rows:
        raise SystemExit(f"{args.path}: no results")
    runs = _unique(r.get("run_id") for r in rows) if args.all else [rows[-1].get("run_id")]
    parts = [markdown([r for r in rows if r.get("run_id") == run], baseline=args.baseline) for run in runs]
    text = "\n\n".join(parts) + "\n"
    src = Path(args.path)
    md = Path(args.md) if args.md else src.with_suffix(".md")
    md.write_text(text)
    print(text)
    if not args.no_plot:
        png = plot(latest(rows), args.png or src.with_suffix(".png"))
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
