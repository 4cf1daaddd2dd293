"""Rows matched by id: hashing, the consistent sample, duplicate checks, the join. Numpy only.

When a catalogue churns (ids added, removed, rows reordered) the cross-Gram
``X^T X_ref`` must pair each row with the reference row of the same id. A full
join would shuffle every vector across the cluster (or spill both tables to
disk); instead every task keeps the rows whose id *hashes* below a threshold.
The hash is a pure function of the id, so a kept id is kept in both versions:
the two samples join exactly, in memory, with no shuffle, and each table is
still read once. The threshold is chosen from the table sizes so that the
sample stays under a byte budget; when the tables are small enough the sample
is every row and the alignment is exactly the one fitted on the intersection.
A Procrustes rotation of width e fitted on half a million common rows differs
from the one fitted on all of them by far less than a retrain's own noise (see
``benchmarks/churn.py``).

Duplicates are found with the same hashes: each block sorts its ids' hashes
into buckets (8 bytes per row, held by the cluster and spilled like any task
result), and one task per bucket looks for repeats and counts the ids the two
versions share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import config

IdKind = Literal["integer", "string"]

_SEED_INT = np.uint64(0x9E3779B97F4A7C15)
_SEED_STR = np.uint64(0xD1B54A32D192ED03)


def id_kind(dtype: np.dtype) -> IdKind:
    """``integer`` or ``string``: ids of different kinds never match."""
    return "integer" if np.dtype(dtype).kind in "iu" else "string"


def normalize_ids(ids: np.ndarray) -> np.ndarray:
    """Ids in one comparable form: int64 for integers, fixed-width unicode for strings."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64, copy=False)
    if ids.dtype.kind == "U":
        return ids
    if ids.dtype.kind == "S":
        return np.char.decode(ids, "utf-8")
    if ids.dtype.kind == "O":
        raise TypeError("object arrays of ids are never read: store ids as int64 or strings")
    # numpy's variable-width StringDType, as zarr reads some string arrays
    width = int(np.strings.str_len(ids).max()) if ids.size else 1
    return ids.astype(f"<U{max(width, 1)}")


def _mix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (uint64 arithmetic wraps, as intended)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash per id, the same for the same id in any version, dtype width or process.

    Strings hash their code points, skipping the padding of fixed-width arrays,
    so ``'ab'`` stored as ``<U2`` and as ``<U16`` hash alike.
    """
    ids = normalize_ids(ids)
    if ids.dtype.kind == "i":
        return _mix(ids.view(np.uint64) ^ _SEED_INT)
    n = ids.shape[0]
    width = ids.dtype.itemsize // 4
    h = np.full(n, _SEED_STR, dtype=np.uint64)
    if n == 0 or width == 0:
        return h
    codes = np.ascontiguousarray(ids).view(np.uint32).reshape(n, width)
    for j in range(width):
        c = codes[:, j].astype(np.uint64)
        h = np.where(c != 0, _mix(h ^ c), h)
    return h


def bucket_count(n_rows: int) -> int:
    """Duplicate-check buckets for a table of ``n_rows`` ids: a power of two, each about ``dstab.id-bucket-rows`` hashes.

    Reads dask config, so call it on the client while the graph is built (the count travels in the tasks).
    """
    return 1 << max(0, math.ceil(math.log2(max(1, n_rows) / config.get("id-bucket-rows"))))


def buckets_of(hashes: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """The hashes split into ``n_buckets`` (a power of two) by their low bits, each sorted."""
    if n_buckets == 1:
        return [np.sort(hashes)]
    which = hashes & np.uint64(n_buckets - 1)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(n_buckets + 1, dtype=np.uint64))
    ordered = hashes[order]
    return [np.sort(ordered[bounds[p] : bounds[p + 1]]) for p in range(n_buckets)]


def first_repeat(sorted_hashes: np.ndarray) -> int | None:
    """A hash that occurs twice in a sorted array, or ``None``."""
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    return int(sorted_hashes[same[0]]) if same.size else None


@dataclass
class IdSummary:
    """What the bucket tasks found: ids in common, and one repeated hash per version if any."""

    n_common: int = 0
    repeat_new: int | None = None
    repeat_ref: int | None = None


def bucket_summary(new_parts: list[np.ndarray], ref_parts: list[np.ndarray] | None) -> IdSummary:
    """Summarise one bucket from every block's piece of it."""
    new = np.sort(np.concatenate(new_parts)) if new_parts else np.empty(0, np.uint64)
    summary = IdSummary(repeat_new=first_repeat(new))
    if ref_parts is not None:
        ref = np.sort(np.concatenate(ref_parts)) if ref_parts else np.empty(0, np.uint64)
        summary.repeat_ref = first_repeat(ref)
        summary.n_common = int(np.intersect1d(new, ref, assume_unique=True).size)
    return summary


def merge_summaries(a: IdSummary, b: IdSummary) -> IdSummary:
    return IdSummary(
        n_common=a.n_common + b.n_common,
        repeat_new=a.repeat_new if a.repeat_new is not None else b.repeat_new,
        repeat_ref=a.repeat_ref if a.repeat_ref is not None else b.repeat_ref,
    )


def id_values(ids: np.ndarray) -> list[int | str]:
    """Ids as Python ``int`` / ``str`` (to name them in messages).

    ``tolist`` and not ``.item()`` per element: numpy's variable-width
    ``StringDType`` (how zarr reads Zarr v3 string ids) yields ``str`` elements,
    which have no ``.item()``.
    """
    return np.asarray(ids).tolist()


def rows_with_hash(ids: np.ndarray, target: int, offset: int) -> list[tuple[int, object]]:
    """``(global row, id)`` of the ids in a block that hash to ``target`` (to name a duplicate)."""
    ids = np.asarray(ids)
    rows = np.flatnonzero(hash_ids(ids) == np.uint64(target))
    return list(zip((offset + rows).tolist(), id_values(ids[rows])))


def first_duplicate(rows: list[tuple[int, object]]) -> tuple[object, int, int] | None:
    """``(id, first row, second row)`` of the first id that repeats in ``(row, id)`` pairs in row order.

    The pairs share one hash; two different ids that collide are told apart here.
    """
    seen: dict[object, int] = {}
    for row, value in rows:
        if value in seen:
            return value, seen[value], row
        seen[value] = row
    return None


# ----------------------------------------------------------------------------- the sample and the join


def sample_threshold(fraction: float) -> np.uint64 | None:
    """Hashes below this are sampled; ``None`` keeps every row."""
    if fraction >= 1.0:
        return None
    return np.uint64(int(fraction * 2.0**64))


@dataclass
class IdSample:
    """Rows (in the table's dtype) of the sampled ids, with their anchor weights (``None``: all 1)."""

    ids: np.ndarray
    rows: np.ndarray
    weights: np.ndarray | None = None
    hashes: np.ndarray | None = None  # of ids, to pick a consistent subset of pairs

    @classmethod
    def take(
        cls,
        ids: np.ndarray,
        hashes: np.ndarray,
        rows: np.ndarray,
        weights: np.ndarray | None,
        threshold: np.uint64 | None,
    ) -> IdSample:
        keep = np.ones(len(ids), bool) if threshold is None else hashes < threshold
        if weights is not None:
            keep &= weights > 0
        return cls(
            ids=normalize_ids(ids)[keep],
            rows=np.ascontiguousarray(rows[keep]),
            weights=None if weights is None else weights[keep],
            hashes=hashes[keep],
        )


def merge_samples(a: IdSample, b: IdSample) -> IdSample:
    weights = None
    if a.weights is not None or b.weights is not None:
        weights = np.concatenate(
            [w if w is not None else np.ones(len(s.ids)) for s, w in ((a, a.weights), (b, b.weights))]
        )
    hashes = None if a.hashes is None or b.hashes is None else np.concatenate([a.hashes, b.hashes])
    return IdSample(
        ids=np.concatenate([a.ids, b.ids]), rows=np.concatenate([a.rows, b.rows]), weights=weights, hashes=hashes
    )


@dataclass
class Pairs:
    """Up to ``n`` rows of the new table and the reference rows they match, with their keys.

    Kept for the row-level drift measures (mean row cosine, neighbour overlap as
    queries, score error between versions); ``n`` is dask config ``dstab.pair-rows``,
    read on the client and passed to the kernels.

    The rows with the smallest key hashes: a random sample, the same in any
    version and for any split into blocks. Keys are ids, or global row
    positions for tables without ids.
    """

    new: np.ndarray
    ref: np.ndarray
    keys: np.ndarray
    hashes: np.ndarray

    @classmethod
    def smallest(cls, new: np.ndarray, ref: np.ndarray, keys: np.ndarray, hashes: np.ndarray, n: int) -> Pairs:
        if len(hashes) > n:
            first = np.argpartition(hashes, n - 1)[:n]
            order = first[np.argsort(hashes[first], kind="stable")]
        else:
            order = np.argsort(hashes, kind="stable")
        return cls(new=new[order], ref=ref[order], keys=keys[order], hashes=hashes[order])


def merge_pairs(a: Pairs | None, b: Pairs | None, n: int) -> Pairs | None:
    """The ``n`` pairs of ``a`` and ``b`` with the smallest key hashes."""
    if a is None or b is None:
        return b if a is None else a
    return Pairs.smallest(
        np.concatenate([a.new, b.new]), np.concatenate([a.ref, b.ref]),
        np.concatenate([a.keys, b.keys]), np.concatenate([a.hashes, b.hashes]), n,
    )  # fmt: skip


def row_distance_cosine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float64 ``x`` and ``y``: the distance ``||x_i - y_i||`` and the cosine (widths zero-padded)."""
    w = min(x.shape[1], y.shape[1])
    xx, yy = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    xy = np.einsum("ij,ij->i", x[:, :w], y[:, :w])
    distance = np.sqrt(np.maximum(xx + yy - 2.0 * xy, 0.0))
    norms = np.sqrt(xx * yy)
    return distance, np.divide(xy, norms, out=np.zeros_like(xy), where=norms > 0)


@dataclass
class Moved:
    """The ``n`` matched rows that moved most between the two versions: their keys, distances and cosines.

    The distance is the Euclidean ``||x - x_ref||`` (widths zero-padded), the
    ranking a diagnosis wants: a row's share of the Frobenius drift. Keys are
    ids, or global row positions for tables without ids.
    """

    keys: np.ndarray
    distance: np.ndarray  # float64, largest first
    cosine: np.ndarray  # float64

    @classmethod
    def largest(cls, x: np.ndarray, y: np.ndarray, keys: np.ndarray, n: int) -> Moved:
        """The ``n`` of float64 rows ``x`` (new) and ``y`` (reference) that moved most."""
        distance, cosine = row_distance_cosine(x, y)
        return cls.top(keys, distance, cosine, n)

    @classmethod
    def top(cls, keys: np.ndarray, distance: np.ndarray, cosine: np.ndarray, n: int) -> Moved:
        if len(distance) > n:
            idx = np.argpartition(-distance, n - 1)[:n]
        else:
            idx = np.arange(len(distance))
        order = idx[np.lexsort((np.asarray(keys)[idx], -distance[idx]))]  # ties by key: the same in any split
        return cls(keys=np.asarray(keys)[order], distance=distance[order], cosine=cosine[order])


def merge_moved(a: Moved | None, b: Moved | None, n: int) -> Moved | None:
    """The ``n`` rows of ``a`` and ``b`` that moved most."""
    if a is None or b is None:
        return b if a is None else a
    return Moved.top(
        np.concatenate([a.keys, b.keys]), np.concatenate([a.distance, b.distance]),
        np.concatenate([a.cosine, b.cosine]), n,
    )  # fmt: skip


@dataclass
class Matched:
    """Anchor statistics over the rows whose ids both samples hold (weighted)."""

    cross: np.ndarray  # X^T W X_ref
    gram: np.ndarray  # X^T W X
    ref_sumsq: float  # sum of w |x_ref|^2
    n_rows: int  # rows matched
    ref_gram: np.ndarray  # X_ref^T W X_ref (its diagonal: per column, sum of w x_ref^2)
    pairs: Pairs | None = None
    moved: Moved | None = None


def match_samples(new: IdSample, ref: IdSample, *, join_rows: int, pair_rows: int, moved_rows: int = 10) -> Matched:
    """Join two samples on id and accumulate the anchor statistics in float64.

    ``join_rows`` rows of ``new`` are looked up at a time (dstab.join-rows: it bounds
    the float64 copies the join makes), and
    up to ``pair_rows`` matched pairs are kept (dstab.pair-rows), and the
    ``moved_rows`` matched rows that moved most (dstab.moved-rows).
    """
    e, e_ref = new.rows.shape[1], ref.rows.shape[1]
    out = Matched(
        cross=np.zeros((e, e_ref)), gram=np.zeros((e, e)), ref_sumsq=0.0, n_rows=0, ref_gram=np.zeros((e_ref, e_ref))
    )
    if len(ref.ids) == 0 or len(new.ids) == 0:
        return out
    order = np.argsort(ref.ids, kind="stable")
    sorted_ids = ref.ids[order]
    for start in range(0, len(new.ids), join_rows):
        part = slice(start, start + join_rows)
        pos = np.minimum(np.searchsorted(sorted_ids, new.ids[part]), len(sorted_ids) - 1)
        hit = np.flatnonzero(sorted_ids[pos] == new.ids[part])
        if hit.size == 0:
            continue
        x = new.rows[part][hit].astype(np.float64)
        y = ref.rows[order[pos[hit]]].astype(np.float64)
        w = None if new.weights is None else new.weights[part][hit]
        xw = x if w is None else x * w[:, None]
        out.cross += xw.T @ y
        out.gram += xw.T @ x
        ref_gram = y.T @ y if w is None else (y * w[:, None]).T @ y
        out.ref_gram += ref_gram
        out.ref_sumsq += float(np.trace(ref_gram))
        out.n_rows += int(hit.size)
        if new.hashes is not None:
            found = Pairs.smallest(
                new.rows[part][hit], ref.rows[order[pos[hit]]], new.ids[part][hit], new.hashes[part][hit], pair_rows
            )
            out.pairs = merge_pairs(out.pairs, found, pair_rows)
        moved = Moved.largest(x, y, new.ids[part][hit], moved_rows)
        out.moved = merge_moved(out.moved, moved, moved_rows)
    return out


def anchor_weights(counts: np.ndarray | None, min_count: float, weighted: bool) -> np.ndarray | None:
    """Per-row anchor weights from a ``counts`` block: 0 below ``min_count``, the count itself if ``weighted``.

    ``None`` means every row weighs 1 (no counts asked for).
    """
    if counts is None or (min_count <= 0 and not weighted):
        return None
    counts = np.asarray(counts, dtype=np.float64)
    w = counts.copy() if weighted else np.ones_like(counts)
    w[counts < min_count] = 0.0
    return w


def first_bad_count(counts: np.ndarray | None) -> int | None:
    """The first row whose count is negative or not finite."""
    if counts is None:
        return None
    bad = np.flatnonzero(~np.isfinite(counts.astype(np.float64)) | (counts < 0))
    return int(bad[0]) if bad.size else None
