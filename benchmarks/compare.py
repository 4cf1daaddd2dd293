"""dstab against the IO floor and the baselines, side by side in one run, on the same data.

    python benchmarks/compare.py --items 2000000 --users 1000000 [--repeat 3] [--workers 2]
    python benchmarks/compare.py --quick            # a small size, in well under two minutes

Every contender reads the same Zarr versions (new, and a stabilized reference)
and writes a stabilized version with the same chunks and codec:

- io-floor:   read new twice + reference once + write once, nothing else (the data-movement floor)
- dstab:      dstab.stabilize(new, ref, in_memory=False).to_zarr(out): out of core, new read twice
- dstab-in-memory: the same with in_memory=True: new's blocks kept in the workers from the statistics
              pass and written from there (new read once)
- io-floor-in-memory: read new once (kept in the workers) + reference once + write once: what
              dstab-in-memory cannot go below
- numpy:      all in memory: Householder QR, cross-Grams and matmuls in numpy (all cores), then written
- naive-dask: da.linalg.tsqr for R, dask matmul for the cross-Grams, then (T @ M).to_zarr, on Dask's
              default threaded scheduler (what the obvious script gets: BLAS threads not pinned)
- naive-dask-cluster: the same code on the LocalCluster dstab uses
- spark:      RowMatrix.tallSkinnyQR (R only), where pyspark and Java are installed

The Dask contenders share one LocalCluster (worker processes, one thread each).
Prints a table of medians and ratios, and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster

import dstab
from dstab import linalg
from dstab.executor import tree_reduce
from dstab.residency import Kept, keep_blocks
from dstab.store import SIDES, Staging, Version, copy_block, load, row_starts
from dstab.synth import synth, synth_like

# ----------------------------------------------------------------------------- data


def make_data(directory: Path, items: int, users: int, dim: int) -> tuple[Version, Version]:
    """A version, its stabilized form (the reference) and a noisy retrain (the new version)."""
    base = directory / "base"
    if not (directory / "new").exists():
        for name in ("base", "ref", "new"):
            shutil.rmtree(directory / name, ignore_errors=True)
        # synth's default chunks: 131,072 rows at width 64, 32 MiB (8,192 rows) at 1,024
        v = synth(base, items=items, users=users, dim=dim, seed=0)
        dstab.stabilize(v).to_zarr(directory / "ref")
        synth_like(directory / "new", v, noise=0.01, seed=1)
        shutil.rmtree(base)
    return dstab.open_version(directory / "new"), dstab.open_version(directory / "ref")


# ----------------------------------------------------------------------------- contenders


def _touch(source: object) -> int:
    return int(load(source).shape[0])


def _sum(a: int, b: int) -> int:
    return a + b


def io_floor(new: Version, ref: Version, out: Path) -> None:
    """Read new and ref (pass 1), then read new and write it (pass 2): the same blocks, tasks that read
    their own rows as dstab's do, the same chunks, codec and writer; no arithmetic at all."""
    io_floor_read(new, ref)
    io_floor_write(new, out)


def io_floor_read(new: Version, ref: Version) -> None:
    """The floor's first pass: read every block of every table of new and of ref, nothing else."""
    reads = []
    for side in new.names:
        chunks = new.table(side).row_chunks()
        for table in (new.table(side), ref.table(side)):
            reads += [dask.delayed(_touch)(b) for b in table.blocks(chunks)]
    dstab.executor.compute(tree_reduce(reads, _sum))


def io_floor_write(new: Version, out: Path, kept: Kept | None = None) -> None:
    """The floor's second pass: read every block of new (or take it from ``kept``) and write it as a version at out."""
    staging = Staging(str(out), inputs=[])
    writes = []
    for side in new.names:
        table = new.table(side)
        target = staging.create_table(side, table, table.dim)
        chunks = table.row_chunks()
        blocks = kept.get(side) if kept else table.blocks(chunks)
        writes += [dask.delayed(copy_block)(b, target, s) for b, s in zip(blocks, row_starts(chunks))]
        writes += staging.copy_ids(side, table)
    dstab.executor.compute(tree_reduce(writes, lambda a, b: None))
    staging.publish({})


def run_dstab(new: Version, ref: Version, out: Path) -> None:
    dstab.stabilize(new, ref, in_memory=False).to_zarr(out)


def run_dstab_in_memory(new: Version, ref: Version, out: Path) -> None:
    dstab.stabilize(new, ref, in_memory=True).to_zarr(out)


def io_floor_in_memory(new: Version, ref: Version, out: Path) -> None:
    """Read new (kept in memory) and ref, then write new from memory: the floor when new fits in memory."""
    kept = keep_blocks(new, new.names)
    reads = []
    for side in new.names:
        reads += [dask.delayed(_touch)(b) for b in kept.get(side)]
        reads += [dask.delayed(_touch)(b) for b in ref.table(side).blocks(new.table(side).row_chunks())]
    values = dstab.executor.compute(tree_reduce(reads, _sum), *kept.to_read())
    kept.hold(values[1:])
    io_floor_write(new, out, kept)


def _finish_from_factors(r_items, r_users, cross_items, cross_users, ref_dim, probes):
    canonical = linalg.canonical_transforms(r_items, r_users, rtol=1e-6)
    omega = linalg.alignment(canonical, [cross_items, cross_users], ref_dim, probes)
    return canonical.m_items @ omega, canonical.m_users @ omega


def _write_like(out: Path, side: str, table, values: np.ndarray) -> None:
    g = zarr.open_group(str(out), mode="a")
    g.create_array(
        f"{side}/vectors",
        data=values,
        chunks=(table.chunk_rows, values.shape[1]),
        compressors=table.vectors.compressors,
    )
    if table.ids is not None:
        g.create_array(f"{side}/ids", data=table.ids[...], chunks=(table.chunk_rows,))


def run_numpy(new: Version, ref: Version, out: Path) -> None:
    """What a numpy user writes: everything in memory, LAPACK Householder QR on all cores."""
    x = {s: new.table(s).vectors[...] for s in SIDES}
    y = {s: ref.table(s).vectors[...] for s in SIDES}
    r = {s: np.linalg.qr(x[s].astype(np.float64), mode="r") for s in SIDES}
    cross = {s: x[s].T.astype(np.float64) @ y[s].astype(np.float64) for s in SIDES}
    probes = [(x[s].sum(axis=0, dtype=np.float64), x[s][:64].astype(np.float64), len(x[s])) for s in SIDES]
    a_items, a_users = _finish_from_factors(r["items"], r["users"], cross["items"], cross["users"], ref.dim, probes)
    for side, a in (("items", a_items), ("users", a_users)):
        _write_like(out, side, new.table(side), x[side] @ a.astype(x[side].dtype))


def run_naive_dask(new: Version, ref: Version, out: Path) -> None:
    """The obvious Dask pipeline: tsqr for R, dask matmuls, to_zarr."""
    x = {s: da.from_zarr(new.table(s).vectors) for s in SIDES}
    y = {s: da.from_zarr(ref.table(s).vectors) for s in SIDES}
    graphs = {}
    for s in SIDES:
        graphs[f"r_{s}"] = da.linalg.tsqr(x[s].astype(np.float64))[1]
        graphs[f"c_{s}"] = x[s].astype(np.float64).T @ y[s].rechunk(x[s].chunks).astype(np.float64)
        graphs[f"sum_{s}"] = x[s].sum(axis=0, dtype=np.float64)
    (res,) = dask.compute(graphs)
    probes = [
        (res[f"sum_{s}"], np.asarray(new.table(s).vectors[:64], dtype=np.float64), new.table(s).n_rows) for s in SIDES
    ]
    a_items, a_users = _finish_from_factors(
        res["r_items"], res["r_users"], res["c_items"], res["c_users"], ref.dim, probes
    )
    stores = []
    for side, a in (("items", a_items), ("users", a_users)):
        stores.append(
            da.to_zarr((x[side] @ a.astype(x[side].dtype)), str(out), component=f"{side}/vectors", compute=False)
        )
    dask.compute(*stores)


def run_spark(new: Version, ref: Version, out: Path) -> None:  # pragma: no cover - optional
    from pyspark.mllib.linalg.distributed import RowMatrix
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master("local[*]").config("spark.driver.memory", "8g").getOrCreate()
    try:
        for side in SIDES:
            arr = new.table(side).vectors
            rows = spark.sparkContext.parallelize(range(0, arr.shape[0], arr.chunks[0])).flatMap(
                lambda start, arr=arr: arr[start : start + arr.chunks[0]].astype(np.float64).tolist()
            )
            RowMatrix(rows).tallSkinnyQR(computeQ=False).R.toArray()
    finally:
        spark.stop()


def spark_available() -> str | None:
    """None if Spark can run here, else why not."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed"
    if shutil.which("java") is None:
        return "no Java runtime"
    return None


# ----------------------------------------------------------------------------- harness


def drop_page_cache() -> None:
    """Make the next run read from disk, as a nightly job does (Linux, root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache: {exc}") from None


def run_once(
    name: str, fn: Callable[[Version, Version, Path], None], new: Version, ref: Version, work: Path,
    client: Client | None, cold: bool,
) -> float:  # fmt: skip
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    if client is not None:
        client.run(lambda: __import__("gc").collect())
    if cold:
        drop_page_cache()
    started = time.perf_counter()
    fn(new, ref, out)
    elapsed = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every run (root): reads come from disk"
    )
    parser.add_argument("--dir", type=Path, help="keep the data here and reuse it (default: a temporary directory)")
    parser.add_argument("--only", help="comma-separated contenders to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="items 200k, users 100k, one repeat: a smoke run")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the floors and dstab on this process's threads (as the CLI runs a job under "
        "dstab.in-process-bytes) instead of on the LocalCluster",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.repeat = 200_000, 100_000, 1
    contenders: dict[str, Callable] = {
        "io-floor": io_floor, "dstab": run_dstab, "io-floor-in-memory": io_floor_in_memory,
        "dstab-in-memory": run_dstab_in_memory, "numpy": run_numpy, "naive-dask": run_naive_dask,
        "naive-dask-cluster": run_naive_dask, "spark": run_spark,
    }  # fmt: skip
    chosen = args.only.split(",") if args.only else list(contenders)
    spark_missing = spark_available()
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="dstab-bench-")
    work = args.dir or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {name: [] for name in chosen if not (name == "spark" and spark_missing)}
    try:
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):  # noqa: E501
            started = time.perf_counter()
            new, ref = make_data(work / "data", args.items, args.users, args.dim)
            print(f"data ready in {time.perf_counter() - started:.1f} s: {new!r}", file=sys.stderr)
            # Interleaved: every repeat runs each contender once, so a slow spell
            # of this shared machine hits them all alike and ratios stay side by side.
            for i in range(args.repeat):
                for name in times:
                    local = name in ("numpy", "spark", "naive-dask") or (
                        args.in_process and name != "naive-dask-cluster"
                    )
                    with dask.config.set(scheduler="threads") if local else dask.config.set({}):
                        elapsed = run_once(name, contenders[name], new, ref, work, None if local else client, args.cold)
                    times[name].append(elapsed)
                    print(f"  {name:<11} run {i + 1}/{args.repeat}: {elapsed:.2f} s", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    results: list[dict] = [{"name": n, "times_s": t, "median_s": statistics.median(t)} for n, t in times.items()]
    if spark_missing and "spark" in chosen:
        results.append({"name": "spark", "skipped": spark_missing})
    floor_times = times.get("io-floor")
    for r in results:  # each repeat's time over the same repeat's floor: the slow spells of a shared machine cancel
        if floor_times and "times_s" in r:
            r["x_floor_per_repeat"] = [t / f for t, f in zip(r["times_s"], floor_times)]
            r["x_floor_median"] = statistics.median(r["x_floor_per_repeat"])
    ours = next((r["median_s"] for r in results if r["name"] == "dstab"), None)
    gb = (args.items + args.users) * args.dim * 4 / 1e9
    print(f"\nitems {args.items:,} + users {args.users:,} x {args.dim} float32 ({gb:.2f} GB per version), "
          f"{'in this process (threads)' if args.in_process else f'{args.workers} workers x {args.threads} threads'}, {'cold' if args.cold else 'warm'} page cache, median of {args.repeat}")  # fmt: skip
    print(f"{'contender':<19} {'median s':>9} {'x io-floor':>11} {'per repeat':>18} {'dstab faster by':>16}")
    for r in results:
        if "skipped" in r:
            print(f"{r['name']:<19} {'skipped: ' + r['skipped']}")
            continue
        vs_floor = f"{r['x_floor_median']:.2f}" if "x_floor_median" in r else "-"
        each = ", ".join(f"{x:.2f}" for x in r.get("x_floor_per_repeat", []))
        faster = f"{r['median_s'] / ours:.2f}x" if ours and r["name"] != "dstab" else "-"
        print(f"{r['name']:<19} {r['median_s']:>9.2f} {vs_floor:>11} {each:>18} {faster:>16}")
    if args.json:
        args.json.write_text(json.dumps({"items": args.items, "users": args.users, "dim": args.dim, "workers": args.workers, "in_process": args.in_process,
                                         "repeat": args.repeat, "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
