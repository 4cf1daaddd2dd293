"""Writing outputs safely: staged out of sight, published whole, never over anything that is not dstab's.

Local outputs are written to a hidden sibling and renamed into place; object
stores are claimed, written in place and marked complete last
(:mod:`dstab.store.outputs` decides what may be replaced and owns the claims);
versions in an Icechunk repository (``REPO.icechunk/VERSION``) are published by
one commit (:mod:`dstab.store.icechunk_repo`).

Write tasks return a *receipt* (:func:`write_block`): None for plain Zarr; for
Icechunk, the session fork the task wrote into. Whoever computes write tasks
reduces their receipts with :func:`merge_receipts` and hands the result to
:meth:`Staging.merge` before the staging is read or published.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from dask.delayed import Delayed

from ..errors import DstabError, OutputExistsError, OutputWriteError, UsageError
from ..faults import failpoint
from . import icechunk_repo
from .model import Table, block_sources, load, row_starts
from .outputs import (
    Claim,
    check_replaceable,
    host,
    inspect_output,
    is_local,
    local_path,
    pid_alive,
)

FORMAT = 1


# What a write task hands back: None (plain Zarr), or the Icechunk session fork it wrote into.
Receipt = Any


@dataclass(frozen=True)
class ArrayTarget:
    """Where a task writes: picklable, so it travels to distributed workers.

    ``session`` is the Icechunk fork of a repository output (None otherwise):
    pickled to a worker it becomes that worker's copy, which the task returns.
    """

    store: str
    path: str
    storage_options: dict[str, Any] | None = None
    session: Any = None
    key: str = ""

    def __dask_tokenize__(self) -> object:
        # the fork is named by its staging's key: tokenizing it would serialize its whole change set per task
        from dask.base import normalize_token

        return ("ArrayTarget", self.store, self.path, normalize_token(self.storage_options), self.key)

    def open(self) -> zarr.Array:
        if self.session is not None:
            icechunk_repo.quiet_logs()
            return zarr.open_array(store=self.session.store, path=self.path, mode="r+")
        opts = None if is_local(self.store) else self.storage_options
        store = str(local_path(self.store)) if is_local(self.store) else self.store
        return zarr.open_array(store=store, path=self.path, mode="r+", storage_options=opts)


def same_or_nested(a: str, b: str) -> bool:
    """True when one location is, or lies inside, the other."""
    if is_local(a) and is_local(b):
        pa, pb = local_path(a), local_path(b)
        return pa == pb or pa in pb.parents or pb in pa.parents
    na, nb = a.rstrip("/"), b.rstrip("/")
    return na == nb or na.startswith(nb + "/") or nb.startswith(na + "/")


def check_output(
    out: str, *, inputs: list[str], overwrite: bool, storage_options: dict[str, Any] | None = None
) -> None:
    """Refuse an output that is (or nests with) an input, that is not dstab's, or that exists without ``overwrite``.

    Cheap (metadata only); the CLI calls it before starting any cluster.
    """
    for source in inputs:
        if same_or_nested(out, source):
            raise UsageError(
                f"output {out} is, contains, or lies inside the input {source}; "
                "dstab never writes over its inputs: choose another --out"
            )
    if icechunk_repo.is_repo_url(out):  # the repository decides, from its head: nothing beside it is touched
        check_replaceable(out, icechunk_repo.inspect_output(out, storage_options), overwrite=overwrite)
        return
    if is_local(out):
        _check_not_inside_a_group(out)
        recover_local(local_path(out))
        _check_writable(out)
    check_replaceable(out, inspect_output(out, storage_options), overwrite=overwrite)


def _check_not_inside_a_group(out: str) -> None:
    """An output inside a Zarr group (a version or a table) would become part of it and change what it holds."""
    for parent in local_path(out).parents:
        if (parent / "zarr.json").is_file():
            raise UsageError(
                f"output {out} lies inside the Zarr group {parent} (a version or a table): writing there would add "
                "to it and change what it holds; choose an --out outside it"
            )


def _check_writable(out: str) -> None:
    """Create and remove a hidden directory beside OUT, so a read-only or full place is refused before any work."""
    final = local_path(out)
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # OUT's missing parents are made at write time: the nearest existing one decides
    if not parent.is_dir():
        raise UsageError(
            f"output {out} lies under {parent}, which is a file, not a directory: nothing can be written there; "
            "choose an output place whose parent is a directory"
        )
    probe = parent / f".{final.name}.dstab-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        error = output_error(out, exc)
        if error is exc:
            raise
        raise error from None


# Hidden siblings a local output is staged in (and an old version is moved to
# while the new one takes its place): ``.NAME.dstab-tmp-HOST-PID-RANDOM``. The
# host and process id tell a later run whether the writer is still alive.
_STAGING_KINDS = ("tmp", "old")


def staging_name(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.dstab-{kind}-{host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
            trash = staging_name(final, "old")
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


def recover_local(final: Path, *, restore_only: bool = False) -> None:
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
            if len(parts) != 4 or parts[1] != host() or not parts[2].isdigit():
                continue
            if not pid_alive(int(parts[2])):
                dead[kind].append(path)
    for path in dead["old"]:
        if not final.exists():
            os.rename(path, final)  # the publish died between its two renames: the old version comes back
        else:
            shutil.rmtree(path, ignore_errors=True)
    if restore_only:  # a reader: put the old version back, leave the clearing to the next writer
        return
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
        self.repo: icechunk_repo.RepoStaging | None = None
        self._key = uuid.uuid4().hex
        if icechunk_repo.is_repo_url(self.out):
            self.local = False
            self.url = self.out
            self.repo = icechunk_repo.RepoStaging(self.out, overwrite=overwrite, storage_options=storage_options)
            self.group = self.repo.group
        elif self.local:
            self._final = local_path(self.out)
            self._tmp = staging_name(self._final, "tmp")
            self.url = str(self._tmp)
            try:
                self._final.parent.mkdir(parents=True, exist_ok=True)
                self.group = zarr.open_group(self.url, mode="w-", zarr_format=3)
            except OSError as exc:
                shutil.rmtree(self._tmp, ignore_errors=True)
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
        coordinates: str | None = None,
    ) -> ArrayTarget:
        """An empty array in the staging group; ``like`` lends its compressors when it is a Zarr array.

        Every array carries Zarr v3 ``dimension_names`` (:func:`dimension_names`,
        from its name), so xarray and other readers of the spec label its axes.
        ``coordinates`` (CF: the arrays that label its rows, ``"ids"``) makes
        xarray open those as coordinates of this one. Strings of any width are
        stored as the spec's variable-length UTF-8 ``string``: fixed-width
        unicode has no Zarr v3 specification (zarr warns, other readers refuse it).
        """
        kwargs: dict[str, Any] = {}
        if isinstance(like, zarr.Array) and like.metadata.zarr_format == 3:
            kwargs["compressors"] = like.compressors
        if coordinates:
            kwargs["attributes"] = {"coordinates": coordinates}
        stored = np.dtypes.StringDType() if np.dtype(dtype).kind in "USTO" else dtype
        self.group.create_array(
            path, shape=shape, chunks=chunks, dtype=stored, dimension_names=dimension_names(path, len(shape)), **kwargs
        )
        return self._target(path)

    def _target(self, path: str) -> ArrayTarget:
        """Where tasks write ``path``: the store's URL, or the repository's fork."""
        if self.repo is not None:  # the fork's store is the whole repository: the path starts at its root
            return ArrayTarget(
                self.url, f"{self.repo.r.group}/{path}", self.storage_options, session=self.repo.fork, key=self._key
            )
        return ArrayTarget(self.url, path, self.storage_options, key=self._key)

    def merge(self, receipt: Receipt) -> None:
        """Take the write tasks' receipts back (reduced by :func:`merge_receipts`); a no-op for plain Zarr.

        Call it after the write pass, before reading what was written or publishing.
        """
        if self.repo is not None:
            self.repo.merge(receipt)

    def run(self, tasks: list[Delayed], *, progress: bool = False, stage: str = "writing") -> None:
        """Compute write tasks that return receipts, and merge them: the whole write pass for callers with no other results."""
        from ..executor import compute, tree_reduce

        if tasks:
            (receipt,) = compute(tree_reduce(tasks, merge_receipts), progress=progress, stage=stage)
            self.merge(receipt)

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
            coordinates="ids" if like.ids is not None else None,
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
                coordinates="ids" if name == "counts" and like.ids is not None else None,
            )
            tasks += [
                dask.delayed(copy_block, pure=True)(block, target, start)
                for block, start in zip(block_sources(column, chunks), row_starts(chunks))
            ]
        return tasks

    def write_small(self, path: str, value: np.ndarray) -> None:
        """A small array written at once (transforms, spectra)."""
        arr = self.group.create_array(
            path,
            shape=value.shape,
            chunks=value.shape or "auto",  # one chunk; a 0-d value has no chunk shape
            dtype=value.dtype,
            dimension_names=dimension_names(path, value.ndim),
        )
        arr[...] = value

    def publish(self, attrs: dict[str, Any]) -> None:
        """Mark complete (last write), then move into place; only the run that owns OUT publishes.

        In a repository: one commit (the old version replaced in the same one), after :meth:`merge`.
        """
        failpoint("after-write")
        if self.repo is not None:
            self.repo.commit({**attrs, "format": FORMAT, "complete": True})
            return
        if self.claim is not None:
            self.claim.verify()
        self.group.attrs["dstab"] = {**attrs, "format": FORMAT, "complete": True}
        consolidate(self.group)
        if self.local:
            move_into_place(self._tmp, self._final, replace=self.overwrite)
        elif self.claim is not None:
            self.claim.release()

    def discard(self) -> None:
        """Remove what was staged (after a failure); an object-store output is removed only by its owner."""
        if self.repo is not None:
            self.repo.discard()  # never committed: nothing of it is visible
            return
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


def consolidate(group: zarr.Group) -> None:
    """Every array's metadata in the root's ``zarr.json``: readers (xarray's ``open_zarr``) open a table with one
    read instead of one per array, and without falling back (and warning) when they look for it.

    A version never changes once published, so the copy cannot go stale. Zarr v3 has no consolidated
    metadata in its specification yet; zarr-python and xarray read it, and readers that do not read it
    the arrays' own metadata, which is there as before.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(group.store, path=group.path or None, zarr_format=3)


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


# Zarr v3 dimension names by array name. A table's arrays share ``row``, so
# ``xarray.open_zarr(OUT, group=TABLE)`` opens it as one Dataset; every saved
# transform maps ``dim_in`` (the raw model's width) to ``dim_out``.
_DIMENSION_NAMES: dict[str, tuple[str, ...]] = {
    "vectors": ("row", "dim"),
    "ids": ("row",),
    "counts": ("row",),
    "singular_values": ("component",),
}


def dimension_names(path: str, ndim: int) -> tuple[str, ...]:
    """The ``dimension_names`` of the array dstab writes at ``path`` (a group-relative path)."""
    parent, _, leaf = path.rpartition("/")
    names = _DIMENSION_NAMES.get(leaf)
    if parent.rpartition("/")[2] == "transform" and leaf != "singular_values":
        names = ("dim_in", "dim_out")
    if names is not None and len(names) == ndim:
        return names
    return tuple(f"{leaf}_{axis}" for axis in range(ndim))  # no known role: still named, each axis apart


def write_block(block: np.ndarray, target: ArrayTarget, start: int) -> Receipt:
    """Write one row block at ``start``: whole storage chunks, so no two tasks share one.

    Returns the receipt: None for plain Zarr, the fork written into for Icechunk.
    """
    target.open()[start : start + block.shape[0]] = block
    return target.session


def merge_receipts(*receipts: Receipt) -> Receipt:
    """Receipts as one (a tree-reduce combiner too): None-cheap, so plain Zarr pays nothing."""
    merged = None
    for receipt in receipts:
        merged = icechunk_repo.merge_forks(merged, receipt)
    return merged


def copy_block(source: Any, target: ArrayTarget, start: int) -> Receipt:
    """Read a block source and write it unchanged."""
    return write_block(load(source), target, start)
