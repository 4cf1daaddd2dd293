"""What neighbour overlap@k costs, out of core, against the rest of a drift report, side by side in one run.

    python benchmarks/neighbours.py --items 4000000 --users 200000 [--queries 1000] [--k 10] [--repeat 3]
    python benchmarks/neighbours.py --quick

Uses the data of ``benchmarks/churn.py`` (a stabilized reference and a 10 %
churned retrain, matched by id). Interleaved, on one LocalCluster of worker
processes:

- read:        read every chunk of both versions' vectors once (the floor of one pass)
- drift, k=0:  ``measure_drift(new, ref, k=0)``: the statistics pass (Frobenius, row cosine, score error)
- drift, k=K:  the same plus neighbour overlap@K of ``queries`` sampled rows per side (one more pass
               over both versions: blockwise top-k by cosine, then a merge)
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

import dask
from distributed import Client, LocalCluster

import dstab
from dstab.report import measure_drift

sys.path.insert(0, str(Path(__file__).resolve().parent))
from churn import make_data  # noqa: E402


def _read_all(*versions: dstab.Version) -> None:
    arrays = [v.table(s).read() for v in versions for s in ("items", "users")]
    dask.compute(*(a.sum() for a in arrays))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="data directory, shared with churn.py (default: temporary)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="100k items, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.repeat = 100_000, 20_000, 1
    tmp = None if args.dir else tempfile.mkdtemp(prefix="dstab-neighbours-")
    directory = args.dir or Path(tmp)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {"read": [], "drift k=0": [], f"drift k={args.k}": []}
    try:
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster),
        ):
            data = make_data(directory, args.items, args.users, args.dim, 0.10)
            new, ref = data["churned"], data["ref"]
            result = {}
            for _ in range(args.repeat):
                for name in times:
                    t0 = time.perf_counter()
                    if name == "read":
                        _read_all(new, ref)
                    else:
                        k = 0 if name == "drift k=0" else args.k
                        result = measure_drift(new, ref, k=k, queries=args.queries)
                    times[name].append(time.perf_counter() - t0)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    extra = med[f"drift k={args.k}"] - med["drift k=0"]
    print(f"items {args.items:,} x {args.dim} + users {args.users:,}, churned (matched by id), {args.queries} queries per side, "
          f"k={args.k}, {args.workers} workers, median of {args.repeat}")  # fmt: skip
    for name, value in med.items():
        print(f"{name:<14} {value:8.2f} s   {value / med['read']:5.2f}x one read of both versions")
    print(f"neighbour overlap@{args.k} costs {extra:.2f} s on top of the statistics pass "
          f"({med[f'drift k={args.k}'] / med['drift k=0']:.2f}x the report without it)")  # fmt: skip
    print(f"overlap@{args.k}: items {result['items']['neighbour_overlap']:.4f}, users {result['users']['neighbour_overlap']:.4f}; "
          f"Frobenius {result['total']:.4g}, score error {result['score_error']:.3g}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times_s": times,
                                         "medians_s": med, "result": result}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
