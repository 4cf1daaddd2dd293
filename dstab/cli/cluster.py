"""Where a command runs: the scheduler ``--scheduler`` names, or a local cluster of worker processes.

Every check that needs no cluster (options that do nothing with the chosen
scheduler, a memory limit too small for the blocks) runs before any worker
starts; a worker killed again and again becomes one line naming the memory limit.
Imports nothing heavy at module level: dask and distributed load inside the functions.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..store import Table

log = logging.getLogger("dstab")

LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")

# What one worker process needs besides its blocks (the interpreter, numpy, Dask,
# zarr and their buffers: about 200 MiB resident when idle, measured), and how
# many blocks' worth of memory a task may hold at once (the block read, its
# float64 slices, the transformed block and the compressed chunks).
WORKER_BASE_BYTES = 256 * 2**20
DEFAULT_DASHBOARD = ":8787"
BLOCKS_IN_FLIGHT = 4


def _local_cluster_options(args: argparse.Namespace) -> list[str]:
    return [
        flag
        for flag, given in (
            ("--workers", args.workers is not None),
            ("--memory-limit", args.memory_limit is not None),
            ("--dashboard-address", args.dashboard_address != DEFAULT_DASHBOARD),
        )
        if given
    ]


def _worker_need(tables: list[Table]) -> tuple[int, str]:
    """Bytes one worker needs to run a task on the largest block of ``tables``, and that block in words."""
    from dask.utils import format_bytes

    if not tables:
        return WORKER_BASE_BYTES, "no table"
    table = max(tables, key=lambda t: t.block_rows() * t.dim * t.dtype.itemsize)
    block = min(table.block_rows(), table.n_rows) * table.dim * table.dtype.itemsize
    words = (
        f"blocks of {min(table.block_rows(), table.n_rows):,} rows x {table.dim} {table.dtype} ({format_bytes(block)})"
    )
    need = WORKER_BASE_BYTES + BLOCKS_IN_FLIGHT * block
    return -(-need // (64 * 2**20)) * 64 * 2**20, words  # rounded up to 64 MiB: a figure to type


def _check_memory_limit(limit: str, n_workers: int, tables: list[Table]) -> None:
    """Refuse a per-worker memory limit that one block's working set cannot fit in, before any worker starts."""
    import psutil
    from dask.utils import format_bytes, parse_bytes

    per_worker = psutil.virtual_memory().total // n_workers if limit == "auto" else parse_bytes(limit)
    need, words = _worker_need(tables)
    if per_worker >= need:
        return
    given = f"--memory-limit {limit}" if limit != "auto" else f"{n_workers} workers sharing this machine's memory"
    raise UsageError(
        f"{given} leaves {format_bytes(per_worker)} per worker, but a worker needs about "
        f"{need // 2**20} MiB for {words}: pass --memory-limit {need // 2**20}MiB or more "
        f"(or fewer --workers), or make blocks smaller with DASK_DSTAB__BLOCK_BYTES (down to one storage chunk)"
    )


def table_bytes(tables: list[Table]) -> int:
    """Bytes of the vectors of ``tables``, as stored uncompressed: what a command reads."""
    return sum(t.n_rows * t.dim * t.dtype.itemsize for t in tables)


def check_scheduler_options(args: argparse.Namespace) -> str | None:
    """The scheduler address asked for (``--scheduler`` or ``DASK_SCHEDULER_ADDRESS``), or None.

    Refuses local-cluster options that the named scheduler would ignore; needs no data, so a command calls it
    first, whether or not it then has work to do.
    """
    import dask

    address = args.scheduler or dask.config.get("scheduler-address", None)
    flags = _local_cluster_options(args)
    if address and flags:
        where = f"--scheduler {address}" if args.scheduler else f"DASK_SCHEDULER_ADDRESS={address}"
        how = (
            "runs in this process"
            if address in LOCAL_SCHEDULERS
            else "attaches to a cluster sized where it was started"
        )
        many = len(flags) > 1
        raise UsageError(
            f"{' and '.join(flags)} only {'apply' if many else 'applies'} to the local cluster dstab starts, "
            f"but {where} {how}, so {'they' if many else 'it'} would be ignored: drop {'them' if many else 'it'}"
        )
    return address


@contextlib.contextmanager
def scheduler_from_args(
    args: argparse.Namespace, tables: list[Table] | None = None, *, nbytes: int | None = None
) -> Iterator[None]:
    """Make the scheduler the command asked for active; close what this created.

    Every check that needs no cluster runs first: options that do nothing with
    the chosen scheduler, and a memory limit too small for the blocks of ``tables``.
    With no scheduler named and no local-cluster option given, a job of at most
    dask config ``dstab.in-process-bytes`` (the vectors of ``tables``, or
    ``nbytes`` for what a command writes from nothing) runs in this process on
    Dask's threads: starting worker processes costs seconds, more than such a job.
    """
    import dask

    from ..executor import spilled_bytes
    from ..extras import available, install_hint

    address = check_scheduler_options(args)
    if address in LOCAL_SCHEDULERS:
        log.debug("dstab: scheduler %s, in this process", address)
        with dask.config.set(scheduler=address):
            yield
        return
    if not address and not _local_cluster_options(args):  # an option only a local cluster uses starts one
        from dask.utils import format_bytes

        from .. import config

        size = table_bytes(tables or []) if nbytes is None else nbytes
        if size <= config.get("in-process-bytes"):
            log.debug(
                "dstab: %s of vectors: running in this process (threads); --workers N starts a local cluster",
                format_bytes(size),
            )
            with dask.config.set(scheduler="threads"):
                yield
            return
    from distributed import Client, LocalCluster

    if address:
        kwargs: dict[str, Any]
        if address.endswith(".json") or os.path.isfile(address):
            if not os.path.isfile(address):
                raise UsageError(
                    f"scheduler file {address} does not exist; start `dask scheduler --scheduler-file {address}`"
                )
            kwargs = {"scheduler_file": address}
        else:
            kwargs = {"address": address}
        try:
            client = Client(timeout="10s", **kwargs)
        except (OSError, TimeoutError, ValueError, TypeError, AssertionError, KeyError) as exc:
            # a bad address (ValueError), a scheduler file that is not one (JSON or key errors), nobody listening
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if "scheduler_file" in kwargs and isinstance(exc, (AssertionError, KeyError, ValueError, TypeError)):
                cause = "not a scheduler file: it names no scheduler address"
            raise UsageError(
                f"cannot reach the Dask scheduler at {address} ({cause}); check the address "
                "(tcp://HOST:PORT) or the scheduler file, or start one with `dask scheduler` and `dask worker ADDRESS`"
            ) from None
        with client, _killed_worker_as_error("the cluster's workers' memory limit"):
            workers = client.scheduler_info()["workers"]
            log.info("dstab: attached to %s (%d workers)", client.scheduler_info().get("address"), len(workers))
            for worker, info in workers.items():
                log.debug(
                    "dstab: worker %s: %s threads, memory limit %s",
                    worker,
                    info.get("nthreads"),
                    info.get("memory_limit"),
                )
            yield
        return
    n_workers = args.workers or os.cpu_count() or 1
    memory_limit = args.memory_limit or "auto"
    _check_memory_limit(memory_limit, n_workers, tables or [])
    # The dashboard is an extra (bokeh): without it the cluster starts with none, and says how to get one.
    dashboard = available("bokeh")
    # One thread per worker process: the kernels are BLAS and (de)compression,
    # which release the GIL but must not oversubscribe the cores.
    try:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=args.dashboard_address if dashboard else None,
            # a failed task reaches this process as its exception (a one-line error, or a traceback for a bug);
            # the workers' own logging of it would only repeat it as pages of log lines
            silence_logs=logging.CRITICAL,
            preload=["dstab.worker_setup"],  # the workers leave Ctrl-C to this process
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise UsageError(
            f"the local cluster could not start ({exc}); check --dashboard-address {args.dashboard_address} "
            "(HOST:PORT or :PORT, e.g. :0 for any free port)"
        ) from None
    with cluster, Client(cluster) as client:
        workers = f"{n_workers} worker{'s' if n_workers > 1 else ''}"
        if dashboard:
            log.info("dstab: local cluster of %s; dashboard at %s", workers, client.dashboard_link)
        else:
            log.info("dstab: local cluster of %s (no dashboard: %s for one)", workers, install_hint("bokeh"))
        log.debug(
            "dstab: scheduler %s, %s, 1 thread each, memory limit %s per worker",
            client.scheduler.address,
            workers,
            memory_limit,
        )
        with _killed_worker_as_error(f"--memory-limit {memory_limit}"):
            yield
        spilled = spilled_bytes(client)
        if spilled:
            log.warning(
                "dstab: workers spilled %s MiB to disk (raise --memory-limit to avoid it)", f"{spilled / 2**20:,.0f}"
            )


class _InterruptedGather(logging.Filter):
    """Drop asyncio's report of the client's gather ended by Ctrl-C (``AllExit``): the interrupt is said in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "AllExit"


logging.getLogger("asyncio").addFilter(_InterruptedGather())


@contextlib.contextmanager
def _killed_worker_as_error(limit: str) -> Iterator[None]:
    """A task that kills its worker again and again (Dask gives up after a few): one line naming the memory limit."""
    from distributed.scheduler import KilledWorker

    try:
        yield
    except KilledWorker as exc:
        raise UsageError(
            f"a task killed its worker {exc.allowed_failures + 1} times ({exc.task!r}): the workers run out of memory at {limit}; raise the memory limit per worker "
            "(--memory-limit 2GiB, or fewer --workers), or make blocks smaller with DASK_DSTAB__BLOCK_BYTES"
        ) from None
