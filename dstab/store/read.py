"""Opening versions and tables (local paths, fsspec URLs, or ``REPO.icechunk/VERSION``) and validating them, from metadata only.

A version is a Zarr v3 group of named tables::

    VERSION/                 attrs["dstab"]: format, complete flag, structure, lineage, report
    VERSION/NAME/vectors     [n, dim] float32|float64, chunked along rows (every table one width)
    VERSION/NAME/ids         [n] int64 or string, optional on input
    VERSION/NAME/counts      [n] how often each row was seen, optional
    VERSION/transform/NAME   outputs only: the e x w matrix that made table NAME

The two-table model names its tables ``items`` and ``users``; any names work.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from ..errors import IncompleteVersionError, InputError, VersionNotFoundError
from .icechunk_repo import is_repo_url
from .icechunk_repo import open_group as open_repo_group
from .model import (
    Table,
    Version,
    check_counts,
    check_ids,
    check_tables,
    check_vectors,
    unit_rows,
)
from .outputs import is_local, local_path
from .write import recover_local


def open_group(
    url: str,
    storage_options: dict[str, Any] | None,
    *,
    what: str = "version",
    layout: str = "a Zarr group of tables, each a group NAME/ with a vectors array (e.g. items/vectors and users/vectors)",
) -> zarr.Group:
    if is_repo_url(url):  # a group in an Icechunk repository: its committed state, read-only
        return open_repo_group(url, storage_options, what=what)
    if is_local(url) and not local_path(url).exists():
        recover_local(
            local_path(url), restore_only=True
        )  # a publish killed between its renames: the old version is back
    if is_local(url) and not local_path(url).exists():
        raise VersionNotFoundError(f"no {what} at {url}: the path does not exist; check the path")
    if not is_local(url):
        from .remote import probe

        # reachable, credentials accepted, bucket there: one line (URL, cause, fix) within seconds if not
        if not probe(url, storage_options, what=what):
            raise VersionNotFoundError(f"no {what} at {url}: nothing is stored there; check the URL")
    try:
        opts = None if is_local(url) else storage_options
        # the arrays' own metadata, not the consolidated copy made at publish (for xarray): a table removed or
        # changed by hand since must show as it is, never as the copy says it was
        node = zarr.open(
            store=url if not is_local(url) else str(local_path(url)),
            mode="r",
            storage_options=opts,
            use_consolidated=False,
        )
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise VersionNotFoundError(
            f"{url} is not a Zarr group ({type(exc).__name__}: {exc}); a {what} is {layout}"
        ) from None
    except Exception as exc:  # the store failed after the probe: one line all the same
        from .remote import is_store_error, storage_error

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
                f"{url} has no {path} array; every table of a version (a group NAME/) needs NAME/vectors, "
                "a loose table needs vectors (see the layout in the README)"
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
    group = open_group(url, storage_options)
    attrs = read_attrs(group)
    if attrs and not attrs.get("complete", False):
        raise IncompleteVersionError(
            f"{url} is an incomplete dstab version (a run stopped while writing it); "
            "run the command that makes it again, with --overwrite"
        )
    tables = [_open_named_table(group, url, name) for name in table_names(group, url, saved_transforms=bool(attrs))]
    check_tables(*tables)
    transforms = {}
    for table in tables:
        saved = _member(group, url, f"transform/{table.name}", required=False)
        if saved is not None:
            transforms[table.name] = np.asarray(saved[...], dtype=np.float64)
    return Version(
        tables={t.name: t for t in tables}, url=url, storage_options=storage_options, attrs=attrs, transforms=transforms
    )


# Groups of a version that are not tables: the saved transforms of an output.
RESERVED = ("transform",)


def table_names(group: zarr.Group, url: str, *, saved_transforms: bool) -> list[str]:
    """The version's tables: its subgroups (``items`` and ``users`` first when present, then by name).

    In a dstab output (``saved_transforms``) the group ``transform`` holds the saved transforms; anywhere
    else a group of that name is a table with a reserved name, refused when the tables are checked.
    """
    try:
        names = sorted(name for name, _ in group.groups() if not (saved_transforms and name in RESERVED))
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise InputError(f"{url} has group metadata dstab cannot read ({exc})") from None
    if not names:
        if "vectors" in group:
            raise InputError(
                f"{url} is a single table (vectors at its top), not a version; a version holds tables as "
                f"subgroups: move it to {url}/NAME/vectors, or use it where a table is expected (apply, diagnose)"
            )
        raise InputError(
            f"{url} has no tables; a version is a Zarr group with one group per table, each holding a vectors "
            "array (e.g. items/vectors and users/vectors; see the layout in the README)"
        )
    default = [n for n in ("items", "users") if n in names]
    return default + [n for n in names if n not in default]


def _open_named_table(group: zarr.Group, url: str, name: str) -> Table:
    vectors = _member(group, url, f"{name}/vectors", required=True)
    ids = _member(group, url, f"{name}/ids", required=False)
    counts = _member(group, url, f"{name}/counts", required=False)
    check_vectors(f"{name}/vectors", vectors)
    assert vectors is not None  # required=True raised otherwise
    return Table(name=name, vectors=vectors, ids=ids, chunk_rows=int(unit_rows(vectors)), counts=counts)


def open_table(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, name: str = "table"
) -> Table:
    """Open a loose table: a Zarr group with ``vectors`` and optional ``ids`` / ``counts``."""
    url = os.fspath(url)
    group = open_group(url, storage_options, what="table", layout="a Zarr group with a vectors array and optional ids")
    attrs = read_attrs(group)
    if attrs and not attrs.get("complete", False):
        raise IncompleteVersionError(
            f"{url} is an incomplete dstab table (a run stopped while writing it); run the command again, with --overwrite"
        )
    vectors = _member(group, url, "vectors", required=True)
    ids = _member(group, url, "ids", required=False)
    counts = _member(group, url, "counts", required=False)
    check_vectors(f"{url}/vectors", vectors)
    assert vectors is not None  # required=True raised otherwise
    table = Table(name=url, vectors=vectors, ids=ids, chunk_rows=int(unit_rows(vectors)), counts=counts)
    if ids is not None:
        check_ids(f"{url}/ids", ids, table.n_rows)
    if counts is not None:
        check_counts(f"{url}/counts", counts, table.n_rows)
    return table


def canonical_url(url: str) -> str:
    """What lineage records: an absolute path for local versions, the URL otherwise."""
    return str(local_path(url)) if is_local(url) else url
