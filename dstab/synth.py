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

from .errors import UsageError
from .executor import run_all
from .store import (
    SIDES,
    ArrayTarget,
    Staging,
    Version,
    canonical_url,
    load,
    open_version,
    row_starts,
    write_block,
)

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


def counts_for_ids(ids: np.ndarray) -> np.ndarray:
    """Synthetic interaction counts, a function of the id alone (a row keeps its popularity across retrains).

    Log-uniform from 1 to 1,000: a long tail of rarely seen rows (about 43% below 20), as in real catalogues.
    """
    mixed = (np.asarray(ids, dtype=np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    u = mixed.astype(np.float64) / float(1 << 53)
    return np.floor(1000.0**u).astype(np.int64)


def _synth_block(
    loadings: np.ndarray, mean: np.ndarray, seed: int, side: int, index: int, n_rows: int, dtype: str,
    target: ArrayTarget, ids_target: ArrayTarget, start: int, id_base: int, counts_target: ArrayTarget | None = None,
) -> int:  # fmt: skip
    rng = np.random.default_rng([seed, side, index])
    latent = rng.normal(size=(n_rows, loadings.shape[0])) + mean
    write_block((latent @ loadings).astype(dtype), target, start)
    ids = np.arange(start, start + n_rows, dtype=np.int64) + id_base
    write_block(ids, ids_target, start)
    if counts_target is not None:
        write_block(counts_for_ids(ids), counts_target, start)
    return 0


def _shaped_noise(rng: np.random.Generator, x: np.ndarray, scale: float) -> np.ndarray:
    """Noise shaped like the rows' own second moment, ``scale`` times as large in every direction.

    Isotropic noise in the table's coordinates would depend on its basis: after
    a few retrains whose bases compound, 1% of the overall size is far more
    than 1% along the weak directions, and a chain of retrains drifts more each
    day. Shaped noise is the same relative perturbation in any basis.
    """
    moment = x.T @ x / max(1, len(x))
    jitter = 1e-12 * max(float(np.trace(moment)), 1e-300) / max(1, len(moment))
    factor = np.linalg.cholesky(moment + jitter * np.eye(len(moment)))
    return scale * rng.normal(size=x.shape) @ factor.T


def _retrain_block(
    source: Any, basis: np.ndarray, noise: float, seed: int, side: int, index: int,
    target: ArrayTarget, start: int, churn: float = 0.0, ids_source: Any = None, ids_target: ArrayTarget | None = None,
    counts_target: ArrayTarget | None = None,
) -> int:  # fmt: skip
    """One block of a retrain; with ``churn``, that share of its rows are new ids and the rows are shuffled."""
    block = load(source)
    x = block.astype(np.float64)
    if noise > 0:
        x = x + _shaped_noise(np.random.default_rng([seed, side, index, 1]), x, noise)
    if churn > 0:
        ids = np.array(load(ids_source), dtype=np.int64)
        rng = np.random.default_rng([seed, side, index, 2])
        gone = np.flatnonzero(rng.random(len(x)) < churn)
        # the rows that leave are replaced by new ones like the block's own (a random row of it, perturbed:
        # the same distribution in any basis), with ids never used before
        donors = rng.integers(0, len(x), size=len(gone))
        x[gone] = x[donors] + _shaped_noise(rng, x, 0.1)[: len(gone)]
        ids[gone] = (1 << 61) + (side << 60) + (seed << 36) + start + gone
        order = rng.permutation(len(x))
        x, ids = x[order], ids[order]
        write_block(ids, ids_target, start)  # type: ignore[arg-type]
        if counts_target is not None:
            write_block(counts_for_ids(ids), counts_target, start)
    write_block((x @ basis).astype(block.dtype), target, start)
    return 0


def _finish(staging: Staging, tasks: list, attrs: dict[str, Any], progress: bool) -> None:
    try:
        run_all(tasks, progress=progress, stage="writing the synthetic version")
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


def check_synth(*, items: int, users: int, dim: int, rank: int | None, seed: int, dtype: str, chunk_rows: int) -> None:
    """The parameters of :func:`synth`, checked before anything starts."""
    rank = dim if rank is None else rank
    for name, value in (("items", items), ("users", users), ("dim", dim), ("rank", rank), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if rank > dim:
        raise UsageError(f"--rank {rank} is larger than --dim {dim}; pass --rank {dim} or less")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise UsageError(f"dtype must be float32 or float64, got {dtype}")


def check_retrain(like: Version, *, noise: float, churn: float, seed: int) -> None:
    """The parameters of :func:`synth_like`, checked before anything starts."""
    if not noise >= 0:
        raise UsageError(f"--noise must be 0 or more, got {noise}")
    if not 0 <= churn < 1:
        raise UsageError(f"--churn must be in [0, 1), got {churn}")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    if churn > 0 and (like.items.ids is None or like.users.ids is None):
        raise UsageError("--churn needs a version with items/ids and users/ids (rows are replaced by id)")


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
    counts: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """Write a synthetic version whose scores have rank ``rank`` (default ``dim``).

    With ``counts``, each side also gets ``SIDE/counts`` (:func:`counts_for_ids`), for the anchor options.
    """
    rank = dim if rank is None else rank
    check_synth(items=items, users=users, dim=dim, rank=rank, seed=seed, dtype=dtype, chunk_rows=chunk_rows)
    model = _model(dim, rank, seed)
    staging = Staging(os.fspath(out), inputs=[], overwrite=overwrite)
    tasks = []
    for side, n in (("items", items), ("users", users)):
        rows = min(chunk_rows, n)
        target = staging.create_array(f"{side}/vectors", shape=(n, dim), chunks=(rows, dim), dtype=np.dtype(dtype))
        ids_target = staging.create_array(f"{side}/ids", shape=(n,), chunks=(rows,), dtype=np.dtype(np.int64))
        counts_target = (
            staging.create_array(f"{side}/counts", shape=(n,), chunks=(rows,), dtype=np.dtype(np.int64)) if counts else None
        )
        id_base = 0 if side == "items" else 10**12  # item and user ids never collide
        for index, start in enumerate(range(0, n, rows)):
            tasks.append(
                dask.delayed(_synth_block, pure=True)(
                    model[side], model["mean"], seed, SIDE_CODE[side], index, min(rows, n - start), dtype,
                    target, ids_target, start, id_base, counts_target,
                )
            )  # fmt: skip
    attrs = _base_attrs(items=items, users=users, dim=dim, rank=rank, seed=seed, dtype=dtype, counts=counts)
    _finish(staging, tasks, attrs, progress)
    return open_version(out)


def random_basis(dim: int, seed: int, condition: float = 10.0) -> np.ndarray:
    """A random invertible ``G`` with condition number ``condition``: rotation, scaling, rotation."""
    from scipy.stats import (
        ortho_group,  # scipy.stats takes 0.3-1.4 s to import: only when a retrain is drawn
    )

    rng = np.random.default_rng([seed, 7])
    q1 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    q2 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    return (q1 * np.logspace(0.0, np.log10(condition), dim)) @ q2


def synth_like(
    out: str | os.PathLike[str],
    like: Version,
    *,
    noise: float = 0.0,
    churn: float = 0.0,
    seed: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """A "retrain" of ``like``: items ``(T + noise) G``, users ``(W + noise) G^-T`` for a random invertible ``G``.

    With ``noise=0`` every score is the same as in ``like``; only the basis moved.
    ``noise`` is relative in every direction (shaped like the rows' second
    moment), so chains of retrains do not compound it. With ``churn``, that share of each side's rows (drawn per block) leave and as
    many new rows with new ids arrive, and the rows are reordered: whole blocks
    are shuffled and the rows inside each block too (out of core, block by block).
    Counts, when ``like`` has them, follow the ids (:func:`counts_for_ids` for new ones).
    """
    check_retrain(like, noise=noise, churn=churn, seed=seed)
    basis = random_basis(like.dim, seed)
    bases = {"items": basis, "users": np.linalg.inv(basis).T}
    inputs = [like.url] if like.url else []
    staging = Staging(os.fspath(out), inputs=inputs, overwrite=overwrite)
    tasks = []
    for side in SIDES:
        table = like.table(side)
        target = staging.create_table(side, table, table.dim)
        chunks = table.row_chunks()
        if churn == 0:
            for index, (block, start) in enumerate(zip(table.blocks(chunks), row_starts(chunks))):
                tasks.append(
                    dask.delayed(_retrain_block, pure=True)(
                        block, bases[side], float(noise), seed, SIDE_CODE[side], index, target, start
                    )
                )
            tasks += staging.copy_ids(side, table)
            continue
        ids_target = staging.create_array(
            f"{side}/ids", shape=(table.n_rows,), chunks=(min(table.chunk_rows, table.n_rows),), dtype=np.dtype(np.int64)
        )
        counts_target = None
        if table.counts is not None:
            counts_target = staging.create_array(
                f"{side}/counts", shape=(table.n_rows,), chunks=(min(table.chunk_rows, table.n_rows),), dtype=np.dtype(np.int64)
            )
        blocks, id_blocks, starts = table.blocks(chunks), table.id_blocks(chunks), row_starts(chunks)
        full = [i for i, n in enumerate(chunks) if n == chunks[0]]  # blocks of one size trade places
        moved = dict(zip(full, np.random.default_rng([seed, SIDE_CODE[side], 3]).permutation(full).tolist()))
        for index in range(len(chunks)):
            src = moved.get(index, index)
            tasks.append(
                dask.delayed(_retrain_block, pure=True)(
                    blocks[src], bases[side], float(noise), seed, SIDE_CODE[side], src, target, starts[index],
                    float(churn), id_blocks[src], ids_target, counts_target,  # type: ignore[index]
                )
            )  # fmt: skip
    attrs = _base_attrs(like=canonical_url(like.url) if like.url else None, noise=noise, churn=churn, seed=seed)
    _finish(staging, tasks, attrs, progress)
    return open_version(out)
