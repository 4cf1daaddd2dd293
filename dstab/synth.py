"""Synthetic versions and synthetic retrains, generated and written out of core.

Every block is drawn from its own seeded generator (``[seed, side, block]``),
so the result is the same on any scheduler and any number of workers.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import dask
import numpy as np
from scipy.stats import ortho_group

from .errors import UsageError
from .executor import compute
from .stats import tree_reduce
from .version import SIDES, ArrayTarget, Staging, Version, load, open_version, row_starts, write_block

SIDE_CODE = {"items": 0, "users": 1}
DEFAULT_CHUNK_ROWS = 131_072


def _spectrum(rank: int) -> np.ndarray:
    """Singular-value profile of a trained model: a few strong directions, a long tail."""
    return np.exp(-np.arange(rank) / max(1.0, rank / 4.0)) + 0.05


def _model(dim: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """The hidden generating model: latent means and per-side loadings (rank x dim)."""
    rng = np.random.default_rng([seed, 99])
    scale = np.sqrt(_spectrum(rank))
    return {
        "items": scale[:, None] * rng.normal(size=(rank, dim)) / np.sqrt(dim),
        "users": scale[:, None] * rng.normal(size=(rank, dim)) / np.sqrt(dim),
        # a non-zero mean, as trained embeddings have, so column sums are informative
        "mean": rng.normal(size=rank) * 0.5,
    }


def _noop(*_: Any) -> int:
    return 0


def _synth_block(
    loadings: np.ndarray, mean: np.ndarray, seed: int, side: int, index: int, n_rows: int, dtype: str,
    target: ArrayTarget, ids_target: ArrayTarget, start: int, id_base: int,
) -> int:  # fmt: skip
    rng = np.random.default_rng([seed, side, index])
    latent = rng.normal(size=(n_rows, loadings.shape[0])) + mean
    write_block((latent @ loadings).astype(dtype), target, start)
    write_block(np.arange(start, start + n_rows, dtype=np.int64) + id_base, ids_target, start)
    return 0


def _retrain_block(
    source: Any, basis: np.ndarray, noise: float, seed: int, side: int, index: int,
    target: ArrayTarget, start: int,
) -> int:  # fmt: skip
    block = load(source)
    x = block.astype(np.float64)
    if noise > 0:
        rng = np.random.default_rng([seed, side, index, 1])
        x = x + noise * np.sqrt(np.mean(x * x)) * rng.normal(size=x.shape)
    write_block((x @ basis).astype(block.dtype), target, start)
    return 0


def _finish(staging: Staging, tasks: list, attrs: dict[str, Any], progress: bool) -> None:
    try:
        compute(tree_reduce(tasks, _noop), progress=progress)
        staging.publish(attrs)
    except BaseException:
        staging.discard()
        raise


def _base_attrs(**params: Any) -> dict[str, Any]:
    from . import __version__

    return {
        "kind": "synthetic",
        "dstab_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": params,
    }


def synth(
    out: str | os.PathLike[str],
    *,
    items: int,
    users: int,
    dim: int,
    rank: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """Write a synthetic version whose scores have rank ``rank`` (default ``dim``)."""
    rank = dim if rank is None else rank
    for name, value in (("items", items), ("users", users), ("dim", dim), ("rank", rank), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if rank > dim:
        raise UsageError(f"--rank {rank} is larger than --dim {dim}; pass --rank {dim} or less")
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise UsageError(f"dtype must be float32 or float64, got {dtype}")
    model = _model(dim, rank, seed)
    staging = Staging(os.fspath(out), inputs=[], overwrite=overwrite)
    tasks = []
    for side, n in (("items", items), ("users", users)):
        rows = min(chunk_rows, n)
        target = staging.create_array(f"{side}/vectors", shape=(n, dim), chunks=(rows, dim), dtype=np.dtype(dtype))
        ids_target = staging.create_array(f"{side}/ids", shape=(n,), chunks=(rows,), dtype=np.dtype(np.int64))
        id_base = 0 if side == "items" else 10**12  # item and user ids never collide
        for index, start in enumerate(range(0, n, rows)):
            tasks.append(
                dask.delayed(_synth_block, pure=True)(
                    model[side], model["mean"], seed, SIDE_CODE[side], index, min(rows, n - start), dtype,
                    target, ids_target, start, id_base,
                )
            )  # fmt: skip
    attrs = _base_attrs(items=items, users=users, dim=dim, rank=rank, seed=seed, dtype=dtype)
    _finish(staging, tasks, attrs, progress)
    return open_version(out)


def random_basis(dim: int, seed: int, condition: float = 10.0) -> np.ndarray:
    """A random invertible ``G`` with condition number ``condition``: rotation, scaling, rotation."""
    rng = np.random.default_rng([seed, 7])
    q1 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    q2 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    return (q1 * np.logspace(0.0, np.log10(condition), dim)) @ q2


def synth_like(
    out: str | os.PathLike[str],
    like: Version,
    *,
    noise: float = 0.0,
    seed: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """A "retrain" of ``like``: items ``(T + noise) G``, users ``(W + noise) G^-T`` for a random invertible ``G``.

    With ``noise=0`` every score is the same as in ``like``; only the basis moved.
    """
    if not noise >= 0:
        raise UsageError(f"--noise must be 0 or more, got {noise}")
    basis = random_basis(like.dim, seed)
    bases = {"items": basis, "users": np.linalg.inv(basis).T}
    inputs = [like.url] if like.url else []
    staging = Staging(os.fspath(out), inputs=inputs, overwrite=overwrite)
    tasks = []
    for side in SIDES:
        table = like.table(side)
        target = staging.create_table(side, table, table.dim)
        chunks = table.row_chunks()
        for index, (block, start) in enumerate(zip(table.blocks(chunks), row_starts(chunks))):
            tasks.append(
                dask.delayed(_retrain_block, pure=True)(
                    block, bases[side], float(noise), seed, SIDE_CODE[side], index, target, start
                )
            )
        tasks += staging.copy_ids(side, table)
    attrs = _base_attrs(like=like.url, noise=noise, seed=seed)
    _finish(staging, tasks, attrs, progress)
    return open_version(out)
