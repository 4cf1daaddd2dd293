"""Synthetic versions and synthetic retrains, generated and written out of core.

Every block is drawn from its own seeded generator (``[seed, table, block]``),
so the result is the same on any scheduler and any number of workers. A
version holds any named tables; ``items`` and ``users`` keep the generators
(and so the values) they always had.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import dask
import numpy as np

from .errors import UsageError
from .release import __version__
from .store import (
    ArrayTarget,
    Staging,
    Version,
    canonical_url,
    default_chunk_rows,
    load,
    open_version,
    row_starts,
    write_block,
)
from .store.write import merge_receipts
from .structure import (
    DEFAULT_CANDIDATE,
    DEFAULT_QUERY,
    Structure,
    check_agrees,
    check_table_name,
    resolve,
    two_sided,
)

SIDE_CODE = {"items": 0, "users": 1}


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
) -> Any:  # fmt: skip
    rng = np.random.default_rng([seed, side, index])
    latent = rng.normal(size=(n_rows, loadings.shape[0])) + mean
    receipts = [write_block((latent @ loadings).astype(dtype), target, start)]
    ids = np.arange(start, start + n_rows, dtype=np.int64) + id_base
    receipts.append(write_block(ids, ids_target, start))
    if counts_target is not None:
        receipts.append(write_block(counts_for_ids(ids), counts_target, start))
    return merge_receipts(*receipts)


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


def _new_id_base(code: int) -> int:
    """Where a table's churned-in ids start: above every id synth writes, a range per table, within int64."""
    if code < 2:  # items and users, as they always were
        return (1 << 61) + (code << 60)
    return (1 << 62) + ((code - 2) << 50)


def _retrain_block(
    source: Any, basis: np.ndarray, noise: float, seed: int, side: int, index: int,
    target: ArrayTarget, start: int, churn: float = 0.0, ids_source: Any = None, ids_target: ArrayTarget | None = None,
    counts_target: ArrayTarget | None = None,
) -> Any:  # fmt: skip
    """One block of a retrain; with ``churn``, that share of its rows are new ids and the rows are shuffled."""
    receipts: list[Any] = []
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
        ids[gone] = _new_id_base(side) + (seed << 36) + start + gone
        order = rng.permutation(len(x))
        x, ids = x[order], ids[order]
        receipts.append(write_block(ids, ids_target, start))  # type: ignore[arg-type]
        if counts_target is not None:
            receipts.append(write_block(counts_for_ids(ids), counts_target, start))
    receipts.append(write_block((x @ basis).astype(block.dtype), target, start))
    return merge_receipts(*receipts)


def _finish(staging: Staging, tasks: list, attrs: dict[str, Any], progress: bool) -> None:
    try:
        staging.run(tasks, progress=progress, stage="writing the synthetic version")
        staging.publish(attrs)
    except BaseException:
        staging.discard()
        raise


def _base_attrs(**params: Any) -> dict[str, Any]:
    return {
        "kind": "synthetic",
        "dstab_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params,
    }


def table_codes(names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Each table's code: it seeds the table's generators and sets its id range (``code * 10**12`` onwards).

    ``items`` is 0 and ``users`` 1, as they always were (so their output is the
    same as before tables had names); any other table is ``2 +`` its position.
    """
    return {name: SIDE_CODE.get(name, 2 + i) for i, name in enumerate(names)}


# Ids of the rows a table starts with: code * ID_STRIDE + row, so no two tables share an id.
ID_STRIDE = 10**12


def check_synth_tables(
    tables: dict[str, int],
    *,
    dim: int,
    rank: int | None,
    seed: int,
    dtype: str,
    chunk_rows: int | None,
    flag: str = "--table",
) -> None:
    """The parameters of :func:`synth_tables`, checked before anything starts."""

    if not tables:
        raise UsageError("synth needs at least one table: --table NAME=ROWS (or --items N --users M)")
    for name, rows in tables.items():
        check_table_name(name, flag)
        if rows < 1:
            raise UsageError(f"--table {name}={rows}: a table needs at least 1 row")
        if rows >= ID_STRIDE:
            raise UsageError(f"{name}: {rows:,} rows is more than synthetic ids allow ({ID_STRIDE:,} per table)")
    rank = dim if rank is None else rank
    for name, value in (("dim", dim), ("rank", rank), ("chunk_rows", 1 if chunk_rows is None else chunk_rows)):
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if rank > dim:
        raise UsageError(f"--rank {rank} is larger than --dim {dim}; pass --rank {dim} or less")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise UsageError(f"dtype must be float32 or float64, got {dtype}")


def check_synth(
    *, items: int, users: int, dim: int, rank: int | None, seed: int, dtype: str, chunk_rows: int | None
) -> None:
    """The parameters of :func:`synth`, checked before anything starts."""
    for name, value in (("items", items), ("users", users)):
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    check_synth_tables(
        {"items": items, "users": users}, dim=dim, rank=rank, seed=seed, dtype=dtype, chunk_rows=chunk_rows
    )


def retrain_structure(like: Version, *, sides: str | Structure | None = None, symmetric: bool = False) -> Structure:
    """The structure a retrain keeps: the one asked for (which must agree with what ``like`` records), else the recorded one, else the default."""
    label = f"--like {like.url or 'version'}"
    structure = resolve(like.names, sides=sides, symmetric_all=symmetric, recorded=like.structure, label=label)
    check_agrees(structure, like.structure, label, like.names)
    return structure


def check_retrain(
    like: Version,
    *,
    noise: float,
    churn: float,
    seed: int,
    sides: str | Structure | None = None,
    symmetric: bool = False,
) -> Structure:
    """The parameters of :func:`synth_like`, checked before anything starts; the structure the retrain keeps."""
    if not noise >= 0:
        raise UsageError(f"--noise must be 0 or more, got {noise}")
    if not 0 <= churn < 1:
        raise UsageError(f"--churn must be in [0, 1), got {churn}")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    if churn > 0:
        # rows are replaced by id: every table needs integer ids (new ids are drawn as integers)
        lacking = [name for name, t in like.tables.items() if t.ids is None or np.dtype(t.ids.dtype).kind not in "iu"]
        if lacking:
            listed = ", ".join(f"{n}/ids" for n in like.names)
            raise UsageError(
                f"--churn needs a version whose tables all have integer ids ({listed}); {lacking[0]} has "
                f"{'none' if like.table(lacking[0]).ids is None else 'string ids'} (rows are replaced by id)"
            )
    return retrain_structure(like, sides=sides, symmetric=symmetric)


def synth_tables(
    out: str | os.PathLike[str],
    tables: dict[str, int],
    *,
    dim: int,
    structure: Structure | str | None = None,
    symmetric: bool = False,
    rank: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    counts: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    params: dict[str, Any] | None = None,
) -> Version:
    """Write a synthetic version of named tables (``{"words": 6_000_000}``) whose scores have rank ``rank``.

    Rows are ``(Z + mean) @ B``, ``Z`` standard normal: two-sided, the
    candidate tables share one loading matrix ``B`` and the query tables
    another; symmetric, every table shares one, so every table's rows live in
    one ``rank``-dimensional space and score against every other's. The
    structure is ``structure`` (or ``--symmetric``), else the default for the
    names (users:items, one table symmetric), and is recorded in the version.
    Ids are unique across tables; with ``counts``, each table also gets
    ``NAME/counts`` (:func:`counts_for_ids`), for the anchor options.
    """
    tables = dict(tables)
    rank = dim if rank is None else rank
    chunk_rows = default_chunk_rows(dim) if chunk_rows is None else chunk_rows
    check_synth_tables(tables, dim=dim, rank=rank, seed=seed, dtype=dtype, chunk_rows=chunk_rows)
    shape = resolve(tuple(tables), sides=structure, symmetric_all=symmetric, label="the synthetic version")
    model = _model(dim, rank, seed)
    # the candidate side (or, symmetric, every table) takes the loadings items always had; the query side the users'
    loadings = {name: model["items" if shape.side_of(name) == 0 else "users"] for name in tables}
    codes = table_codes(tuple(tables))
    staging = Staging(os.fspath(out), inputs=[], overwrite=overwrite)
    tasks = []
    for name, n in tables.items():
        rows = min(chunk_rows, n)
        target = staging.create_array(
            f"{name}/vectors", shape=(n, dim), chunks=(rows, dim), dtype=np.dtype(dtype), coordinates="ids"
        )
        ids_target = staging.create_array(f"{name}/ids", shape=(n,), chunks=(rows,), dtype=np.dtype(np.int64))
        counts_target = (
            staging.create_array(
                f"{name}/counts", shape=(n,), chunks=(rows,), dtype=np.dtype(np.int64), coordinates="ids"
            )
            if counts
            else None
        )
        id_base = codes[name] * ID_STRIDE  # items from 0, users from 10**12: no two tables share an id
        for index, start in enumerate(range(0, n, rows)):
            tasks.append(
                dask.delayed(_synth_block, pure=True)(
                    loadings[name], model["mean"], seed, codes[name], index, min(rows, n - start), dtype,
                    target, ids_target, start, id_base, counts_target,
                )
            )  # fmt: skip
    if params is None:
        params = {
            "tables": tables, "structure": shape.to_attrs(), "dim": dim, "rank": rank, "seed": seed, "dtype": dtype,
            "counts": counts,
        }  # fmt: skip
    attrs = {**_base_attrs(**params), "structure": shape.to_attrs()}
    _finish(staging, tasks, attrs, progress)
    return open_version(out)


def synth(
    out: str | os.PathLike[str],
    *,
    items: int,
    users: int,
    dim: int,
    rank: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    counts: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """Write a synthetic two-sided version (users scored against items) whose scores have rank ``rank`` (default ``dim``).

    With ``counts``, each side also gets ``SIDE/counts`` (:func:`counts_for_ids`), for the anchor options.
    """
    rank = dim if rank is None else rank
    check_synth(items=items, users=users, dim=dim, rank=rank, seed=seed, dtype=dtype, chunk_rows=chunk_rows)
    return synth_tables(
        out, {"items": items, "users": users}, dim=dim, structure=two_sided((DEFAULT_QUERY,), (DEFAULT_CANDIDATE,)),
        rank=rank, seed=seed, dtype=dtype, chunk_rows=chunk_rows, counts=counts, overwrite=overwrite, progress=progress,
        params={"items": items, "users": users, "dim": dim, "rank": rank, "seed": seed, "dtype": dtype, "counts": counts},
    )  # fmt: skip


def random_basis(dim: int, seed: int, condition: float = 10.0) -> np.ndarray:
    """A random invertible ``G`` with condition number ``condition``: rotation, scaling, rotation."""
    from scipy.stats import (
        ortho_group,  # scipy.stats takes 0.3-1.4 s to import: only when a retrain is drawn
    )

    rng = np.random.default_rng([seed, 7])
    q1 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    q2 = ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    return (q1 * np.logspace(0.0, np.log10(condition), dim)) @ q2


def random_rotation(dim: int, seed: int) -> np.ndarray:
    """A random orthogonal ``Q`` (Haar: QR of a Gaussian matrix, signs fixed by R's diagonal): keeps every dot product."""
    rng = np.random.default_rng([seed, 8])
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def retrain_bases(structure: Structure, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Each table's basis change: candidate tables ``G``, query tables ``G^-T``; symmetric, one orthogonal ``Q`` for all.

    Two-sided scores ``(W G^-T)(T G)^T = W T^T`` are kept by any invertible
    ``G``; a table scored against itself keeps its dot products only under an
    orthogonal map, so a symmetric model's retrain rotates every table alike.
    """
    if structure.kind == "symmetric":
        rotation = random_rotation(dim, seed)
        return {name: rotation for name in structure.tables}
    basis = random_basis(dim, seed)
    inverse_t = np.linalg.inv(basis).T
    return {name: basis if structure.side_of(name) == 0 else inverse_t for name in structure.tables}


def synth_like(
    out: str | os.PathLike[str],
    like: Version,
    *,
    noise: float = 0.0,
    churn: float = 0.0,
    seed: int = 1,
    sides: str | Structure | None = None,
    symmetric: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Version:
    """A "retrain" of ``like``: every table's rows plus noise, in a new basis that keeps every score.

    Two-sided (users:items): candidate tables ``(T + noise) G``, query tables
    ``(W + noise) G^-T`` for a random invertible ``G``; symmetric: every table
    ``(X + noise) Q`` for one random orthogonal ``Q``. The structure is
    ``sides`` / ``symmetric``, else the one ``like`` recorded, else the default
    for its tables; the retrain records it.

    With ``noise=0`` every score is the same as in ``like``; only the basis moved.
    ``noise`` is relative in every direction (shaped like the rows' second
    moment), so chains of retrains do not compound it. With ``churn``, that share of each table's rows (drawn per block) leave and as
    many new rows with new ids arrive, and the rows are reordered: whole blocks
    are shuffled and the rows inside each block too (out of core, block by block).
    Counts, when ``like`` has them, follow the ids (:func:`counts_for_ids` for new ones).
    """
    structure = check_retrain(like, noise=noise, churn=churn, seed=seed, sides=sides, symmetric=symmetric)
    bases = retrain_bases(structure, like.dim, seed)
    codes = table_codes(like.names)
    inputs = [like.url] if like.url else []
    staging = Staging(os.fspath(out), inputs=inputs, overwrite=overwrite)
    tasks = []
    for side in like.names:
        table, code = like.table(side), codes[side]
        target = staging.create_table(side, table, table.dim)
        chunks = table.row_chunks()
        if churn == 0:
            for index, (block, start) in enumerate(zip(table.blocks(chunks), row_starts(chunks))):
                tasks.append(
                    dask.delayed(_retrain_block, pure=True)(
                        block, bases[side], float(noise), seed, code, index, target, start
                    )
                )
            tasks += staging.copy_ids(side, table)
            continue
        ids_target = staging.create_array(
            f"{side}/ids",
            shape=(table.n_rows,),
            chunks=(min(table.chunk_rows, table.n_rows),),
            dtype=np.dtype(np.int64),
        )
        counts_target = None
        if table.counts is not None:
            counts_target = staging.create_array(
                f"{side}/counts", shape=(table.n_rows,), chunks=(min(table.chunk_rows, table.n_rows),),
                dtype=np.dtype(np.int64), coordinates="ids",
            )  # fmt: skip
        blocks, id_blocks, starts = table.blocks(chunks), table.id_blocks(chunks), row_starts(chunks)
        full = [i for i, n in enumerate(chunks) if n == chunks[0]]  # blocks of one size trade places
        moved = dict(zip(full, np.random.default_rng([seed, code, 3]).permutation(full).tolist()))
        for index in range(len(chunks)):
            src = moved.get(index, index)
            tasks.append(
                dask.delayed(_retrain_block, pure=True)(
                    blocks[src], bases[side], float(noise), seed, code, src, target, starts[index],
                    float(churn), id_blocks[src], ids_target, counts_target,  # type: ignore[index]
                )
            )  # fmt: skip
    basis = "orthogonal" if structure.kind == "symmetric" else "invertible"
    attrs = _base_attrs(
        like=canonical_url(like.url) if like.url else None, noise=noise, churn=churn, seed=seed, basis=basis
    )
    _finish(staging, tasks, {**attrs, "structure": structure.to_attrs()}, progress)
    return open_version(out)
