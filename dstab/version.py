"""Versions on disk: opening and validating them, and writing new ones safely.

A version is a Zarr group (local path or fsspec URL)::

    VERSION/                 attrs["dstab"]: format, complete flag, lineage, report
    VERSION/items/vectors    [n_items, dim] float32|float64, chunked along rows
    VERSION/items/ids        [n_items] int64 or string, optional on input
    VERSION/users/vectors
    VERSION/users/ids
    VERSION/transform/...    outputs only: the e x w matrices that made it

This module is the I/O edge: the maths never sees a store.
"""

from __future__ import annotations

import errno
import glob
import os
import platform
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import Delayed

from .errors import (
    DstabError,
    IncompleteVersionError,
    OutputWriteError,
    InputError,
    OutputExistsError,
    UsageError,
    VersionNotFoundError,
)
from .faults import failpoint
from .linalg import transform_rows
from .outputs import Claim, check_replaceable, inspect_output, is_local, local_path

FORMAT = 1
Side = Literal["items", "users"]
SIDES: tuple[Side, Side] = ("items", "users")
# Row blocks handed to one task are a whole number of storage chunks, grown
# towards this many bytes so that per-task overhead stays small.
TARGET_BLOCK_BYTES = 64 * 2**20


def _same_or_nested(a: str, b: str) -> bool:
    """True when one location is, or lies inside, the other."""
    if is_local(a) and is_local(b):
        pa, pb = local_path(a), local_path(b)
        return pa == pb or pa in pb.parents or pb in pa.parents
    na, nb = a.rstrip("/"), b.rstrip("/")
    return na == nb or na.startswith(nb + "/") or nb.startswith(na + "/")


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
        """Rows per task's block: whole storage chunks, about TARGET_BLOCK_BYTES each."""
        row_bytes = max(1, self.dim * self.dtype.itemsize)
        per_chunk = self.chunk_rows * row_bytes
        # dask config "dstab.block-bytes" (env DASK_DSTAB__BLOCK_BYTES) overrides the default
        target = int(dask.config.get("dstab.block-bytes", None) or TARGET_BLOCK_BYTES)
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
        return _block_sources(self.vectors, row_chunks or self.row_chunks())

    def id_blocks(self, row_chunks: tuple[int, ...] | None = None) -> list[Any] | None:
        if self.ids is None:
            return None
        return _block_sources(self.ids, row_chunks or self.row_chunks())

    def count_blocks(self, row_chunks: tuple[int, ...] | None = None) -> list[Any] | None:
        if self.counts is None:
            return None
        return _block_sources(self.counts, row_chunks or self.row_chunks())

    def read(self, row_chunks: int | tuple[int, ...] | None = None) -> da.Array:
        """The vectors as a lazy Dask array, full width, one block per ``row_chunks``."""
        return _as_dask(self.vectors, (row_chunks or self.row_chunks(), self.dim))


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, stop)`` of a Zarr array, read by the task that uses them. Picklable."""

    array: zarr.Array
    start: int
    stop: int

    def load(self) -> np.ndarray:
        return self.array[self.start : self.stop]


def load(source: Any) -> Any:
    """The numpy rows behind a block source (``None`` stays ``None``)."""
    return source.load() if isinstance(source, RowBlock) else source


def _block_sources(source: Any, row_chunks: tuple[int, ...]) -> list[Any]:
    if isinstance(source, zarr.Array):
        return [RowBlock(source, start, start + n) for start, n in zip(row_starts(row_chunks), row_chunks)]
    chunks = (row_chunks,) + tuple((d,) for d in source.shape[1:])
    blocks = _as_dask(source, chunks).to_delayed(optimize_graph=True)
    return list(blocks.reshape(len(row_chunks)))


def _as_dask(source: Any, chunks: tuple) -> da.Array:
    if isinstance(source, da.Array):
        return source.rechunk(chunks)
    if isinstance(source, zarr.Array):
        return da.from_zarr(source, chunks=chunks)
    return da.from_array(np.asarray(source), chunks=chunks)


@dataclass(frozen=True)
class Version:
    """An opened, validated version. Open one with :func:`open_version`."""

    items: Table
    users: Table
    url: str | None = None
    storage_options: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # attrs["dstab"], empty for raw inputs
    # the e x w matrices that made a stabilized version (raw rows -> its rows), empty otherwise
    transforms: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def table(self, side: Side) -> Table:
        return self.items if side == "items" else self.users

    def transform(self, side: Side, rows: Any) -> np.ndarray:
        """Map raw rows of ``side`` (numpy, n x e, in the raw model's basis) into this version's space.

        An extra user row mapped this way scores against this version's items
        as the raw row scored against the raw items.
        """
        transform = self.saved_transform(side)
        return transform_rows(checked_rows(side, rows, transform.shape[0]), transform)

    def saved_transform(self, side: Side) -> np.ndarray:
        if side not in self.transforms:
            raise InputError(
                f"{self.url or 'this version'} has no transform/{side}: only versions written by "
                "`dstab stabilize` keep the transforms that map new rows into them"
            )
        return self.transforms[side]

    @property
    def dim(self) -> int:
        return self.items.dim

    @property
    def dtype(self) -> np.dtype:
        return self.items.dtype

    def __repr__(self) -> str:
        where = self.url or "<in memory>"
        return (
            f"Version({where!s}, items={self.items.n_rows:,} x {self.items.dim}, "
            f"users={self.users.n_rows:,} x {self.users.dim}, dtype={self.dtype})"
        )


def checked_rows(side: str, rows: Any, width: int) -> np.ndarray:
    """Raw rows handed to a transform, as a float32/float64 numpy array of the raw model's width."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise InputError(f"{side} rows must have shape (n, {width}) (the raw model's width), got {rows.shape}")
    if rows.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"{side} rows have dtype {rows.dtype}; pass float32 or float64 rows")
    return rows


def _check_vectors(name: str, arr: Any) -> None:
    if arr.ndim != 2:
        raise InputError(
            f"{name} must be 2-D [rows, dim], got shape {tuple(arr.shape)}; store one row per vector"
        )
    dtype = np.dtype(arr.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(
            f"{name} has dtype {dtype}; dstab needs float32 or float64 vectors: cast the table, "
            f"e.g. arr.astype('float32'), and write it again"
        )
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty (0 rows); a version needs at least one row on each side")
    if arr.shape[1] == 0:
        raise InputError(f"{name} has width 0; embeddings need at least one dimension")


def _check_ids(name: str, ids: Any, n_rows: int) -> None:
    if ids.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] != n_rows:
        raise InputError(
            f"{name} has {ids.shape[0]:,} ids for {n_rows:,} vector rows; write exactly one id per row"
        )
    dtype = np.dtype(ids.dtype)
    if dtype.kind not in "iuUT":
        raise InputError(
            f"{name} has dtype {dtype}; ids must be integers or strings (object arrays are never read)"
        )


def _check_counts(name: str, counts: Any, n_rows: int) -> None:
    if counts.ndim != 1 or counts.shape[0] != n_rows:
        raise InputError(
            f"{name} has shape {tuple(counts.shape)} for {n_rows:,} vector rows; write exactly one count per row"
        )
    if np.dtype(counts.dtype).kind not in "iuf":
        raise InputError(f"{name} has dtype {counts.dtype}; counts must be integers or floats")


def check_tables(items: Table, users: Table) -> None:
    """Validate what can be checked without reading the data."""
    for table in (items, users):
        _check_vectors(f"{table.name}/vectors", table.vectors)
        if table.ids is not None:
            _check_ids(f"{table.name}/ids", table.ids, table.n_rows)
        if table.counts is not None:
            _check_counts(f"{table.name}/counts", table.counts, table.n_rows)
    if items.dim != users.dim:
        raise InputError(
            f"items/vectors has width {items.dim} but users/vectors has width {users.dim}; "
            "both sides of a version must come from the same model"
        )
    if items.dtype != users.dtype:
        raise InputError(
            f"items/vectors is {items.dtype} but users/vectors is {users.dtype}; store both sides in one dtype"
        )


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
    """A version from in-memory numpy or Dask arrays (for tests, notebooks and small tables)."""
    tables = []
    for name, vectors, ids, counts in (("items", items, item_ids, item_counts), ("users", users, user_ids, user_counts)):
        if isinstance(vectors, da.Array):
            rows = int(vectors.chunks[0][0]) if vectors.ndim else 1
        elif isinstance(vectors, zarr.Array):
            rows = _unit_rows(vectors)
        else:
            vectors = np.asarray(vectors)
            rows = int(vectors.shape[0]) if vectors.ndim else 1
        if ids is not None and not isinstance(ids, (da.Array, zarr.Array)):
            ids = np.asarray(ids)
        if counts is not None and not isinstance(counts, (da.Array, zarr.Array)):
            counts = np.asarray(counts)
        tables.append(Table(name=name, vectors=vectors, ids=ids, chunk_rows=max(1, chunk_rows or rows), counts=counts))
    check_tables(*tables)
    return Version(items=tables[0], users=tables[1])


def _open_group(
    url: str,
    storage_options: dict[str, Any] | None,
    *,
    what: str = "version",
    layout: str = "a Zarr group with items/vectors and users/vectors arrays",
) -> zarr.Group:
    if is_local(url) and not local_path(url).exists():
        raise VersionNotFoundError(f"no {what} at {url}: the path does not exist; check the path")
    if not is_local(url):
        from .stores import probe

        # reachable, credentials accepted, bucket there: one line (URL, cause, fix) within seconds if not
        if not probe(url, storage_options, what=what):
            raise VersionNotFoundError(f"no {what} at {url}: nothing is stored there; check the URL")
    try:
        opts = None if is_local(url) else storage_options
        node = zarr.open(store=url if not is_local(url) else str(local_path(url)), mode="r", storage_options=opts)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise VersionNotFoundError(
            f"{url} is not a Zarr group ({type(exc).__name__}: {exc}); a {what} is {layout}"
        ) from None
    except Exception as exc:  # the store failed after the probe: one line all the same
        from .stores import is_store_error, storage_error

        if is_local(url) or not is_store_error(exc):
            raise
        raise storage_error(url, exc, storage_options, what=what) from None
    if not isinstance(node, zarr.Group):
        raise VersionNotFoundError(f"{url} is a Zarr array, not a group; a {what} is {layout}")
    return node


def _member(group: zarr.Group, url: str, path: str, required: bool) -> zarr.Array | None:
    try:
        node = group[path]
    except (ValueError, TypeError, NotImplementedError) as exc:
        # e.g. an object dtype with a pickle codec: zarr refuses the metadata, and so does dstab
        raise InputError(
            f"{url}/{path} has array metadata dstab cannot read ({exc}); store vectors as float32 or float64 "
            "and ids as int64 or strings (object arrays are never read)"
        ) from None
    except KeyError:
        if required:
            raise InputError(
                f"{url} has no {path} array; a version needs items/vectors and users/vectors, a table "
                "needs vectors (see the layout in the README)"
            ) from None
        return None
    if not isinstance(node, zarr.Array):
        raise InputError(f"{url}/{path} is a group, not an array")
    return node


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs.get("dstab", {})
    return dict(meta) if isinstance(meta, dict) else {}


def open_version(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Version:
    """Open and validate the version at ``url`` (local path or fsspec URL). Reads metadata only.

    Raises :class:`VersionNotFoundError` if nothing is there, :class:`IncompleteVersionError`
    if a run died while writing it, and :class:`InputError` if it is malformed.
    """
    url = os.fspath(url)
    group = _open_group(url, storage_options)
    attrs = read_attrs(group)
    if attrs and not attrs.get("complete", False):
        raise IncompleteVersionError(
            f"{url} is an incomplete dstab version (a run stopped while writing it); "
            "run the command that makes it again, with --overwrite"
        )
    tables = []
    for side in SIDES:
        vectors = _member(group, url, f"{side}/vectors", required=True)
        ids = _member(group, url, f"{side}/ids", required=False)
        counts = _member(group, url, f"{side}/counts", required=False)
        _check_vectors(f"{side}/vectors", vectors)
        tables.append(Table(name=side, vectors=vectors, ids=ids, chunk_rows=int(_unit_rows(vectors)), counts=counts))
    check_tables(*tables)
    transforms = {}
    for side in SIDES:
        saved = _member(group, url, f"transform/{side}", required=False)
        if saved is not None:
            transforms[side] = np.asarray(saved[...], dtype=np.float64)
    return Version(
        items=tables[0], users=tables[1], url=url, storage_options=storage_options, attrs=attrs, transforms=transforms
    )


def open_table(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, name: str = "table") -> Table:
    """Open a loose table: a Zarr group with ``vectors`` and optional ``ids`` / ``counts``."""
    url = os.fspath(url)
    group = _open_group(url, storage_options, what="table", layout="a Zarr group with a vectors array and optional ids")
    attrs = read_attrs(group)
    if attrs and not attrs.get("complete", False):
        raise IncompleteVersionError(
            f"{url} is an incomplete dstab table (a run stopped while writing it); run the command again, with --overwrite"
        )
    vectors = _member(group, url, "vectors", required=True)
    ids = _member(group, url, "ids", required=False)
    counts = _member(group, url, "counts", required=False)
    _check_vectors(f"{url}/vectors", vectors)
    table = Table(name=url, vectors=vectors, ids=ids, chunk_rows=int(_unit_rows(vectors)), counts=counts)
    if ids is not None:
        _check_ids(f"{url}/ids", ids, table.n_rows)
    if counts is not None:
        _check_counts(f"{url}/counts", counts, table.n_rows)
    return table


def canonical_url(url: str) -> str:
    """What lineage records: an absolute path for local versions, the URL otherwise."""
    return str(local_path(url)) if is_local(url) else url


def _unit_rows(arr: zarr.Array) -> int:
    """Rows of the smallest unit two tasks may not share: the shard if sharded, else the chunk."""
    shards = getattr(arr, "shards", None)
    return int((shards or arr.chunks)[0])


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ArrayTarget:
    """Where a task writes: picklable, so it travels to distributed workers."""

    store: str
    path: str
    storage_options: dict[str, Any] | None = None

    def open(self) -> zarr.Array:
        opts = None if is_local(self.store) else self.storage_options
        store = str(local_path(self.store)) if is_local(self.store) else self.store
        return zarr.open_array(store=store, path=self.path, mode="r+", storage_options=opts)


def check_output(
    out: str, *, inputs: list[str], overwrite: bool, storage_options: dict[str, Any] | None = None
) -> None:
    """Refuse an output that is (or nests with) an input, that is not dstab's, or that exists without ``overwrite``.

    Cheap (metadata only); the CLI calls it before starting any cluster.
    """
    for source in inputs:
        if _same_or_nested(out, source):
            raise UsageError(
                f"output {out} is, contains, or lies inside the input {source}; "
                "dstab never writes over its inputs: choose another --out"
            )
    if is_local(out):
        recover_local(local_path(out))
    check_replaceable(out, inspect_output(out, storage_options), overwrite=overwrite)


# Hidden siblings a local output is staged in (and an old version is moved to
# while the new one takes its place): ``.NAME.dstab-tmp-HOST-PID-RANDOM``. The
# host and process id tell a later run whether the writer is still alive.
_STAGING_KINDS = ("tmp", "old")


def _host() -> str:
    return platform.node().replace("-", "_") or "host"


def _staging_name(final: Path, kind: str) -> Path:
    host = _host()
    return final.parent / f".{final.name}.dstab-{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(staged: Path, final: Path, *, replace: bool) -> None:
    """Rename a finished staging directory to ``final``.

    Without ``replace`` the rename itself is the test that ``final`` is still
    free (renaming a directory onto a non-empty one fails), so of two runs
    racing for one new OUT exactly one publishes; the other learns it here. With
    ``replace``, an existing ``final`` must be a dstab output: it is renamed
    aside first (``.NAME.dstab-old-...``), so a kill between the two renames
    loses nothing (:func:`recover_local` puts it back).
    """
    trash = None
    if replace:
        existing = inspect_output(str(final))
        check_replaceable(str(final), existing, overwrite=True)
        if existing.kind == "dstab":
            trash = _staging_name(final, "old")
            os.rename(final, trash)
            failpoint("publish-swap")
    try:
        os.rename(staged, final)
    except OSError as exc:
        if trash is not None and not final.exists():
            os.rename(trash, final)
        if isinstance(exc, (FileExistsError, IsADirectoryError, NotADirectoryError)) or exc.errno in (
            errno.ENOTEMPTY,
            errno.EEXIST,
            errno.ENOTDIR,
            errno.EISDIR,
        ):
            raise OutputExistsError(
                f"{final} appeared while this run was writing it (another run published there first); "
                "this run's output was not published: check what is there, and rerun with --overwrite to replace it"
            ) from None
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def recover_local(final: Path) -> None:
    """Clear what killed runs left beside ``final``, and put back an old version a killed publish had moved aside.

    Only staging directories of processes on this host that are no longer
    alive are touched; a run in progress (or on another host) is left alone.
    """
    if not final.parent.is_dir():
        return
    dead: dict[str, list[Path]] = {kind: [] for kind in _STAGING_KINDS}
    for kind in _STAGING_KINDS:
        for path in final.parent.glob(f".{glob.escape(final.name)}.dstab-{kind}-*"):
            parts = path.name.rsplit("-", 3)
            if len(parts) != 4 or parts[1] != _host() or not parts[2].isdigit():
                continue
            if not _pid_alive(int(parts[2])):
                dead[kind].append(path)
    for path in dead["old"]:
        if not final.exists():
            os.rename(path, final)  # the publish died between its two renames: the old version comes back
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in dead["tmp"]:
        shutil.rmtree(path, ignore_errors=True)


class Staging:
    """A version being written: invisible (local) or marked incomplete (fsspec) until :meth:`publish`.

    Local outputs are written to a hidden sibling directory and renamed into
    place at the end; other stores are written in place and the complete flag
    is set last, so a reader never sees a half-written version as complete.
    """

    def __init__(
        self,
        out: str,
        *,
        inputs: list[str],
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.out = os.fspath(out)
        self.storage_options = storage_options
        self.overwrite = overwrite
        check_output(self.out, inputs=inputs, overwrite=overwrite, storage_options=storage_options)
        self.local = is_local(self.out)
        self.claim: Claim | None = None
        if self.local:
            final = local_path(self.out)
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._final = final
                self._tmp = _staging_name(final, "tmp")
                self.url = str(self._tmp)
                self.group = zarr.open_group(self.url, mode="w-", zarr_format=3)
            except OSError as exc:
                shutil.rmtree(getattr(self, "_tmp", final.parent / ".nothing"), ignore_errors=True)
                raise output_error(self.out, exc) from None
        else:
            self.url = self.out.rstrip("/")
            # own OUT before touching it: a second run stops here, and only the owner publishes
            self.claim = Claim(self.url, storage_options)
            self.claim.acquire()
            try:
                check_replaceable(self.out, inspect_output(self.out, storage_options), overwrite=overwrite)
                self.group = zarr.open_group(self.url, mode="w", zarr_format=3, storage_options=storage_options)
            except BaseException:
                self.claim.release()
                raise
        self.group.attrs["dstab"] = {"format": FORMAT, "complete": False}

    def create_array(
        self,
        path: str,
        *,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: np.dtype,
        like: Any | None = None,
    ) -> ArrayTarget:
        """An empty array in the staging group; ``like`` lends its compressors when it is a Zarr array."""
        kwargs: dict[str, Any] = {}
        if isinstance(like, zarr.Array) and like.metadata.zarr_format == 3:
            kwargs["compressors"] = like.compressors
        with warnings.catch_warnings():
            # Fixed-width string ids have no Zarr v3 spec yet; zarr-python warns
            # on creation but stores and reads them fine. Input ids of that
            # dtype are copied as they are.
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
            self.group.create_array(path, shape=shape, chunks=chunks, dtype=dtype, **kwargs)
        return ArrayTarget(self.url, path, self.storage_options)

    def create_table(self, side: str, like: Table, width: int) -> ArrayTarget:
        """The ``side/vectors`` array for a table of ``like``'s rows and storage chunks, ``width`` wide.

        ``side=""`` writes a loose table (``vectors``, ``ids`` at the group's top).

        The ids of ``like`` (if any) are copied by the returned tasks of
        :meth:`copy_ids`; the vectors are the caller's to write.
        """
        return self.create_array(
            _join(side, "vectors"),
            shape=(like.n_rows, width),
            chunks=(min(like.chunk_rows, like.n_rows), width),
            dtype=like.dtype,
            like=like.vectors,
        )

    def copy_ids(self, side: str, like: Table) -> list[Delayed]:
        """Tasks that copy ``like``'s ids and counts, block by block, into ``side/ids`` and ``side/counts``."""
        tasks = []
        chunks = like.row_chunks()
        for name, column in (("ids", like.ids), ("counts", like.counts)):
            if column is None:
                continue
            target = self.create_array(
                _join(side, name),
                shape=(like.n_rows,),
                chunks=(min(like.chunk_rows, like.n_rows),),
                dtype=np.dtype(column.dtype),
                like=column,
            )
            tasks += [
                dask.delayed(copy_block, pure=True)(block, target, start)
                for block, start in zip(_block_sources(column, chunks), row_starts(chunks))
            ]
        return tasks

    def write_small(self, path: str, value: np.ndarray) -> None:
        """A small array written at once (transforms, spectra)."""
        arr = self.group.create_array(path, shape=value.shape, chunks=value.shape or None, dtype=value.dtype)
        arr[...] = value

    def publish(self, attrs: dict[str, Any]) -> None:
        """Mark complete (last write), then move into place; only the run that owns OUT publishes."""
        failpoint("after-write")
        if self.claim is not None:
            self.claim.verify()
        self.group.attrs["dstab"] = {**attrs, "format": FORMAT, "complete": True}
        if self.local:
            move_into_place(self._tmp, self._final, replace=self.overwrite)
        elif self.claim is not None:
            self.claim.release()

    def discard(self) -> None:
        """Remove what was staged (after a failure); an object-store output is removed only by its owner."""
        if self.local:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            if self.claim is not None:
                self.claim.verify()
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
            fs.rm(path, recursive=True)
        except (FileNotFoundError, OSError, OutputExistsError):
            pass
        finally:
            if self.claim is not None:
                self.claim.release()


def output_error(out: str, exc: OSError) -> DstabError | OSError:
    """A write that the machine refused, as one line naming OUT, the cause and the fix (others stay as they are)."""
    reasons = {
        errno.ENOSPC: ("there is no space left on the device", "free space or choose another --out"),
        errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another --out"),
        errno.EROFS: ("the file system is read-only", "choose an --out on a writable file system"),
        errno.EACCES: ("permission was denied", "choose an --out in a directory you may write to"),
        errno.EPERM: ("the operation is not permitted", "choose an --out in a directory you may write to"),
        errno.EFBIG: ("a file grew past the size this process may write", "raise the file size limit (ulimit -f)"),
    }
    if exc.errno not in reasons:
        return exc
    cause, fix = reasons[exc.errno]
    return OutputWriteError(f"cannot write {out}: {cause} ({exc.strerror}); nothing was published: {fix}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def row_starts(chunks: tuple[int, ...]) -> list[int]:
    """First global row of each block."""
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int).tolist()


def write_block(block: np.ndarray, target: ArrayTarget, start: int) -> None:
    """Write one row block at ``start``: whole storage chunks, so no two tasks share one."""
    target.open()[start : start + block.shape[0]] = block


def copy_block(source: Any, target: ArrayTarget, start: int) -> None:
    """Read a block source and write it unchanged."""
    write_block(load(source), target, start)
