"""Quickstart: make a version and two retrains of it, stabilize the chain, print what changed.

Runs on the embedded default: a local Zarr directory and a local Dask cluster
of worker processes, which this script (not the library) starts.

    python pipelines/quickstart.py [--dir quickstart-data] [--items 400000] [--users 200000] [--dim 64] [--no-progress]

Progress goes to stderr: a bar per step on a terminal, plain lines in a log file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from distributed import Client, LocalCluster

import dstab
from dstab.synth import synth, synth_like

MARKER = ".dstab-quickstart"


def fresh_directory(directory: Path) -> None:
    """Empty the quickstart's own scratch directory; refuse to touch any other."""
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            raise SystemExit(f"quickstart: {directory} exists and was not made by the quickstart; pass another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).touch()


def explanation(noise: float) -> str:
    """What the quickstart's numbers mean and what a good value is, in one line."""
    return (
        "drift = distance of a day's vectors from the day before's stabilized ones (relative, 0 = identical; good after "
        f"stabilization: of the order of the retrains' own noise, {noise:g} here); score error = relative change of the "
        "user-item scores made by stabilizing (good: below 1e-5, float32 rounding)"
    )


def run(directory: Path, items: int, users: int, dim: int, noise: float, *, progress: bool = False) -> list[dict]:
    def step(line: str) -> None:
        if progress:
            print(f"quickstart: {line}", file=sys.stderr, flush=True)

    fresh_directory(directory)
    step(f"day0: synthetic version, {items:,} items and {users:,} users of width {dim}")
    v0 = synth(directory / "day0", items=items, users=users, dim=dim, seed=0, progress=progress)
    raws = [v0]
    for d in (1, 2):
        step(f"day{d}: synthetic retrain of day0 (new basis, noise {noise:g})")
        raws.append(synth_like(directory / f"day{d}", v0, noise=noise, seed=d, progress=progress))
    rows = []
    reference = None
    for day, raw in enumerate(raws):
        step(
            f"day{day}: stabilizing"
            + (f" onto day{day - 1}-stable" if reference is not None else " (first: no reference)")
        )
        started = time.perf_counter()
        result = dstab.stabilize(raw, reference, progress=progress)
        reference = result.to_zarr(directory / f"day{day}-stable", progress=progress)
        rows.append({"day": day, "seconds": time.perf_counter() - started, **result.report})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("quickstart-data"))
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise of each retrain")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        print(f"local cluster of {args.workers} workers, dashboard {client.dashboard_link}", file=sys.stderr)
        rows = run(args.dir, args.items, args.users, args.dim, args.noise, progress=not args.no_progress)
    print(f"{'version':<14} {'rank':>4} {'drift before':>13} {'drift after':>12} {'score error':>12} {'seconds':>8}")
    for r in rows:
        before = "-" if r["drift_before"] is None else f"{r['drift_before']:.4f}"
        after = "-" if r["drift_after"] is None else f"{r['drift_after']:.4f}"
        print(
            f"day{r['day']}-stable   {r['rank']:>4} {before:>13} {after:>12} {r['score_error']:>12.2e} {r['seconds']:>8.1f}"
        )
    print(explanation(args.noise))
    print(f"versions in {args.dir}/, total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
