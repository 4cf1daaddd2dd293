"""Nearest neighbours of a few query rows against a whole table, out of core: blockwise top-k, then a merge.

Similarity is cosine (what ANN indexes built on embeddings usually rank by).
Each task scores the queries against one block of rows (in slices, so the
score matrix stays small), keeps the best ``k + 1`` per query, and a binary
tree merges the candidates; the query itself (same key) is dropped at the end.
Neighbour overlap@k between two versions compares the key sets of a query's
neighbours in each.
"""

from __future__ import annotations

import functools
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed

from . import config
from .executor import tree_reduce
from .linalg import transform_rows
from .store import Table, load, row_starts

# Rows scored against all queries at once: dask config dstab.neighbour-slice-rows
# (8,192; 1,000 queries x 8,192 rows of float32 scores is 32 MiB), read on the
# client by top_neighbours and passed to the kernels.


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _keep_best(sims: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest per row of ``sims`` (q x m) with their keys, unordered."""
    if sims.shape[1] <= k:
        return sims, keys
    top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(sims, top, axis=1), np.take_along_axis(keys, top, axis=1)


def _merge_candidates(
    best_s: np.ndarray, best_k: np.ndarray, q_idx: np.ndarray, cand_s: np.ndarray, cand_k: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best per query of the current best (q x k) and scattered candidates ``(query, sim, key)``."""
    q, k = best_s.shape
    all_q = np.concatenate([np.repeat(np.arange(q), k), q_idx])
    all_s = np.concatenate([best_s.ravel(), cand_s])
    all_k = np.concatenate([best_k.ravel(), cand_k])
    order = np.lexsort((-all_s, all_q))  # by query, then best first
    counts = np.bincount(all_q, minlength=q)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    keep = order[rank < k]  # every query has at least its k current best
    return all_s[keep].reshape(q, k), all_k[keep].reshape(q, k)


def _block_topk(
    block: Any,
    keys_block: Any | None,
    offset: int,
    queries: np.ndarray,
    transform: np.ndarray | None,
    k: int,
    slice_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` cosine neighbours of each query among one block's rows (optionally transformed first).

    The first slice is reduced with a partial sort; after that only scores
    above each query's current k-th best are candidates, a tiny share of a
    slice, which makes the pass about as fast as the matrix product itself.
    """
    from .ids import normalize_ids

    rows = load(block)
    keys = load(keys_block)
    keys = normalize_ids(keys) if keys is not None else np.arange(offset, offset + len(rows), dtype=np.int64)
    best_s = best_k = None
    for start in range(0, len(rows), slice_rows):
        part = rows[start : start + slice_rows]
        if transform is not None:
            part = transform_rows(part, transform)
        sims = queries @ unit_rows(part).T
        part_keys = keys[start : start + slice_rows]
        if best_s is None or best_s.shape[1] < k:
            merged_s = sims if best_s is None else np.hstack([best_s, sims])
            merged_k = np.broadcast_to(part_keys, sims.shape)
            merged_k = merged_k if best_k is None else np.hstack([best_k, merged_k])
            best_s, best_k = _keep_best(merged_s, merged_k, k)
            continue
        # flat indices: numpy's 2-D nonzero was measured 5x slower than this
        flat = np.flatnonzero(sims > best_s.min(axis=1)[:, None])
        q_idx, r_idx = np.divmod(flat, sims.shape[1])
        if q_idx.size:
            assert best_k is not None  # set with best_s
            best_s, best_k = _merge_candidates(best_s, best_k, q_idx, sims[q_idx, r_idx], part_keys[r_idx])
    if best_s is None or best_k is None:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), keys.dtype)
    return best_s, best_k


def _merge_topk(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    return _keep_best(np.hstack([a[0], b[0]]), np.hstack([a[1], b[1]]), k)


def top_neighbours(table: Table, queries: np.ndarray, k: int, *, transform: np.ndarray | None = None) -> Delayed:
    """Delayed ``(similarities, keys)``, each q x (k + 1), of the queries' nearest rows in ``table``.

    ``queries`` are rows in the table's (transformed) space; keys are the
    table's ids, or row positions when it has none.
    """
    unit = unit_rows(queries)
    slice_rows = config.get("neighbour-slice-rows")  # read here, on the client: workers do not see dask.config.set
    chunks = table.row_chunks()
    id_blocks = table.id_blocks(chunks) or [None] * len(chunks)
    parts = [
        dask.delayed(_block_topk, pure=True)(block, ids, start, unit, transform, k + 1, slice_rows)
        for block, ids, start in zip(table.blocks(chunks), id_blocks, row_starts(chunks))
    ]
    return tree_reduce(parts, functools.partial(_merge_topk, k=k + 1))


Search = tuple[Table, np.ndarray, "np.ndarray | None"]  # table, query rows in its space, transform applied to its rows


def neighbour_sets(
    groups: list[list[Search]], keys: list[np.ndarray], k: int, *, progress: bool = False
) -> list[list[list[set]]]:
    """Run every search of every group in one pass over the tables; per group, per search, the queries' key sets.

    All searches of a group share the query keys ``keys[group]`` (the same
    sampled rows, seen in several tables or spaces), so their key sets compare.
    """
    from .executor import compute

    graphs = [
        top_neighbours(table, rows, k, transform=transform) for group in groups for table, rows, transform in group
    ]
    found = iter(compute(*graphs, progress=progress, stage="neighbour search")) if graphs else iter(())
    return [[neighbour_keys(next(found), group_keys, k) for _ in group] for group, group_keys in zip(groups, keys)]


def neighbour_keys(found: tuple[np.ndarray, np.ndarray], query_keys: np.ndarray, k: int) -> list[set]:
    """The ``k`` best keys per query, without the query itself."""
    sims, keys = found
    out = []
    for i in range(len(query_keys)):
        order = np.argsort(-sims[i], kind="stable")
        chosen = [key for key in keys[i][order].tolist() if key != query_keys[i].item()][:k]
        out.append(set(chosen))
    return out


def overlap(a: list[set], b: list[set], k: int) -> float:
    """Mean share of a query's k neighbours found in both versions.

    A table of k rows or fewer gives each query fewer than k neighbours: the
    share is then of the neighbours there are, so that identical neighbourhoods
    score 1 whatever the table's size.
    """
    if not a:
        return float("nan")
    return float(np.mean([len(x & y) / max(1, min(k, max(len(x), len(y)))) for x, y in zip(a, b)]))
