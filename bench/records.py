"""Where benchmark rows go and what they carry: the CSV columns, the run's environment
(device, versions, commit, time) recorded with every row, and :class:`Recorder`, which appends
rows to ``<results>/<bench>.csv`` / ``.json``.  Part of the harness (bench/harness.py imports
and re-exports all of it: bench scripts import ``harness`` only)."""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent

# Columns in the order the CSV writes them (extra keys, e.g. case params, follow).
COLUMNS = (
    "run_id", "timestamp", "bench", "baseline", "case", "provider", "mode", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "reps", "input_sets", "peak_mb",
    "flops", "bytes", "tflops", "gbps", "frac_matmul", "frac_copy",
    "ceiling_copy_gbps", "ceiling_matmul_tflops",
    "device", "device_type", "python", "torch", "triton", "transformers", "cuda", "commit",
)
META_COLUMNS = ("device", "device_type", "python", "torch", "triton", "transformers", "cuda", "commit")


# ------------------------------------------------------------------------ metadata
def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(repo: Path = BENCH_DIR.parent) -> str:
    """``FASTLM_GIT_COMMIT`` if set, else ``git rev-parse HEAD`` (+"-dirty"), else "unknown"."""
    if os.environ.get("FASTLM_GIT_COMMIT"):
        return os.environ["FASTLM_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    """Device, versions, commit and time of this run (recorded with every row)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


# ------------------------------------------------------------------------- recording
def results_dir_default() -> Path:
    """``FASTLM_BENCH_RESULTS`` if set (gpu_check.sh's dry run uses it), else ``bench/results``."""
    return Path(os.environ.get("FASTLM_BENCH_RESULTS") or BENCH_DIR / "results")


class Recorder:
    """Appends result rows to ``<results_dir>/<name>.csv`` and ``<name>.json``.

    The CSV has one row per measurement with the metadata repeated in every row (a
    header change, e.g. new param columns, rewrites the file with the union of columns).
    The JSON is a list of runs, each ``{"meta": environment, "ceilings": ..., "rows": [...]}``.
    """

    def __init__(self, name: str, results_dir: str | Path | None = None):
        self.dir = Path(results_dir) if results_dir is not None else results_dir_default()
        self.csv_path = self.dir / f"{name}.csv"
        self.json_path = self.dir / f"{name}.json"

    def write(self, rows: list[dict], meta: dict, ceilings: dict) -> None:
        """Append ``rows``; rows of a run already in the JSON (same ``run_id``) join it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._append_csv(rows)
        self._append_json({"meta": meta, "ceilings": ceilings, "rows": rows})

    def _append_csv(self, rows: list[dict]) -> None:
        old_rows, old_cols = [], []
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                old_cols = list(reader.fieldnames or [])
                old_rows = list(reader)
        cols = list(old_cols) or [c for c in COLUMNS]
        for row in rows:
            cols += [k for k in row if k not in cols]
        mode = "a" if cols == old_cols else "w"
        with open(self.csv_path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
                writer.writerows(old_rows)
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    def _append_json(self, run: dict) -> None:
        runs = []
        if self.json_path.exists():
            try:
                runs = json.loads(self.json_path.read_text())
                if not isinstance(runs, list):
                    raise ValueError("not a list of runs")
            except ValueError as exc:
                backup = self.json_path.with_suffix(f".json.bad-{int(time.time())}")
                self.json_path.rename(backup)
                warnings.warn(f"{self.json_path} was unreadable ({exc}); moved to {backup}")
                runs = []
        run_id = run["rows"][0].get("run_id") if run["rows"] else None
        if runs and run_id is not None and runs[-1]["rows"] and runs[-1]["rows"][0].get("run_id") == run_id:
            runs[-1]["rows"] += run["rows"]
        else:
            runs.append(run)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(runs, indent=1, default=str))
        tmp.replace(self.json_path)
