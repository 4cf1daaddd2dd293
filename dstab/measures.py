"""How far one version is from another, from the statistics of one pass (numpy only, plus the neighbour search).

Shared by :func:`dstab.stabilize` (drift before and after the transform it
fits) and :mod:`dstab.report` (drift between two written versions), so both
measure the same thing the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import linalg
from .stats import TableStats
from .store import Table

# Knobs (dask config, see dstab.config): dstab.neighbours-k, the k of neighbour
# overlap@k (10), and dstab.query-rows, the rows of each table whose neighbours
# are searched, a sample of the common rows (1,000).


def mean_row_cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    """Mean cosine between paired rows (widths zero-padded: the dot runs over the common columns)."""
    if len(x) == 0:
        return None
    w = min(x.shape[1], y.shape[1])
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    dots = np.einsum("ij,ij->i", x64[:, :w], y64[:, :w])
    norms = np.linalg.norm(x64, axis=1) * np.linalg.norm(y64, axis=1)
    return float(np.mean(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)))


def paired_score_error(query: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Relative Frobenius difference, between two versions, of the scores of sampled query rows x sampled candidate rows.

    Each argument is ``(rows in the version, the same rows in the other)``; for
    a symmetric model pass the same pooled sample twice.
    """
    (q_new, q_ref), (c_new, c_ref) = query, candidate
    if min(len(q_new), len(c_new)) == 0:
        return None
    s_new = q_new.astype(np.float64) @ c_new.astype(np.float64).T
    s_ref = q_ref.astype(np.float64) @ c_ref.astype(np.float64).T
    scale = np.linalg.norm(s_ref)
    return float(np.linalg.norm(s_new - s_ref) / scale) if scale > 0 else None


def pooled_pairs(stats: dict[str, TableStats], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The sampled row pairs of ``names`` stacked: (rows here, the same rows in the reference)."""
    found = [p for p in (stats[n].pairs for n in names if n in stats) if p is not None and len(p.keys)]
    if not found:
        return None
    width = max(p.new.shape[1] for p in found), max(p.ref.shape[1] for p in found)
    return (
        np.concatenate([linalg.pad_columns(p.new, width[0]) for p in found]),
        np.concatenate([linalg.pad_columns(p.ref, width[1]) for p in found]),
    )


def table_drift(stats: TableStats, transform: np.ndarray | None) -> dict[str, Any]:
    """Squared drift of one table onto the reference (rows ``X @ transform``; ``None``: the rows as they are).

    Returns the squared Frobenius distance ``sq``, the reference's squared norm
    ``scale``, the same per output column (``col_sq``, ``col_scale``; widths
    zero-padded), and the mean row cosine of the sampled pairs.
    """
    assert stats.cross is not None, "drift needs statistics taken against a reference"
    transform = np.eye(stats.gram.shape[0]) if transform is None else transform
    gram = stats.gram_of_anchors
    pairs = stats.pairs
    return {
        "sq": linalg.squared_drift(transform, gram, stats.cross, stats.ref_sumsq),
        "scale": stats.ref_sumsq,
        "col_sq": linalg.column_drift(transform, gram, stats.cross, stats.ref_col_sumsq),  # type: ignore[arg-type]
        "col_scale": np.asarray(stats.ref_col_sumsq),
        "cosine": mean_row_cosine(pairs.new @ transform, pairs.ref) if pairs is not None else None,
    }


# Eigenvalues of a Gram below this share of its largest are taken as zero when
# finding the orthonormal basis: float32 rows give Gram eigenvalues accurate to
# about (eps32 * sqrt(n))^2 relative, far below this, and a direction that weak
# carries nothing of the scores.
OVERLAP_RTOL = 1e-10


def _range_whitener(gram: np.ndarray) -> np.ndarray:
    """``P`` (e x r) with ``X P`` an orthonormal basis of the column space of ``X``, from ``G = X^T X`` alone."""
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    keep = values > OVERLAP_RTOL * max(float(values[-1]), 0.0) if len(values) else np.zeros(0, bool)
    if not keep.any():
        return np.zeros((gram.shape[0], 0))
    return vectors[:, keep] / np.sqrt(values[keep])


def eigenspace_overlap(gram: np.ndarray, ref_gram: np.ndarray, cross: np.ndarray) -> float | None:
    """Eigenspace overlap of two tables over their paired rows (Leszczynski et al. 2020): ``||U^T V||_F^2 / k``.

    ``U`` and ``V`` are orthonormal bases of the column spaces of the two
    tables ``X`` and ``Y`` (rows paired), ``k`` the larger of their ranks: 1
    when both span the same space, 0 when orthogonal; unchanged by any
    invertible transform of either table's columns, so stabilization leaves it
    as the retrain made it. From the pass's ``X^T X``, ``Y^T Y`` and ``X^T Y``
    alone: ``U^T V = P^T (X^T Y) Q`` with ``X P`` and ``Y Q`` orthonormal.
    """
    p, q = _range_whitener(gram), _range_whitener(ref_gram)
    k = max(p.shape[1], q.shape[1])
    if k == 0:
        return None
    w = min(cross.shape[1], ref_gram.shape[0])
    m = p.T @ cross[:, :w] @ q[:w]
    return float(min(1.0, np.vdot(m, m) / k))


def stats_overlap(stats: TableStats) -> float | None:
    """:func:`eigenspace_overlap` of a table and its reference, over the anchor rows of the pass."""
    if stats.cross is None or stats.ref_gram is None:
        return None
    return eigenspace_overlap(stats.gram_of_anchors, stats.ref_gram, stats.cross)


def moved_rows(stats: TableStats) -> list[dict[str, Any]]:
    """The rows that moved most, largest first: ``{"id", "distance", "cosine"}`` (``id``: the row's id, or its position)."""
    moved = stats.moved
    if moved is None:
        return []
    keys = moved.keys.tolist()
    return [
        {"id": key, "distance": float(d), "cosine": float(c)} for key, d, c in zip(keys, moved.distance, moved.cosine)
    ]


def relative(sq: float, scale: float) -> float | None:
    """``sqrt(sq / scale)``: a relative Frobenius distance (``None`` when there is nothing to compare)."""
    return float(np.sqrt(sq / scale)) if scale > 0 else None


def relative_per_dim(measures: Sequence[dict[str, Any]], width: int = 0) -> list[float | None]:
    """Relative drift per output column, summed over tables (widths zero-padded to at least ``width``)."""
    width = max([width] + [len(m["col_sq"]) for m in measures])
    sq = sum(linalg.pad_vector(m["col_sq"], width) for m in measures)
    scale = sum(linalg.pad_vector(m["col_scale"], width) for m in measures)
    return [relative(float(v), float(c)) for v, c in zip(sq, scale)]  # type: ignore[arg-type]


def neighbour_overlaps(
    groups: Mapping[str, Sequence[tuple[Table, np.ndarray, np.ndarray | None]]],
    keys: dict[str, np.ndarray],
    k: int,
    *,
    progress: bool = False,
) -> dict[str, list[list[set[Any]]]]:
    """Neighbour key sets of each table's query rows in each of its searches (one graph for all tables).

    ``groups[name]`` lists searches ``(table, query rows, transform of the
    table's rows or None)``; the result lists, per table, the neighbour keys of
    every search, in the same order, ready for :func:`dstab.neighbours.overlap`.
    """
    from .neighbours import neighbour_sets

    names = list(groups)
    found = neighbour_sets([list(groups[n]) for n in names], [keys[n] for n in names], k, progress=progress)
    return dict(zip(names, found))
