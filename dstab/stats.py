"""The one streaming pass: every statistic the stabilizer needs, each chunk read once.

Per-block kernels (private, numpy only) beside the graph builders, in the manner
of ``dask/array/linalg.py``. The graph has one task per input block plus binary
trees of merges: O(number of chunks) tasks, and no task holds more than one
block of a table (and, matched by position, the same rows of the reference).

Rows of the new version are paired with the reference's in one of two ways:

* by position, when neither table has ids or both list the same ids in the same
  order (checked first, on the ids alone): the cross-Gram is exact and each
  task reads the same rows of both tables;
* by id otherwise (churn: ids added, removed, reordered): each table is read
  once on its own and a consistent hash sample of ids is joined, see
  :mod:`dstab.ids`.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, replace
from typing import Any, Literal

import dask
import numpy as np
from dask.delayed import Delayed
from scipy.linalg import blas as _blas

from . import config
from . import ids as idm
from .errors import InputError
from .executor import compute, tree_reduce
from .faults import failpoint
from .linalg import qr_factor
from .residency import NOTHING_KEPT, Kept
from .store import Table, Version, load, row_starts

# The knobs of the pass (dask config, see dstab.config), all read on the client:
# - dstab.sample-rows (256): rows of each table kept as a sample spread over the
#   whole table (the first rows of every block); they probe the score error
#   during the write pass and break sign ties, at no extra read.
# - dstab.id-sample-bytes (32 MiB): bytes of rows per table that the id sample
#   may hold (see dstab.ids), 128k rows at width 64 in float32. The sample is the
#   largest thing a worker holds when rows are matched by id (both tables'
#   samples meet in the join), and a rotation fitted on 128k common rows is as
#   good as one on all of them (benchmarks/churn.py).
# - dstab.slice-bytes, dstab.pair-rows, dstab.join-rows: see PassKnobs.

Match = Literal["position", "id"]


@dataclass(frozen=True)
class AnchorSpec:
    """Which anchor rows count, from the new version's ``counts`` (if the table has them)."""

    min_count: float = 0.0  # rows with a count below this do not anchor the rotation
    weighted: bool = False  # weight anchor rows by their count

    @property
    def uses_counts(self) -> bool:
        return self.min_count > 0 or self.weighted


@dataclass(frozen=True)
class IdPlan:
    """How a table's ids are treated in the pass (picklable; travels with the tasks)."""

    n_buckets: int  # duplicate-check buckets, a power of two
    sample: bool = False  # keep the rows of sampled ids for a join
    threshold: np.uint64 | None = None  # hashes below are sampled; None: all
    fraction: float = 1.0  # the share of ids sampled


@dataclass(frozen=True)
class TableStats:
    """What one pass over one table (and its reference) yields; merged and finished into new objects, never changed."""

    n_rows: int
    gram: np.ndarray  # e x e, float64: X^T X
    row_sum: np.ndarray  # e, float64: 1^T X
    sample: np.ndarray  # s x e, float64: spread sample of rows
    r: np.ndarray | None = None  # e x e, float64: Householder R (TSQR), when asked for
    # Against the reference, over the anchor rows (matched, weighted; estimated
    # from the id sample when matched by id):
    cross: np.ndarray | None = None  # e x e_ref: X^T W X_ref
    anchor_gram: np.ndarray | None = None  # e x e: X^T W X (None: same as gram)
    ref_sumsq: float = 0.0  # sum of w ||x_ref||^2
    ref_col_sumsq: np.ndarray | None = None  # e_ref: the same per column
    ref_gram: np.ndarray | None = None  # e_ref x e_ref: X_ref^T W X_ref (its diagonal is ref_col_sumsq)
    pairs: idm.Pairs | None = None  # a random sample of matched row pairs
    moved: idm.Moved | None = None  # the matched rows that moved most (among the id sample, when matched by id)
    n_anchor: int = 0  # anchor rows used (in the sample, when matched by id)
    matched_by: Match | None = None
    sample_fraction: float = 1.0  # share of common ids the id sample held
    ids: idm.IdSummary | None = None  # common ids and repeats, when the table has ids
    # the first non-finite value, if any
    first_nonfinite: tuple[int, bool] | None = None  # (row, whether it is in the reference)
    first_bad_count: int | None = None  # first row whose count is negative or not finite

    @property
    def gram_of_anchors(self) -> np.ndarray:
        return self.gram if self.anchor_gram is None else self.anchor_gram


@dataclass(frozen=True)
class PassKnobs:
    """The dask config knobs the pass's kernels use, read on the client and sent with the tasks.

    A distributed worker is another process and does not see a ``dask.config.set``
    made in the client, so no kernel reads the config itself.
    """

    # dstab.slice-bytes: bytes of float64 rows a kernel converts and multiplies at
    # once. About 1 MiB keeps each slice in cache between the Gram and the
    # cross-Gram: measured here, a 262,144 x 64 block's statistics took 123 ms in
    # 2,048-row slices and 160 ms in 32,768-row ones, with two workers side by side.
    slice_bytes: int
    pair_rows: int  # dstab.pair-rows: matched row pairs kept for the row-level drift measures
    join_rows: int  # dstab.join-rows: rows of the id sample joined per step
    moved_rows: int = 10  # dstab.moved-rows: the rows that moved most, kept with their ids

    @classmethod
    def read(cls) -> PassKnobs:
        """The knobs as dask config holds them now (call on the client)."""
        return cls(
            config.get("slice-bytes"), config.get("pair-rows"), config.get("join-rows"), config.get("moved-rows")
        )


def slice_rows(dim: int, slice_bytes: int) -> int:
    """Rows of one slice: about ``slice_bytes`` of float64 at width ``dim``."""
    return max(256, slice_bytes // (8 * max(dim, 1)))


def row_slices(n_rows: int, dim: int, slice_bytes: int) -> list[slice]:
    """Consecutive row ranges of :func:`slice_rows` rows each."""
    step = slice_rows(dim, slice_bytes)
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _first_nonfinite_row(block: np.ndarray) -> int | None:
    if np.isfinite(block).all():
        return None
    bad = ~np.isfinite(block)
    return int(np.flatnonzero(bad.any(axis=1))[0])


# ----------------------------------------------------------------------------- per-block kernels
#
# A block's statistics are sums over its rows, taken slice by slice so that each
# float64 slice stays in cache for every sum that needs it. Each sum is a small
# accumulator with one ``add`` per slice; the block kernel only chooses which
# ones run and packs their results.


# Accumulators of this many entries and more are updated in place by BLAS: ``c += a.T @ a`` makes an
# e x e temporary per slice, and at width 1,024 (8 MiB) its allocation and the extra pass over it cost a
# quarter of the kernel (1,132 vs 948 ms a block with the reference's); at width 64 the calls through
# scipy cost more than the 32 KiB temporary (92 vs 87 ms), so small ones keep numpy's product.
IN_PLACE_ENTRIES = 256 * 256


def _add_gram(c: np.ndarray, a: np.ndarray) -> None:
    """``c += a^T a``; only the upper triangle counts (:func:`_symmetric` completes it)."""
    if c.size >= IN_PLACE_ENTRIES:
        _blas.dsyrk(1.0, a.T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
    else:
        c += a.T @ a


def _add_product(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``c += a^T b``; ``c`` is a Fortran-ordered float64 accumulator (:func:`_accumulator`)."""
    if c.size >= IN_PLACE_ENTRIES:
        _blas.dgemm(1.0, a.T, b.T, beta=1.0, c=c, trans_b=1, overwrite_c=1)
    else:
        c += a.T @ b


def _accumulator(rows: int, cols: int) -> np.ndarray:
    return np.zeros((rows, cols), order="F")  # BLAS updates it in place only in its own (Fortran) order


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """The full symmetric matrix from the upper triangle that :func:`_add_gram` fills."""
    return np.ascontiguousarray(np.triu(upper) + np.triu(upper, 1).T)


class _OwnSums:
    """``X^T X`` and ``1^T X`` of the block's own rows."""

    def __init__(self, e: int, step: int) -> None:
        self.gram, self.row_sum = _accumulator(e, e), np.zeros(e)
        self._ones = np.ones(step)

    def add(self, x: np.ndarray, rows: slice) -> None:
        _add_gram(self.gram, x)
        self.row_sum += self._ones[: len(x)] @ x  # on the cached float64 slice: 3x cheaper than a separate sum

    def finish(self) -> None:
        self.gram = _symmetric(self.gram)


class _HouseholderR:
    """TSQR inside the block: each slice's rows stacked under the running ``R`` and factored again."""

    def __init__(self, e: int, step: int) -> None:
        self._stack = np.zeros((e + step, e))  # the running R on top, the slice below
        self._e, self._filled = e, 0

    def add(self, x: np.ndarray, rows: slice) -> None:
        self._stack[self._filled : self._filled + len(x)] = x
        self._stack[: self._e] = qr_factor(self._stack[: self._filled + len(x)])
        self._filled = self._e

    @property
    def r(self) -> np.ndarray:
        return self._stack[: self._e].copy()


class _CrossSums:
    """Sums against the reference's same rows (matched by position), weighted when anchor weights apply.

    With ``measure`` (``dstab report``, not ``stabilize``) also the reference's
    Gram over the anchor rows (for the eigenspace overlap) and each row's
    distance and cosine (for the rows that moved most): about 40% more work
    per block than the cross-Gram and column sums alone, so only when asked.
    """

    def __init__(self, ref_block: np.ndarray, weights: np.ndarray | None, e: int, step: int, measure: bool) -> None:
        e_ref = ref_block.shape[1]
        self._ref, self._weights, self._measure = ref_block, weights, measure
        self.cross, self.ref_col_sumsq = _accumulator(e, e_ref), np.zeros(e_ref)
        self.ref_gram = _accumulator(e_ref, e_ref) if measure else None
        self.distance = np.empty(len(ref_block)) if measure else None
        self.cosine = np.empty(len(ref_block)) if measure else None
        self.anchor_gram = None if weights is None else _accumulator(e, e)
        self._y = np.empty((step, e_ref))
        self._w = None if weights is None else np.empty((step, max(e, e_ref)))

    def add(self, x: np.ndarray, rows: slice) -> None:
        y = self._y[: len(x)]
        np.copyto(y, self._ref[rows])
        if self._measure:
            self.distance[rows], self.cosine[rows] = idm.row_distance_cosine(x, y)  # type: ignore[index]
        if self._weights is None:
            _add_product(self.cross, x, y)
            if self.ref_gram is not None:
                _add_gram(self.ref_gram, y)
            else:
                self.ref_col_sumsq += np.einsum("ij,ij->j", y, y)
            return
        w = self._weights[rows]
        xw = self._w[: len(x), : x.shape[1]]  # type: ignore[index]
        np.multiply(x, w[:, None], out=xw)
        _add_product(self.cross, xw, y)
        _add_product(self.anchor_gram, xw, x)  # type: ignore[arg-type]
        if self.ref_gram is not None:
            yw = self._w[: len(x), : y.shape[1]]  # type: ignore[index]  # xw is spent: reuse the buffer
            np.multiply(y, w[:, None], out=yw)
            _add_product(self.ref_gram, yw, y)
        else:
            self.ref_col_sumsq += np.einsum("i,ij,ij->j", w, y, y)

    def finish(self) -> None:
        self.cross = np.ascontiguousarray(self.cross)
        if self.anchor_gram is not None:
            self.anchor_gram = np.ascontiguousarray(self.anchor_gram)
        if self.ref_gram is not None:
            self.ref_gram = _symmetric(self.ref_gram) if self._weights is None else np.ascontiguousarray(self.ref_gram)
            self.ref_col_sumsq = np.diag(self.ref_gram).copy()


def _slice_sums(block: np.ndarray, accumulators: list[Any], slice_bytes: int) -> None:
    """Feed every float64 slice of ``block`` to every accumulator."""
    # One float64 buffer, reused for every slice: Dask's nanny sets
    # MALLOC_TRIM_THRESHOLD_, which pins glibc's mmap threshold at 128 KiB, so a
    # fresh 1 MiB temporary per slice was an mmap, page faults and a munmap
    # each, and made this kernel 2.5x slower inside workers than outside.
    slices = row_slices(block.shape[0], block.shape[1], slice_bytes)
    x_buf = np.empty((slices[0].stop if slices else 0, block.shape[1]))
    for rows in slices:
        x = x_buf[: rows.stop - rows.start]
        np.copyto(x, block[rows])
        for accumulator in accumulators:
            accumulator.add(x, rows)


def _first_nonfinite(
    block: np.ndarray, ref_block: np.ndarray | None, own: _OwnSums, cross: _CrossSums | None, offset: int
) -> tuple[int, bool] | None:
    """``(row, in the reference)`` of the first NaN or Inf, or ``None``.

    A NaN or Inf anywhere shows in the column sums or the Gram's diagonal (finite
    float32 or float64 squares cannot overflow a float64 sum of this size), so
    the full scan for the offending row runs only when there is one.
    """
    found = None
    if not (np.isfinite(own.row_sum).all() and np.isfinite(np.diag(own.gram)).all()):
        bad = _first_nonfinite_row(block)
        if bad is not None:
            found = (offset + bad, False)
    if cross is not None and not (np.isfinite(cross.ref_col_sumsq).all() and np.isfinite(cross.cross).all()):
        bad_ref = _first_nonfinite_row(ref_block)  # type: ignore[arg-type]
        if bad_ref is not None and (found is None or offset + bad_ref < found[0]):
            found = (offset + bad_ref, True)
    return found


def _block_stats(
    block: Any,
    ref_blocks: tuple[Any, ...],
    counts_block: Any | None,
    ids_block: Any | None,
    offset: int,
    n_sample: int,
    qr: bool,
    spec: AnchorSpec = AnchorSpec(),
    plan: IdPlan | None = None,
    knobs: PassKnobs | None = None,
    measure: bool = False,
) -> tuple[tuple[TableStats, ...], idm.IdSample | None, list[np.ndarray] | None]:
    """Statistics of one row block; ``offset`` is the block's first global row.

    The arguments are block sources (see :func:`dstab.store.load`): the task
    reads its own rows. ``ref_blocks`` are the same rows of each reference
    matched by position (none when every reference is matched by id, or there
    is none). Returns the statistics (the block's own first, then one per
    reference block, each with the block's own sums too), the block's id sample
    (when ``plan.sample``) and its id hashes by bucket (when it has ids).
    The graph builder always passes ``knobs``; a direct call (tests, benchmarks)
    may leave them to the local config. ``measure``: see :class:`_CrossSums`.
    """
    knobs = knobs or PassKnobs.read()
    failpoint("during-statistics")  # in a worker, mid-pass: the kill takes the whole process group
    block, counts, ids = (load(a) for a in (block, counts_block, ids_block))
    refs = [load(r) for r in ref_blocks]
    hashes = None
    if ids is not None:
        ids = idm.normalize_ids(ids)
        hashes = idm.hash_ids(ids)  # once per block: the pairs, the buckets and the id sample all use them
    first_bad_count = idm.first_bad_count(counts)
    if first_bad_count is not None:  # reported by the caller; the block's counts are not used
        first_bad_count += offset
        counts = None
    weights = idm.anchor_weights(counts, spec.min_count, spec.weighted)
    e, step = block.shape[1], slice_rows(block.shape[1], knobs.slice_bytes)
    own = _OwnSums(e, step)
    householder = _HouseholderR(e, step) if qr else None
    crosses = [_CrossSums(ref, weights, e, step, measure) for ref in refs]
    _slice_sums(block, [a for a in (own, householder, *crosses) if a is not None], knobs.slice_bytes)
    own.finish()
    for cross in crosses:
        cross.finish()
    own_stats = TableStats(
        n_rows=int(block.shape[0]),
        gram=own.gram,
        row_sum=own.row_sum,
        sample=block[:n_sample].astype(np.float64),
        r=householder.r if householder is not None else None,
        first_nonfinite=_first_nonfinite(block, None, own, None, offset),
        first_bad_count=first_bad_count,
    )
    results = [own_stats]
    for ref, cross in zip(refs, crosses):
        keys, key_hashes = (ids, hashes) if ids is not None else _position_keys(offset, len(block))
        assert key_hashes is not None  # position keys come with their hashes
        results.append(
            replace(
                own_stats,
                cross=cross.cross,
                anchor_gram=cross.anchor_gram,
                ref_sumsq=float(cross.ref_col_sumsq.sum()),
                ref_col_sumsq=cross.ref_col_sumsq,
                ref_gram=cross.ref_gram,
                pairs=idm.Pairs.smallest(block, np.asarray(ref), keys, key_hashes, knobs.pair_rows),
                moved=None
                if cross.distance is None
                else idm.Moved.top(keys, cross.distance, cross.cosine, knobs.moved_rows),  # type: ignore[arg-type]
                n_anchor=int(block.shape[0] if weights is None else np.count_nonzero(weights)),
                first_nonfinite=_first_nonfinite(block, ref, own, cross, offset),
            )
        )
    id_sample = buckets = None
    if ids is not None and plan is not None:
        assert hashes is not None  # hashed with the ids
        buckets = idm.buckets_of(hashes, plan.n_buckets)
        if plan.sample:
            id_sample = idm.IdSample.take(ids, hashes, block, weights, plan.threshold)
    return tuple(results), id_sample, buckets


def _position_keys(offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions as keys (and their hashes) for tables paired by position without ids."""
    keys = np.arange(offset, offset + n, dtype=np.int64)
    return keys, idm.hash_ids(keys)


def _reference_block_ids(
    block: Any, ids_block: Any, offset: int, plan: IdPlan
) -> tuple[idm.IdSample, list[np.ndarray], tuple[int, bool] | None]:
    """A reference block matched by id: its sampled rows, its id hashes by bucket, its first non-finite row."""
    block, ids = load(block), load(ids_block)
    hashes = idm.hash_ids(ids)
    bad = _first_nonfinite_row(block)
    return (
        idm.IdSample.take(ids, hashes, block, None, plan.threshold),
        idm.buckets_of(hashes, plan.n_buckets),
        None if bad is None else (offset + bad, True),
    )


def _first(a: tuple | None, b: tuple | None) -> tuple | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a[0] <= b[0] else b


def _min_row(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a + b


def _merge(a: TableStats, b: TableStats, pair_rows: int, moved_rows: int = 10) -> TableStats:
    """Combine the statistics of two disjoint row ranges (keeping ``pair_rows`` row pairs, ``moved_rows`` moved rows)."""
    return TableStats(
        n_rows=a.n_rows + b.n_rows,
        gram=a.gram + b.gram,
        row_sum=a.row_sum + b.row_sum,
        sample=np.concatenate([a.sample, b.sample]),
        r=None if a.r is None or b.r is None else qr_factor(np.vstack([a.r, b.r])),
        cross=_add(a.cross, b.cross),
        anchor_gram=_add(a.anchor_gram, b.anchor_gram),
        ref_sumsq=a.ref_sumsq + b.ref_sumsq,
        ref_col_sumsq=_add(a.ref_col_sumsq, b.ref_col_sumsq),
        ref_gram=_add(a.ref_gram, b.ref_gram),
        pairs=idm.merge_pairs(a.pairs, b.pairs, pair_rows),
        moved=idm.merge_moved(a.moved, b.moved, moved_rows),
        n_anchor=a.n_anchor + b.n_anchor,
        first_nonfinite=_first(a.first_nonfinite, b.first_nonfinite),
        first_bad_count=_min_row(a.first_bad_count, b.first_bad_count),
    )


def _merge_each(a: tuple[TableStats, ...], b: tuple[TableStats, ...], knobs: PassKnobs) -> tuple[TableStats, ...]:
    """:func:`_merge` of two blocks' statistics, the own and each reference's in turn."""
    return tuple(_merge(x, y, knobs.pair_rows, knobs.moved_rows) for x, y in zip(a, b))


def _finish_by_id(
    stats: TableStats,
    new_sample: idm.IdSample | None,
    ref_sample: idm.IdSample | None,
    ref_nonfinite: tuple[int, bool] | None,
    summary: idm.IdSummary,
    *,
    fraction: float,
    knobs: PassKnobs,
) -> TableStats:
    """``stats`` with the id samples joined: the anchor statistics, scaled to the whole table."""
    if new_sample is None or ref_sample is None:
        return replace(stats, ids=summary)
    matched = idm.match_samples(
        new_sample, ref_sample, join_rows=knobs.join_rows, pair_rows=knobs.pair_rows, moved_rows=knobs.moved_rows
    )
    # The sample holds about ``fraction`` of the common ids: scaling back keeps
    # the two sides' weights right when both anchor the rotation.
    return replace(
        stats,
        ids=summary,
        matched_by="id",
        sample_fraction=fraction,
        cross=matched.cross / fraction,
        anchor_gram=matched.gram / fraction,
        ref_sumsq=matched.ref_sumsq / fraction,
        ref_col_sumsq=np.diag(matched.ref_gram) / fraction,
        ref_gram=matched.ref_gram / fraction,
        pairs=matched.pairs,
        moved=matched.moved,
        n_anchor=matched.n_rows,
        # the new version's own rows are reported first
        first_nonfinite=stats.first_nonfinite if stats.first_nonfinite is not None else ref_nonfinite,
    )


# ----------------------------------------------------------------------------- graph builders


def side_statistics(
    table: Table,
    *,
    references: tuple[Table, ...] = (),
    matches: tuple[Match, ...] = (),
    spec: AnchorSpec = AnchorSpec(),
    plan: IdPlan | None = None,
    qr: bool = False,
    measure: bool = False,
    blocks: list[Any] | None = None,
) -> Delayed:
    """Delayed list of :class:`TableStats` of one table: one per reference (against it), or one without any.

    One task per block reads the block (and the same rows of every reference
    matched by position) and reduces it; a binary tree merges the results.
    Each reference matched by id (``matches[j] == "id"``) gets one more task
    per reference block, which samples it, and its sample is joined with the
    table's in one task at the end: every table is read once, whatever the
    number of references. With a ``plan`` the table's ids are also checked for
    repeats (and counted against each reference's). With ``qr=True`` the pass
    also runs Householder TSQR (about 28x the work of the Gram per row): the
    accurate path for float64 or ill-conditioned tables. With ``measure=True``
    the statistics against each reference also hold its Gram over the anchor
    rows and the rows that moved most (see :class:`_CrossSums`). ``blocks``:
    the table's blocks already read and kept in memory (:mod:`dstab.residency`),
    one per :meth:`~dstab.store.Table.row_chunks` block, used instead of reading them.
    """
    if len(matches) != len(references):
        raise ValueError("one match mode per reference")
    chunks = table.row_chunks()
    n = len(chunks)
    positional = [j for j, m in enumerate(matches) if m == "position"]
    by_id = [j for j, m in enumerate(matches) if m == "id"]
    if by_id and (plan is None or not plan.sample or table.ids is None):
        raise ValueError("matching by id needs ids on both tables and a sampling plan")
    if any(references[j].ids is None for j in by_id):
        raise ValueError("matching by id needs ids on both tables")
    blocks = table.blocks(chunks) if blocks is None else blocks
    ref_blocks = [references[j].blocks(chunks) for j in positional]
    counts = table.count_blocks(chunks) if spec.uses_counts and table.counts is not None else None
    ids = table.id_blocks(chunks) if plan is not None else None
    # read here, on the client: the kernels get the values as arguments (workers do not see dask.config.set)
    knobs = PassKnobs.read()
    n_sample = max(1, -(-config.get("sample-rows") // n))
    parts = [
        dask.delayed(_block_stats, pure=True, nout=3)(
            b, tuple(r[k] for r in ref_blocks), c, i, off, n_sample, qr, spec, plan, knobs, measure
        )
        for k, (b, c, i, off) in enumerate(zip(blocks, counts or [None] * n, ids or [None] * n, row_starts(chunks)))
    ]
    merged = tree_reduce([p[0] for p in parts], functools.partial(_merge_each, knobs=knobs))
    own = merged[0]
    against: dict[int, Any] = {j: merged[1 + i] for i, j in enumerate(positional)}
    if ids is None:
        return dask.delayed(list)([against[j] for j in range(len(references))] if references else [own])
    assert plan is not None
    new_sample = tree_reduce([p[1] for p in parts], idm.merge_samples) if by_id else None
    new_buckets = [p[2] for p in parts]

    n_buckets = plan.n_buckets

    def summary(ref_parts: list[Any] | None) -> Delayed:
        per_bucket = [
            dask.delayed(idm.bucket_summary, pure=True)(
                [b[k] for b in new_buckets], [q[1][k] for q in ref_parts] if ref_parts is not None else None
            )
            for k in range(n_buckets)
        ]
        return tree_reduce(per_bucket, idm.merge_summaries)

    own_summary = summary(None)
    finish = functools.partial(_finish_by_id, fraction=plan.fraction, knobs=knobs)
    for j in by_id:
        reference = references[j]
        ref_chunks = reference.row_chunks()
        ref_parts = [
            dask.delayed(_reference_block_ids, pure=True, nout=3)(b, i, off, plan)
            for b, i, off in zip(reference.blocks(ref_chunks), reference.id_blocks(ref_chunks), row_starts(ref_chunks))  # type: ignore[arg-type]
        ]
        ref_sample = tree_reduce([p[0] for p in ref_parts], idm.merge_samples)
        ref_nonfinite = tree_reduce([p[2] for p in ref_parts], _first)
        against[j] = dask.delayed(finish, pure=True)(own, new_sample, ref_sample, ref_nonfinite, summary(ref_parts))
    for j in positional:  # the same ids in the same order: the table's own summary (its repeats)
        against[j] = dask.delayed(finish, pure=True)(against[j], None, None, None, own_summary)
    if not references:
        return dask.delayed(list)([dask.delayed(finish, pure=True)(own, None, None, None, own_summary)])
    return dask.delayed(list)([against[j] for j in range(len(references))])


def own_statistics(table: Table, *, qr: bool = False, blocks: list[Any] | None = None) -> Delayed:
    """Delayed :class:`TableStats` of one table on its own (no reference); ``blocks`` as for :func:`side_statistics`."""
    return side_statistics(table, qr=qr, blocks=blocks)[0]  # type: ignore[index]  # a Delayed list indexes lazily


def _ids_equal(a: Any, b: Any) -> bool:
    a, b = idm.normalize_ids(load(a)), idm.normalize_ids(load(b))
    return bool(np.array_equal(a, b))


def ids_identical(a: Table, b: Table) -> Delayed | bool:
    """Whether two tables list the same ids in the same order (reads the ids only)."""
    if a.ids is None or b.ids is None or a.n_rows != b.n_rows:
        return False
    chunks = a.row_chunks()
    checks = [dask.delayed(_ids_equal, pure=True)(x, y) for x, y in zip(a.id_blocks(chunks), b.id_blocks(chunks))]  # type: ignore[arg-type]
    return tree_reduce(checks, operator.and_)


# ----------------------------------------------------------------------------- the whole pass


def check_pairable(new: Version, reference: Version, sides: tuple[str, ...]) -> None:
    """Raise :class:`InputError` when rows of ``sides`` cannot be paired (metadata only: no data is read).

    Ids of different kinds never match; without ids on both, rows pair by position and the counts must agree.
    """
    for side in sides:
        a, b = new.table(side), reference.table(side)
        if a.ids is not None and b.ids is not None:
            ka, kb = idm.id_kind(a.ids.dtype), idm.id_kind(b.ids.dtype)
            if ka != kb:
                at = f" ({reference.url})" if reference.url else ""
                raise InputError(
                    f"{side}/ids of the new version are {ka}s ({a.ids.dtype}) but the reference's{at} are {kb}s "
                    f"({b.ids.dtype}); ids only match ids of the same kind: write both versions' ids as "
                    "int64 or both as strings"
                )
        elif a.n_rows != b.n_rows:
            which = "the new version" if a.ids is None else "the reference"
            raise InputError(
                f"{side}: the new version has {a.n_rows:,} rows but the reference has {b.n_rows:,}, and {which} "
                f"has no {side}/ids; rows without ids are matched by position, so give both versions "
                f"{side}/ids (int64 or strings) to match rows by id"
            )


def match_modes(
    new: Version, references: tuple[Version, ...], sides: tuple[str, ...], *, progress: bool = False
) -> list[dict[str, Match]]:
    """How each side's rows pair with each reference's: by position when that is exact, else by id.

    Raises :class:`InputError` when they cannot be paired (no ids and different
    lengths; ids of different kinds). The ids are compared in one compute for
    every reference.
    """
    modes: list[dict[str, Match]] = [{} for _ in references]
    candidates: list[tuple[int, str]] = []
    for j, reference in enumerate(references):
        check_pairable(new, reference, sides)
        for side in sides:
            if new.table(side).ids is not None and reference.table(side).ids is not None:
                candidates.append((j, side))
            else:
                modes[j][side] = "position"
    checks = [ids_identical(new.table(s), references[j].table(s)) for j, s in candidates]
    lazy = [c for c in checks if isinstance(c, Delayed)]
    answers = iter(compute(*lazy, progress=progress, stage="comparing ids")) if lazy else iter(())
    for (j, side), check in zip(candidates, checks):
        same = next(answers) if isinstance(check, Delayed) else check
        modes[j][side] = "position" if same else "id"
    return modes


def pass_statistics(
    new: Version,
    references: tuple[Version, ...],
    anchor_tables: tuple[str, ...],
    *,
    spec: AnchorSpec = AnchorSpec(),
    qr: bool = False,
    id_sample_bytes: int | None = None,
    tables: tuple[str, ...] | None = None,
    measure: bool = False,
    kept: Kept = NOTHING_KEPT,
    progress: bool = False,
) -> list[dict[str, TableStats]]:
    """The statistics pass over ``tables`` of ``new`` (default: all), against each reference on ``anchor_tables``.

    Returns one ``{table: TableStats}`` per reference (the table's own sums and
    those against that reference), or a single one without references. One
    compute reads every chunk of ``new`` and of each reference's anchor tables
    once (the ids are compared first, on the ids alone, where both versions
    have them).

    Checks the data on the way (non-finite values, bad counts, repeated ids, no
    common ids) and raises :class:`InputError` naming the row or id (and the
    reference, when there are several).
    ``id_sample_bytes`` defaults to dask config ``dstab.id-sample-bytes``.
    ``kept``: blocks of tables of ``new`` kept in memory (:mod:`dstab.residency`), read from there (and,
    on a local scheduler, read here and held).
    """
    if id_sample_bytes is None:
        id_sample_bytes = config.get("id-sample-bytes")
    # that the anchor tables have counts when the spec uses them is checked before, by stabilize.check_request
    sides = new.names if tables is None else tables
    modes = match_modes(new, references, anchor_tables, progress=progress)
    graphs = []
    for side in sides:
        table = new.table(side)
        refs = tuple(r.table(side) for r in references) if side in anchor_tables else ()
        matches = tuple(m.get(side, "position") for m in modes) if refs else ()
        plan = None
        if table.ids is not None:
            n_most = max([table.n_rows] + [r.n_rows for r in refs])
            plan = IdPlan(n_buckets=idm.bucket_count(n_most))
            if "id" in matches:
                row_bytes = max([table.dim * table.dtype.itemsize] + [r.dim * r.dtype.itemsize for r in refs])
                fraction = min(1.0, max(1, id_sample_bytes // row_bytes) / n_most)
                plan = IdPlan(plan.n_buckets, sample=True, threshold=idm.sample_threshold(fraction), fraction=fraction)
        graphs.append(
            side_statistics(
                table,
                references=refs,
                matches=matches,
                spec=spec if refs else AnchorSpec(),
                plan=plan,
                qr=qr,
                measure=measure,
                blocks=kept.get(side),
            )
        )
    to_read = kept.to_read()
    values = compute(*graphs, *to_read, progress=progress, stage="statistics pass")
    kept.hold(values[len(graphs) :])
    computed = dict(zip(sides, values[: len(graphs)]))
    results: list[dict[str, TableStats]] = []
    for j in range(max(1, len(references))):
        reference = references[j] if references else None
        label = "the reference" if len(references) < 2 else f"the reference {reference.url or j + 1}"  # type: ignore[union-attr]
        per_table = {}
        for side in sides:
            found = computed[side]
            stats = found[j] if side in anchor_tables and references else found[0]
            if side in anchor_tables and reference is not None and stats.matched_by is None:
                stats = replace(stats, matched_by="position")
            raise_data_errors(side, stats, new, reference, label)
            per_table[side] = stats
        results.append(per_table)
    return results


def _id_at(table: Table, row: int) -> str:
    if table.ids is None:
        return ""
    return f" (id {idm.id_values(table.ids[row : row + 1])[0]!r})"


def _rows_with_hash(ids_block: Any, target: int, offset: int) -> list[tuple[int, object]]:
    return idm.rows_with_hash(load(ids_block), target, offset)


def _concat_lists(a: list, b: list) -> list:
    return a + b


def _name_repeat(table: Table, target: int) -> list[tuple[int, object]]:
    """``(row, id)`` of every row whose id hashes to ``target`` (one more pass over the ids)."""
    chunks = table.row_chunks()
    found = [
        dask.delayed(_rows_with_hash, pure=True)(block, target, off)
        for block, off in zip(table.id_blocks(chunks), row_starts(chunks))  # type: ignore[arg-type]
    ]
    (rows,) = compute(tree_reduce(found, _concat_lists))
    return rows


def check_repeat(side: str, label: str, table: Table, repeat: int | None) -> None:
    """Raise :class:`InputError` naming the id that hashes to ``repeat`` and its first two rows, if it repeats.

    Reads ``table``'s ids once more (the ids only), and only when the bucket
    check found a repeated hash.
    """
    if repeat is None:
        return
    found = idm.first_duplicate(_name_repeat(table, repeat))
    if found is not None:
        value, first, second = found
        raise InputError(
            f"{side}/ids of {label} has the id {value!r} at rows {first} and {second}; "
            "ids must be unique: drop or merge the duplicate rows upstream"
        )


def check_finite(label: str, stats: TableStats, table: Table) -> None:
    """Raise :class:`InputError` naming the first non-finite row the pass found in ``table``."""
    if stats.first_nonfinite is None:
        return
    row = stats.first_nonfinite[0]
    raise InputError(
        f"{label} row {row}{_id_at(table, row)} is not finite (NaN or Inf); "
        "fix or drop that row upstream and write the version again"
    )


def raise_data_errors(
    side: str, stats: TableStats, new: Version, reference: Version | None, label: str = "the reference"
) -> None:
    """Turn what a statistics pass found wrong in the data into a clear :class:`InputError` (``label`` names the reference)."""
    table = new.table(side)
    if stats.first_nonfinite is not None:
        row, in_reference = stats.first_nonfinite
        where = table if not in_reference else reference.table(side)  # type: ignore[union-attr]
        check_finite(f"{side}/vectors" + (f" of {label}" if in_reference else ""), stats, where)
    if stats.first_bad_count is not None:
        row = stats.first_bad_count
        value = np.asarray(table.counts[row : row + 1])[0].item()  # type: ignore[index]
        raise InputError(f"{side}/counts row {row}{_id_at(table, row)} is {value!r}; counts must be finite and >= 0")
    summary = stats.ids
    if summary is None:
        return
    check_repeat(side, "the new version", table, summary.repeat_new)
    if summary.repeat_ref is not None:
        check_repeat(side, label, reference.table(side), summary.repeat_ref)  # type: ignore[union-attr]
    if stats.matched_by == "id" and summary.n_common == 0:
        assert reference is not None
        raise InputError(
            f"{side}: none of the new version's {table.n_rows:,} ids appears among {label}'s "
            f"{reference.table(side).n_rows:,} ids; check that the reference is the right version, "
            f"or anchor on the other side only (--anchor)"
        )
