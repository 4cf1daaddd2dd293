"""Saved transforms at work: map extra rows (users embedded online, new items) into a stabilized version.

    >>> stable = dstab.open_version("day2-stable.zarr")
    >>> stable.transform("users", fresh_rows)                       # numpy in, numpy out (any table's name)
    >>> dstab.apply_table(stable, "users", dstab.open_table("new-users.zarr"), "new-users-stable.zarr")

Out of core like the rest: one task per block reads its rows, transforms and
writes them; nothing is visible at the output until every block is written.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import dask
import numpy as np

from .errors import InputError
from .linalg import transform_rows
from .store import (
    Staging,
    Table,
    Version,
    canonical_url,
    load,
    open_table,
    row_starts,
    write_block,
)


def _transform_write(source: Any, transform: np.ndarray, target: Any, start: int, label: str) -> Any:
    block = load(source)
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = start + int(np.flatnonzero(~finite)[0])
        raise InputError(
            f"{label}/vectors row {row} is not finite (NaN or Inf); fix or drop that row and run apply again"
        )
    return write_block(transform_rows(block, transform), target, start)  # the receipt


def apply_table(
    version: Version,
    side: str,
    table: Table,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Table:
    """Write ``table``'s rows mapped into ``version``'s stabilized space at ``out`` (``vectors``, ``ids``).

    ``table`` holds raw rows of the version's table ``side`` (any table name)
    from the model that made the version's input; each keeps its id and place.
    Returns the written table, opened.
    """
    transform = version.saved_transform(side)
    if table.dim != transform.shape[0]:
        raise InputError(
            f"{table.name}/vectors has width {table.dim} but {version.url} maps {side} rows of width "
            f"{transform.shape[0]}; apply rows from the model that made {version.attrs.get('input') or 'its input'}"
        )
    out = os.fspath(out)
    inputs = [u for u in (version.url, table.name) if u]
    staging = Staging(out, inputs=inputs, overwrite=overwrite, storage_options=storage_options)
    try:
        target = staging.create_table("", table, transform.shape[1])
        chunks = table.row_chunks()
        tasks = [
            dask.delayed(_transform_write, pure=True)(block, transform, target, start, table.name)
            for block, start in zip(table.blocks(chunks), row_starts(chunks))
        ]
        tasks += staging.copy_ids("", table)
        staging.run(tasks, progress=progress, stage="applying the saved transform")
        staging.publish(
            {
                "kind": "applied",
                "side": side,  # the version's table whose transform mapped the rows
                "version": canonical_url(version.url) if version.url else None,
                "input": canonical_url(table.name) if table.name else None,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    except BaseException:
        staging.discard()
        raise
    return open_table(out, storage_options)
