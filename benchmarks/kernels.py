"""Per-block costs of the kernels against reading and writing the same block: where time beyond the IO floor goes.

    python benchmarks/kernels.py [--rows 262144] [--dim 64] [--repeat 5]

One BLAS thread, a zstd Zarr array of 131,072-row chunks (or one 64 MiB chunk
when wider) in a temporary directory, min of --repeat runs per line. Run two at
once to see the figures with both cores busy, as they are inside a 2-worker
cluster.

Besides the kernels dstab runs, the lines marked "(not used)" measure the
alternatives the statistics kernel was weighed against: its products in float32
(accumulated in float64 slice by slice), and the Gram and cross-Gram fused into
one product ``x^T [x | y]``; and the read split into its parts (the chunk files'
bytes alone, their zstd decompression alone).
"""

from __future__ import annotations

import argparse
import os
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


def _slices(n: int, dim: int) -> list[slice]:
    step = max(256, (1 << 20) // (8 * dim))  # dstab.slice-bytes' default: 1 MiB of float64 rows
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def float32_products(x: np.ndarray, y: np.ndarray) -> None:
    """The Gram and cross-Gram with float32 products, summed in float64 per slice (not used: see docs/design.md)."""
    g, c = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1], y.shape[1]))
    for rows in _slices(len(x), x.shape[1]):
        g += x[rows].T @ x[rows]
        c += x[rows].T @ y[rows]


def fused_products(x: np.ndarray, y: np.ndarray) -> None:
    """The Gram and cross-Gram as one float64 product ``x^T [x | y]`` per slice (not used: no faster)."""
    e = x.shape[1]
    rows_all = _slices(len(x), e)
    z = np.empty((rows_all[0].stop - rows_all[0].start, e + y.shape[1]))
    acc = np.zeros((e, e + y.shape[1]))
    for rows in rows_all:
        zz = z[: rows.stop - rows.start]
        np.copyto(zz[:, :e], x[rows])
        np.copyto(zz[:, e:], y[rows])
        acc += zz[:, :e].T @ zz


def chunk_files(path: str) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(path, "c")) for f in files)


def read_bytes(files: list[str]) -> list[bytes]:
    out = []
    for name in files:
        with open(name, "rb") as fh:
            out.append(fh.read())
    return out


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
        chunks = (min(131_072, args.rows, max(1, (64 << 20) // (4 * args.dim))), args.dim)
        zarr.create_array(f"{tmp}/x.zarr", data=x, chunks=chunks)
        zarr.create_array(f"{tmp}/out.zarr", shape=x.shape, chunks=chunks, dtype=x.dtype)
        stored = zarr.open_array(f"{tmp}/x.zarr", mode="r")
        target = ArrayTarget(f"{tmp}/out.zarr", "")
        from numcodecs.zstd import Zstd

        files = chunk_files(f"{tmp}/x.zarr")
        raw = read_bytes(files)
        zstd = Zstd()
        rows = [
            ("read one block (zarr, zstd)", lambda: stored[:]),
            ("  its chunk files' bytes alone", lambda: read_bytes(files)),
            ("  their zstd decompression alone", lambda: [zstd.decode(b) for b in raw]),
            ("write one block (zarr, zstd)", lambda: write_block(x, target, 0)),
            ("statistics: block + reference block", lambda: _block_stats(x, (y,), None, None, 0, 4, False)),
            ("  products in float32 (not used)", lambda: float32_products(x, y)),
            ("  Gram and cross-Gram fused (not used)", lambda: fused_products(x, y)),
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
