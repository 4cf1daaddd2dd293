"""A version written but not yet computed: what ``to_zarr(..., compute=False)`` returns.

Like ``dask.array.to_zarr(..., compute=False)`` and xarray's delayed writes, the
write pass is a graph to compute later, alone or together with other work
(``dask.compute(pending, other)``). Unlike them, computing it also *publishes*:
the staged version is marked complete and moved into place (or committed) on the
client after every block is written, so a reader never sees it half-written.
``PendingVersion`` is a Dask collection whose finalize step is the publish.
Dask runs a collection's finalize inside the graph: in the calling process on the
threaded and synchronous schedulers, but on a worker under ``distributed``, where
the staging (its claim, its Icechunk session) is not. So ``dask.compute(pending)``
is refused while a ``distributed.Client`` is active, before anything runs, naming
``pending.compute()``, which runs the write pass on the cluster and publishes here.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from dask.base import tokenize
from dask.delayed import Delayed

from .errors import UsageError
from .executor import active_client


class PendingVersion:
    """The write pass of a version to ``out``: ``.compute()`` (or ``dask.compute(p)``) writes, publishes and returns it.

    Nothing is visible at ``out`` until then; :meth:`discard` drops what was
    staged without publishing. One compute only: a version is published once.
    """

    def __init__(
        self,
        out: str,
        write: Delayed,
        *,
        finish: Callable[[Any], Any],
        discard: Callable[[], None],
        compute: Callable[..., tuple[Any, ...]],
    ) -> None:
        self.out = out
        self._write = write
        self._finish = finish
        self._discard = discard
        self._compute = compute
        self._state = "pending"
        self._pid = os.getpid()
        # a pending write dropped without compute() or discard() (or this process ending first) leaves no staging
        self._cleanup = weakref.finalize(self, discard)

    def __repr__(self) -> str:
        tasks = len(self._write.__dask_graph__())
        return f"<PendingVersion {self.out}: {self._state}, {tasks} tasks; .compute() writes and publishes it>"

    # -- running it ourselves: progress lines, Ctrl-C and cleanup as the CLI's own passes
    def compute(self, *, progress: bool = False) -> Any:
        """Write every block, publish, and return the version opened (the staging is removed on failure)."""
        self._check_pending()
        try:
            (result,) = self._compute(self._write, progress=progress, stage="write pass")
        except BaseException:
            self.discard()
            raise
        return self._publish(result)

    def discard(self) -> None:
        """Drop what was staged; nothing is published."""
        if self._state == "pending":
            self._state = "discarded"
            self._cleanup()

    def _check_pending(self) -> None:
        if self._state != "pending":
            raise UsageError(f"the write of {self.out} was already {self._state}; call to_zarr again for another write")

    def _publish(self, result: Any) -> Any:
        if os.getpid() != self._pid:  # a copy on a worker: never publish from there
            raise UsageError(
                f"the write of {self.out} must be published by the process that staged it: call .compute() on it"
            )
        self._check_pending()
        self._state = "published"
        self._cleanup.detach()  # from here the publish owns the staging (and removes it if it fails)
        try:
            return self._finish(result)
        except BaseException:
            self._discard()
            raise

    # -- the Dask collection protocol, so dask.compute(pending, ...) works; the publish runs in the caller
    def __dask_graph__(self) -> Any:
        self._check_pending()  # before any task writes into a staging that is gone
        if active_client() is not None:
            raise UsageError(
                f"dask.compute() of the pending write of {self.out} would publish it from a worker; "
                "call .compute() on it instead (the write pass still runs on the cluster)"
            )
        return self._write.__dask_graph__()

    def __dask_keys__(self) -> Any:
        return self._write.__dask_keys__()

    def __dask_layers__(self) -> Any:
        return self._write.__dask_layers__()

    def __dask_tokenize__(self) -> Any:
        return tokenize(self._write, self.out)

    def __dask_postcompute__(self) -> tuple[Callable[..., Any], tuple[()]]:
        return self._finalize, ()

    def _finalize(self, results: Any) -> Any:
        # a Delayed's keys are [key]: the write pass's one reduced result
        return self._publish(results[0])

    __dask_optimize__ = staticmethod(Delayed.__dask_optimize__)
    __dask_scheduler__ = staticmethod(Delayed.__dask_scheduler__)
