"""The small maths of stabilization: numpy in, numpy out, no Dask, no I/O.

Everything here works on e x e matrices (Gram and cross-Gram matrices of the
tables, accumulated in float64 by :mod:`dstab.stats`). Notation follows
docs/design.md: items ``T`` (n x e), users ``W`` (m x e), scores ``S = W T^T``.

1. ``R`` is any square root of the Gram matrix (``R^T R = T^T T``); we take it
   from the symmetric eigendecomposition, which is rank revealing and never
   fails on a singular Gram (Cholesky would).
2. Core SVD ``R_T R_W^T = U Σ V^T``, truncated to rank ``k``.
3. ``M_T = R_W^T V Σ^-1/2`` and ``M_W = R_T^T U Σ^-1/2``: ``T M_T`` and
   ``W M_W`` have the same scores and both have Gram ``Σ`` (balanced).
4. Orthogonal Procrustes onto the reference, or a deterministic sign rule.

A model is a list of *sides*, each a group of tables sharing one transform
(:mod:`dstab.structure`): two sides (candidate, query) for two-sided models,
whose transforms come from steps 1-3 on the pooled Gram of each side's tables;
one side for symmetric models, whose transform is orthogonal (the principal
axes of the pooled Gram, :func:`symmetric_transform`). Steps 4 are the same for
both: ``Ω`` is fitted on every anchor table's cross-Gram and shared by all sides.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InputError, UsageError

# The Gram path squares the condition number: in float64 it resolves singular
# values of a table down to about sqrt(eps64) ~ 1.5e-8 of the largest, so no
# default threshold may go below that.
_GRAM_FLOOR = float(np.sqrt(np.finfo(np.float64).eps))


def default_rtol(dtype: np.dtype | type, dim: int) -> float:
    """Relative singular-value threshold below which a core dimension is noise.

    A table stored in ``dtype`` carries rounding noise of about ``eps * sqrt(dim)``
    of its largest singular value, and the scores inherit it; ``dim * eps`` keeps
    a safety factor of ``sqrt(dim)`` above that (7.6e-6 for float32 at dim 64).
    """
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return max(dim * eps, _GRAM_FLOOR)


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """Return ``R`` (e x e) with ``R^T R = gram``, for a symmetric PSD ``gram``.

    ``R = diag(sqrt(λ)) V^T`` from ``gram = V diag(λ) V^T``; eigenvalues that
    rounding pushed below zero are clamped, so a rank-deficient Gram gives a
    rank-deficient ``R`` rather than an error.
    """
    gram = np.asarray(gram, dtype=np.float64)
    sym = 0.5 * (gram + gram.T)
    lam, vec = np.linalg.eigh(sym)
    return np.sqrt(np.clip(lam, 0.0, None))[:, None] * vec.T


@dataclass(frozen=True)
class Canonical:
    """Canonical transforms of one version, one per side: rows of side ``i`` map by ``X @ transforms[i]``.

    ``singular_values`` holds the whole spectrum of the scores (length e,
    descending); only the first ``rank`` were kept.
    """

    transforms: tuple[np.ndarray, ...]  # e x k each: (candidate, query) for two-sided, (all,) for symmetric
    singular_values: np.ndarray  # e
    rank: int

    @property
    def m_items(self) -> np.ndarray:
        """The candidate side's transform (items in the default model)."""
        return self.transforms[0]

    @property
    def m_users(self) -> np.ndarray:
        """The query side's transform (users in the default model; the same as m_items when symmetric)."""
        return self.transforms[-1]


def choose_rank(singular_values: np.ndarray, rank: int | Literal["auto"], rtol: float) -> int:
    """Number of core dimensions to keep: a fixed ``rank`` or those above ``rtol * σ_max``."""
    sv = np.asarray(singular_values, dtype=np.float64)
    if sv.size == 0 or not sv[0] > 0.0:
        return 0
    if rank == "auto":
        return int(np.count_nonzero(sv > rtol * sv[0]))
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise UsageError(f"rank must be 'auto' or a positive integer, got {rank!r}")
    if rank > sv.size:
        raise UsageError(
            f"rank={rank} is larger than the embedding width {sv.size}; pass --rank {sv.size} or less, or --rank auto"
        )
    if not sv[rank - 1] > 0.0:
        kept = int(np.count_nonzero(sv > 0.0))
        raise InputError(
            f"rank={rank} asked for, but the scores have only {kept} non-zero "
            f"singular values; pass --rank {kept} or --rank auto"
        )
    return int(rank)


def core_svd(r_items: np.ndarray, r_users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD ``U, σ, V^T`` of the core ``R_T R_W^T``; σ are the singular values of the score matrix."""
    return np.linalg.svd(r_items @ r_users.T)


def canonical_transforms(
    r_items: np.ndarray,
    r_users: np.ndarray,
    *,
    rank: int | Literal["auto"] = "auto",
    rtol: float,
) -> Canonical:
    """Steps 2-4 of docs/design.md ("The maths") from the two factors (``R^T R`` = Gram; any square root works)."""
    u, sv, vt = core_svd(r_items, r_users)
    k = choose_rank(sv, rank, rtol)
    if k == 0:
        raise InputError(
            "the interaction of items and users is zero (every score is 0): items/vectors or users/vectors "
            "is all zeros, or their rows span orthogonal subspaces; check the tables were exported correctly"
        )
    inv_sqrt = 1.0 / np.sqrt(sv[:k])
    m_items = (r_users.T @ vt[:k].T) * inv_sqrt
    m_users = (r_items.T @ u[:, :k]) * inv_sqrt
    return Canonical(transforms=(m_items, m_users), singular_values=sv, rank=k)


def symmetric_transform(r: np.ndarray, *, rank: int | Literal["auto"] = "auto", rtol: float) -> Canonical:
    """The orthogonal canonical transform of a symmetric model from ``R`` (``R^T R`` = the pooled Gram).

    With ``R = P Σ V^T``, the rows' principal axes are ``V`` and the scores
    ``X X^T`` have singular values ``σ²``: the rank step keeps the axes whose
    ``σ²`` is above ``rtol`` of the largest (as for two-sided cores), so the
    directions with no energy (a collapsed model) are dropped and every dot
    product is kept. ``X V_k`` has Gram ``diag(σ²)``.
    """
    _, sigma, vt = np.linalg.svd(np.asarray(r, dtype=np.float64))
    sv = sigma**2
    k = choose_rank(sv, rank, rtol)
    if k == 0:
        raise InputError("every vector of every table is zero; check the tables were exported correctly")
    return Canonical(transforms=(vt[:k].T,), singular_values=sv, rank=k)


# Above this condition number (among the singular values a float32 table can
# resolve at all), the Gram path's relative error on the smallest of them,
# about eps64 * κ², passes 1e-8, and `auto` switches to Householder TSQR.
GRAM_MAX_CONDITION = 1e4


def gram_is_accurate(gram: np.ndarray, dtype: np.dtype | type) -> bool:
    """Whether the float64 Gram of a table in ``dtype`` resolves every singular value the data holds.

    Singular values below ``dim * eps(dtype) * σ_max`` are the data's own rounding
    noise and are ignored; among the rest the condition number must stay under
    :data:`GRAM_MAX_CONDITION`. Tables stored in float64 carry more precision
    than the Gram path keeps, so they always take the Householder path.
    """
    if np.dtype(dtype) == np.dtype(np.float64):
        return False
    sigma = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (gram + gram.T)), 0.0, None))
    if sigma.size == 0 or sigma[-1] == 0.0:
        return True
    floor = gram.shape[0] * float(np.finfo(np.dtype(dtype)).eps) * sigma[-1]
    signal = sigma[sigma > floor]
    return bool(sigma[-1] / signal[0] <= GRAM_MAX_CONDITION)


def qr_factor(rows: np.ndarray) -> np.ndarray:
    """Householder ``R`` (e x e, zero-padded when fewer rows than columns) of ``rows`` in float64."""
    e = rows.shape[1]
    r: np.ndarray = np.linalg.qr(np.asarray(rows, dtype=np.float64), mode="r")  # type: ignore[assignment]  # mode="r" returns R alone
    if r.shape[0] < e:
        r = np.vstack([r, np.zeros((e - r.shape[0], e))])
    return r


def procrustes(cross: np.ndarray) -> np.ndarray:
    """Orthogonal ``Ω`` maximising ``tr(Ω^T cross)``: ``argmin ||X Ω - Y||_F`` for ``cross = X^T Y``.

    ``cross`` must be square (pad it first).
    """
    p, _, qt = np.linalg.svd(cross)
    return p @ qt


def pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` with zero columns appended up to ``width``."""
    out = np.zeros((a.shape[0], width), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


Probe = tuple[np.ndarray, np.ndarray, int]  # (column sums, sample rows, row count) of one side, raw coordinates


def alignment(
    canonical: Canonical,
    crosses: Sequence[np.ndarray | None],
    ref_width: int,
    probes: Sequence[Probe],
) -> np.ndarray:
    """Rotation ``Ω`` (k x w, orthonormal rows, ``w = max(k, ref_width)``) onto the reference.

    ``crosses[i]`` is side ``i``'s raw cross-Gram ``X^T X_ref`` (e x ref_width),
    summed over its anchor tables, or ``None`` for a side with no anchor table.
    The canonical cross matrix is ``M_i^T (X^T X_ref)``; every side is
    zero-padded to width ``w`` and the same ``Ω`` is applied to all, so
    ``Ω Ω^T = I_k`` keeps every score.

    When the new version is wider than the reference (k > ref_width), the
    reference fixes only the first ref_width columns; the others are free, and
    are made deterministic: principal axes of what is left, in decreasing
    order, with signs from :func:`column_signs`.
    """
    k = canonical.rank
    width = max(k, ref_width)
    total = np.zeros((width, width))
    for m, cross in zip(canonical.transforms, crosses):
        if cross is not None:
            total[:k, :ref_width] += m.T @ cross
    omega = procrustes(total)[:k, :]
    if k > ref_width:
        free = omega[:, ref_width:]
        variances, axes = np.linalg.eigh(free.T @ (canonical.singular_values[:k, None] * free))
        free = free @ axes[:, ::-1]
        variances = variances[::-1]
        signs = column_signs([m @ free for m in canonical.transforms], variances, probes)
        omega[:, ref_width:] = free * signs
    return omega


def column_signs(transforms: Sequence[np.ndarray], variances: np.ndarray, probes: Sequence[Probe]) -> np.ndarray:
    """±1 per output column, decided by the data alone.

    ``transforms[i]`` maps raw rows of side ``i`` to the columns in question, and
    ``probes[i]`` summarises that side's rows; ``variances`` are the columns'
    squared norms. For every column the sign is taken from the first decisive
    of: each side's column sum in turn (the candidate side first), then the
    largest-magnitude sampled value of each side. The columns are the same for
    every reparametrisation up to sign, so this rule gives the same output
    whatever basis the model used.
    """
    k = transforms[0].shape[1]
    signs = np.ones(k)
    for j in range(k):
        decided = False
        # A column sum is at most sqrt(n * variance) in size (Cauchy-Schwarz);
        # below 1e-3 of that it is too close to zero to survive input rounding.
        for (row_sums, _, n_rows), m in zip(probes, transforms):
            value = float(row_sums @ m[:, j])
            if abs(value) > 1e-3 * np.sqrt(max(n_rows, 1) * max(variances[j], 0.0)):
                signs[j] = np.sign(value)
                decided = True
                break
        if decided:
            continue
        for (_, sample, _), m in zip(probes, transforms):
            if sample.shape[0] == 0:
                continue
            column = sample @ m[:, j]
            value = float(column[np.argmax(np.abs(column))])
            if value != 0.0:
                signs[j] = np.sign(value)
                break
    return signs


def sign_alignment(canonical: Canonical, probes: Sequence[Probe]) -> np.ndarray:
    """Diagonal ±1 (k x k) that fixes the canonical columns' signs when there is no reference."""
    k = canonical.rank
    return np.diag(column_signs(canonical.transforms, canonical.singular_values[:k], probes))


def pooled_probe(probes: Sequence[Probe]) -> Probe:
    """One side's probe from its tables' probes: column sums and counts added, samples stacked."""
    return (
        np.sum([p[0] for p in probes], axis=0),
        np.concatenate([p[1] for p in probes]),
        int(sum(p[2] for p in probes)),
    )


def squared_drift(
    transform: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    ref_sumsq: float,
) -> float:
    """``||X A - pad(X_ref)||_F^2`` from statistics alone, for ``A`` = ``transform`` (e x w).

    ``cross = X^T X_ref`` (e x w_ref), ``ref_sumsq = ||X_ref||_F^2``; the narrower
    side is zero-padded. Exact up to float64 rounding, no pass over the rows.
    """
    w = min(transform.shape[1], cross.shape[1])
    value = np.trace(transform.T @ gram @ transform) - 2.0 * np.trace(transform[:, :w].T @ cross[:, :w]) + ref_sumsq
    return max(float(value), 0.0)


def identity_drift(gram: np.ndarray, cross: np.ndarray, ref_sumsq: float) -> float:
    """``||pad(X) - pad(X_ref)||_F^2``: how far the raw table is from the reference."""
    return squared_drift(np.eye(gram.shape[0]), gram, cross, ref_sumsq)


def column_drift(transform: np.ndarray, gram: np.ndarray, cross: np.ndarray, ref_col_sumsq: np.ndarray) -> np.ndarray:
    """``||(X A)[:, j] - pad(X_ref)[:, j]||^2`` for every output column ``j``, from statistics alone.

    The result has ``max(w, w_ref)`` entries; columns one side lacks count as zeros.
    """
    w, w_ref = transform.shape[1], len(ref_col_sumsq)
    out = np.zeros(max(w, w_ref))
    # diag(A^T G A) through one matrix product: the three-operand einsum loops in O(e^3) without BLAS
    # (0.3 s at width 512, 2 s at 1,024)
    out[:w] += np.einsum("ij,ij->j", transform, gram @ transform)
    common = min(w, w_ref)
    out[:common] -= 2.0 * np.einsum("ij,ij->j", transform[:, :common], cross[:, :common])
    out[:w_ref] += ref_col_sumsq
    return np.clip(out, 0.0, None)


# A float32 product ``rows @ T`` errs by about eps32 * cond(T) of each row, since raw rows are large
# where T is small (measured: the score error of stabilized versions grew as 3e-9 x cond(T), from 1.3e-7 at
# cond 10 to 4e-5 at cond 1.3e4, on chains of synthetic retrains whose bases compound). Up to this
# condition it stays below 4e-7, a few float32 roundings; above it the product runs in float64, slice by
# slice, and only its result is rounded to float32 (3.6e-8 at cond 1.3e4). The float64 product costs
# 2.8x the float32 one (105 vs 37 ms per 262,144 x 64 block, one thread), a third more on the write pass,
# so it is kept for the transforms that need it.
FLOAT32_PRODUCT_MAX_CONDITION = 128.0
# rows per float64 slice: a few MiB, never a float64 copy of a whole block
PRODUCT_SLICE_ROWS = 8192


@functools.lru_cache(maxsize=64)
def _condition(key: bytes, shape: tuple[int, ...]) -> float:
    m = np.frombuffer(key, dtype=np.float64).reshape(shape)
    s = np.linalg.svd(m, compute_uv=False) if m.size else np.ones(1)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def transform_condition(transform: np.ndarray) -> float:
    """The condition number of a transform (its largest over its smallest singular value); cached by value."""
    t = np.ascontiguousarray(transform, dtype=np.float64)
    return _condition(t.tobytes(), t.shape)


def transform_rows(rows: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``rows @ transform`` in the rows' own dtype (float32 stays float32): how every stabilized row is made.

    float32 rows go through a float32 product while ``transform`` is well conditioned, and a float64 one
    otherwise (see :data:`FLOAT32_PRODUCT_MAX_CONDITION`), so the score error stays at float32 rounding.
    """
    if rows.dtype != np.float32 or transform_condition(transform) <= FLOAT32_PRODUCT_MAX_CONDITION:
        return rows @ transform.astype(rows.dtype, copy=False)
    t = np.asarray(transform, dtype=np.float64)
    out = np.empty((rows.shape[0], t.shape[1]), dtype=np.float32)
    for start in range(0, rows.shape[0], PRODUCT_SLICE_ROWS):
        part = slice(start, start + PRODUCT_SLICE_ROWS)
        out[part] = np.asarray(rows[part], dtype=np.float64) @ t
    return out


def pad_vector(v: np.ndarray, width: int) -> np.ndarray:
    """``v`` with zeros appended up to ``width``."""
    out = np.zeros(width)
    out[: len(v)] = v
    return out
