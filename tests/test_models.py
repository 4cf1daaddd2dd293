"""Any embedding model: two-sided models of several tables per side, and symmetric models, against numpy.

Every expectation is computed here in float64 numpy from the tables as stored
(Householder QR and SVD, no dstab code): the scores the structure defines, the
balanced (two-sided) or orthogonal (symmetric) canonical form, and the
orthogonal Procrustes optimum onto a reference, fitted on every anchor table
jointly. Tolerances are either the issue's (1e-5 relative on float32 scores,
1e-6 on a relative drift) or derived from float32 rounding (see
:func:`two_sided_bounds` and :func:`symmetric_bounds`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab

from conftest import random_basis

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# What the issue asks of float32 outputs: every score kept to 1e-5 relative (Frobenius).
SCORE_RTOL = 1e-5
# A drift from statistics (float64) against the same drift computed here: both are exact up to float64
# rounding of float32 data, and the written float32 rows move it by at most (e + 1) eps32 relative.
DRIFT_ATOL = 1e-6
FAST = ("--scheduler", "threads", "--no-progress")


# ----------------------------------------------------------------------------- data


def model_table(rng: np.random.Generator, n: int, dim: int, rank: int | None = None, decay: float = 4.0) -> np.ndarray:
    """Rows like a trained table: a decaying spectrum of ``rank`` directions and a non-zero mean, float32."""
    k = rank or dim
    scale = np.exp(-np.arange(k) / decay) + 0.1
    latent = rng.normal(size=(n, k)) + 0.3
    return (latent @ (scale[:, None] * rng.normal(size=(k, dim)))).astype(np.float32)


def noisy(rng: np.random.Generator, x: np.ndarray, level: float = 0.01) -> np.ndarray:
    """``x`` plus Gaussian noise of ``level`` times its own rms, in float64 (a retrain's noise)."""
    x64 = x.astype(np.float64)
    return x64 + level * np.sqrt(np.mean(x64**2)) * rng.normal(size=x.shape)


def random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def write_tables(
    path: Path | str, tables: dict[str, np.ndarray], ids: dict[str, np.ndarray] | None = None, chunk_rows: int = 64
) -> str:
    """A raw version of named tables written with plain zarr: NAME/vectors (+ NAME/ids)."""
    group = zarr.open_group(str(path), mode="w")
    for name, vectors in tables.items():
        group.create_array(
            f"{name}/vectors", shape=vectors.shape, chunks=(chunk_rows, vectors.shape[1]), dtype=vectors.dtype
        )[...] = vectors
        if ids is not None and name in ids:
            with warnings.catch_warnings():  # fixed-width strings have no Zarr v3 spec yet: zarr warns, reads fine
                warnings.simplefilter("ignore")
                array = group.create_array(
                    f"{name}/ids", shape=ids[name].shape, chunks=(chunk_rows,), dtype=ids[name].dtype
                )
            array[...] = ids[name]
    return str(path)


def write_loose_table(
    path: Path | str, vectors: np.ndarray, ids: np.ndarray | None = None, chunk_rows: int = 64
) -> str:
    """A loose table (what `dstab apply` maps): vectors (+ ids) at the group's top."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("vectors", shape=vectors.shape, chunks=(chunk_rows, vectors.shape[1]), dtype=vectors.dtype)[
        ...
    ] = vectors
    if ids is not None:
        group.create_array("ids", shape=ids.shape, chunks=(chunk_rows,), dtype=ids.dtype)[...] = ids
    return str(path)


def read_output(path: Path | str, names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[f"{name}/vectors"][...] for name in names}


def stabilized_in_memory(result: dstab.Stabilization) -> dict[str, np.ndarray]:
    return {name: result.stabilized(name).compute() for name in result.new.names}


# ----------------------------------------------------------------------------- numpy references


def r_factor(rows: np.ndarray) -> np.ndarray:
    """Householder R (e x e, zero rows appended when there are fewer rows than columns), float64."""
    e = rows.shape[1]
    r = np.linalg.qr(rows.astype(np.float64), mode="r")
    return np.vstack([r, np.zeros((e - r.shape[0], e))]) if r.shape[0] < e else r


def np_two_sided(
    query: list[np.ndarray], candidate: list[np.ndarray], rtol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M_query, M_candidate, σ): the balanced canonical transforms from each side's stacked tables.

    ``R_C R_Q^T = U Σ V^T``; ``M_C = R_Q^T V Σ^-1/2``, ``M_Q = R_C^T U Σ^-1/2``, so that
    ``(Q M_Q)(C M_C)^T = Q C^T`` for every query table Q and candidate table C,
    and both sides' stacked outputs have Gram ``Σ``.
    """
    r_q, r_c = r_factor(np.vstack(query)), r_factor(np.vstack(candidate))
    u, s, vt = np.linalg.svd(r_c @ r_q.T)
    k = int(np.sum(s > rtol * s[0]))
    return (r_c.T @ u[:, :k]) / np.sqrt(s[:k]), (r_q.T @ vt[:k].T) / np.sqrt(s[:k]), s


def np_symmetric(tables: list[np.ndarray], rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """(V_k, λ): the principal axes of every row of every table, and the eigenvalues of their Gram."""
    _, sigma, vt = np.linalg.svd(np.vstack(tables).astype(np.float64), full_matrices=False)
    lam = np.concatenate([sigma**2, np.zeros(tables[0].shape[1] - len(sigma))])
    k = int(np.sum(lam > rtol * lam[0]))
    return vt[:k].T, lam


def np_procrustes(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Orthogonal Ω minimising ``Σ ||X Ω - Y||_F^2`` over every (X, Y) pair jointly."""
    cross = sum(x.astype(np.float64).T @ y.astype(np.float64) for x, y in pairs)
    p, _, qt = np.linalg.svd(cross)
    return p @ qt


def np_drift(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Relative Frobenius drift ``sqrt(Σ ||X - Y||^2 / Σ ||Y||^2)`` (dstab's ``drift_after`` definition)."""
    sq = sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)) for x, y in pairs)
    scale = sum(float(np.sum(y.astype(np.float64) ** 2)) for _, y in pairs)
    return float(np.sqrt(sq / scale))


def score_error(a: np.ndarray, b: np.ndarray, a_out: np.ndarray, b_out: np.ndarray) -> tuple[float, float]:
    """(absolute, relative) Frobenius error of the scores ``a b^T`` after stabilization."""
    s = a.astype(np.float64) @ b.astype(np.float64).T
    err = float(np.linalg.norm(a_out.astype(np.float64) @ b_out.astype(np.float64).T - s))
    return err, err / float(np.linalg.norm(s))


def default_rtol(dim: int) -> float:
    """The documented default rank threshold for float32 tables: ``max(dim * eps32, sqrt(eps64))``."""
    return max(dim * EPS32, float(np.sqrt(EPS64)))


# ----------------------------------------------------------------------------- error bounds


def two_sided_bounds(query: list[np.ndarray], candidate: list[np.ndarray], report: dict[str, Any]) -> dict[str, Any]:
    """Absolute bounds on a two-sided float32 output, the derivation of tests/test_bad_input.py ``error_bounds``.

    The tables of a side share one transform fitted on their stacked rows, so
    the side *is* one table for the maths: the bound on the stacked score matrix
    ``Q C^T`` (``scores``) bounds every (query table, candidate table) block of
    it, and the bound on one side's Gram entry by entry (``gram``) holds for
    each side's stacked output Gram against ``diag(σ)`` (both sides: ``2 gram``
    between them). ``c = ((e + 1) eps32 + β) ||Q||_F ||C||_F`` with β the fit's
    backward error (``sqrt(g)`` on the Gram path, ``g`` for TSQR, ``g = (n + e)
    eps64``); scores: ``2 k c + c² Σ 1/σ_j`` + the σ error + the rank step's
    ``sqrt(e - k) rtol σ_1``.
    """
    sv = np.asarray(report["singular_values"], dtype=np.float64)
    e, k = len(sv), int(report["rank"])
    norm_q = float(np.linalg.norm(np.vstack(query).astype(np.float64)))
    norm_c = float(np.linalg.norm(np.vstack(candidate).astype(np.float64)))
    g = (sum(len(t) for t in query + candidate) + e) * EPS64
    beta = float(np.sqrt(g)) if report["method"] == "gram" else g
    c = ((e + 1) * EPS32 + beta) * norm_q * norm_c
    s = sv[:k]
    ratio = np.sqrt(s[:, None] / s[None, :])
    gram = c * (ratio + 1 / ratio) + c**2 / np.sqrt(s[:, None] * s[None, :])
    sv_error = (2 * beta + beta**2) * norm_q * norm_c
    return {
        "scores": 2 * k * c + c**2 * float(np.sum(1 / s)) + sv_error + np.sqrt(e - k) * report["rtol"] * sv[0],
        "gram": gram + np.diag(np.full(k, sv_error)),
    }


def symmetric_bounds(tables: list[np.ndarray], report: dict[str, Any]) -> dict[str, Any]:
    """Absolute bounds on a symmetric float32 output ``X_out = fl(X fl(V))``, V the fitted axes (e x k).

    * Output rounding: ``|F| <= (e + 1) eps32 |X| |V|`` (``eps``, not ``u``: a factor 2 to
      spare), so ``||F_A||_F <= f ||A||_F`` with ``f = (e + 1) eps32 sqrt(k)``.
    * Fit: V are the exact principal axes of a table ``X + δX``, ``||δX|| <= β ||X||_F``
      (β as for two-sided); ``P = V V^T``. The dropped directions carry at most
      ``(e - k) rtol λ_1`` of that table's energy, so
      ``d = ||X (I - P)||_F <= (sqrt((e - k) rtol) (1 + β) + sqrt(e) β) ||X||_F``.
    * A pair (A, B): ``A_out B_out^T - A B^T = -A (I - P) B^T + F_A V^T B^T + A V F_B^T + F_A F_B^T``,
      so its error is at most ``d² + (2 f + f²) ||A||_F ||B||_F``.
    * Stacked Gram against ``diag(λ)`` (λ of the perturbed table, what the report holds):
      ``(2 f + f² + 3 sqrt(e) β) ||X||_F²`` entry by entry.
    """
    sv = np.asarray(report["singular_values"], dtype=np.float64)
    e, k = len(sv), int(report["rank"])
    norm = float(np.linalg.norm(np.vstack(tables).astype(np.float64)))
    g = (sum(len(t) for t in tables) + e) * EPS64
    beta = float(np.sqrt(g)) if report["method"] == "gram" else g
    f = (e + 1) * EPS32 * np.sqrt(k)
    d = (np.sqrt((e - k) * report["rtol"]) * (1 + beta) + np.sqrt(e) * beta) * norm
    norms = [float(np.linalg.norm(t.astype(np.float64))) for t in tables]
    return {
        "pair": lambda i, j: d**2 + (2 * f + f**2) * norms[i] * norms[j],
        "gram": (2 * f + f**2 + 3 * np.sqrt(e) * beta) * norm**2,
    }


def check_two_sided(
    tables: dict[str, np.ndarray],
    out: dict[str, np.ndarray],
    query: tuple[str, ...],
    candidate: tuple[str, ...],
    report: dict[str, Any],
    rtol: float | None,
) -> None:
    """Every query x candidate table's scores kept; both sides' stacked Grams equal ``diag(σ)`` (balanced)."""
    bounds = two_sided_bounds([tables[q] for q in query], [tables[c] for c in candidate], report)
    for q, c in itertools.product(query, candidate):
        err, rel = score_error(tables[q], tables[c], out[q], out[c])
        assert err <= bounds["scores"], (q, c, err, bounds["scores"])
        if rtol is not None:
            assert rel < rtol, f"scores of {q} x {c}: relative error {rel:.3g}, want < {rtol:g}"
    k = int(report["rank"])
    sv = np.asarray(report["singular_values"][:k])
    grams = [sum(out[n].astype(np.float64).T @ out[n].astype(np.float64) for n in side) for side in (query, candidate)]
    check_gram(grams[0], sv, bounds["gram"], aligned=report["drift_after"] is not None)
    check_gram(grams[1], sv, bounds["gram"], aligned=report["drift_after"] is not None)
    if report["drift_after"] is None:
        assert np.all(np.abs(grams[0] - grams[1]) <= 2 * bounds["gram"])
    else:  # rotated by Ω: the entrywise bound holds in the canonical basis, its Frobenius norm in any
        assert np.linalg.norm(grams[0] - grams[1]) <= 2 * np.linalg.norm(bounds["gram"])


def check_gram(gram: np.ndarray, sv: np.ndarray, bound: np.ndarray | float, *, aligned: bool) -> None:
    """A stacked output Gram is ``diag(sv)`` (entry by entry within ``bound``), or, aligned onto a reference,
    ``Ω^T diag(sv) Ω``: its eigenvalues are ``sv`` within the Frobenius norm of the bound (Weyl)."""
    k = len(sv)
    assert gram.shape == (k, k)
    bound = np.broadcast_to(bound, (k, k))
    if not aligned:
        assert np.all(np.abs(gram - np.diag(sv)) <= bound), np.abs(gram - np.diag(sv)).max()
        return
    np.testing.assert_allclose(np.linalg.eigvalsh(gram)[::-1], sv, rtol=0, atol=float(np.linalg.norm(bound)))


def check_symmetric(
    tables: dict[str, np.ndarray], out: dict[str, np.ndarray], report: dict[str, Any], rtol: float | None
) -> None:
    """Every pair of tables' dot products (each table with itself too) kept; the stacked Gram is ``diag(λ)``."""
    names = list(tables)
    bounds = symmetric_bounds([tables[n] for n in names], report)
    for (i, a), (j, b) in itertools.combinations_with_replacement(enumerate(names), 2):
        err, rel = score_error(tables[a], tables[b], out[a], out[b])
        assert err <= bounds["pair"](i, j), (a, b, err, bounds["pair"](i, j))
        if rtol is not None:
            assert rel < rtol, f"dot products of {a} x {b}: relative error {rel:.3g}, want < {rtol:g}"
    k = int(report["rank"])
    gram = sum(out[n].astype(np.float64).T @ out[n].astype(np.float64) for n in names)
    check_gram(
        gram, np.asarray(report["singular_values"][:k]), bounds["gram"], aligned=report["drift_after"] is not None
    )


# ----------------------------------------------------------------------------- 1. two-sided, several tables per side


TWO_SIDED = {
    "users:items,creators": {"users": 500, "items": 400, "creators": 150},
    "users,sessions:items,creators": {"users": 400, "sessions": 250, "items": 350, "creators": 120},
}


def split_sides(sides: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    query, candidate = sides.split(":")
    return tuple(query.split(",")), tuple(candidate.split(","))


@pytest.mark.parametrize("where", ["memory", "zarr"])
@pytest.mark.parametrize("sides", list(TWO_SIDED))
def test_two_sided_keeps_every_cross_score_and_balances(tmp_path: Path, sides: str, where: str):
    query, candidate = split_sides(sides)
    rng = np.random.default_rng(10)
    tables = {name: model_table(rng, n, 12) for name, n in TWO_SIDED[sides].items()}
    if where == "memory":
        result = dstab.stabilize(dstab.from_tables(tables, chunk_rows=64), sides=sides)
        out = stabilized_in_memory(result)
    else:
        result = dstab.stabilize(dstab.open_version(write_tables(tmp_path / "v", tables, chunk_rows=70)), sides=sides)
        written = result.to_zarr(tmp_path / "out")
        out = read_output(tmp_path / "out", list(tables))
        assert written.structure == result.structure
        assert set(tables) <= set(zarr.open_group(str(tmp_path / "out"), mode="r")["transform"].array_keys())
    report = result.report
    assert report["tables"] == {name: len(t) for name, t in tables.items()}
    assert all(
        out[name].dtype == np.float32 and out[name].shape == (len(t), report["rank"]) for name, t in tables.items()
    )
    check_two_sided(tables, out, query, candidate, report, SCORE_RTOL)
    # the kept singular values are those of the stacked score matrix (numpy, Householder)
    _, _, s = np_two_sided([tables[q] for q in query], [tables[c] for c in candidate], report["rtol"])
    k = report["rank"]
    assert k == 12
    np.testing.assert_allclose(report["singular_values"][:k], s[:k], rtol=0, atol=1e-9 * s[0])
    # one transform per side: the tables of a side share it
    for side in (query, candidate):
        for name in side[1:]:
            np.testing.assert_array_equal(result.transforms[name], result.transforms[side[0]])


def two_sided_retrain(
    rng: np.random.Generator, tables: dict[str, np.ndarray], query: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """A retrain made in numpy: 1% noise, then candidate rows @ G and query rows @ G^-T (scores kept), with
    G an ill-conditioned basis change times a random orthogonal one."""
    dim = next(iter(tables.values())).shape[1]
    g = random_basis(rng, dim, 10.0) @ random_orthogonal(rng, dim)
    g_inv_t = np.linalg.inv(g).T
    return {name: (noisy(rng, t) @ (g_inv_t if name in query else g)).astype(np.float32) for name, t in tables.items()}


@pytest.mark.parametrize("sides", list(TWO_SIDED))
def test_two_sided_drift_is_the_joint_procrustes_optimum(tmp_path: Path, sides: str):
    query, candidate = split_sides(sides)
    rng = np.random.default_rng(11)
    day1 = {name: model_table(rng, n, 10) for name, n in TWO_SIDED[sides].items()}
    dstab.stabilize(dstab.open_version(write_tables(tmp_path / "day1", day1)), sides=sides).to_zarr(tmp_path / "ref")
    ref = dstab.open_version(tmp_path / "ref")
    day2 = two_sided_retrain(rng, day1, query)
    result = dstab.stabilize(dstab.from_tables(day2, chunk_rows=64), ref, sides=sides)
    result.to_zarr(tmp_path / "out")
    out = read_output(tmp_path / "out", list(day2))
    check_two_sided(day2, out, query, candidate, result.report, SCORE_RTOL)

    # numpy: day 2's balanced form, then one orthogonal Ω fitted on every table jointly onto the reference
    m_q, m_c, _ = np_two_sided([day2[q] for q in query], [day2[c] for c in candidate], result.report["rtol"])
    canonical = {name: day2[name].astype(np.float64) @ (m_q if name in query else m_c) for name in day2}
    y = {name: zarr.open_group(str(tmp_path / "ref"), mode="r")[f"{name}/vectors"][...] for name in day2}
    omega = np_procrustes([(canonical[n], y[n]) for n in day2])
    best = np_drift([(canonical[n] @ omega, y[n]) for n in day2])
    assert abs(result.report["drift_after"] - best) <= DRIFT_ATOL, (result.report["drift_after"], best)
    assert abs(np_drift([(out[n], y[n]) for n in day2]) - best) <= DRIFT_ATOL
    assert abs(result.report["drift_before"] - np_drift([(day2[n], y[n]) for n in day2])) <= DRIFT_ATOL
    assert best < 0.05 < result.report["drift_before"]  # 1% noise: the alignment undid the basis change
    for name in day2:
        expected = canonical[name] @ omega
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=SCORE_RTOL * np.abs(expected).max(), err_msg=name)


# ----------------------------------------------------------------------------- 2. symmetric


SYMMETRIC = {
    "item2vec": {"words": 900},
    "four-fields": {"user_id": 400, "item_id": 300, "category": 40, "hour": 24},
}


@pytest.mark.parametrize("where", ["memory", "zarr"])
@pytest.mark.parametrize("case", list(SYMMETRIC))
def test_symmetric_keeps_every_dot_product_with_an_orthogonal_transform(tmp_path: Path, case: str, where: str):
    rng = np.random.default_rng(20)
    tables = {name: model_table(rng, n, 16) for name, n in SYMMETRIC[case].items()}
    if where == "memory":
        result = dstab.stabilize(dstab.from_tables(tables, chunk_rows=50), symmetric=True)
        out = stabilized_in_memory(result)
    else:
        result = dstab.stabilize(
            dstab.open_version(write_tables(tmp_path / "v", tables, chunk_rows=50)), symmetric=True
        )
        result.to_zarr(tmp_path / "out")
        out = read_output(tmp_path / "out", list(tables))
        assert dstab.open_version(tmp_path / "out").structure == result.structure
    assert result.structure.kind == "symmetric" and set(result.structure.tables) == set(tables)
    report = result.report
    assert report["rank"] == 16
    check_symmetric(tables, out, report, SCORE_RTOL)
    # one orthogonal transform for every table: T^T T = I on the kept columns
    first = result.transforms[next(iter(tables))]
    for name in tables:
        np.testing.assert_array_equal(result.transforms[name], first)
    np.testing.assert_allclose(first.T @ first, np.eye(report["rank"]), rtol=0, atol=1e-12)
    _, lam = np_symmetric(list(tables.values()), report["rtol"])
    np.testing.assert_allclose(report["singular_values"], lam, rtol=0, atol=1e-9 * lam[0])


def reparametrisation_bound(tables: list[np.ndarray], report: dict[str, Any]) -> float:
    """Bound on ``||out(X) - out(fl(X O))||_F`` (stacked rows) for an orthogonal O, to first order.

    ``fl(X O) = (X + δX) O`` with ``||δX||_2 <= ||δX||_F <= eps32 ||X||_F`` (``eps``, not ``u``: a factor 2
    to spare); the Gram path adds a backward error ``E``, ``||E|| <= g ||X||_F^2``, in each run. Axis
    ``j`` then moves by ``Σ_i v_i ΔG_ij / (λ_j - λ_i)``, ``|ΔG_ij| <= (σ_i + σ_j) ||δX||_2 + 2 g ||X||_F^2``,
    so output column ``j`` by ``||δX||_2 + sqrt(Σ_i (σ_i |ΔG_ij| / |λ_j - λ_i|)²)``; both outputs' own
    rounding adds ``2 f ||X||_F`` (``f`` of :func:`symmetric_bounds`). Twice this, for second-order terms.
    """
    x = np.vstack(tables).astype(np.float64)
    e, k = x.shape[1], int(report["rank"])
    norm = float(np.linalg.norm(x))
    sigma = np.linalg.svd(x, compute_uv=False)
    lam = sigma**2
    g = (len(x) + e) * EPS64
    delta = EPS32 * norm
    columns = []
    for j in range(k):
        others = np.arange(e) != j
        dg = (sigma[others] + sigma[j]) * delta + 2 * g * norm**2
        columns.append(delta + np.sqrt(np.sum((sigma[others] * dg / np.abs(lam[j] - lam[others])) ** 2)))
    f = (e + 1) * EPS32 * np.sqrt(k)
    return 2 * (float(np.linalg.norm(columns)) + 2 * f * norm)


@pytest.mark.parametrize("case", list(SYMMETRIC))
def test_symmetric_output_is_the_same_for_any_orthogonal_reparametrisation(case: str):
    rng = np.random.default_rng(21)
    # a well separated spectrum (decay 8: neighbouring eigenvalues 22% apart), so the bound below is tight
    tables = {name: model_table(rng, n, 16, decay=8.0) for name, n in SYMMETRIC[case].items()}
    base = dstab.stabilize(dstab.from_tables(tables, chunk_rows=64), symmetric=True)
    out = stabilized_in_memory(base)
    again = stabilized_in_memory(dstab.stabilize(dstab.from_tables(tables, chunk_rows=64), symmetric=True))
    for name in tables:  # repeatable bit for bit
        np.testing.assert_array_equal(again[name], out[name])
    bound = reparametrisation_bound(list(tables.values()), base.report)
    stacked = np.vstack([out[n].astype(np.float64) for n in tables])
    assert bound < 1e-4 * np.linalg.norm(stacked)  # the check below means something
    for trial in range(3):
        o = random_orthogonal(rng, 16)
        rotated = {name: (t.astype(np.float64) @ o).astype(np.float32) for name, t in tables.items()}
        other = stabilized_in_memory(dstab.stabilize(dstab.from_tables(rotated, chunk_rows=64), symmetric=True))
        diff = np.vstack([other[n].astype(np.float64) for n in tables]) - stacked
        # same columns, same signs: the sign rule reads the data, not the basis
        assert np.linalg.norm(diff) <= bound, (trial, np.linalg.norm(diff), bound, np.abs(diff).max(axis=0))


@pytest.mark.parametrize("case", list(SYMMETRIC))
def test_symmetric_collapsed_model_gives_its_rank_and_keeps_every_dot_product(case: str):
    rng = np.random.default_rng(22)
    basis = rng.normal(size=(5, 16))  # every row of every table in one 5-dimensional subspace of 16
    tables = {name: ((rng.normal(size=(n, 5)) + 0.3) @ basis).astype(np.float32) for name, n in SYMMETRIC[case].items()}
    result = dstab.stabilize(dstab.from_tables(tables, chunk_rows=64), symmetric=True)
    out = stabilized_in_memory(result)
    assert result.report["rank"] == 5
    assert all(out[name].shape == (len(t), 5) for name, t in tables.items())
    check_symmetric(tables, out, result.report, SCORE_RTOL)
    t = result.transforms[next(iter(tables))]
    np.testing.assert_allclose(t.T @ t, np.eye(5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(SYMMETRIC))
def test_symmetric_drift_is_the_joint_procrustes_optimum(tmp_path: Path, case: str):
    rng = np.random.default_rng(23)
    day1 = {name: model_table(rng, n, 12) for name, n in SYMMETRIC[case].items()}
    dstab.stabilize(dstab.open_version(write_tables(tmp_path / "day1", day1)), symmetric=True).to_zarr(tmp_path / "ref")
    ref = dstab.open_version(tmp_path / "ref")
    o = random_orthogonal(rng, 12)  # a symmetric model's retrain: only an orthogonal change keeps dot products
    day2 = {name: (noisy(rng, t) @ o).astype(np.float32) for name, t in day1.items()}
    result = dstab.stabilize(dstab.from_tables(day2, chunk_rows=64), ref, symmetric=True)
    result.to_zarr(tmp_path / "out")
    out = read_output(tmp_path / "out", list(day2))
    check_symmetric(day2, out, result.report, SCORE_RTOL)

    v, _ = np_symmetric(list(day2.values()), result.report["rtol"])
    canonical = {name: day2[name].astype(np.float64) @ v for name in day2}
    y = {name: zarr.open_group(str(tmp_path / "ref"), mode="r")[f"{name}/vectors"][...] for name in day2}
    omega = np_procrustes([(canonical[n], y[n]) for n in day2])
    best = np_drift([(canonical[n] @ omega, y[n]) for n in day2])
    assert abs(result.report["drift_after"] - best) <= DRIFT_ATOL, (result.report["drift_after"], best)
    assert abs(np_drift([(out[n], y[n]) for n in day2]) - best) <= DRIFT_ATOL
    assert best < 0.05 < result.report["drift_before"]
    for name in day2:
        np.testing.assert_allclose(result.transforms[name], v @ omega, rtol=0, atol=1e-6, err_msg=name)
        expected = canonical[name] @ omega
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=SCORE_RTOL * np.abs(expected).max(), err_msg=name)


# ----------------------------------------------------------------------------- 3. ids and churn, every scheduler


def churned(
    rng: np.random.Generator, vectors: np.ndarray, ids: np.ndarray, new_ids: np.ndarray, o: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A retrain of one table: 10% of rows removed, ``new_ids`` added (10%), 1% noise, rotated by ``o``, shuffled."""
    n = len(ids)
    keep = np.sort(rng.choice(n, n - len(new_ids), replace=False))
    added = model_table(rng, len(new_ids), vectors.shape[1])
    rows = np.vstack([noisy(rng, vectors[keep]), added.astype(np.float64)]) @ o
    all_ids = np.concatenate([ids[keep], new_ids])
    order = rng.permutation(len(all_ids))
    return rows[order].astype(np.float32), all_ids[order]


def test_ids_and_churn_rotation_is_the_procrustes_fit_on_common_ids(tmp_path: Path, scheduler: str):
    rng = np.random.default_rng(30)
    dim = 8
    day1 = {"words": model_table(rng, 400, dim), "tags": model_table(rng, 250, dim)}
    ids1 = {
        "words": rng.permutation(10_000)[:400].astype(np.int64),
        "tags": np.array([f"tag-{i:04d}" for i in rng.permutation(250)]),
    }
    new_ids = {
        "words": np.arange(20_000, 20_040, dtype=np.int64),
        "tags": np.array([f"new-{i:04d}" for i in range(25)]),
    }
    dstab.stabilize(
        dstab.open_version(write_tables(tmp_path / "day1", day1, ids1, chunk_rows=60)), symmetric=True
    ).to_zarr(tmp_path / "ref")
    o = random_orthogonal(rng, dim)
    day2, ids2 = {}, {}
    for name, vectors in day1.items():
        day2[name], ids2[name] = churned(rng, vectors, ids1[name], new_ids[name], o)
    new = dstab.open_version(write_tables(tmp_path / "day2", day2, ids2, chunk_rows=60))
    result = dstab.stabilize(new, dstab.open_version(tmp_path / "ref"), symmetric=True)

    # numpy: day 2's principal axes from all its rows, Procrustes on the rows whose ids both days hold
    v, _ = np_symmetric(list(day2.values()), result.report["rtol"])
    ref = zarr.open_group(str(tmp_path / "ref"), mode="r")
    pairs = []
    for name in day2:
        ref_ids = ref[f"{name}/ids"][...]
        common, here, there = np.intersect1d(ids2[name], ref_ids, return_indices=True)
        assert len(common) == len(ids1[name]) - len(new_ids[name])
        assert result.report["matching"][name]["common"] == len(common)
        pairs.append((day2[name][here].astype(np.float64) @ v, ref[f"{name}/vectors"][...][there]))
    expected = v @ np_procrustes(pairs)
    for name in day2:
        np.testing.assert_allclose(
            result.transforms[name], expected, rtol=0, atol=1e-6, err_msg=f"{name} on {scheduler}"
        )
    assert abs(result.report["drift_after"] - np_drift([(x @ np_procrustes(pairs), y) for x, y in pairs])) <= DRIFT_ATOL


# ----------------------------------------------------------------------------- 4. --anchor by table names


def test_anchor_on_one_table_is_the_procrustes_fit_on_that_table(tmp_path: Path):
    sides = "users:items,creators"
    query, candidate = split_sides(sides)
    rng = np.random.default_rng(40)
    day1 = {name: model_table(rng, n, 10) for name, n in TWO_SIDED[sides].items()}
    dstab.stabilize(dstab.from_tables(day1, chunk_rows=64), sides=sides).to_zarr(tmp_path / "ref")
    day2 = two_sided_retrain(rng, day1, query)
    result = dstab.stabilize(
        dstab.from_tables(day2, chunk_rows=64), dstab.open_version(tmp_path / "ref"), sides=sides, anchor="creators"
    )
    assert result.params["anchor_tables"] == ["creators"]

    m_q, m_c, _ = np_two_sided([day2[q] for q in query], [day2[c] for c in candidate], result.report["rtol"])
    y = zarr.open_group(str(tmp_path / "ref"), mode="r")["creators/vectors"][...]
    x = day2["creators"].astype(np.float64) @ m_c
    omega = np_procrustes([(x, y)])
    for name in day2:
        expected = (m_q if name in query else m_c) @ omega
        np.testing.assert_allclose(
            result.transforms[name], expected, rtol=0, atol=1e-6 * np.abs(expected).max(), err_msg=name
        )
    assert abs(result.report["drift_after"] - np_drift([(x @ omega, y)])) <= DRIFT_ATOL
    assert set(result.report["drift"]) == {"creators"}
    # anchoring on all tables fits another rotation (else this test could not tell them apart)
    everything = dstab.stabilize(
        dstab.from_tables(day2, chunk_rows=64), dstab.open_version(tmp_path / "ref"), sides=sides
    )
    assert np.abs(everything.transforms["creators"] - result.transforms["creators"]).max() > 1e-4


# ----------------------------------------------------------------------------- 5. the CLI end to end


def dstab_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return dstab_cli_all([args])[0]


def dstab_cli_all(commands: list[tuple[object, ...]]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``dstab`` commands that do not depend on one another side by side (subprocesses), in order of the list."""
    exe = str(Path(sys.executable).with_name("dstab"))
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    procs = [
        subprocess.Popen([exe, *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for a in commands
    ]
    done = []
    for argv, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess([exe, *map(str, argv)], proc.returncode, out, err))
    return done


CLI_MODELS = {
    "two-sided": ({"users": 300, "items": 250, "creators": 90}, ["--sides", "users:items,creators"], "creators"),
    "symmetric": ({"words": 300, "contexts": 200}, ["--symmetric"], "contexts"),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(CLI_MODELS))
def test_cli_end_to_end(tmp_path: Path, model: str):
    sizes, flag, extra_table = CLI_MODELS[model]
    rng = np.random.default_rng(50)
    dim = 8
    day1 = {name: model_table(rng, n, dim) for name, n in sizes.items()}
    ids = {name: np.arange(n, dtype=np.int64) * 7 for name, n in sizes.items()}
    if model == "two-sided":
        query, candidate = ("users",), ("items", "creators")
        day2 = two_sided_retrain(rng, day1, query)
    else:
        o = random_orthogonal(rng, dim)
        day2 = {name: (noisy(rng, t) @ o).astype(np.float32) for name, t in day1.items()}
    write_tables(tmp_path / "day1", day1, ids)
    write_tables(tmp_path / "day2", day2, ids)
    extra = model_table(rng, 40, dim)  # rows of a table other than users or items, embedded after the retrain
    write_loose_table(tmp_path / "extra", extra, np.arange(40, dtype=np.int64) + 10_000)

    p = dstab_cli("stabilize", tmp_path / "day1", "--out", tmp_path / "s1", *flag, *FAST)
    assert p.returncode == 0, p.stderr
    # day 2: no structure flag, and several tables: the structure comes from the reference
    p = dstab_cli("stabilize", tmp_path / "day2", "--out", tmp_path / "s2", "--reference", tmp_path / "s1", *FAST)
    assert p.returncode == 0, p.stderr
    assert "drift before" in p.stdout
    s1, s2 = dstab.open_version(tmp_path / "s1"), dstab.open_version(tmp_path / "s2")
    assert s1.structure is not None and s1.structure.kind == model and set(s1.structure.tables) == set(sizes)
    assert s2.structure == s1.structure
    out = read_output(tmp_path / "s2", list(day2))
    if model == "two-sided":
        check_two_sided(day2, out, query, candidate, s2.attrs["report"], SCORE_RTOL)
    else:
        check_symmetric(day2, out, s2.attrs["report"], SCORE_RTOL)
    assert s2.attrs["report"]["drift_after"] < 0.05 < s2.attrs["report"]["drift_before"]
    for name in day2:  # ids travel with their rows
        np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "s2"), mode="r")[f"{name}/ids"][...], ids[name])

    report, log, apply = dstab_cli_all([
        ("report", tmp_path / "s2", "--json", *FAST),
        ("log", tmp_path / "s2", "--json"),
        ("apply", tmp_path / "s2", "--table", extra_table, "--rows", tmp_path / "extra", "--out", tmp_path / "mapped", *FAST),
    ])  # fmt: skip
    assert report.returncode == 0, report.stderr
    described = json.loads(report.stdout)
    assert described["tables"] == sizes and described["structure"] == s1.structure.to_attrs()
    assert described["drift_after"] == s2.attrs["report"]["drift_after"]

    assert log.returncode == 0, log.stderr
    entries = json.loads(log.stdout)["chain"]
    assert [Path(e["url"]).name for e in entries] == ["s2", "s1"]
    assert entries[0]["structure"] == entries[1]["structure"] == s1.structure.to_attrs()

    # apply: extra rows of a table that is not users or items, mapped with its saved transform
    assert apply.returncode == 0, apply.stderr
    mapped = zarr.open_group(str(tmp_path / "mapped"), mode="r")
    expected = extra.astype(np.float64) @ s2.transforms[extra_table]
    np.testing.assert_allclose(mapped["vectors"][...], expected, rtol=0, atol=SCORE_RTOL * np.abs(expected).max())
    np.testing.assert_array_equal(mapped["ids"][...], np.arange(40) + 10_000)
    # the mapped rows score against the version's partner tables as the raw rows did against day 2's
    for partner in s2.structure.partners(extra_table):
        _, rel = score_error(extra, day2[partner], mapped["vectors"][...], out[partner])
        assert rel < SCORE_RTOL, (partner, rel)


# ----------------------------------------------------------------------------- 6. property: any structure, any sizes


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["two-sided", "symmetric"]))
    dim = draw(st.integers(2, 10))
    rank = draw(st.integers(1, dim))
    seed = draw(st.integers(0, 2**32 - 1))
    if kind == "symmetric":
        names = [f"t{i}" for i in range(draw(st.integers(1, 4)))]
        sides: Any = None
    else:
        n_query, n_candidate = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        sides = ([f"q{i}" for i in range(n_query)], [f"c{i}" for i in range(n_candidate)])
        names = sides[0] + sides[1]
    sizes = {name: draw(st.integers(1, 120)) for name in names}
    chunk_rows = draw(st.integers(7, 64))
    return {
        "kind": kind,
        "dim": dim,
        "rank": rank,
        "seed": seed,
        "sides": sides,
        "sizes": sizes,
        "chunk_rows": chunk_rows,
    }


@settings(max_examples=20, deadline=None)
@given(case=models())
def test_any_structure_keeps_its_scores_within_float32_rounding(case: dict[str, Any]):
    rng = np.random.default_rng(case["seed"])
    dim, rank = case["dim"], case["rank"]
    # a side's tables share its latent directions (one model), as do all tables of a symmetric model
    bases = {side: rng.normal(size=(rank, dim)) for side in ("query", "candidate", "all")}
    scale = np.exp(-np.arange(rank) / 3.0)[:, None]
    tables = {}
    for name, n in case["sizes"].items():
        side = "all" if case["kind"] == "symmetric" else ("query" if name.startswith("q") else "candidate")
        tables[name] = ((rng.normal(size=(n, rank)) + 0.3) @ (scale * bases[side])).astype(np.float32)
    version = dstab.from_tables(tables, chunk_rows=case["chunk_rows"])
    with dask.config.set(scheduler="synchronous"):
        if case["kind"] == "symmetric":
            result = dstab.stabilize(version, symmetric=True)
            out = stabilized_in_memory(result)
            check_symmetric(tables, out, result.report, None)
        else:
            query, candidate = case["sides"]
            result = dstab.stabilize(version, sides=f"{','.join(query)}:{','.join(candidate)}")
            out = stabilized_in_memory(result)
            check_two_sided(tables, out, tuple(query), tuple(candidate), result.report, None)
    assert result.report["rank"] <= rank
