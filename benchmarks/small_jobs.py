"""Every dstab command on a small version, end to end in fresh processes: no command should make a small job wait.

    python benchmarks/small_jobs.py [--items 6000 --users 4000 --dim 64] [--runs 5] [--target 3] [--json FILE]
    python benchmarks/small_jobs.py --items 200 --users 100 --dim 512      # the 300 x 512 case
    python benchmarks/small_jobs.py --runs 1                               # the smoke run

Each command is the console script in a new process (interpreter start, imports,
the work, the output), as a user or a scheduler runs it, on a 10k-row version by
default. The commands are interleaved run by run, so that a slow spell of a
shared machine hits them all alike. Prints each command's median and every
run's wall time, and PASS when the slowest median is under ``--target`` seconds;
``--strict`` exits 1 on a FAIL. Each command's outputs are removed between runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def dstab_command() -> list[str]:
    """The installed console script beside this interpreter, else the module (same code path)."""
    script = Path(sys.executable).with_name("dstab")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dstab.cli"]


def run(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return elapsed


def commands(items: int, users: int, dim: int) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, what it writes, removed before each run)."""
    return {
        "synth": (["synth", "x.zarr", "--items", str(items), "--users", str(users), "--dim", str(dim)], ["x.zarr"]),
        "synth --like": (["synth", "x.zarr", "--like", "a", "--seed", "3"], ["x.zarr"]),
        "stabilize": (["stabilize", "a", "--out", "x.zarr"], ["x.zarr"]),
        "stabilize --reference": (["stabilize", "b", "--reference", "sa", "--out", "x.zarr"], ["x.zarr"]),
        "report": (["report", "sb"], []),
        "report --reference": (["report", "sb", "--reference", "sa"], []),
        "report --chain": (["report", "sb", "--chain"], []),
        "diagnose": (["diagnose", "sb"], []),
        "apply": (["apply", "sb", "--table", "users", "--rows", "b/users", "--out", "x.zarr"], ["x.zarr"]),
        "log": (["log", "sb"], []),
        "export": (["export", "sb", "--out", "x.parquet"], ["x.parquet"]),
        "import": (["import", "--items", "items.npy", "--users", "users.npy", "--out", "x.zarr"], ["x.zarr"]),
        "nightly": (["nightly", "days"], ["days/stable"]),
    }


def prepare(work: Path, items: int, users: int, dim: int) -> None:
    """Two raw versions a and b (a retrain), sa and sb (b stabilized onto sa), .npy files and a nightly source."""
    dstab = dstab_command()
    run([*dstab, "synth", "a", "--items", str(items), "--users", str(users), "--dim", str(dim)], work)
    run([*dstab, "synth", "b", "--like", "a", "--seed", "1"], work)
    run([*dstab, "stabilize", "a", "--out", "sa"], work)
    run([*dstab, "stabilize", "b", "--reference", "sa", "--out", "sb"], work)
    rng = np.random.default_rng(0)
    np.save(work / "items.npy", rng.normal(size=(items, dim)).astype(np.float32))
    np.save(work / "users.npy", rng.normal(size=(users, dim)).astype(np.float32))
    for day, version in (("2026-01-01", "a"), ("2026-01-02", "b")):
        shutil.copytree(work / version, work / "days" / "raw" / day)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=6000)
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target", type=float, default=3.0, help="seconds every command's median must stay under")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a median misses the target")
    args = parser.parse_args(argv)
    dstab = dstab_command()
    with tempfile.TemporaryDirectory(prefix="dstab-small-") as tmp:
        work = Path(tmp)
        prepare(work, args.items, args.users, args.dim)
        todo = commands(args.items, args.users, args.dim)
        times: dict[str, list[float]] = {name: [] for name in todo}
        for i in range(args.runs):
            for name, (arguments, outputs) in todo.items():
                for out in outputs:
                    shutil.rmtree(work / out, ignore_errors=True)
                times[name].append(run([*dstab, *arguments, "-q"], work))
            print(f"  run {i + 1}/{args.runs} done", file=sys.stderr)
    print(f"items {args.items:,} + users {args.users:,} x {args.dim} float32; every command end to end in a fresh "
          f"process, median of {args.runs}")  # fmt: skip
    print(f"{'command':<24} {'median s':>9}   runs")
    for name, t in times.items():
        print(f"{name:<24} {statistics.median(t):>9.2f}   {', '.join(f'{x:.2f}' for x in t)}")
    slowest = max(times, key=lambda n: statistics.median(times[n]))
    worst = statistics.median(times[slowest])
    ok = worst < args.target
    print(
        f"{'PASS' if ok else 'FAIL'}: the slowest command ({slowest}) takes {worst:.2f} s (median); target < {args.target} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"items": args.items, "users": args.users, "dim": args.dim, "runs": args.runs, "target_s": args.target,
                 "times_s": times, "medians_s": {n: statistics.median(t) for n, t in times.items()}, "pass": ok},
                indent=1,
            )
        )  # fmt: skip
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
