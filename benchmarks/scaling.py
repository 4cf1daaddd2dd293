"""How dstab scales: time per row and peak memory against rows, and speed-up against workers.

    python benchmarks/scaling.py --rows 1e6,3e6,1e7,3e7 --workers 1,2 --memory-limit 1GiB --out benchmarks/results
    python benchmarks/scaling.py --quick --out /tmp/scaling     # a smoke run, seconds

Each point stabilizes a new version (items 2/3 of the rows, users 1/3, dim 64,
float32, zstd Zarr) against a reference of the same shape, end to end
(statistics pass, local maths, write pass), on a LocalCluster of worker
processes with the given memory limit each. Peak memory is the resident memory
of this process and every worker, scheduler and nanny process together, sampled
every 50 ms; spill is what the workers wrote to disk. The rows sweep runs at
the largest worker count, the workers sweep at the middle row count.
Writes scaling.json and scaling.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
from distributed import Client, LocalCluster

import dstab
from dstab.executor import spilled_bytes
from dstab.synth import synth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treemem import tree_rss  # noqa: E402


class PeakSampler:
    """Samples the resident memory of this process tree in a thread; ``peak`` is the largest sum seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(me)[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def dataset(directory: Path, rows: int, dim: int) -> tuple[dstab.Version, dstab.Version]:
    items, users = rows * 2 // 3, rows - rows * 2 // 3
    path = directory / f"rows-{rows}"
    if not (path / "ref").exists():
        shutil.rmtree(path, ignore_errors=True)
        synth(path / "new", items=items, users=users, dim=dim, seed=1)
        synth(path / "ref", items=items, users=users, dim=dim, seed=2)
    return dstab.open_version(path / "new"), dstab.open_version(path / "ref")


def run_point(client: Client, new: dstab.Version, ref: dstab.Version, out: Path, repeat: int) -> dict:
    times, peaks, spills, kept = [], [], [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        client.run(lambda: __import__("gc").collect())
        spill_before = spilled_bytes(client)
        with PeakSampler() as sampler:
            started = time.perf_counter()
            result = dstab.stabilize(new, ref)  # in memory or not as the default (auto) decides for these workers
            result.to_zarr(out)
            times.append(time.perf_counter() - started)
        kept.append(result.report["in_memory"])
        peaks.append(sampler.peak)
        spills.append(spilled_bytes(client) - spill_before)
        shutil.rmtree(out, ignore_errors=True)
    rows = new.items.n_rows + new.users.n_rows
    median = statistics.median(times)
    return {
        "rows": rows,
        "vector_bytes_pair": 2 * rows * new.dim * new.dtype.itemsize,
        "times_s": times,
        "median_s": median,
        "ns_per_row": median / rows * 1e9,
        "peak_rss_bytes": max(peaks),
        "spilled_bytes": max(spills),
        "in_memory": all(kept),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = [p["rows"] for p in result["rows_sweep"]]
    ax1.plot(rows, [p["ns_per_row"] for p in result["rows_sweep"]], "o-", label="time per row")
    ax1.set(xscale="log", xlabel="rows (items + users)", ylabel="ns per row", title="Time per row against rows")
    ax1.set_ylim(bottom=0)
    ax2.plot(rows, [p["peak_rss_bytes"] / 2**30 for p in result["rows_sweep"]], "o-", label="peak RSS, all processes")
    ax2.plot(
        rows, [p["vector_bytes_pair"] / 2**30 for p in result["rows_sweep"]], "s--", label="vectors read (new + ref)"
    )
    limit = result["memory_limit_bytes_total"] / 2**30
    ax2.axhline(limit, color="grey", linestyle=":", label=f"worker memory limit, total ({limit:.1f} GiB)")
    ax2.set(xscale="log", yscale="log", xlabel="rows (items + users)", ylabel="GiB", title="Peak memory against rows")
    ax2.legend(fontsize=8)
    workers = [p["workers"] for p in result["workers_sweep"]]
    ax3.plot(workers, [p["median_s"] for p in result["workers_sweep"]], "o-")
    for p in result["workers_sweep"]:
        ax3.annotate(
            f"{p['median_s']:.1f} s, {p['peak_rss_bytes'] / 2**30:.2f} GiB", (p["workers"], p["median_s"]), fontsize=8
        )
    ax3.set(
        xlabel="workers", ylabel="seconds", title=f"Time against workers ({result['workers_sweep'][0]['rows']:,} rows)"
    )
    ax3.set_xticks(workers)
    ax3.set_ylim(bottom=0)
    fig.suptitle(f"dstab stabilize with reference, dim {result['dim']} float32, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_counts(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_counts, default=parse_counts("1e6,3e6,1e7,3e7"))
    parser.add_argument("--workers", type=parse_counts, default=[1, 2])
    parser.add_argument("--memory-limit", default="1GiB", help="per worker")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs per point below 1e7 rows (one above)")
    parser.add_argument("--data", type=Path, default=None, help="where the versions live (default: OUT/data, deleted)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="rows 30k,90k, workers 1,2: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.workers, args.repeat, args.dim = [30_000, 90_000], [1, 2], 1, 16
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    from dask.utils import parse_bytes

    limit = parse_bytes(args.memory_limit)
    result: dict = {
        "dim": args.dim,
        "memory_limit_per_worker_bytes": limit,
        "memory_limit_bytes_total": limit * max(args.workers),
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "date": time.strftime("%Y-%m-%d"),
        "rows_sweep": [],
        "workers_sweep": [],
    }
    middle = sorted(args.rows)[len(args.rows) // 2]
    try:
        for workers in sorted(args.workers, reverse=True):
            with (
                LocalCluster(
                    n_workers=workers, threads_per_worker=1, memory_limit=args.memory_limit, dashboard_address=":0"
                ) as cluster,
                Client(cluster) as client,
            ):  # noqa: E501
                sizes = sorted(args.rows) if workers == max(args.workers) else [middle]
                for rows in sizes:
                    new, ref = dataset(data, rows, args.dim)
                    repeat = args.repeat if rows < 10_000_000 else 1
                    point = {"workers": workers, **run_point(client, new, ref, args.out / "stable", repeat)}
                    print(json.dumps(point), file=sys.stderr)
                    if workers == max(args.workers):
                        result["rows_sweep"].append(point)
                    if rows == middle:
                        result["workers_sweep"].append(point)
                    if args.data is None and rows != middle:
                        shutil.rmtree(data / f"rows-{rows}", ignore_errors=True)
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    result["workers_sweep"].sort(key=lambda p: p["workers"])
    per_row = [p["ns_per_row"] for p in result["rows_sweep"]]
    base = statistics.median(per_row)
    result["time_per_row_spread"] = [min(per_row) / base - 1, max(per_row) / base - 1]
    sweep = result["workers_sweep"]
    result["speedup_1_to_max_workers"] = sweep[0]["median_s"] / sweep[-1]["median_s"] if len(sweep) > 1 else None
    (args.out / "scaling.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "scaling.png")
    print(f"{'rows':>12} {'median s':>9} {'ns/row':>8} {'peak GiB':>9} {'pair GiB':>9} {'spilled MiB':>12} in memory")
    for p in result["rows_sweep"]:
        print(f"{p['rows']:>12,} {p['median_s']:>9.2f} {p['ns_per_row']:>8.1f} {p['peak_rss_bytes'] / 2**30:>9.2f} "
              f"{p['vector_bytes_pair'] / 2**30:>9.2f} {p['spilled_bytes'] / 2**20:>12.1f} {p['in_memory']}")  # fmt: skip
    lo, hi = result["time_per_row_spread"]
    print(f"time per row within {lo:+.0%} / {hi:+.0%} of the median across sizes")
    for p in sweep:
        print(
            f"{p['workers']} workers at {p['rows']:,} rows: {p['median_s']:.2f} s, peak {p['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
    if result["speedup_1_to_max_workers"]:
        print(
            f"speed-up from {sweep[0]['workers']} to {sweep[-1]['workers']} workers: {result['speedup_1_to_max_workers']:.2f}x"
        )
    print(f"wrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
