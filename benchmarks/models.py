"""One table against two, each against its own IO floor, side by side in one run (issue 12).

    python benchmarks/models.py --rows 6000000 [--dim 64] [--repeat 3] [--workers 2] [--json PATH] [--dir DIR]

Two cases that move the same bytes (``--rows`` rows of ``--dim`` float32, int64 ids):

- two-table: ``items`` (2/3 of the rows) + ``users`` (the rest), scored users x items (two-sided);
  day 2 is ``synth_like`` of day 1 (a random invertible basis, 1% shaped noise), as in ``compare.py``.
- one-table: one table ``emb`` of all the rows, scored against itself (symmetric); day 1 rows are drawn
  like the synthetic ``items``, day 2 is day 1 @ a random orthogonal matrix + 1% shaped noise.

In each case the reference is day 1 stabilized, and day 2 is stabilized onto it. Each repeat times, for
each case, the IO floor of ``compare.py`` (read new twice + reference once + write once, nothing else)
and then ``dstab.stabilize(new, ref, in_memory=False).to_zarr(out)`` (out of core); the two cases swap order every repeat, so a slow
spell of the shared machine hits both alike. Both passes are timed separately (floor: read / write;
dstab: statistics / write), to show where time beyond the floor goes, and so is the CPU time of the
run's own processes (workers, and this one with the scheduler), a view of the same ratio that other load
on a shared machine moves much less. Reports the per-repeat ratios dstab / floor, their medians, and
one-table ratio / two-table ratio (the target: <= 1); the JSON also keeps the load average around the runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import psutil
from distributed import Client, LocalCluster

import dstab
from dstab.executor import run_all
from dstab.store import Staging, Version, default_chunk_rows, row_starts
from dstab.synth import _model, _retrain_block, _synth_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import io_floor_read, io_floor_write  # noqa: E402
from compare import make_data as make_two_table  # noqa: E402

ONE_TABLE = "emb"
CASES = ("two-table", "one-table")
# Each case keeps new + ref; making them briefly adds day 1 (raw), and a timed run adds one output.
VERSIONS_ON_DISK = 2 * 2 + 2


# ----------------------------------------------------------------------------- data


def random_orthogonal(dim: int, seed: int) -> np.ndarray:
    from scipy.stats import ortho_group  # scipy.stats is slow to import: only when drawing

    return ortho_group.rvs(dim, random_state=np.random.default_rng([seed, 7])) if dim > 1 else np.ones((1, 1))


def make_one_table(directory: Path, rows: int, dim: int, chunk_rows: int | None = None) -> tuple[Version, Version]:
    """Day 1 (one table, rows drawn like ``synth``'s items, int64 ids), its stabilized form (the
    reference), and day 2 = day 1 @ Q + 1% shaped noise for a random orthogonal Q (the new version)."""
    if not (directory / "new").exists():
        for name in ("base", "ref", "new"):
            shutil.rmtree(directory / name, ignore_errors=True)
        model = _model(dim, dim, seed=0)  # the same generating model as the two-table items
        staging = Staging(str(directory / "base"), inputs=[])
        rows_per = min(chunk_rows or default_chunk_rows(dim), rows)
        target = staging.create_array(
            f"{ONE_TABLE}/vectors", shape=(rows, dim), chunks=(rows_per, dim), dtype=np.dtype(np.float32)
        )
        ids = staging.create_array(f"{ONE_TABLE}/ids", shape=(rows,), chunks=(rows_per,), dtype=np.dtype(np.int64))
        tasks = [
            dask.delayed(_synth_block, pure=True)(
                model["items"], model["mean"], 0, 2, index, min(rows_per, rows - start), "float32", target, ids, start, 0
            )
            for index, start in enumerate(range(0, rows, rows_per))
        ]  # fmt: skip
        run_all(tasks)
        staging.publish({"kind": "synthetic", "params": {"rows": rows, "dim": dim}})
        base = dstab.open_version(directory / "base")
        dstab.stabilize(base).to_zarr(directory / "ref")

        table = base.table(ONE_TABLE)
        staging = Staging(str(directory / "new"), inputs=[str(directory / "base")])
        target = staging.create_table(ONE_TABLE, table, dim)
        basis = random_orthogonal(dim, seed=1)
        chunks = table.row_chunks()
        tasks = [
            dask.delayed(_retrain_block, pure=True)(block, basis, 0.01, 1, 2, index, target, start)
            for index, (block, start) in enumerate(zip(table.blocks(chunks), row_starts(chunks)))
        ]
        run_all(tasks + staging.copy_ids(ONE_TABLE, table))
        staging.publish({"kind": "synthetic", "params": {"like": "base", "noise": 0.01, "orthogonal": True}})
        shutil.rmtree(directory / "base")
    return dstab.open_version(directory / "new"), dstab.open_version(directory / "ref")


def check_disk(work: Path, rows: int, dim: int) -> None:
    """Stop before writing anything if the scratch directory cannot hold every version at once."""
    need = VERSIONS_ON_DISK * rows * (dim * 4 + 8)
    free = shutil.disk_usage(work).free
    if free < need * 1.1:
        raise SystemExit(
            f"{work} has {free / 1e9:.1f} GB free; --rows {rows:,} x --dim {dim} needs about {need / 1e9:.1f} GB: "
            "pass --dir on a larger disk or fewer --rows"
        )


# ----------------------------------------------------------------------------- runs


def floor_passes(new: Version, ref: Version, out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    io_floor_read(new, ref)
    middle = time.perf_counter()
    io_floor_write(new, out)
    return middle - started, time.perf_counter() - middle


def dstab_passes(new: Version, ref: Version, out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    result = dstab.stabilize(new, ref, in_memory=False)  # out of core, as the floor it is measured against
    middle = time.perf_counter()
    result.to_zarr(out)
    return middle - started, time.perf_counter() - middle


def _process_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def cpu_seconds(client: Client) -> float:
    """CPU time used so far by the workers and this process (which hosts the scheduler).

    Wall time on this shared machine swings with whatever else runs; the CPU
    time a run's own processes use does much less, so it is a second, steadier
    view of the same ratio (page-cache copies count as system time).
    """
    return sum(client.run(_process_cpu).values()) + _process_cpu()


def timed(fn: Callable[[Version, Version, Path], tuple[float, float]], new: Version, ref: Version, out: Path,
          client: Client) -> tuple[float, float, float]:  # fmt: skip
    """The two passes' wall times and the CPU seconds of one run, on a clean output and freshly collected
    workers (as compare.run_once)."""
    shutil.rmtree(out, ignore_errors=True)
    client.run(gc.collect)
    gc.collect()
    try:
        cpu = cpu_seconds(client)
        first, second = fn(new, ref, out)
        return first, second, cpu_seconds(client) - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarize(runs: dict[str, list[tuple[float, float, float]]], tables: dict[str, int]) -> dict:
    floor = [a + b for a, b, _ in runs["io-floor"]]
    ours = [a + b for a, b, _ in runs["dstab"]]
    ratios = [d / f for d, f in zip(ours, floor)]
    cpu_ratios = [d[2] / f[2] for d, f in zip(runs["dstab"], runs["io-floor"])]
    return {
        "tables": tables,
        "floor_s": floor, "floor_read_s": [r[0] for r in runs["io-floor"]], "floor_write_s": [r[1] for r in runs["io-floor"]],
        "dstab_s": ours, "dstab_fit_s": [r[0] for r in runs["dstab"]], "dstab_write_s": [r[1] for r in runs["dstab"]],
        "floor_cpu_s": [r[2] for r in runs["io-floor"]], "dstab_cpu_s": [r[2] for r in runs["dstab"]],
        "cpu_ratios": cpu_ratios, "median_cpu_ratio": statistics.median(cpu_ratios),
        "ratios": ratios,
        "median_floor_s": statistics.median(floor), "median_dstab_s": statistics.median(ours),
        "median_ratio": statistics.median(ratios),
        "fit_over_floor_read": statistics.median(d[0] / f[0] for d, f in zip(runs["dstab"], runs["io-floor"])),
        "write_over_floor_write": statistics.median(d[1] / f[1] for d, f in zip(runs["dstab"], runs["io-floor"])),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=6_000_000, help="rows in each case (two-table: 2/3 items, 1/3 users)"
    )
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="keep the data here and reuse it (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("rows", "dim", "repeat", "workers"):
        if getattr(args, name) < (3 if name == "rows" else 1):
            parser.error(f"--{name} must be at least {3 if name == 'rows' else 1}, got {getattr(args, name)}")
    items = (2 * args.rows) // 3
    users = args.rows - items
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="dstab-models-")
    work = args.dir or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    check_disk(work, args.rows, args.dim)
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {
        case: {"io-floor": [], "dstab": []} for case in CASES
    }
    score_error: dict[str, float] = {}
    try:
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):  # noqa: E501
            started = time.perf_counter()
            data = {
                "two-table": make_two_table(work / "two-table", items, users, args.dim),
                "one-table": make_one_table(work / "one-table", args.rows, args.dim),
            }
            print(f"data ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            for case, (new, _) in data.items():
                print(f"  {case}: {new!r}", file=sys.stderr)
            load_before = list(psutil.getloadavg())
            for i in range(args.repeat):
                # swap the cases' order every repeat; inside a case the floor runs right before dstab
                for case in CASES if i % 2 == 0 else CASES[::-1]:
                    new, ref = data[case]
                    for name, fn in (("io-floor", floor_passes), ("dstab", dstab_passes)):
                        passes = timed(fn, new, ref, work / "out", client)
                        runs[case][name].append(passes)
                        print(f"  {case:<9} {name:<8} run {i + 1}/{args.repeat}: {passes[0] + passes[1]:6.2f} s "
                              f"({passes[0]:.2f} + {passes[1]:.2f}), {passes[2]:.2f} CPU s", file=sys.stderr)  # fmt: skip
            load_after = list(psutil.getloadavg())
            # one more fit per case, untimed, to show both cases are real stabilizations (not part of the ratios)
            for case, (new, ref) in data.items():
                result = dstab.stabilize(new, ref)
                result.to_zarr(work / "out")
                score_error[case] = float(result.report["score_error"])
                shutil.rmtree(work / "out", ignore_errors=True)
            tables = {case: {name: new.table(name).n_rows for name in new.names} for case, (new, _) in data.items()}
    finally:
        if tmp is not None:
            tmp.cleanup()
    cases = {case: {**summarize(runs[case], tables[case]), "score_error": score_error[case]} for case in CASES}
    two, one = cases["two-table"], cases["one-table"]
    relative = one["median_ratio"] / two["median_ratio"]
    per_repeat = [o / t for o, t in zip(one["ratios"], two["ratios"])]
    cpu_relative = one["median_cpu_ratio"] / two["median_cpu_ratio"]
    gb = args.rows * args.dim * 4 / 1e9
    print(f"\n{args.rows:,} rows x {args.dim} float32 per case ({gb:.2f} GB of vectors per version), {args.workers} "
          f"workers x 1 thread, warm page cache, {args.repeat} interleaved repeats")  # fmt: skip
    header = (f"{'case':<10} {'floor s':>8} {'dstab s':>8} {'ratio':>6}  {'per-repeat ratios':<24} {'stats/read':>10} "
              f"{'write/write':>11} {'CPU ratio':>9}")  # fmt: skip
    print(header)
    for case, c in cases.items():
        print(f"{case:<10} {c['median_floor_s']:>8.2f} {c['median_dstab_s']:>8.2f} {c['median_ratio']:>6.2f}  "
              f"{', '.join(f'{r:.2f}' for r in c['ratios']):<24} {c['fit_over_floor_read']:>10.2f} "
              f"{c['write_over_floor_write']:>11.2f} {c['median_cpu_ratio']:>9.2f}")  # fmt: skip
    verdict = "no worse" if relative <= 1 else "WORSE"
    print(
        f"one-table ratio / two-table ratio: {relative:.3f} (per repeat {', '.join(f'{r:.2f}' for r in per_repeat)}): {verdict}"
    )
    print(f"the same in CPU seconds: {cpu_relative:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "rows": args.rows, "dim": args.dim, "workers": args.workers, "repeat": args.repeat, "cases": cases,
            "one_over_two": relative, "one_over_two_per_repeat": per_repeat, "one_table_no_worse": relative <= 1,
            "one_over_two_cpu": cpu_relative, "load_average_before": load_before, "load_average_after": load_after,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
