"""Ten nightly runs in a row: the peak memory of each stays within 10% of the first, and every version is right.

    python benchmarks/nightly_memory.py [--runs 10] [--items 1000000] [--users 500000] [--dim 64] [--dir DIR]

Day 0 is a synthetic version, stabilized by a first (bootstrap) run with no
reference; each later day is a retrain of the day before (1% noise, 10% churn,
rows reordered, a new random basis; drawn from yesterday's stabilized version,
as a model retrained from yesterday's state, so that random bases do not
compound into an ill-conditioned table). Before run d, day d's raw version is
put in DIR/raw; then ``python pipelines/nightly.py DIR`` runs as its own process
(with its own local cluster, as a cron job would), stabilizing just that day
onto the day before. The peak resident memory of its whole process tree
(workers included) is sampled. Each published version is then opened
(complete) and checked: its scores against the raw day's on sampled rows, and
its saved transform applied to the raw rows reproduces it. The ``--runs`` runs
with a reference are compared with the first of them (the bootstrap run reads
no reference and is reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import psutil

import dstab
from dstab.synth import synth, synth_like

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treemem import tree_rss  # noqa: E402


def day_name(run: int) -> str:
    """The raw day of run ``run``: dated, as the nightly wants (2026-11-01, 2026-11-02, ...)."""
    return (date(2026, 11, 1) + timedelta(days=run)).isoformat()


ROOT = Path(__file__).resolve().parent.parent


def run_measured(command: list[str], interval: float = 0.05) -> tuple[int, float, int]:
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root)[0])
        time.sleep(interval)
    return child.returncode, time.perf_counter() - started, peak


def check_version(raw_path: Path, stable_path: Path, rows: int = 2000) -> float:
    """Score error of the published version against its raw day, on rows spread over both tables."""
    raw, stable = dstab.open_version(raw_path), dstab.open_version(stable_path)  # raises unless complete
    assert stable.attrs["complete"] is True
    picks = {}
    for side in ("items", "users"):
        n = raw.table(side).n_rows
        index = np.linspace(0, n - 1, min(rows, n)).astype(int)
        r = np.asarray(raw.table(side).vectors.get_orthogonal_selection((index, slice(None))), dtype=np.float64)
        s = np.asarray(stable.table(side).vectors.get_orthogonal_selection((index, slice(None))), dtype=np.float64)
        np.testing.assert_allclose(stable.transform(side, r), s, rtol=0, atol=1e-4 * np.abs(s).max())
        picks[side] = (r, s)
    raw_scores = picks["users"][0] @ picks["items"][0].T
    out_scores = picks["users"][1] @ picks["items"][1].T
    return float(np.linalg.norm(out_scores - raw_scores) / np.linalg.norm(raw_scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--max-ratio", type=float, default=1.10, help="fail when a peak exceeds this times the first")
    args = parser.parse_args(argv)
    tmp = None if args.dir else tempfile.mkdtemp(prefix="dstab-nightly-")
    directory = args.dir or Path(tmp)  # type: ignore[arg-type]
    shutil.rmtree(directory / "raw", ignore_errors=True)
    shutil.rmtree(directory / "stable", ignore_errors=True)
    staging = directory / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    (directory / "raw").mkdir(parents=True)
    series = []
    bootstrap = None
    try:
        import dask

        for run in range(0, args.runs + 1):
            name = day_name(run)  # the nightly orders days by their dates
            with dask.config.set(scheduler="threads"):
                if run == 0:
                    synth(staging / name, items=args.items, users=args.users, dim=args.dim, seed=1)
                else:
                    yesterday = dstab.open_version(directory / "stable" / day_name(run - 1))
                    synth_like(staging / name, yesterday, noise=0.01, churn=0.1, seed=run)
            # the day's raw version arrives (a rename, as a training job publishing it would)
            os.rename(staging / name, directory / "raw" / name)
            command = [sys.executable, str(ROOT / "pipelines" / "nightly.py"), str(directory), "--no-progress",
                       "--workers", str(args.workers), "--dashboard-address", ":0"]  # fmt: skip
            code, wall, peak = run_measured(command)
            if code != 0:
                raise SystemExit(f"nightly run {run} failed with exit code {code}")
            error = check_version(directory / "raw" / name, directory / "stable" / name)
            record = {"run": run, "day": name, "wall_s": round(wall, 2), "peak_tree_rss_mib": round(peak / 2**20, 1),
                      "score_error": error}  # fmt: skip
            label = "bootstrap, no reference" if run == 0 else "onto the day before"
            print(
                f"run {run:>2} ({name}, {label}): peak {peak / 2**20:8.1f} MiB, {wall:6.1f} s, score error {error:.2e}",
                flush=True,
            )
            if run == 0:
                bootstrap = record
            else:
                series.append(record)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    assert bootstrap is not None
    first = series[0]["peak_tree_rss_mib"]
    worst = max(s["peak_tree_rss_mib"] for s in series)
    print(f"peak memory: first {first:.1f} MiB, largest {worst:.1f} MiB ({worst / first:.3f}x the first; "
          f"target <= {args.max_ratio:.2f}x)")  # fmt: skip
    print("every published version complete, its transform reproducing it, scores kept")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "bootstrap": bootstrap, "series": series,
                                         "max_over_first": worst / first}, indent=1))  # fmt: skip
    return 0 if worst <= args.max_ratio * first else 1


if __name__ == "__main__":
    sys.exit(main())
