"""What matching rows by id costs against the positional path, side by side in one run.

    python benchmarks/churn.py --items 4000000 --users 200000 [--repeat 3] [--workers 2]
    python benchmarks/churn.py --quick          # a small size, in about a minute

Three versions share one stabilized reference (a synthetic version with int64
ids): a noisy retrain listing the same ids in the same order (positional path),
and the same retrain with 10 % of the items removed, 10 % new items added, and
the item rows reordered (blocks shuffled and rows shuffled inside them), which
dstab matches by id. Each contender runs ``dstab.stabilize(new, ref)`` (the
statistics pass) and then ``.to_zarr`` (the write pass), interleaved, on one
LocalCluster of worker processes. Also compares the default id sample with
a sample of every common id (exact join), to show what the sample costs in drift.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, LocalCluster

import dstab
from dstab.report import measure_drift
from dstab.synth import synth, synth_like


def make_churned(source: Path, out: Path, churn: float, seed: int) -> None:
    """``source`` with ``churn`` of its items removed, as many new ones added, and the rows reordered."""
    rng = np.random.default_rng(seed)
    src = zarr.open_group(str(source), mode="r")
    group = zarr.open_group(str(out), mode="w")
    items, ids = src["items/vectors"], src["items/ids"]
    n, dim = items.shape
    chunk = items.chunks[0]
    keep = np.flatnonzero(rng.random(n) >= churn)
    n_new = n - len(keep)
    vectors = np.empty((n, dim), dtype=items.dtype)
    out_ids = np.empty(n, dtype=np.int64)
    vectors[: len(keep)] = items[...][keep]
    out_ids[: len(keep)] = ids[...][keep]
    scale = vectors[:1000].std(axis=0)
    vectors[len(keep) :] = (rng.normal(size=(n_new, dim)) * scale).astype(items.dtype)
    out_ids[len(keep) :] = np.arange(n_new) + 5 * 10**12  # ids the reference never had
    # reorder: shuffle whole chunks, then rows inside each chunk
    order = np.concatenate(
        [rng.permutation(np.arange(s, min(s + chunk, n))) for s in rng.permutation(np.arange(0, n, chunk))]
    )
    for name, data in (("vectors", vectors[order]), ("ids", out_ids[order])):
        arr = group.create_array(f"items/{name}", shape=data.shape, chunks=(chunk,) + data.shape[1:], dtype=data.dtype)
        arr[...] = data
    for name in ("vectors", "ids"):
        a = src[f"users/{name}"]
        group.create_array(f"users/{name}", shape=a.shape, chunks=a.chunks, dtype=a.dtype)[...] = a[...]


def make_data(directory: Path, items: int, users: int, dim: int, churn: float) -> dict[str, dstab.Version]:
    if not (directory / "churned").exists():
        for name in ("base", "ref", "same", "churned"):
            shutil.rmtree(directory / name, ignore_errors=True)
        base = synth(directory / "base", items=items, users=users, dim=dim, seed=0)
        dstab.stabilize(base).to_zarr(directory / "ref")
        synth_like(directory / "same", base, noise=0.01, seed=1)
        make_churned(directory / "same", directory / "churned", churn, seed=2)
        shutil.rmtree(directory / "base")
    return {name: dstab.open_version(directory / name) for name in ("ref", "same", "churned")}


def run_once(
    new: dstab.Version, ref: dstab.Version, out: Path, **kwargs: object
) -> tuple[float, float, dstab.Stabilization]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = dstab.stabilize(new, ref, **kwargs)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    result.to_zarr(out, overwrite=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--churn", type=float, default=0.10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="keep the data here between runs (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="200k items, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.repeat = 200_000, 50_000, 1
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="dstab-churn-")
        directory = Path(tmp)
    try:
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster),
        ):
            data = make_data(directory, args.items, args.users, args.dim, args.churn)
            ref = data["ref"]
            contenders = {"positional": data["same"], "by-id": data["churned"]}
            fits: dict[str, list[float]] = {k: [] for k in contenders}
            totals: dict[str, list[float]] = {k: [] for k in contenders}
            results: dict[str, dstab.Stabilization] = {}
            for _ in range(args.repeat):
                for name, new in contenders.items():
                    fit, total, results[name] = run_once(new, ref, directory / f"out-{name}")
                    fits[name].append(fit)
                    totals[name].append(total)
            # the exact join (every common id in the sample) once, for its drift and cost
            exact_bytes = 2 * args.items * args.dim * 4
            fit_exact, total_exact, result_exact = run_once(
                data["churned"], ref, directory / "out-exact", id_sample_bytes=exact_bytes
            )
            drift_sampled = measure_drift(dstab.open_version(directory / "out-by-id"), ref, k=0)["items"]["frobenius"]
            drift_exact = measure_drift(dstab.open_version(directory / "out-exact"), ref, k=0)["items"]["frobenius"]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {k: (statistics.median(fits[k]), statistics.median(totals[k])) for k in contenders}
    m = results["by-id"].report["matching"]["items"]
    print(f"items {args.items:,} x {args.dim} (users {args.users:,}), churn {args.churn:.0%} removed + added, "
          f"{args.workers} workers, median of {args.repeat}")  # fmt: skip
    print(f"{'path':<12} {'fit s':>8} {'fit+write s':>12}")
    for name in contenders:
        print(f"{name:<12} {med[name][0]:8.2f} {med[name][1]:12.2f}")
    fit_ratio = med["by-id"][0] / med["positional"][0]
    total_ratio = med["by-id"][1] / med["positional"][1]
    print(f"ratio by-id / positional: fit {fit_ratio:.2f}x, fit+write {total_ratio:.2f}x")
    print(f"matching: {m['common']:,} common, {m['added']:,} added, {m['removed']:,} removed; "
          f"sample {m['sample_fraction']:.3f} of the ids ({m['anchor_rows']:,} anchor rows)")  # fmt: skip
    print(f"exact join (every common id): fit {fit_exact:.2f} s, fit+write {total_exact:.2f} s (one run)")
    print(f"items drift vs reference after: sampled {drift_sampled:.6f}, exact {drift_exact:.6f} "
          f"(sampled / exact {drift_sampled / drift_exact:.5f})")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "items": args.items, "users": args.users, "dim": args.dim, "churn": args.churn, "workers": args.workers,
            "repeat": args.repeat, "fit_s": fits, "total_s": totals, "fit_ratio": fit_ratio, "total_ratio": total_ratio,
            "matching": m, "exact_fit_s": fit_exact, "exact_total_s": total_exact,
            "drift_sampled": drift_sampled, "drift_exact": drift_exact,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
