"""Whatever a caller hands the Python API as a version, turned into a :class:`Version` in one place.

Accepted, for the new version and for the reference alike:

- a :class:`Version` (as opened by :func:`open_version` or made by :func:`from_tables`);
- the path or fsspec URL of a version (``"day2"``, ``"s3://bucket/day2"``);
- a mapping ``{table_name: X}`` where each X is a numpy array, a Dask array, a Zarr array, or the path
  or URL of a Zarr array (``"day2/users/vectors"``) or of a table group (``"day2/users"``: ``vectors``
  and optional ``ids`` / ``counts``).

Ids and counts of in-memory tables come as ``ids={name: array}`` / ``counts={name: array}``. Nothing is
read here beyond metadata: numpy stays numpy, Dask stays lazy, Zarr arrays are read block by block by
the tasks that use them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ..errors import InputError, UsageError, VersionNotFoundError
from .model import Table, Version, from_tables
from .outputs import is_local, local_path
from .read import open_table, open_version

ACCEPTED = (
    "a Version, the path or URL of a version, or a mapping {table_name: X} where X is a numpy, Dask or "
    "Zarr array (rows x dim) or the path of a Zarr array or table group"
)
ACCEPTED_TABLE = "a numpy, Dask or Zarr array (rows x dim), or the path or URL of a Zarr array or of a table group"


def as_version(
    obj: Any,
    *,
    ids: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
    label: str = "new",
    storage_options: dict[str, Any] | None = None,
) -> Version:
    """``obj`` as a :class:`Version` (metadata only); ``label`` ("new", "reference") names it in errors.

    Raises :class:`InputError` (or :class:`VersionNotFoundError` for a path with nothing there), one line
    naming what was given and what is accepted.
    """
    given = {k: v for k, v in (("ids", ids), ("counts", counts)) if v}
    if isinstance(obj, Version):
        _no_keywords(given, label, "a Version, which holds its own")
        return obj
    if isinstance(obj, (str, os.PathLike)):
        _no_keywords(given, label, f"the version at {os.fspath(obj)}, which holds its own")
        return _labelled(lambda: open_version(os.fspath(obj), storage_options), label)
    if not isinstance(obj, Mapping):
        raise InputError(f"the {label} version was given as {kind_of(obj)}; give {ACCEPTED}")
    if not obj:
        raise InputError(f"the {label} version was given as an empty mapping; give at least one table {{name: array}}")
    vectors: dict[str, Any] = {}
    stored_ids: dict[str, Any] = {}
    stored_counts: dict[str, Any] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InputError(
                f"the {label} tables are keyed by {kind_of(name)}; key each table by its name, e.g. {{'users': U}}"
            )
        where = f"the {label} table {name!r}"
        if isinstance(value, (str, os.PathLike)):
            table = open_path(os.fspath(value), storage_options, where=where)
            vectors[name] = table.vectors
            for column, store in ((table.ids, stored_ids), (table.counts, stored_counts)):
                if column is not None:
                    store[name] = column
            continue
        vectors[name] = checked_array(value, where)
    for label_of, stored, extra in (("ids", stored_ids, ids or {}), ("counts", stored_counts, counts or {})):
        twice = [name for name in extra if name in stored]
        if twice:
            raise UsageError(
                f"{label_of} given for the {label} table {twice[0]!r}, whose table group already has {twice[0]}/{label_of}; "
                f"give them one way, not both"
            )
        stored.update(extra)
    return _labelled(lambda: from_tables(vectors, ids=stored_ids, counts=stored_counts), label)


def open_path(url: str, storage_options: dict[str, Any] | None = None, *, where: str = "a table") -> Table:
    """The table at ``url``: a Zarr array (its vectors) or a table group (``vectors`` + optional ids/counts)."""
    if is_local(url) and not local_path(url).exists():
        raise VersionNotFoundError(
            f"{where}: no Zarr array or table group at {url}: the path does not exist; check the path"
        )
    if not is_local(url):
        from .remote import probe

        if not probe(url, storage_options, what="table"):
            raise VersionNotFoundError(
                f"{where}: no Zarr array or table group at {url}: nothing is stored there; check the URL"
            )
    try:
        node = zarr.open(
            store=str(local_path(url)) if is_local(url) else url,
            mode="r",
            storage_options=None if is_local(url) else storage_options,
            use_consolidated=False,  # as store.read: what is there, not the copy made at publish
        )
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise InputError(
            f"{where}: {url} is not a Zarr array or group ({type(exc).__name__}: {exc}); give {ACCEPTED_TABLE}"
        ) from None
    if isinstance(node, zarr.Array):
        return Table(name=url, vectors=checked_array(node, f"{where} ({url})"), ids=None, chunk_rows=1)
    if "vectors" not in node and any(True for _ in node.groups()):
        raise InputError(
            f"{where}: {url} is a version (a group of tables), not a table; give one of its tables, "
            f"e.g. {url.rstrip('/')}/NAME, or the version itself in place of the mapping"
        )
    return _labelled(lambda: replace(open_table(url, storage_options), name=url), where)


def checked_array(value: Any, where: str) -> Any:
    """An array the model can hold: numpy, Dask or Zarr, two-dimensional (the rest is checked with the version)."""
    array: Any
    if isinstance(value, (da.Array, zarr.Array)):
        array = value
    elif isinstance(value, np.ndarray) or hasattr(value, "__array__") and not isinstance(value, (list, tuple)):
        array = np.asarray(value)
    else:
        raise InputError(f"{where} was given as {kind_of(value)}; give {ACCEPTED_TABLE}")
    if array.ndim != 2:
        raise InputError(
            f"{where} is an array of shape {tuple(array.shape)}; it must be 2-D (rows x dim, one row per vector): "
            "reshape it, e.g. x.reshape(1, -1) for one row"
        )
    return array


def _no_keywords(given: dict[str, Any], label: str, what: str) -> None:
    if given:
        names = " and ".join(f"{k}=" for k in given)
        raise UsageError(
            f"{names} name ids/counts of in-memory tables, but the {label} version is {what}; "
            f"drop {names}, or give the tables as a mapping {{name: array}}"
        )


def _labelled(make: Any, label: str) -> Any:
    """Run ``make``; an error about a table says whose table it is (the new version's or the reference's)."""
    try:
        return make()
    except (InputError, VersionNotFoundError) as exc:
        message = str(exc)
        prefix = label if label.startswith("the ") else f"the {label} version"
        if message.startswith(prefix):
            raise
        raise type(exc)(f"{prefix}: {message}") from None


def kind_of(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    name = f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
