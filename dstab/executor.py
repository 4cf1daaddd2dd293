"""Running graphs on whatever scheduler the caller made active.

The library never creates a Client. It computes on the scheduler Dask would
pick (a ``distributed.Client`` made default by the caller, ``dask.config``'s
``scheduler``, or the threaded default), pins BLAS to one thread for local
schedulers (with Dask's threads, multi-threaded BLAS inside tasks was measured
100x slower; distributed's nanny already sets ``OMP_NUM_THREADS=1`` and friends
in its workers), and can show progress on stderr: a bar on a terminal, and
otherwise (a log file, a pipe) two plain lines per stage, when it starts (with
its number of tasks) and when it ends (with its time), never a ``\\r``.

Those lines (and the CLI's notes) go through the ``dstab`` logger, which
writes them to stderr by default (:func:`log_to_stderr`, as distributed does
for its own loggers); its level is what the CLI's ``-v`` and ``-q`` set.
An application that wants them elsewhere replaces the logger's handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import dask.threaded
from threadpoolctl import threadpool_limits

from . import config


def active_client() -> Any | None:
    """The ``distributed.Client`` that ``dask.compute`` would use now, or None."""
    if "distributed" not in sys.modules:
        # no Client exists before distributed is imported; asking Dask would import it (0.5 s of a small job)
        return None
    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    return owner if isinstance(owner, Client) else None


DEFAULT_STAGE = "computing"


def _on_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a log file, a pipe or a capture is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


log = logging.getLogger("dstab")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes each message to ``sys.stderr`` as it is then (a redirect, a test's capture), not as it was at import."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if sys.stderr is not None:  # no stderr at all (pythonw): nowhere to say it
            super().emit(record)


def log_to_stderr() -> None:
    """Give the ``dstab`` logger its default: plain lines on stderr at INFO, unless it has handlers already."""
    if log.handlers:
        return
    log.addHandler(_Stderr())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False  # the lines are said once, here, not again by a root handler


log_to_stderr()


def _say(line: str) -> None:
    """One plain line on stderr (through the ``dstab`` logger, at INFO)."""
    log.info("dstab: %s", line)


def _started(stage: str, n_tasks: int) -> None:
    _say(f"{stage}: {n_tasks:,} task{'' if n_tasks == 1 else 's'} ...")


@contextlib.contextmanager
def _timed(stage: str) -> Iterator[None]:
    """The closing plain line of a stage: its time, or that it stopped."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        _say(f"{stage}: stopped after {time.perf_counter() - started:.1f} s")
        raise
    _say(f"{stage}: done in {time.perf_counter() - started:.1f} s")


def _local_lines(stage: str) -> contextlib.AbstractContextManager[Any]:
    """Local schedulers: the opening line of a stage when the scheduler starts it (the graph's task count)."""
    from dask.callbacks import Callback

    class StartLine(Callback):
        said = False

        def _start(self, dsk: Any) -> None:
            if not self.said:  # once: a task computing its own graph does not speak
                self.said = True
                _started(stage, len(dsk))

    return StartLine()


def _distributed_lines(futures: list[Any], stage: str) -> None:
    """Distributed: the opening line once the scheduler reports the task count; returns when all are done."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class StartLine(TextProgressBar):
        said = False

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # "all": distributed passes it by name
            if not self.said:
                self.said = True
                _started(stage, all)

        def _draw_stop(self, **kwargs: Any) -> None:
            pass

    StartLine(futures, complete=True)


def compute(*graphs: Any, progress: bool = False, stage: str = DEFAULT_STAGE) -> tuple[Any, ...]:
    """``dask.compute(*graphs)`` on the active scheduler, optionally showing progress on stderr.

    ``stage`` names the work in the progress output (``"statistics pass"``).
    On a terminal progress is a bar; otherwise it is two plain lines,
    ``dstab: STAGE: N tasks ...`` and ``dstab: STAGE: done in T s``.
    """
    terminal = progress and _on_terminal(sys.stderr)
    plain = progress and not terminal
    if terminal:
        _say(stage)
    client = active_client()
    if client is not None:
        with _timed(stage) if plain else contextlib.nullcontext():
            futures = client.compute(list(graphs))
            try:
                if terminal:
                    from distributed import progress as show_progress

                    with contextlib.redirect_stdout(sys.stderr):
                        show_progress(futures)
                elif plain:
                    _distributed_lines(futures, stage)
                return tuple(client.gather(futures))
            except BaseException:
                _settle(client, futures)
                raise
    bar: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if terminal:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(out=sys.stderr)
    elif plain:
        bar = _local_lines(stage)
    with _timed(stage) if plain else contextlib.nullcontext(), threadpool_limits(limits=1, user_api="blas"), bar:
        # Dask's default for these graphs is the threaded scheduler; named by its function, not by a string,
        # which Dask would resolve by importing distributed
        if dask.config.get("scheduler", None) not in (None, "threads", "threading", dask.threaded.get):
            return dask.compute(*graphs)
        # A pool of this compute's own, so that when a task fails the others still running are waited for:
        # a block write finishing after the caller has cleaned up would put back what it removed.
        pool = ThreadPoolExecutor(int(dask.config.get("num_workers", None) or os.cpu_count() or 1))
        try:
            return dask.compute(*graphs, scheduler=dask.threaded.get, pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _executing(dask_worker: Any) -> int:
    state = dask_worker.state
    return int(state.executing_count + len(state.long_running))


def _settle(client: Any, futures: list[Any]) -> None:
    """Cancel a failed compute's futures and wait until no worker still runs a task (cancelled ones included).

    A worker cannot stop a task that has started, so after a failure the other
    block writes of the same compute may still be running; the caller removes
    its staging only once they have ended. Bounded: on a cluster shared with
    other work it stops waiting after the dask config ``dstab.settle-seconds``.
    """
    try:
        client.cancel(futures, force=True)
        deadline = time.monotonic() + config.get("settle-seconds")  # dask config dstab.settle-seconds, on the client
        while time.monotonic() < deadline and any(client.run(_executing).values()):
            time.sleep(0.05)
    except Exception:  # the cluster itself is going away: nothing left to wait for
        pass


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


def run_all(tasks: list[Any], *, progress: bool = False, stage: str = "writing") -> None:
    """Compute delayed tasks run for their effect (writes), joined by a tree so no task waits on thousands."""
    if tasks:
        compute(tree_reduce(tasks, _nothing), progress=progress, stage=stage)
