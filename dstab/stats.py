"""The one streaming pass: every statistic the stabilizer needs, each chunk read once.

Per-block kernels (private, numpy only) beside the graph builder, in the manner
of ``dask/array/linalg.py``. The graph has one task per input block plus a
binary tree of merges: O(number of chunks) tasks, and no task holds more than
one block of the new table and the matching block of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed

from .linalg import qr_factor
from .errors import InputError
from .version import Side, Table, Version, load, row_starts

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
    # the first non-finite value, if any
    first_nonfinite: tuple[int, bool] | None = None  # (global row, whether it is in the reference)
    # (global row, new id, reference id) of the first position where ids differ
    first_id_mismatch: tuple[int, object, object] | None = None


# Bytes of float64 rows a kernel converts and multiplies at once. About 1 MiB
# keeps each slice in cache between the Gram and the cross-Gram: measured here,
# a 262,144 x 64 block's statistics took 123 ms in 2,048-row slices and 160 ms
# in 32,768-row ones, with two workers running side by side.
SLICE_BYTES = 2**20


def row_slices(n_rows: int, dim: int) -> list[slice]:
    """Consecutive row ranges of about :data:`SLICE_BYTES` of float64 each."""
    step = max(256, SLICE_BYTES // (8 * max(dim, 1)))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _first_nonfinite_row(block: np.ndarray) -> int | None:
    if np.isfinite(block).all():
        return None
    bad = ~np.isfinite(block)
    return int(np.flatnonzero(bad.any(axis=1))[0])


def _block_stats(
    block: Any,
    ref_block: Any | None,
    ids_block: Any | None,
    ref_ids_block: Any | None,
    offset: int,
    n_sample: int,
    qr: bool,
) -> SideStats:
    """Statistics of one row block; ``offset`` is the block's first global row.

    The arguments are block sources (see :func:`dstab.version.load`): the task
    reads its own rows.
    """
    block, ref_block, ids_block, ref_ids_block = (load(a) for a in (block, ref_block, ids_block, ref_ids_block))
    e = block.shape[1]
    stats = SideStats(
        n_rows=int(block.shape[0]),
        gram=np.zeros((e, e)),
        row_sum=np.zeros(e),
        sample=block[:n_sample].astype(np.float64),
    )
    slices = row_slices(*block.shape)
    # One float64 buffer per input, reused for every slice: Dask's nanny sets
    # MALLOC_TRIM_THRESHOLD_, which pins glibc's mmap threshold at 128 KiB, so a
    # fresh 1 MiB temporary per slice was an mmap, page faults and a munmap
    # each, and made this kernel 2.5x slower inside workers than outside.
    step = slices[0].stop if slices else 0
    x_buf = np.empty((step, e))
    ones = np.ones(step)
    if ref_block is not None:
        stats.cross = np.zeros((e, ref_block.shape[1]))
        y_buf = np.empty((step, ref_block.shape[1]))
    if qr:
        stack = np.zeros((e + step, e))  # the running R on top, the slice below
        r_rows = 0
    for rows in slices:
        n = rows.stop - rows.start
        x = x_buf[:n]
        np.copyto(x, block[rows])
        stats.gram += x.T @ x
        stats.row_sum += ones[:n] @ x  # on the cached float64 slice: 3x cheaper than a separate sum
        if qr:
            # TSQR inside the block: the slice's R stacked under the running R
            stack[r_rows : r_rows + n] = x
            r = qr_factor(stack[: r_rows + n])
            stack[:e] = r
            r_rows = e
        if ref_block is not None:
            y = y_buf[:n]
            np.copyto(y, ref_block[rows])
            stats.cross += x.T @ y
            flat = y.reshape(-1)
            stats.ref_sumsq += float(flat @ flat)
    if qr:
        stats.r = stack[:e].copy() if slices else np.zeros((e, e))
    # A NaN or Inf anywhere shows in the column sums or the Gram's diagonal (finite
    # float32 or float64 squares cannot overflow a float64 sum of this size), so
    # the full scan for the offending row runs only when there is one.
    first_nonfinite = None
    if not (np.isfinite(stats.row_sum).all() and np.isfinite(np.diag(stats.gram)).all()):
        bad = _first_nonfinite_row(block)
        if bad is not None:
            first_nonfinite = (offset + bad, False)
    if ref_block is not None and not np.isfinite(stats.ref_sumsq):
        bad_ref = _first_nonfinite_row(ref_block)
        if bad_ref is not None and (first_nonfinite is None or offset + bad_ref < first_nonfinite[0]):
            first_nonfinite = (offset + bad_ref, True)
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


def side_statistics(
    table: Table,
    *,
    reference: Table | None = None,
    match_ids: bool = False,
    qr: bool = False,
) -> Delayed:
    """Delayed :class:`SideStats` of one table, matched to ``reference`` by position.

    One task per block reads the block (and the reference's same rows, and with
    ``match_ids`` both tables' ids) and reduces it; a binary tree merges the
    results. With ``qr=True`` the pass also runs Householder TSQR (about 28x
    the work of the Gram per row): the accurate path for float64 or
    ill-conditioned tables.
    """
    chunks = table.row_chunks()
    n = len(chunks)
    blocks = table.blocks(chunks)
    ref_blocks = reference.blocks(chunks) if reference is not None else [None] * n
    ids = ref_ids = None
    if match_ids and reference is not None and table.ids is not None and reference.ids is not None:
        ids, ref_ids = table.id_blocks(chunks), reference.id_blocks(chunks)
    n_sample = max(1, -(-SAMPLE_ROWS // n))
    parts = [
        dask.delayed(_block_stats, pure=True)(b, r, i, ri, off, n_sample, qr)
        for b, r, i, ri, off in zip(blocks, ref_blocks, ids or [None] * n, ref_ids or [None] * n, row_starts(chunks))
    ]
    return tree_reduce(parts, _merge)


def raise_data_errors(side: Side, stats: SideStats, new: Table, reference: Version | None) -> None:
    """Turn what a statistics pass found wrong in the data into a clear :class:`InputError`."""
    if stats.first_nonfinite is not None:
        row, in_reference = stats.first_nonfinite
        table = reference.table(side) if in_reference else new  # type: ignore[union-attr]
        where = " of the reference" if in_reference else ""
        ident = ""
        if table.ids is not None:
            ident = f" (id {np.asarray(table.ids[row : row + 1])[0].item()!r})"
        raise InputError(
            f"{side}/vectors{where} row {row}{ident} is not finite (NaN or Inf); "
            "fix or drop that row upstream and write the version again"
        )
    if stats.first_id_mismatch is not None:
        row, a, b = stats.first_id_mismatch
        raise InputError(
            f"{side}/ids differ from the reference's at row {row} ({a!r} vs {b!r}); rows are matched by "
            "position in this version of dstab, so both versions must list the same ids in the same order"
        )
