"""The one streaming pass: every statistic the stabilizer needs, each chunk read once.

Per-block kernels (private, numpy only) beside the graph builder, in the manner
of ``dask/array/linalg.py``. The graph has one task per input block plus a
binary tree of merges: O(number of chunks) tasks, and no task holds more than
one block of the new table and the matching block of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from .linalg import qr_factor
from .version import row_starts

# Rows of each table kept as a sample spread over the whole table (the first
# rows of every block): they probe the score error during the write pass and
# break sign ties, at no extra read.
SAMPLE_ROWS = 256


@dataclass
class SideStats:
    """What one pass over one table (and its reference, matched by position) yields."""

    n_rows: int
    gram: np.ndarray  # e x e, float64: X^T X
    row_sum: np.ndarray  # e, float64: 1^T X
    sample: np.ndarray  # s x e, float64: spread sample of rows
    cross: np.ndarray | None = None  # e x e_ref, float64: X^T X_ref
    r: np.ndarray | None = None  # e x e, float64: Householder R (TSQR), when asked for
    ref_sumsq: float = 0.0  # ||X_ref||_F^2
    # (global row, which array) of the first non-finite value, if any
    first_nonfinite: tuple[int, str] | None = None
    # (global row, new id, reference id) of the first position where ids differ
    first_id_mismatch: tuple[int, object, object] | None = None


# Rows converted to float64 at once inside a kernel: 32768 x 64 x 8 B = 16 MiB,
# small beside the block itself, large enough for BLAS to run at full speed.
SLICE_ROWS = 32_768


def row_slices(n_rows: int, step: int = SLICE_ROWS) -> list[slice]:
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _first_nonfinite_row(block: np.ndarray) -> int | None:
    if np.isfinite(block).all():
        return None
    bad = ~np.isfinite(block)
    return int(np.flatnonzero(bad.any(axis=1))[0])


def _block_stats(
    block: np.ndarray,
    ref_block: np.ndarray | None,
    ids_block: np.ndarray | None,
    ref_ids_block: np.ndarray | None,
    offset: int,
    n_sample: int,
    new_name: str,
    ref_name: str,
    qr: bool,
) -> SideStats:
    """Statistics of one row block; ``offset`` is the block's first global row."""
    first_nonfinite = None
    bad = _first_nonfinite_row(block)
    if bad is not None:
        first_nonfinite = (offset + bad, new_name)
    if ref_block is not None:
        bad_ref = _first_nonfinite_row(ref_block)
        if bad_ref is not None and (first_nonfinite is None or offset + bad_ref < first_nonfinite[0]):
            first_nonfinite = (offset + bad_ref, ref_name)
    e = block.shape[1]
    stats = SideStats(
        n_rows=int(block.shape[0]),
        gram=np.zeros((e, e)),
        row_sum=np.zeros(e),
        sample=block[:n_sample].astype(np.float64),
    )
    if ref_block is not None:
        stats.cross = np.zeros((e, ref_block.shape[1]))
    if qr:
        stats.r = np.zeros((0, e))
    # float64 accumulation, a slice of rows at a time so the float64 copy stays small
    for rows in row_slices(block.shape[0]):
        x = block[rows].astype(np.float64)
        stats.gram += x.T @ x
        stats.row_sum += x.sum(axis=0)
        if qr:
            # TSQR inside the block: the slice's R stacked under the running R
            stats.r = qr_factor(np.vstack([stats.r, x]))
        if ref_block is not None:
            y = ref_block[rows].astype(np.float64)
            stats.cross += x.T @ y
            stats.ref_sumsq += float(np.einsum("ij,ij->", y, y))
    stats.first_nonfinite = first_nonfinite
    if ids_block is not None and ref_ids_block is not None:
        differ = np.flatnonzero(ids_block != ref_ids_block)
        if differ.size:
            i = int(differ[0])
            stats.first_id_mismatch = (offset + i, ids_block[i].item(), ref_ids_block[i].item())
    return stats


def _first(a: tuple | None, b: tuple | None) -> tuple | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a[0] <= b[0] else b


def _merge(a: SideStats, b: SideStats) -> SideStats:
    """Combine the statistics of two disjoint row ranges."""
    return SideStats(
        n_rows=a.n_rows + b.n_rows,
        gram=a.gram + b.gram,
        row_sum=a.row_sum + b.row_sum,
        sample=np.concatenate([a.sample, b.sample]),
        cross=None if a.cross is None else a.cross + b.cross,
        r=None if a.r is None else qr_factor(np.vstack([a.r, b.r])),
        ref_sumsq=a.ref_sumsq + b.ref_sumsq,
        first_nonfinite=_first(a.first_nonfinite, b.first_nonfinite),
        first_id_mismatch=_first(a.first_id_mismatch, b.first_id_mismatch),
    )


def tree_reduce(parts: list[Delayed], combine) -> Delayed:
    """Pairwise merge ``parts`` into one delayed value (depth log2 n, n - 1 tasks)."""
    if not parts:
        raise ValueError("nothing to reduce")
    level = list(parts)
    while len(level) > 1:
        nxt = [dask.delayed(combine, pure=True)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _blocks(array: da.Array | None, chunks: tuple[int, ...]) -> list:
    """Row blocks of ``array`` as delayed objects; its row chunks must already be ``chunks``.

    Callers open every input with the new table's row chunks (see
    :meth:`dstab.version.Table.read`), so blocks pair up without a rechunk.
    """
    if array is None:
        return [None] * len(chunks)
    if array.chunks[0] != chunks:
        raise ValueError(f"row chunks {array.chunks[0]} do not match {chunks}; open the array with matching chunks")
    if array.ndim == 2:
        if len(array.chunks[1]) != 1:
            raise ValueError(f"vectors must be one chunk wide, got column chunks {array.chunks[1]}")
        return list(array.to_delayed(optimize_graph=True)[:, 0])
    return list(array.to_delayed(optimize_graph=True))


def side_statistics(
    vectors: da.Array,
    *,
    ref_vectors: da.Array | None = None,
    ids: da.Array | None = None,
    ref_ids: da.Array | None = None,
    new_name: str = "vectors",
    ref_name: str = "reference vectors",
    qr: bool = False,
) -> Delayed:
    """Delayed :class:`SideStats` of one table, matched to its reference by position.

    With ``qr=True`` the pass also runs Householder TSQR (about 28x the work of
    the Gram per row): the accurate path for float64 or ill-conditioned tables.
    """
    chunks = vectors.chunks[0]
    n_sample = max(1, -(-SAMPLE_ROWS // len(chunks)))
    offsets = row_starts(chunks)
    parts = [
        dask.delayed(_block_stats, pure=True)(b, r, i, ri, off, n_sample, new_name, ref_name, qr)
        for b, r, i, ri, off in zip(
            _blocks(vectors, chunks),
            _blocks(ref_vectors, chunks),
            _blocks(ids, chunks) if ref_ids is not None else [None] * len(chunks),
            _blocks(ref_ids, chunks) if ids is not None else [None] * len(chunks),
            offsets,
        )
    ]
    return tree_reduce(parts, _merge)
