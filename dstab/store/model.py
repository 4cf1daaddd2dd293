"""The data model: tables and versions as opened (Zarr, numpy or Dask behind them), their blocks, their invariants.

A version is a set of tables with row vectors (and optional ids and counts);
a task reads one block of rows of one table. Nothing here touches a store
beyond the arrays it is given: opening is :mod:`dstab.store.read`, writing
:mod:`dstab.store.write`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr

from .. import config
from ..errors import InputError
from ..linalg import transform_rows
from ..structure import Structure, check_table_name, default_structure

Side = Literal["items", "users"]  # the two tables of the default two-sided model

SIDES: tuple[Side, Side] = ("items", "users")


# Row blocks handed to one task are a whole number of storage chunks, grown
# towards block_bytes() so that per-task overhead stays small.


# Rows per chunk of a table dstab lays out itself (synth, import, an in-memory numpy table): 131,072 up to
# width 64 and fewer above, so that a chunk holds at most 32 MiB of float32. A fixed 131,072 rows made 512 MiB
# chunks at width 1,024, and a worker then needed 2.3 GiB for one task's blocks.
CHUNK_ELEMENTS = 131_072 * 64


def default_chunk_rows(dim: int) -> int:
    """Rows per chunk of a table of width ``dim`` that dstab lays out itself (see :data:`CHUNK_ELEMENTS`)."""
    return max(1, min(131_072, CHUNK_ELEMENTS // max(dim, 1)))


def block_bytes() -> int:
    """The target bytes of one task's block: dask config ``dstab.block-bytes`` (64 MiB; DASK_DSTAB__BLOCK_BYTES)."""
    return config.get("block-bytes")


@dataclass(frozen=True)
class Table:
    """One side of a version: row vectors and, optionally, their ids."""

    name: str  # "items" or "users", or a caller's label for a loose table
    vectors: Any  # zarr.Array, numpy or dask array, (n, e)
    ids: Any | None  # same kinds, (n,)
    chunk_rows: int  # rows per storage chunk (the unit every task's block is made of)
    counts: Any | None = None  # same kinds, (n,): how often each row was seen (anchor filter / weights)

    @property
    def n_rows(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.vectors.dtype)

    def block_rows(self) -> int:
        """Rows per task's block: whole storage chunks, about :func:`block_bytes` each."""
        row_bytes = max(1, self.dim * self.dtype.itemsize)
        per_chunk = self.chunk_rows * row_bytes
        # dask config "dstab.block-bytes" (env DASK_DSTAB__BLOCK_BYTES) overrides the default
        target = block_bytes()
        return self.chunk_rows * max(1, target // per_chunk)

    def row_chunks(self) -> tuple[int, ...]:
        """Rows of each block, in order (all :meth:`block_rows` but the last)."""
        step = self.block_rows()
        return tuple(min(step, self.n_rows - start) for start in range(0, self.n_rows, step))

    def blocks(self, row_chunks: tuple[int, ...] | None = None) -> list[Any]:
        """One source per block of rows: read it with :func:`load` inside the task that uses it.

        Zarr-backed tables give :class:`RowBlock` handles, so each task reads its
        own rows (no separate read task, no block sent between workers); in-memory
        and Dask tables give Dask's delayed blocks.
        """
        return block_sources(self.vectors, row_chunks or self.row_chunks())

    def id_blocks(self, row_chunks: tuple[int, ...] | None = None) -> list[Any] | None:
        if self.ids is None:
            return None
        return block_sources(self.ids, row_chunks or self.row_chunks())

    def count_blocks(self, row_chunks: tuple[int, ...] | None = None) -> list[Any] | None:
        if self.counts is None:
            return None
        return block_sources(self.counts, row_chunks or self.row_chunks())

    def read(self, row_chunks: int | tuple[int, ...] | None = None) -> da.Array:
        """The vectors as a lazy Dask array, full width, one block per ``row_chunks``."""
        return as_dask(self.vectors, (row_chunks or self.row_chunks(), self.dim))


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, stop)`` of a Zarr array, read by the task that uses them. Picklable."""

    array: zarr.Array
    start: int
    stop: int

    def load(self) -> np.ndarray:
        return np.asarray(self.array[self.start : self.stop])


def load(source: Any) -> Any:
    """The numpy rows behind a block source (``None`` stays ``None``)."""
    return source.load() if isinstance(source, RowBlock) else source


def block_sources(source: Any, row_chunks: tuple[int, ...]) -> list[Any]:
    if isinstance(source, zarr.Array):
        return [RowBlock(source, start, start + n) for start, n in zip(row_starts(row_chunks), row_chunks)]
    chunks = (row_chunks,) + tuple((d,) for d in source.shape[1:])
    blocks = as_dask(source, chunks).to_delayed(optimize_graph=True)
    return list(blocks.reshape(len(row_chunks)))


def as_dask(source: Any, chunks: tuple) -> da.Array:
    if isinstance(source, da.Array):
        return source.rechunk(chunks)
    if isinstance(source, zarr.Array):
        return da.from_zarr(source, chunks=chunks)
    return da.from_array(np.asarray(source), chunks=chunks)


@dataclass(frozen=True)
class Version:
    """An opened, validated version: named tables. Open one with :func:`open_version`."""

    tables: dict[str, Table]
    url: str | None = None
    storage_options: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # attrs["dstab"], empty for raw inputs
    # the e x w matrices that made a stabilized version (raw rows of a table -> its rows), empty otherwise
    transforms: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tables)

    @property
    def structure(self) -> Structure | None:
        """The structure recorded in the version (dstab outputs), else ``None``."""
        return Structure.from_attrs(self.attrs.get("structure"))

    @property
    def known_structure(self) -> Structure | None:
        """The structure recorded in the version, else the default for its tables, else ``None`` (it must be told)."""
        return self.structure or default_structure(self.names)

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise InputError(
                f"{self.url or 'this version'} has no table {name!r}; its tables are {', '.join(self.tables)}"
            ) from None

    @property
    def items(self) -> Table:
        return self.table("items")

    @property
    def users(self) -> Table:
        return self.table("users")

    def transform(self, name: str, rows: Any) -> np.ndarray:
        """Map raw rows of table ``name`` (numpy, n x e, in the raw model's basis) into this version's space.

        An extra row mapped this way scores against this version's rows as the
        raw row scored against the raw rows.
        """
        transform = self.saved_transform(name)
        return transform_rows(checked_rows(name, rows, transform.shape[0]), transform)

    def saved_transform(self, name: str) -> np.ndarray:
        if name not in self.transforms:
            if self.transforms:
                raise InputError(
                    f"{self.url or 'this version'} has no transform for a table {name!r}; it maps rows of "
                    f"{', '.join(self.transforms)}"
                )
            raise InputError(
                f"{self.url or 'this version'} has no transform/{name}: only versions written by "
                "`dstab stabilize` keep the transforms that map new rows into them"
            )
        return self.transforms[name]

    @property
    def first(self) -> Table:
        return next(iter(self.tables.values()))

    @property
    def dim(self) -> int:
        return self.first.dim

    @property
    def dtype(self) -> np.dtype:
        return self.first.dtype

    def __repr__(self) -> str:
        where = self.url or "<in memory>"
        shapes = ", ".join(f"{name}={t.n_rows:,} x {t.dim}" for name, t in self.tables.items())
        return f"Version({where!s}, {shapes}, dtype={self.dtype})"


def checked_rows(side: str, rows: Any, width: int) -> np.ndarray:
    """Raw rows handed to a transform, as a float32/float64 numpy array of the raw model's width."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise InputError(f"{side} rows must have shape (n, {width}) (the raw model's width), got {rows.shape}")
    if rows.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"{side} rows have dtype {rows.dtype}; pass float32 or float64 rows")
    return rows


def check_vectors(name: str, arr: Any) -> None:
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D [rows, dim], got shape {tuple(arr.shape)}; store one row per vector")
    dtype = np.dtype(arr.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(
            f"{name} has dtype {dtype}; dstab needs float32 or float64 vectors: cast the table, "
            f"e.g. arr.astype('float32'), and write it again"
        )
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty (0 rows); a version needs at least one row in every table")
    if arr.shape[1] == 0:
        raise InputError(f"{name} has width 0; embeddings need at least one dimension")


def check_ids(name: str, ids: Any, n_rows: int) -> None:
    if ids.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] != n_rows:
        raise InputError(f"{name} has {ids.shape[0]:,} ids for {n_rows:,} vector rows; write exactly one id per row")
    dtype = np.dtype(ids.dtype)
    if dtype.kind not in "iuUT":
        raise InputError(f"{name} has dtype {dtype}; ids must be integers or strings (object arrays are never read)")


def check_counts(name: str, counts: Any, n_rows: int) -> None:
    if counts.ndim != 1 or counts.shape[0] != n_rows:
        raise InputError(
            f"{name} has shape {tuple(counts.shape)} for {n_rows:,} vector rows; write exactly one count per row"
        )
    if np.dtype(counts.dtype).kind not in "iuf":
        raise InputError(f"{name} has dtype {counts.dtype}; counts must be integers or floats")


def check_tables(*tables: Table) -> None:
    """Validate what can be checked without reading the data: each table, and one width and dtype for all.

    Every table of a version meets every other (directly or through a side's
    shared transform), so all come from one model of one width.
    """
    if not tables:
        raise InputError("a version needs at least one table (NAME/vectors)")
    for table in tables:
        check_table_name(table.name, "a table of the version", InputError)
        check_vectors(f"{table.name}/vectors", table.vectors)
        if table.ids is not None:
            check_ids(f"{table.name}/ids", table.ids, table.n_rows)
        if table.counts is not None:
            check_counts(f"{table.name}/counts", table.counts, table.n_rows)
    first = tables[0]
    for table in tables[1:]:
        if table.dim != first.dim:
            raise InputError(
                f"{first.name}/vectors has width {first.dim} but {table.name}/vectors has width {table.dim}; "
                "every table of a version must come from the same model (one width)"
            )
        if table.dtype != first.dtype:
            raise InputError(
                f"{first.name}/vectors is {first.dtype} but {table.name}/vectors is {table.dtype}; store every table in one dtype"
            )


def from_tables(
    vectors: dict[str, Any],
    *,
    ids: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
) -> Version:
    """A version of named tables from in-memory numpy, Dask or Zarr arrays (tests, notebooks, small tables).

    >>> from_tables({"words": w}, ids={"words": vocab})           # one table: symmetric by default
    >>> from_tables({"users": u, "items": i, "creators": c})      # say --sides users:items,creators
    """
    ids, counts = ids or {}, counts or {}
    for label, given in (("ids", ids), ("counts", counts)):
        unknown = [name for name in given if name not in vectors]
        if unknown:
            raise InputError(
                f"{label} given for the table {unknown[0]!r}, which has no vectors; tables: {', '.join(vectors)}"
            )
    tables = []
    for name, table_vectors in vectors.items():
        check_table_name(name, "from_tables", InputError)
        if isinstance(table_vectors, da.Array):
            rows = int(table_vectors.chunks[0][0]) if table_vectors.ndim and table_vectors.chunks[0] else 1
        elif isinstance(table_vectors, zarr.Array):
            rows = unit_rows(table_vectors)
        else:
            table_vectors = np.asarray(table_vectors)
            # no storage chunk to follow: the CLI's chunk, so a large array is read (and written) in many blocks
            width = int(table_vectors.shape[1]) if table_vectors.ndim > 1 else 1
            rows = min(int(table_vectors.shape[0]), default_chunk_rows(width)) if table_vectors.ndim else 1
        table_ids, table_counts = ids.get(name), counts.get(name)
        if table_ids is not None and not isinstance(table_ids, (da.Array, zarr.Array)):
            table_ids = np.asarray(table_ids)
        if table_counts is not None and not isinstance(table_counts, (da.Array, zarr.Array)):
            table_counts = np.asarray(table_counts)
        tables.append(
            Table(
                name=name,
                vectors=table_vectors,
                ids=table_ids,
                chunk_rows=max(1, chunk_rows or rows),
                counts=table_counts,
            )
        )
    check_tables(*tables)
    return Version(tables={t.name: t for t in tables})


def from_arrays(
    items: Any,
    users: Any,
    *,
    item_ids: Any | None = None,
    user_ids: Any | None = None,
    item_counts: Any | None = None,
    user_counts: Any | None = None,
    chunk_rows: int | None = None,
) -> Version:
    """A two-table version (``items``, ``users``) from in-memory arrays: :func:`from_tables` for the default model."""
    keep = lambda pairs: {name: value for name, value in pairs if value is not None}  # noqa: E731
    return from_tables(
        {"items": items, "users": users},
        ids=keep((("items", item_ids), ("users", user_ids))),
        counts=keep((("items", item_counts), ("users", user_counts))),
        chunk_rows=chunk_rows,
    )


def unit_rows(arr: zarr.Array) -> int:
    """Rows of the smallest unit two tasks may not share: the shard if sharded, else the chunk."""
    shards = getattr(arr, "shards", None)
    return int((shards or arr.chunks)[0])


def row_starts(chunks: tuple[int, ...]) -> list[int]:
    """First global row of each block."""
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int).tolist()
