"""Shared fixtures and the plain-numpy reference every result is checked against."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from hypothesis import settings

# Let tests import the pipeline scripts as modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# `pytest --hypothesis-profile=nodb --hypothesis-seed=N`: a property test run with no example database, so
# that what passes under many seeds is known to pass, not to replay (or skip) what an earlier run found.
settings.register_profile("nodb", database=None)


# ----------------------------------------------------------------------------- numpy reference


def reference_stabilize(
    T: np.ndarray,
    W: np.ndarray,
    ref: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    rank: int | None = None,
    rtol: float = 1e-6,
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stabilization written from the paper with Householder QR, in float64, all in memory.

    ``pairs[side] = (rows of T or W, rows of the reference)`` fits the rotation
    on those row pairs only (ids in common), weighted by ``weights[side]`` (per
    pair); by default row i pairs with row i. A side absent from ``pairs``
    (when given) does not anchor.

    Returns (items_out, users_out, singular_values). Without a reference the
    column signs follow dstab's documented rule: the items' column sum positive,
    or where it is within 1e-3 * sqrt(n σ) of zero, the users' column sum.
    """
    T64, W64 = T.astype(np.float64), W.astype(np.float64)
    R_T = np.linalg.qr(T64, mode="r")
    R_W = np.linalg.qr(W64, mode="r")
    U, s, Vt = np.linalg.svd(R_T @ R_W.T)
    k = rank if rank is not None else int(np.sum(s > rtol * s[0]))
    X_T = T64 @ R_W.T @ Vt[:k].T / np.sqrt(s[:k])
    X_W = W64 @ R_T.T @ U[:, :k] / np.sqrt(s[:k])
    if ref is None:
        return _signed(X_T, X_W) + (s,)
    ref_T, ref_W = (r.astype(np.float64) for r in ref)
    r = ref_T.shape[1]
    if pairs is None:
        pairs = {
            "items": (np.arange(len(T)), np.arange(len(ref_T))),
            "users": (np.arange(len(W)), np.arange(len(ref_W))),
        }
    cross = np.zeros((k, r))
    for side, X, Y in (("items", X_T, ref_T), ("users", X_W, ref_W)):
        if side in pairs:
            a, b = pairs[side]
            w = (weights or {}).get(side, np.ones(len(a)))
            cross += (X[a] * w[:, None]).T @ Y[b]
    if k <= r:
        # polar factor of the k x r cross matrix: the rows of Ω that matter
        P, _, Qt = np.linalg.svd(cross, full_matrices=False)
        omega = P @ Qt
        return X_T @ omega, X_W @ omega, s
    # wider than the reference: first r columns by Procrustes, the rest are the
    # principal axes of the remainder, sign-fixed like the no-reference case
    P, _, Qt = np.linalg.svd(cross, full_matrices=False)
    fixed = P @ Qt
    rest_T = X_T - (X_T @ fixed) @ fixed.T
    rest_W = X_W - (X_W @ fixed) @ fixed.T
    _, _, axes = np.linalg.svd(rest_T, full_matrices=False)
    free_T, free_W = _signed(rest_T @ axes[: k - r].T, rest_W @ axes[: k - r].T)
    return np.hstack([X_T @ fixed, free_T]), np.hstack([X_W @ fixed, free_W]), s


def _signed(X_T: np.ndarray, X_W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dstab's documented sign rule: items' column sum positive, or, where it is
    within 1e-3 * sqrt(n * column variance) of zero, the users' column sum."""
    sums_T, sums_W = X_T.sum(axis=0), X_W.sum(axis=0)
    variance = (X_T**2).sum(axis=0)
    decisive_T = np.abs(sums_T) > 1e-3 * np.sqrt(len(X_T) * variance)
    signs = np.where(decisive_T, np.sign(sums_T), np.sign(sums_W))
    return X_T * signs, X_W * signs


def relative_score_error(T: np.ndarray, W: np.ndarray, T_out: np.ndarray, W_out: np.ndarray) -> float:
    S = W.astype(np.float64) @ T.astype(np.float64).T
    S_out = W_out.astype(np.float64) @ T_out.astype(np.float64).T
    return float(np.linalg.norm(S_out - S) / np.linalg.norm(S))


def random_tables(
    seed: int, n_items: int = 600, n_users: int = 400, dim: int = 12, dtype: str = "float32", rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tables with a decaying spectrum and a non-zero mean, like trained embeddings."""
    rng = np.random.default_rng(seed)
    k = rank or dim
    scale = np.exp(-np.arange(k) / 4.0) + 0.1
    A = rng.normal(size=(k, dim)) * scale[:, None]
    B = rng.normal(size=(k, dim)) * scale[:, None]
    T = (rng.normal(size=(n_items, k)) + 0.3) @ A
    W = (rng.normal(size=(n_users, k)) + 0.3) @ B
    return T.astype(dtype), W.astype(dtype)


def random_basis(rng: np.random.Generator, dim: int, condition: float) -> np.ndarray:
    q1, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    q2, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (q1 * np.logspace(0, np.log10(condition), dim)) @ q2


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``dstab ARGS`` in a fresh process, as a user runs it: exit code, stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "dstab.cli", *args], capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- versions on disk


def write_version(
    path: Path | str,
    T: np.ndarray,
    W: np.ndarray,
    *,
    item_ids: np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
    item_counts: np.ndarray | None = None,
    user_counts: np.ndarray | None = None,
    chunk_rows: int = 128,
) -> str:
    """A raw version written with plain zarr (not with dstab's writer)."""
    group = zarr.open_group(str(path), mode="w")
    for side, vectors, ids, counts in (("items", T, item_ids, item_counts), ("users", W, user_ids, user_counts)):
        shape = np.shape(vectors)
        chunks = (chunk_rows,) + tuple(max(1, d) for d in shape[1:])
        arr = group.create_array(f"{side}/vectors", shape=shape, chunks=chunks, dtype=np.asarray(vectors).dtype)
        if np.size(vectors):
            arr[...] = vectors
        if ids is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ida = group.create_array(f"{side}/ids", shape=ids.shape, chunks=(chunk_rows,), dtype=ids.dtype)
            ida[...] = ids
        if counts is not None:
            group.create_array(f"{side}/counts", shape=counts.shape, chunks=(chunk_rows,), dtype=counts.dtype)[...] = (
                counts
            )
    return str(path)


def read_tables(path: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return group["items/vectors"][...], group["users/vectors"][...]


# ----------------------------------------------------------------------------- schedulers


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[object]:
    """A real LocalCluster of two worker processes, shared by the tests that ask for it."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(params=["synchronous", "threads", "distributed"])
def scheduler(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test body on each scheduler a user may have active."""
    if request.param == "distributed":
        from distributed import Client

        cluster = request.getfixturevalue("local_cluster")
        with Client(cluster):
            yield request.param
    else:
        with dask.config.set(scheduler=request.param):
            yield request.param


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)
