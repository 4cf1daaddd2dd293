"""The pure maths (dstab.linalg) against numpy, with property tests over shapes, seeds and bases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstab import linalg
from dstab.errors import InputError, UsageError

from conftest import (
    random_basis,
    random_tables,
    reference_stabilize,
    relative_score_error,
)


def fit(T: np.ndarray, W: np.ndarray, rank="auto", rtol=1e-9):
    T64, W64 = T.astype(np.float64), W.astype(np.float64)
    return linalg.canonical_transforms(
        linalg.gram_factor(T64.T @ T64), linalg.gram_factor(W64.T @ W64), rank=rank, rtol=rtol
    )


def signed(T, W, c):
    omega = linalg.sign_alignment(
        c,
        [
            (T.sum(axis=0).astype(np.float64), T[:50].astype(np.float64), len(T)),
            (W.sum(axis=0).astype(np.float64), W[:50].astype(np.float64), len(W)),
        ],
    )
    return T.astype(np.float64) @ c.m_items @ omega, W.astype(np.float64) @ c.m_users @ omega


tables = st.builds(
    lambda seed, dim, n_items, n_users: random_tables(seed, n_items, n_users, dim, "float64"),
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 24),
    n_items=st.integers(30, 200),
    n_users=st.integers(30, 200),
)


def test_gram_factor_is_a_square_root_even_when_singular():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 8))  # rank 3 in width 8
    G = X.T @ X
    R = linalg.gram_factor(G)
    np.testing.assert_allclose(R.T @ R, G, rtol=0, atol=1e-10 * np.abs(G).max())
    # The null eigenvalues come out of eigh as rounding noise of size ~ e * eps * lambda_max, and R takes their
    # square roots: its null directions are ~ sqrt(e * eps) * |R| (4e-8 at e = 8, on whichever side of zero the
    # BLAS kernel's rounding lands), so the rank is read at a tolerance above that bound and far below the rank-3
    # singular values (order |R|).
    s = np.linalg.svd(R, compute_uv=False)
    bound = np.sqrt(len(G) * np.finfo(np.float64).eps) * s[0]
    assert (s[3:] < 10 * bound).all() and s[2] > 1e3 * bound


@settings(max_examples=60, deadline=None)
@given(tables)
def test_scores_preserved_and_balanced(tw):
    T, W = tw
    c = fit(T, W)
    XT, XW = T @ c.m_items, W @ c.m_users
    assert relative_score_error(T, W, XT, XW) < 1e-10
    sv = c.singular_values[: c.rank]
    # balanced: both Grams equal diag(σ)
    scale = sv[0]
    np.testing.assert_allclose(XT.T @ XT, np.diag(sv), rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(XW.T @ XW, np.diag(sv), rtol=0, atol=1e-8 * scale)
    # the core spectrum is the spectrum of the score matrix
    np.testing.assert_allclose(sv, np.linalg.svd(W @ T.T, compute_uv=False)[: c.rank], rtol=1e-8, atol=1e-10 * scale)


@settings(max_examples=60, deadline=None)
@given(tables, st.integers(0, 2**32 - 1), st.floats(1.0, 100.0))
def test_same_result_for_any_reparametrisation(tw, seed, condition):
    T, W = tw
    G = random_basis(np.random.default_rng(seed), T.shape[1], condition)
    XT, XW = signed(T, W, fit(T, W))
    YT, YW = signed(T @ G, W @ np.linalg.inv(G).T, fit(T @ G, W @ np.linalg.inv(G).T))
    scale = np.abs(XT).max()
    assert np.abs(XT - YT).max() < 1e-6 * scale
    assert np.abs(XW - YW).max() < 1e-6 * np.abs(XW).max()


@settings(max_examples=40, deadline=None)
@given(tables)
def test_matches_householder_reference(tw):
    T, W = tw
    XT, XW = signed(T, W, fit(T, W, rtol=1e-6))
    RT, RW, _ = reference_stabilize(T, W, rtol=1e-6)
    assert XT.shape == RT.shape
    np.testing.assert_allclose(XT, RT, rtol=0, atol=1e-7 * np.abs(RT).max())
    np.testing.assert_allclose(XW, RW, rtol=0, atol=1e-7 * np.abs(RW).max())


def test_signs_are_deterministic_from_the_data():
    T, W = random_tables(1)
    XT, _ = signed(T, W, fit(T, W))
    assert (XT.sum(axis=0) > 0).all()
    # the sign rule does not depend on the basis, only on the data: flip a basis vector
    G = np.eye(T.shape[1])
    G[0, 0] = -1
    YT, _ = signed(T @ G, W @ G, fit(T @ G, W @ G))
    np.testing.assert_allclose(XT, YT, atol=1e-9 * np.abs(XT).max())


def test_rank_two_table_gives_two_columns():
    T, W = random_tables(2, n_items=500, n_users=300, dim=32, rank=2, dtype="float32")
    c = fit(T, W, rtol=linalg.default_rtol(np.float32, 32))
    assert c.rank == 2
    XT, XW = T.astype(np.float64) @ c.m_items, W.astype(np.float64) @ c.m_users
    assert XT.shape == (500, 2)
    assert relative_score_error(T, W, XT, XW) < 1e-5


def test_fixed_rank_truncates_to_best_approximation():
    T, W = random_tables(3, dim=10, dtype="float64")
    c = fit(T, W, rank=4)
    S = W @ T.T
    U, s, Vt = np.linalg.svd(S, full_matrices=False)
    best = (U[:, :4] * s[:4]) @ Vt[:4]
    np.testing.assert_allclose((W @ c.m_users) @ (T @ c.m_items).T, best, atol=1e-9 * np.abs(S).max())


@pytest.mark.parametrize("k_new,k_ref", [(6, 4), (4, 6), (5, 5)])
def test_alignment_with_different_widths(k_new, k_ref):
    rng = np.random.default_rng(4)
    T, W = random_tables(5, dim=k_new, dtype="float64")
    ref_T, ref_W = rng.normal(size=(T.shape[0], k_ref)), rng.normal(size=(W.shape[0], k_ref))
    c = fit(T, W)
    probes = [(T.sum(axis=0), T[:20], len(T)), (W.sum(axis=0), W[:20], len(W))]
    omega = linalg.alignment(c, [T.T @ ref_T, W.T @ ref_W], k_ref, probes)
    width = max(k_new, k_ref)
    assert omega.shape == (k_new, width)
    np.testing.assert_allclose(omega @ omega.T, np.eye(k_new), atol=1e-12)
    XT, XW = T @ c.m_items @ omega, W @ c.m_users @ omega
    assert relative_score_error(T, W, XT, XW) < 1e-10
    RT, RW, _ = reference_stabilize(T, W, (ref_T, ref_W), rtol=1e-9)
    np.testing.assert_allclose(XT, RT, atol=1e-8 * np.abs(RT).max())
    np.testing.assert_allclose(XW, RW, atol=1e-8 * np.abs(RW).max())


def test_procrustes_recovers_a_rotation_and_statistics_predict_drift():
    T, W = random_tables(6, dim=8, dtype="float64")
    c = fit(T, W)
    XT, XW = T @ c.m_items, W @ c.m_users
    Q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(8, 8)))
    ref_T, ref_W = XT @ Q, XW @ Q
    omega = linalg.alignment(c, [T.T @ ref_T, W.T @ ref_W], 8, [])
    np.testing.assert_allclose(omega, Q, atol=1e-9)
    A = c.m_items @ omega
    predicted = linalg.squared_drift(A, T.T @ T, T.T @ ref_T, float((ref_T**2).sum()))
    assert predicted == pytest.approx(float(((T @ A - ref_T) ** 2).sum()), abs=1e-12 * (ref_T**2).sum())
    before = linalg.identity_drift(T.T @ T, T.T @ ref_T, float((ref_T**2).sum()))
    assert before == pytest.approx(float(((T - ref_T) ** 2).sum()), rel=1e-10)


def test_default_rtol_follows_dtype():
    assert linalg.default_rtol(np.float32, 64) == pytest.approx(64 * np.finfo(np.float32).eps)
    assert linalg.default_rtol(np.float64, 64) >= np.sqrt(np.finfo(np.float64).eps)


def test_zero_interaction_and_bad_rank_are_clear_errors():
    T = np.zeros((10, 3))
    W = np.ones((10, 3))
    with pytest.raises(InputError, match="all zeros"):
        linalg.canonical_transforms(linalg.gram_factor(T.T @ T), linalg.gram_factor(W.T @ W), rtol=1e-6)
    T, W = random_tables(8, dim=4, dtype="float64")
    with pytest.raises(UsageError, match="larger than the embedding width 4"):
        fit(T, W, rank=5)
    with pytest.raises(UsageError, match="positive integer"):
        fit(T, W, rank=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_cond=st.floats(0.0, 6.0), e=st.integers(2, 40))
def test_transform_rows_float32_error_stays_at_float32_rounding_whatever_the_condition(seed, log_cond, e):
    """float32 rows through any transform: each row within a few float32 roundings of the exact product.

    The bound: a float32 product errs by about e * eps32 * |x| |T| per entry, so it is used only while
    cond(T) <= FLOAT32_PRODUCT_MAX_CONDITION; above, the float64 product rounded once to float32.
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(e, e)))
    v, _ = np.linalg.qr(rng.normal(size=(e, e)))
    t = (u * np.logspace(0, log_cond, e)) @ v
    # raw rows as a model has them: large where the transform is small (stabilized rows z are balanced)
    x = (rng.normal(size=(300, e)) @ np.linalg.inv(t)).astype(np.float32)
    out = linalg.transform_rows(x, t)
    assert out.dtype == np.float32
    exact = x.astype(np.float64) @ t
    row_error = np.linalg.norm(out - exact, axis=1) / np.linalg.norm(exact, axis=1)
    eps32 = np.finfo(np.float32).eps
    cond = min(np.linalg.cond(t), 128.0)  # never worse than a float32 product through a transform of condition 128
    assert row_error.max() <= 2 * eps32 * cond * np.sqrt(e) + 2 * eps32
