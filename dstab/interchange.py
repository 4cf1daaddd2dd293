"""Import versions from ``.npy`` and Parquet, export them to Parquet. Out of core, through pyarrow.

Sources are split into pieces read by separate tasks (row ranges of a
memory-mapped ``.npy``; row groups of each Parquet file), stitched into one
Dask array, rechunked to whole Zarr chunks and written block by block, so no
table is ever held whole and no two tasks write one chunk.

Parquet tables hold an id column plus either one list column of vectors
(``list<float>`` or ``fixed_size_list<float>[D]``) or D scalar columns. A
Parquet source is one file or a directory of them (partitioned directories
included: every ``*.parquet`` below it, in path order), local or any fsspec URL.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from . import ids as idm
from .errors import InputError, UsageError
from .executor import compute, run_all, tree_reduce
from .extras import require
from .ids import IdKind, id_kind
from .release import __version__
from .stats import check_repeat
from .store import (
    EXPORT_MARKER,
    Claim,
    Staging,
    Table,
    Version,
    canonical_url,
    check_output,
    check_replaceable,
    default_chunk_rows,
    inspect_output,
    is_local,
    local_path,
    move_into_place,
    open_version,
    row_starts,
    staging_name,
    write_block,
)
from .store.write import merge_receipts
from .structure import Structure, check_table_name, check_tables_named

# Rows of a .npy file one task reads.
NPY_PIECE_ROWS = 262_144
VECTOR_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, start + n_rows)`` of a source, as one task reads them."""

    path: str
    n_rows: int
    start: int = 0  # .npy: first row; parquet: unused
    row_group: int = -1  # parquet: the row group


@dataclass
class Source:
    """A table to import: where it is, how its columns map to ids and vectors, and its pieces."""

    url: str
    kind: str  # "npy" or "parquet"
    n_rows: int
    dim: int
    dtype: np.dtype
    pieces: list[Piece]
    ids_url: str | None = None  # npy: a separate .npy of ids
    id_column: str | None = None  # parquet
    vector_column: str | None = None  # parquet: one list column
    vector_columns: list[str] = field(default_factory=list)  # parquet: D scalar columns
    storage_options: dict[str, Any] | None = None
    ids_kind: IdKind | None = None  # "integer" or "string" when the source has ids (found when it is opened)


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _npy_header(path: str, label: str) -> np.ndarray:
    if not is_local(path):
        raise UsageError(f"{label}: .npy files are memory-mapped and must be local; got {path}")
    p = local_path(path)
    if not p.is_file():
        raise InputError(f"{label}: no file at {path}")
    try:
        # allow_pickle=False: an object array is refused, never unpickled
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"{label}: {path} is not a plain .npy array ({exc}); save it with numpy.save") from None


def open_npy(path: str, *, ids: str | None = None, label: str = "items") -> Source:
    """A ``.npy`` table ([rows, dim] float32/float64), with ids from another ``.npy`` if given."""
    arr = _npy_header(path, label)
    if arr.ndim != 2:
        raise InputError(f"{label}: {path} has shape {arr.shape}; vectors must be 2-D [rows, dim]")
    _check_vector_dtype(arr.dtype, f"{label}: {path}")
    if ids is not None:
        id_arr = _npy_header(ids, f"{label} ids")
        if id_arr.shape != (arr.shape[0],):
            raise InputError(
                f"{label}: {ids} has shape {id_arr.shape} for {arr.shape[0]:,} vector rows; write one id per row"
            )
        if id_arr.dtype.kind not in "iuU":
            raise InputError(f"{label}: {ids} has dtype {id_arr.dtype}; ids must be integers or strings")
    n = int(arr.shape[0])
    pieces = [Piece(str(local_path(path)), min(NPY_PIECE_ROWS, n - s), start=s) for s in range(0, n, NPY_PIECE_ROWS)]
    return Source(
        url=path, kind="npy", n_rows=n, dim=int(arr.shape[1]), dtype=np.dtype(arr.dtype), pieces=pieces,
        ids_url=str(local_path(ids)) if ids is not None else None,
        ids_kind=None if ids is None else id_kind(id_arr.dtype),
    )  # fmt: skip


def _check_vector_dtype(dtype: np.dtype, label: str) -> None:
    if np.dtype(dtype) not in VECTOR_DTYPES:
        raise InputError(f"{label} holds {dtype} values; vectors must be float32 or float64: cast them upstream")


def _parquet_files(url: str, storage_options: dict[str, Any] | None, label: str) -> tuple[Any, list[str]]:
    if not is_local(url):
        from .store.remote import probe

        if not probe(url, storage_options, what=f"{label} source"):  # one line if the store cannot answer
            raise InputError(f"{label}: nothing at {url}; give a Parquet file or a directory of them")
    fs, path = _fs(url, storage_options)
    if not fs.exists(path):
        raise InputError(f"{label}: nothing at {url}; give a Parquet file or a directory of them")
    if fs.isdir(path):
        files = sorted(
            f for f in fs.find(path)
            if f.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in f[len(path):].split("/"))
        )  # fmt: skip
        if not files:
            raise InputError(f"{label}: {url} is a directory with no *.parquet files")
    else:
        files = [path]
    return fs, files


def open_parquet(
    url: str,
    *,
    id_column: str | None = "id",
    vector_column: str | None = None,
    vector_columns: str | list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    label: str = "items",
) -> Source:
    """A Parquet table: one file or a directory of files (reads the footers only).

    ``vector_columns`` may be a list of names or one glob (``"v*"``) matched
    against the schema in its order; without either vector option, the one
    list column of the schema is taken.
    """
    pa = require("pyarrow")

    fs, files = _parquet_files(url, storage_options, label)
    pieces: list[Piece] = []
    schema = None
    for f in files:
        with fs.open(f, "rb") as handle:
            meta = _parquet_file(handle, f, label)
            if schema is None:
                schema = meta.schema_arrow
            elif not meta.schema_arrow.equals(schema):
                raise InputError(
                    f"{label}: {f} has another schema than {files[0]}; all files of a table must share one"
                )
            pieces += [Piece(f, meta.metadata.row_group(i).num_rows, row_group=i) for i in range(meta.num_row_groups)]
    assert schema is not None
    names = schema.names
    if id_column is not None and id_column not in names:
        raise InputError(
            f"{label}: {url} has no column {id_column!r} (columns: {', '.join(names)}); pass --id-column NAME"
        )
    ids_kind: IdKind | None = None
    if id_column is not None:
        id_type = schema.field(id_column).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise InputError(f"{label}: column {id_column!r} is {id_type}; ids must be integers or strings")
        ids_kind = "integer" if pa.types.is_integer(id_type) else "string"
    if vector_column is not None and vector_columns:
        raise UsageError(
            "give either --vector-column NAME (one list column) or --vector-columns COLS (scalar columns), not both"
        )
    if isinstance(vector_columns, str):
        pattern = vector_columns
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) and n != id_column]
        if not matched:
            raise InputError(f"{label}: no column of {url} matches {pattern!r} (columns: {', '.join(names)})")
        # a glob selects numeric scalar columns only: a list column (or a string one) it also matches is skipped
        vector_columns = [n for n in matched if _is_number(schema.field(n).type)]
        if not vector_columns:
            _refuse_vector_column(label, url, matched[0], schema.field(matched[0]).type, f"matched by {pattern!r}")
    if vector_columns:
        missing = [c for c in vector_columns if c not in names]
        if missing:
            raise InputError(f"{label}: {url} has no column {missing[0]!r} (columns: {', '.join(names)})")
        for c in vector_columns:
            if not _is_number(schema.field(c).type):
                _refuse_vector_column(label, url, c, schema.field(c).type, "given in --vector-columns")
        types = {schema.field(c).type for c in vector_columns}
        if len(types) != 1:
            first = schema.field(vector_columns[0]).type
            other = next(c for c in vector_columns if schema.field(c).type != first)
            raise InputError(
                f"{label}: the vector columns have several types (column {vector_columns[0]!r} is {first}, column "
                f"{other!r} is {schema.field(other).type}); cast them to one float type upstream"
            )
        dtype = np.dtype(types.pop().to_pandas_dtype())
        _check_vector_dtype(dtype, f"{label}: columns {vector_columns[0]}..")
        dim = len(vector_columns)
    else:
        if vector_column is None:
            lists = [n for n in names if _is_list(schema.field(n).type)]
            if len(lists) != 1:
                raise InputError(
                    f"{label}: {url} has {len(lists)} list columns ({', '.join(lists) or 'none'}); name the vectors "
                    "with --vector-column NAME (one list column) or --vector-columns 'PATTERN' (scalar columns)"
                )
            vector_column = lists[0]
        if vector_column not in names:
            raise InputError(f"{label}: {url} has no column {vector_column!r} (columns: {', '.join(names)})")
        vtype = schema.field(vector_column).type
        if not _is_list(vtype):
            raise InputError(f"{label}: column {vector_column!r} is {vtype}, not a list of floats")
        dtype = np.dtype(vtype.value_type.to_pandas_dtype())
        _check_vector_dtype(dtype, f"{label}: column {vector_column!r}")
        dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else _first_list_length(fs, pieces, vector_column)
    return Source(
        url=url, kind="parquet", n_rows=sum(p.n_rows for p in pieces), dim=int(dim), dtype=dtype, pieces=pieces,
        id_column=id_column, vector_column=None if vector_columns else vector_column,
        vector_columns=list(vector_columns or []), storage_options=storage_options, ids_kind=ids_kind,
    )  # fmt: skip


def _is_list(t: Any) -> bool:
    pa = require("pyarrow")

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: Any) -> bool:
    pa = require("pyarrow")

    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _refuse_vector_column(label: str, url: str, name: str, vtype: Any, how: str) -> None:
    """--vector-columns names scalar float columns: one line on a column that is not one."""
    if _is_list(vtype):
        fix = f"it is a list column: import it with --vector-column {name} instead of --vector-columns"
    else:
        fix = "--vector-columns takes float32 or float64 scalar columns: cast or drop it upstream"
    raise InputError(f"{label}: column {name!r} of {url} ({how}) is {vtype}, not a scalar float column; {fix}")


def _not_parquet(label: str, path: str, exc: Exception) -> InputError:
    reason = " ".join(str(exc).split())  # one line, whatever pyarrow says
    return InputError(
        f"{label}: {path} is not a Parquet file ({reason}); expected a Parquet file or a directory of "
        "*.parquet files (or a .npy file): convert the table to Parquet upstream"
    )


def _parquet_file(handle: Any, path: str, label: str) -> Any:
    """``pyarrow.parquet.ParquetFile`` of an open file; :class:`InputError` naming it when it is not Parquet."""
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")

    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as exc:  # no magic bytes, too small: text, CSV, an empty file
        raise _not_parquet(label, path, exc) from None
    except OSError as exc:  # magic bytes but a footer that does not decode; other OSErrors are the store's
        if "thrift" not in str(exc).lower():
            raise
        raise _not_parquet(label, path, exc) from None


def _first_list_length(fs: Any, pieces: list[Piece], column: str) -> int:
    pq = require("pyarrow.parquet")

    for p in pieces:
        if p.n_rows:
            with fs.open(p.path, "rb") as handle:
                col = pq.ParquetFile(handle).read_row_group(p.row_group, columns=[column]).column(column)
            return len(col[0].values)
    raise InputError("the table has no rows; a version needs at least one row in every table")


# ----------------------------------------------------------------------------- per-piece kernels


def _read_piece(source: Source, piece: Piece, offset: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Vectors (and ids) of one piece; ``offset`` is its first global row (for error messages)."""
    if source.kind == "npy":
        rows = np.load(piece.path, mmap_mode="r", allow_pickle=False)[piece.start : piece.start + piece.n_rows]
        ids = None
        if source.ids_url is not None:
            ids = np.array(
                np.load(source.ids_url, mmap_mode="r", allow_pickle=False)[piece.start : piece.start + piece.n_rows]
            )
        return np.array(rows), ids
    return _read_parquet_piece(source, piece, offset)


def _read_parquet_piece(source: Source, piece: Piece, offset: int) -> tuple[np.ndarray, np.ndarray | None]:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")

    fs, _ = _fs(source.url, source.storage_options)
    columns = ([source.id_column] if source.id_column else []) + (source.vector_columns or [source.vector_column])  # type: ignore[list-item]
    with fs.open(piece.path, "rb") as handle:
        table = pq.ParquetFile(handle).read_row_group(piece.row_group, columns=columns)
    where = f"{source.url} ({piece.path}, row group {piece.row_group})"
    for name in columns:
        col = table.column(name)
        if col.null_count:
            row = offset + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{where}: column {name!r} is null at row {row}; fill or drop that row upstream")
    if source.vector_columns:
        vectors = np.column_stack([table.column(c).to_numpy() for c in source.vector_columns]).astype(
            source.dtype, copy=False
        )
    else:
        col = table.column(source.vector_column).combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):
            lengths = np.diff(col.offsets.to_numpy())
            bad = np.flatnonzero(lengths != source.dim)
            if bad.size:
                raise InputError(
                    f"{where}: the vector at row {offset + int(bad[0])} has {int(lengths[bad[0]])} values, not "
                    f"{source.dim}; every vector must have the same length"
                )
        flat = col.flatten()
        if flat.null_count:  # a null inside a vector (e.g. [None, 1.0, ...]) would read as NaN
            pc = require("pyarrow.compute")

            first = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            row = offset + int(pc.list_parent_indices(col)[first].as_py())
            raise InputError(
                f"{where}: column {source.vector_column!r} has a null element at row {row}; fill or drop that row upstream"
            )
        values = flat.to_numpy(zero_copy_only=False)
        if len(values) != table.num_rows * source.dim:
            raise InputError(f"{where}: vectors hold null values; fill or drop those rows upstream")
        vectors = values.reshape(table.num_rows, source.dim).astype(source.dtype, copy=False)
    ids = None
    if source.id_column:
        raw = table.column(source.id_column)
        if pa.types.is_integer(raw.type):
            ids = raw.to_numpy().astype(np.int64, copy=False)
        else:
            ids = np.asarray(raw.to_pylist(), dtype=str)
    return vectors, ids


# ----------------------------------------------------------------------------- import


def _write_finite_block(block: np.ndarray, target: Any, start: int, label: str) -> Any:
    """Write one block of vectors, refusing NaN or Inf first (the import is then discarded: nothing published)."""
    if not np.isfinite(block).all():
        row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise InputError(f"{label} row {row} is not finite (NaN or Inf); fix or drop that row and import again")
    return write_block(block, target, start)


def _write_ids(block: np.ndarray, target: Any, start: int, n_buckets: int) -> list[Any]:
    """Write one block of ids and return their hashes by bucket (the duplicate check, on ids already in memory), then the receipt."""
    receipt = write_block(block, target, start)
    block = np.asarray(block)
    return [*idm.buckets_of(idm.hash_ids(block.astype(str) if block.dtype == object else block), n_buckets), receipt]


def _table_graph(source: Source, side: str, staging: Staging, chunk_rows: int) -> tuple[list[Any], Any | None]:
    """Tasks that read ``source`` piece by piece and write ``side/vectors`` (and ``side/ids``) in whole chunks.

    With ids, also a delayed :class:`dstab.ids.IdSummary` of them: the id
    write tasks hash their blocks into buckets (8 bytes per row), one task per
    bucket looks for a repeated hash, as :mod:`dstab.stats` does; no more reads.
    """
    parts = []
    offsets = row_starts(tuple(p.n_rows for p in source.pieces))
    light = dataclasses.replace(source, pieces=[])  # each task needs its own piece, not the list of all
    for piece, offset in zip(source.pieces, offsets):
        parts.append(dask.delayed(_read_piece, pure=True, nout=2)(light, piece, offset))
    rows = min(chunk_rows, source.n_rows)
    vectors = da.concatenate(
        [
            da.from_delayed(p[0], shape=(piece.n_rows, source.dim), dtype=source.dtype)
            for p, piece in zip(parts, source.pieces)
        ]
    ).rechunk((rows, source.dim))
    target = staging.create_array(
        f"{side}/vectors", shape=(source.n_rows, source.dim), chunks=(rows, source.dim), dtype=source.dtype,
        coordinates="ids" if source.ids_kind is not None else None,
    )  # fmt: skip
    tasks = [
        dask.delayed(_write_finite_block, pure=True)(block, target, start, f"{side}: {source.url}")
        for block, start in zip(vectors.to_delayed().ravel(), row_starts(vectors.chunks[0]))
    ]
    if source.ids_kind is not None:
        # ids go out as int64 or Zarr v3's variable-length UTF-8 strings (a specified type)
        meta_ids = np.dtype(np.int64) if source.ids_kind == "integer" else np.dtype(object)
        ids = da.concatenate(
            [da.from_delayed(p[1], shape=(piece.n_rows,), dtype=meta_ids) for p, piece in zip(parts, source.pieces)]
        ).rechunk((rows,))
        id_target = staging.create_array(
            f"{side}/ids", shape=(source.n_rows,), chunks=(rows,),
            dtype=np.dtype(np.int64) if meta_ids.kind == "i" else np.dtypes.StringDType(),
        )  # fmt: skip
        n_buckets = idm.bucket_count(source.n_rows)
        hashed = [
            dask.delayed(_write_ids, pure=True)(block, id_target, start, n_buckets)
            for block, start in zip(ids.to_delayed().ravel(), row_starts(ids.chunks[0]))
        ]
        summaries = [
            dask.delayed(idm.bucket_summary, pure=True)([h[k] for h in hashed], None) for k in range(n_buckets)
        ]
        tasks += [h[n_buckets] for h in hashed]  # the id writes' receipts
        return tasks, tree_reduce(summaries, idm.merge_summaries)
    return tasks, None


def _write_tables(staging: Staging, sources: dict[str, Source], chunk_rows: int, progress: bool) -> None:
    """Write every side into ``staging``; :class:`InputError` naming a repeated id and its first two rows.

    Runs before the version is published, so a refused import leaves nothing
    behind. Naming a repeat reads the staged ids once more (ids only), and only
    when there is one.
    """
    tasks, checks = [], {}
    for side, source in sources.items():
        side_tasks, check = _table_graph(source, side, staging, chunk_rows)
        tasks += side_tasks
        if check is not None:
            checks[side] = check
    receipt, *summaries = compute(
        tree_reduce(tasks, merge_receipts), *checks.values(), progress=progress, stage="import"
    )
    staging.merge(receipt)  # the write tasks' Icechunk forks, before the ids are read back
    for side, summary in zip(checks, summaries):
        source = sources[side]
        ids, vectors = staging.group[f"{side}/ids"], staging.group[f"{side}/vectors"]
        assert isinstance(ids, zarr.Array) and isinstance(vectors, zarr.Array)  # created above as arrays
        table = Table(side, vectors=vectors, ids=ids, chunk_rows=int(ids.chunks[0]))
        where = source.ids_url if source.kind == "npy" else f"{source.url} (column {source.id_column!r})"
        check_repeat(side, str(where), table, summary.repeat_new)


def check_sources(sources: dict[str, Source]) -> None:
    """What an import can check before writing: names, rows, and one width and dtype for every table."""
    if not sources:
        raise UsageError("an import needs at least one table: --table NAME=SRC (or --items SRC, --users SRC)")
    for name, src in sources.items():
        check_table_name(name)
        if src.n_rows == 0:
            raise InputError(f"{name}: {src.url} has no rows; a version needs at least one row in each table")
    (first, a), *rest = sources.items()
    for name, src in rest:
        if src.dim != a.dim:
            raise InputError(
                f"{first} has width {a.dim} but {name} has width {src.dim}; every table must come from one model"
            )
        if src.dtype != a.dtype:
            raise InputError(f"{first} is {a.dtype} but {name} is {src.dtype}; store every table in one dtype")


def import_version(
    out: str | os.PathLike[str],
    sources: dict[str, Source] | Source,
    users: Source | None = None,
    *,
    structure: Structure | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Version:
    """Write a version at ``out`` from named sources (see :func:`open_npy`, :func:`open_parquet`).

    ``sources`` maps table names to sources (``{"words": src}``); the two-table
    call ``import_version(out, items, users)`` of earlier releases still works.
    With ``structure`` (checked against the names), the version records which
    tables score against which, so ``stabilize`` needs no --sides for it.
    """
    if isinstance(sources, Source):
        if users is None:
            raise UsageError("import_version(out, items, users) needs both sources; or pass {name: source, ...}")
        sources = {"items": sources, "users": users}
    elif users is not None:
        raise UsageError("pass the users source inside the dict of sources: {'items': ..., 'users': ...}")
    sources = dict(sources)
    check_sources(sources)
    if structure is not None:
        check_tables_named(structure, tuple(sources), "the imported version")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(next(iter(sources.values())).dim)
    if chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    out = os.fspath(out)
    inputs = [u for src in sources.values() for u in (src.url, src.ids_url) if u]
    staging = Staging(out, inputs=inputs, overwrite=overwrite, storage_options=storage_options)
    try:
        _write_tables(staging, sources, chunk_rows, progress)
        attrs: dict[str, Any] = {
            "kind": "imported",
            "dstab_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            # where each table was read from, and how (never the storage options: they may hold credentials)
            "sources": {
                name: {
                    "url": canonical_url(src.url),
                    "format": src.kind,
                    "ids": canonical_url(src.ids_url) if src.ids_url else None,
                    "id_column": src.id_column if src.kind == "parquet" else None,
                    "vector_column": src.vector_column,
                    "vector_columns": list(src.vector_columns),
                }
                for name, src in sources.items()
            },
        }
        if structure is not None:
            attrs["structure"] = structure.to_attrs()
        staging.publish(attrs)
    except BaseException:
        staging.discard()
        raise
    return open_version(out, storage_options)


# ----------------------------------------------------------------------------- export


def _export_block(source: Any, ids_source: Any, start: int, fs: Any, path: str, layout: str) -> None:
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")

    from .store import load

    vectors = load(source)
    ids = load(ids_source) if ids_source is not None else np.arange(start, start + len(vectors), dtype=np.int64)
    if ids.dtype.kind in "TO":  # Zarr v3 variable-length strings (numpy's StringDType): pyarrow takes them as objects
        ids = ids.astype(object)
    elif ids.dtype.kind not in "iu":
        ids = np.asarray(ids, dtype=str)
    columns: dict[str, Any] = {"id": pa.array(ids)}
    if layout == "list":
        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
        columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    else:
        for j in range(vectors.shape[1]):
            columns[f"v{j}"] = pa.array(vectors[:, j])
    with fs.open(path, "wb") as handle:
        pq.write_table(pa.table(columns), handle, compression="zstd")


def export_version(
    version: Version,
    out: str | os.PathLike[str],
    *,
    layout: str = "list",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> list[str]:
    """Write each table of ``version`` as a directory of Parquet files: ``OUT/NAME/part-*.parquet`` (``OUT/items/...``).

    Columns: ``id`` (the version's ids, or the row number when it has none) and
    either ``vector`` (``fixed_size_list<float>[D]``, ``layout="list"``) or
    ``v0 .. v{D-1}`` (``layout="columns"``). One file per block, in row order.
    Local outputs appear whole or not at all; elsewhere a ``_SUCCESS`` file is
    written last.
    """
    if layout not in ("list", "columns"):
        raise UsageError(f"layout must be 'list' or 'columns', got {layout!r}")
    out = os.fspath(out)
    fs, root = _fs(out, storage_options)
    check_output(out, inputs=[version.url] if version.url else [], overwrite=overwrite, storage_options=storage_options)
    local = is_local(out)
    final = root
    claim = None
    if local:
        final_path = local_path(out)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        root = str(staging_name(final_path, "tmp"))
    else:
        claim = Claim(out, storage_options)
        claim.acquire()
        if fs.exists(root):
            check_replaceable(out, inspect_output(out, storage_options), overwrite=overwrite)
            fs.rm(root, recursive=True)
    try:
        # the marker says "a dstab output" (so --overwrite may replace it later); complete only at the end
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(
            f"{root}/{EXPORT_MARKER}", json.dumps({"format": 1, "kind": "parquet-export", "complete": False}).encode()
        )
        tasks = []
        for side in version.names:
            table = version.table(side)
            fs.makedirs(f"{root}/{side}", exist_ok=True)
            chunks = table.row_chunks()
            ids = table.id_blocks(chunks) or [None] * len(chunks)
            for i, (block, id_block, start) in enumerate(zip(table.blocks(chunks), ids, row_starts(chunks))):
                path = f"{root}/{side}/part-{i:05d}.parquet"
                tasks.append(dask.delayed(_export_block, pure=True)(block, id_block, start, fs, path, layout))
        run_all(tasks, progress=progress, stage="export to Parquet")
        if claim is not None:
            claim.verify()
        # the tables, and the structure the version recorded, so that an import of the export can say it again
        done: dict[str, Any] = {"format": 1, "kind": "parquet-export", "complete": True, "tables": list(version.names)}
        if version.structure is not None:
            done["structure"] = version.structure.to_attrs()
        fs.pipe_file(f"{root}/{EXPORT_MARKER}", json.dumps(done).encode())
        if local:
            move_into_place(Path(root), final_path, replace=overwrite)
        else:
            with fs.open(f"{root}/_SUCCESS", "wb") as handle:
                handle.write(b"")
    except BaseException:
        try:
            if claim is not None:
                claim.verify()  # raises when another run owns OUT now: its files are not ours to remove
            fs.rm(root, recursive=True)
        except (FileNotFoundError, OSError):
            pass
        raise
    finally:
        if claim is not None:
            claim.release()
    return [f"{final}/{side}" for side in version.names]


# ----------------------------------------------------------------------------- command-line table options


def named_values(
    flag: str,
    values: list[str] | None,
    what: str,
    shorthands: dict[str, str | None] | None = None,
    example: str = "words",
) -> dict[str, str]:
    """Repeatable ``FLAG NAME=VALUE`` options, after shorthands such as ``--items SRC``, as ``{name: value}``.

    One :class:`UsageError` line for a malformed one, a name that cannot name
    a table, or a table given twice (checked before anything is read or written).
    """
    result: dict[str, str] = {}
    given_by: dict[str, str] = {}
    for name, value in (shorthands or {}).items():
        if value is not None:
            result[name], given_by[name] = value, f"--{name}"
    for text in values or []:
        name, sep, value = text.partition("=")
        if not sep or not value:
            raise UsageError(f"{flag} {text}: write {flag} NAME={what}, e.g. {flag} {example}")
        check_table_name(name, f"{flag} {text}")
        if name in result:
            raise UsageError(
                f"the table {name!r} is given twice ({given_by[name]} and {flag} {text}); give each table once"
            )
        result[name], given_by[name] = value, f"{flag} {text}"
    return result
