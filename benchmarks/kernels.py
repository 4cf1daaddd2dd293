"""Per-block costs of the kernels against reading and writing the same block: where time beyond the IO floor goes.

    python benchmarks/kernels.py [--rows 262144] [--dim 64] [--repeat 5]

One BLAS thread, a zstd Zarr array of 131,072-row chunks in a temporary
directory, min of --repeat runs per line. Run two at once to see the figures
with both cores busy, as they are inside a 2-worker cluster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import zarr
from threadpoolctl import threadpool_limits

from dstab.linalg import transform_rows
from dstab.stabilize import _apply_write_check
from dstab.stats import _block_stats
from dstab.store import ArrayTarget, write_block


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    y = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    a = rng.normal(size=(args.dim, args.dim))
    probe = rng.normal(size=(64, args.dim))
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1, user_api="blas"):
        chunks = (min(131_072, args.rows), args.dim)
        zarr.create_array(f"{tmp}/x.zarr", data=x, chunks=chunks)
        zarr.create_array(f"{tmp}/out.zarr", shape=x.shape, chunks=chunks, dtype=x.dtype)
        stored = zarr.open_array(f"{tmp}/x.zarr", mode="r")
        target = ArrayTarget(f"{tmp}/out.zarr", "")
        rows = [
            ("read one block (zarr, zstd)", lambda: stored[:]),
            ("write one block (zarr, zstd)", lambda: write_block(x, target, 0)),
            ("statistics: block + reference block", lambda: _block_stats(x, (y,), None, None, 0, 4, False)),
            ("statistics: block alone", lambda: _block_stats(x, (), None, None, 0, 4, False)),
            ("statistics with Householder TSQR", lambda: _block_stats(x, (), None, None, 0, 4, True)),
            ("transform (float32 matmul)", lambda: transform_rows(x, a)),
            ("transform + write + score check", lambda: _apply_write_check(x, a, target, 0, probe, probe)),
        ]
        print(f"per {args.rows:,} x {args.dim} float32 block, one BLAS thread, min of {args.repeat}")
        for name, fn in rows:
            print(f"  {name:<40} {best_ms(fn, args.repeat):8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
