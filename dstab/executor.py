"""Running graphs on whatever scheduler the caller made active.

The library never creates a Client. It computes on the scheduler Dask would
pick (a ``distributed.Client`` made default by the caller, ``dask.config``'s
``scheduler``, or the threaded default), pins BLAS to one thread for local
schedulers (with Dask's threads, multi-threaded BLAS inside tasks was measured
100x slower; distributed's nanny already sets ``OMP_NUM_THREADS=1`` and friends
in its workers), and can show progress on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import dask
from threadpoolctl import threadpool_limits


def active_client() -> Any | None:
    """The ``distributed.Client`` that ``dask.compute`` would use now, or None."""
    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    return owner if isinstance(owner, Client) else None


def compute(*graphs: Any, progress: bool = False) -> tuple[Any, ...]:
    """``dask.compute(*graphs)`` on the active scheduler, optionally with a progress bar."""
    client = active_client()
    if client is not None:
        futures = client.compute(list(graphs))
        if progress:
            from distributed import progress as show_progress

            with contextlib.redirect_stdout(sys.stderr):
                show_progress(futures)
        return tuple(client.gather(futures))
    bar: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if progress:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(out=sys.stderr)
    with threadpool_limits(limits=1, user_api="blas"), bar:
        return dask.compute(*graphs)


def _spilled_by(dask_worker: Any) -> float:
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return float(metrics.get(("disk-write", "bytes"), 0.0))


def spilled_bytes(client: Any) -> int:
    """Bytes the client's workers have spilled to disk since they started, summed."""
    return int(sum(client.run(_spilled_by).values()))


def tree_reduce(parts: list[Any], combine: Any) -> Any:
    """Pairwise merge ``parts`` (delayed values) into one delayed value (depth log2 n, n - 1 tasks)."""
    if not parts:
        raise ValueError("nothing to reduce")
    level = list(parts)
    while len(level) > 1:
        nxt = [dask.delayed(combine, pure=True)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _nothing(*_: Any) -> None:
    return None


def run_all(tasks: list[Any], *, progress: bool = False) -> None:
    """Compute delayed tasks run for their effect (writes), joined by a tree so no task waits on thousands."""
    if tasks:
        compute(tree_reduce(tasks, _nothing), progress=progress)
