"""The ``dstab`` command: stabilize, apply, report, diagnose, log, import, export, synth, nightly.

Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the
array, the row or id, and the fix), 3 a quality gate crossed (``nightly
--max-score-error`` / ``--max-drift``: the day is not published), 1
unexpected failure (with a traceback). Inputs and the output location are
checked before any cluster starts. With ``--json`` every command prints
exactly one JSON object on stdout (also on failure: ``{"ok": false, "error":
..., "exit_code": N}``); progress and notes go to stderr through the
``dstab`` logger (``-v`` adds debug lines, ``-q`` keeps warnings and errors).

Start-up: building the parser imports nothing heavy (no dask, zarr, scipy or
distributed, none of the command modules), so ``dstab --help`` answers at
once; each command imports what it needs inside its handler.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import DstabError, UsageError
from .release import __version__

if TYPE_CHECKING:
    from .store import Table, Version

log = logging.getLogger("dstab")

LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")
# The choices of --method and --anchor-weights, written here so that building the parser does not import
# dstab.stabilize (and with it dask.array); tests/test_cli_json.py checks they are stabilize's METHODS and ANCHOR_WEIGHTS.
METHODS = ("auto", "gram", "tsqr")
ANCHOR_WEIGHTS = ("uniform", "counts")

# Names this module once imported at its top, still reachable as dstab.cli.NAME (imported on first use).
_LAZY = {
    "open_version": ".store",
    "open_table": ".store",
    "check_output": ".store",
    "describe": ".report",
    "diagnose": ".diagnose",
    "open_version_or_table": ".diagnose",
    "stabilize": ".stabilize",
    "apply_table": ".apply",
    "chain": ".lineage",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __package__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- schedulers


def add_scheduler_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="attach to a running dask.distributed scheduler: tcp://host:port, or a scheduler file "
        "(JSON) written by `dask scheduler --scheduler-file`; also 'threads' or 'synchronous' to run "
        "in this process. Default: $DASK_SCHEDULER_ADDRESS if set, else a local cluster of worker processes",
    )
    g.add_argument(
        "--workers", type=parse_workers, metavar="N", help="local cluster: worker processes (default: one per core)"
    )
    g.add_argument(
        "--memory-limit",
        type=parse_memory_limit,
        metavar="SIZE",
        help="local cluster: memory limit per worker, e.g. 2GiB (default: auto, the machine's memory split evenly)",
    )
    g.add_argument(
        "--dashboard-address", default=":8787", metavar="ADDR",
        help="local cluster: dashboard (default :8787; needs the dashboard extra, pip install 'dstab[dashboard]')",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# What one worker process needs besides its blocks (the interpreter, numpy, Dask,
# zarr and their buffers: about 200 MiB resident when idle, measured), and how
# many blocks' worth of memory a task may hold at once (the block read, its
# float64 slices, the transformed block and the compressed chunks).
WORKER_BASE_BYTES = 256 * 2**20
BLOCKS_IN_FLIGHT = 4


def _positive_int(value: str, wording: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {value!r}")
    return number


def parse_workers(value: str) -> int:
    return _positive_int(value, "a whole number of worker processes, at least 1")


def parse_memory_limit(value: str) -> str:
    """``auto`` or a size Dask understands (2GiB, 500MB, 1e9); anything else is a usage error."""
    if value == "auto":
        return value
    from dask.utils import (
        parse_bytes,  # here, not at the top: start-up (only when the option is given)
    )

    try:
        size = parse_bytes(value)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"must be a size such as 2GiB, 512MiB or 4e9 (or auto), got {value!r}"
        ) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 2GiB, got {value!r}")
    return value


def parse_gate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, e.g. 1e-5, got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, e.g. 1e-5, got {value!r}")
    return number


def _local_cluster_options(args: argparse.Namespace) -> list[str]:
    return [
        flag
        for flag, value in (("--workers", args.workers), ("--memory-limit", args.memory_limit))
        if value is not None
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


@contextlib.contextmanager
def scheduler_from_args(args: argparse.Namespace, tables: list[Table] | None = None) -> Iterator[None]:
    """Make the scheduler the command asked for active; close what this created.

    Every check that needs no cluster runs first: options that do nothing with
    the chosen scheduler, and a memory limit too small for the blocks of ``tables``.
    """
    import dask

    from .executor import spilled_bytes
    from .extras import available, install_hint

    address = args.scheduler or dask.config.get("scheduler-address", None)
    if address and _local_cluster_options(args):
        where = f"--scheduler {address}" if args.scheduler else f"DASK_SCHEDULER_ADDRESS={address}"
        how = (
            "runs in this process"
            if address in LOCAL_SCHEDULERS
            else "attaches to a cluster sized where it was started"
        )
        raise UsageError(
            f"{' and '.join(_local_cluster_options(args))} size the local cluster dstab starts, but {where} {how}, "
            "so they would be ignored: drop them"
        )
    if address in LOCAL_SCHEDULERS:
        log.debug("dstab: scheduler %s, in this process", address)
        with dask.config.set(scheduler=address):
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
            raise UsageError(
                f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}: {exc}); check the address "
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


# ----------------------------------------------------------------------------- output: text or one JSON object


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, paths: what json.dumps does not take by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=_jsonable)


def _finish(args: argparse.Namespace, data: dict[str, Any], lines: Callable[[], list[str]]) -> int:
    """The command's result: ``{"ok": true, "command": ..., **data}`` with --json, else ``lines()`` on stdout."""
    if getattr(args, "json", False):
        print(_dumps({"ok": True, "command": args.command, **data}))
    else:
        for line in lines():
            print(line)
    return 0


def _notes(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """Notes as ``note:`` lines: on stdout with the text result, on stderr (the log) beside a JSON one."""
    lines = [f"note: {note}" for note in notes]
    if getattr(args, "json", False):
        for line in lines:
            log.info("%s", line)
        return []
    return lines


def _progress(args: argparse.Namespace) -> bool:
    """Progress on stderr unless --no-progress or -q."""
    return not args.no_progress and args.verbosity >= 0


# ----------------------------------------------------------------------------- commands


def parse_rank(value: str) -> int | str:
    return value if value == "auto" else _positive_int(value, "'auto' or a positive integer")


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stabilize options as :func:`dstab.stabilize` takes them."""
    return {
        "sides": args.sides, "symmetric": args.symmetric, "rank": args.rank, "rtol": args.rtol, "anchor": args.anchor,
        "anchor_min_count": args.anchor_min_count, "anchor_weights": args.anchor_weights, "method": args.method,
        "neighbours": args.neighbours,
    }  # fmt: skip


def _key_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What a scheduler gates on, from a stabilization's report."""
    keys = ("rank", "dim_in", "dim_out", "structure", "tables", "dtype", "method", "drift_before", "drift_after",
            "score_error", "score_max_abs_error", "score_max_abs", "anchor", "drift", "notes")  # fmt: skip
    return {key: report.get(key) for key in keys}


def cmd_stabilize(args: argparse.Namespace) -> int:
    from .report import format_matching, format_side_drift
    from .stabilize import check_request, stabilize
    from .store import check_output, open_version

    options = _storage_options(args)
    new = open_version(args.new, options)
    reference = open_version(args.reference, options) if args.reference else None
    inputs = [v.url for v in (new, reference) if v is not None and v.url]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, storage_options=options)
    request = check_request(new, reference, **_fit_options(args))
    started = time.perf_counter()
    with scheduler_from_args(args, _tables(new, reference)):
        result = stabilize(new, reference, **_fit_options(args), progress=_progress(args))
        result.to_zarr(args.out, overwrite=args.overwrite, storage_options=options, progress=_progress(args))
    r = result.report
    seconds = time.perf_counter() - started

    def lines() -> list[str]:
        shapes = ", ".join(f"{name} {n:,} x {r['dim_out']}" for name, n in r["tables"].items())
        text = [
            f"wrote {args.out}: {shapes}, rank {r['rank']} of {r['dim_in']}, {request.structure}, {seconds:.1f} s",
            f"score error {r['score_error']:.3g} (relative), max abs {r['score_max_abs_error']:.3g} of {r['score_max_abs']:.3g}",
        ]
        if r["drift_before"] is not None:
            text.append(
                f"drift before {r['drift_before']:.4g}, after {r['drift_after']:.4g} (relative, anchors: {r['anchor']})"
            )
        return text + format_side_drift(r.get("drift") or {}) + format_matching(r.get("matching") or {}) + notes

    notes = _notes(args, r.get("notes") or [])
    data = {"out": args.out, **_key_figures(r), "matching": r.get("matching") or {}, "seconds": round(seconds, 3)}
    return _finish(args, data, lines)


def _tables(*versions: Version | None) -> list[Table]:
    return [table for v in versions if v is not None for table in v.tables.values()]


def _check_plot_path(args: argparse.Namespace) -> None:
    """A --plot file is a .png in an existing directory, outside every input, and not anyone else's file.

    Checked before any work starts; replacing a plot dstab drew earlier is fine.
    """
    if not args.plot:
        return
    from .plots import check_plot_target
    from .store import same_or_nested

    plot = os.fspath(args.plot)
    if os.path.splitext(plot)[1].lower() != ".png":
        raise UsageError(f"--plot needs a .png file name, got {plot}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise UsageError(f"--plot {plot}: the directory {os.path.dirname(os.path.abspath(plot))} does not exist")
    for name in ("version", "reference", "base", "path"):
        source = getattr(args, name, None)
        if source and same_or_nested(plot, os.fspath(source)):
            raise UsageError(f"--plot {plot} is or lies inside the input {source}; dstab never writes into its inputs")
    check_plot_target(plot)


def _emit(args: argparse.Namespace, data: Any, text: Any, plot: Any) -> None:
    """Print ``data`` as JSON (--json) or ``text()``, and draw ``plot(path)`` when --plot is given."""
    if args.plot:
        plot(args.plot)
    if args.json:
        print(_dumps(data))
        return
    print(text())
    if args.plot:
        print(f"  plot: {args.plot}")


def cmd_report(args: argparse.Namespace) -> int:
    from .plots import plot_report
    from .report import describe, format_report
    from .store import open_version

    _check_plot_path(args)
    options = _storage_options(args)
    version = open_version(args.version, options)
    reference = open_version(args.reference, options) if args.reference else None
    base = open_version(args.base, options) if args.base else None
    needs_pass = reference is not None or base is not None or version.attrs.get("kind") != "stabilized"
    with scheduler_from_args(args, _tables(version, reference, base)) if needs_pass else contextlib.nullcontext():
        report = describe(version, reference, base=base, progress=needs_pass and _progress(args) and not args.json)
    _emit(args, report, lambda: format_report(report), lambda path: plot_report(report, path))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import (
        diagnose,
        diagnosis_json,
        diagnosis_structure,
        format_diagnosis,
        open_version_or_table,
    )
    from .plots import plot_diagnosis
    from .store import Version

    _check_plot_path(args)
    target = open_version_or_table(args.path, _storage_options(args))
    if args.rtol is not None and not (0.0 <= args.rtol < 1.0):
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol}")

    structure = {"sides": args.sides, "symmetric": args.symmetric}
    diagnosis_structure(target, **structure)  # bad --sides / --symmetric: refused before any cluster starts
    with scheduler_from_args(args, _tables(target) if isinstance(target, Version) else [target]):
        result = diagnose(target, **structure, rtol=args.rtol, progress=_progress(args) and not args.json)
    _emit(args, diagnosis_json(result), lambda: format_diagnosis(result), lambda path: plot_diagnosis(result, path))
    return 0


def _apply_target(args: argparse.Namespace) -> tuple[str, str]:
    """(the version's table whose transform applies, the raw rows): --table NAME --rows T, or --items T / --users T."""
    given = [flag for flag in ("items", "users", "table") if getattr(args, flag)]
    if len(given) != 1:
        raise UsageError(
            "say which table the rows belong to: --table NAME --rows TABLE (or --items TABLE / --users TABLE)"
        )
    if args.table:
        if not args.rows:
            raise UsageError(f"--table {args.table} names the table; give the raw rows with --rows TABLE")
        return args.table, args.rows
    if args.rows:
        raise UsageError(f"--rows goes with --table NAME; --{given[0]} already gives the rows")
    return given[0], getattr(args, given[0])


def cmd_apply(args: argparse.Namespace) -> int:
    from .apply import apply_table
    from .store import check_output, open_table, open_version

    options = _storage_options(args)
    version = open_version(args.version, options)
    side, rows = _apply_target(args)
    table = open_table(rows, options)
    transform = version.saved_transform(side)  # fails early, before any cluster starts
    check_output(
        args.out, inputs=[u for u in (version.url, table.name) if u], overwrite=args.overwrite, storage_options=options
    )
    started = time.perf_counter()
    with scheduler_from_args(args, [table]):
        apply_table(
            version, side, table, args.out, overwrite=args.overwrite, storage_options=options, progress=_progress(args)
        )
    seconds = time.perf_counter() - started
    data = {"out": args.out, "version": args.version, "table": side, "rows": table.n_rows, "dim_in": int(transform.shape[0]),
            "dim_out": int(transform.shape[1]), "seconds": round(seconds, 3)}  # fmt: skip
    return _finish(args, data, lambda: [
        f"wrote {args.out}: {table.n_rows:,} rows of {side} x {transform.shape[1]} in the space of {args.version}, {seconds:.1f} s"
    ])  # fmt: skip


def cmd_log(args: argparse.Namespace) -> int:
    from .lineage import chain, format_chain
    from .store import open_version

    entries = chain(open_version(args.version, _storage_options(args)))
    print(_dumps(entries) if args.json else format_chain(entries))
    return 0


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options", metavar="JSON",
        help="fsspec options for remote versions (e.g. credentials, endpoint_url); never printed or stored",
    )  # fmt: skip


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def _source(args: argparse.Namespace, name: str, path: str, ids: str | None, options: dict[str, Any] | None) -> Any:
    """Table ``name`` of an import: a .npy file (ids from another .npy) or Parquet (ids from a column)."""
    from .interchange import open_npy, open_parquet

    if path.endswith(".npy"):
        if args.vector_column or args.vector_columns:
            raise UsageError("--vector-column / --vector-columns apply to Parquet sources, not .npy files")
        return open_npy(path, ids=ids, label=name)
    if ids:
        flag = f"--{name}-ids" if getattr(args, f"{name}_ids", None) == ids else f"--table-ids {name}={ids}"
        raise UsageError(f"{flag} applies to .npy sources; a Parquet source names its id column with --id-column")
    columns = args.vector_columns
    if columns and "," in columns:
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    return open_parquet(
        path, id_column=args.id_column or None, vector_column=args.vector_column, vector_columns=columns,
        storage_options=options, label=name,
    )  # fmt: skip


def _version_figures(version: Version) -> dict[str, Any]:
    """A written version's key figures: rows per table, width, dtype, structure."""
    structure = version.structure
    return {
        "tables": {name: t.n_rows for name, t in version.tables.items()},
        "dim": version.dim,
        "dtype": str(version.dtype),
        "structure": structure.to_attrs() if structure is not None else None,
    }


def cmd_import(args: argparse.Namespace) -> int:
    from .interchange import check_sources, import_version, named_values
    from .store import check_output
    from .structure import resolve

    options = _storage_options(args)
    # every table option is checked (names, repeats, ids for tables that exist, the structure) before a file is opened
    paths = named_values(
        "--table", args.table, "SRC", {"items": args.items, "users": args.users}, example="words=words.npy"
    )
    ids = named_values(
        "--table-ids", args.table_ids, "IDS.npy", {"items": args.items_ids, "users": args.users_ids}, example="words=ids.npy"
    )  # fmt: skip
    if not paths:
        raise UsageError("import needs at least one table: --table NAME=SRC (repeatable), or --items SRC / --users SRC")
    unknown = [name for name in ids if name not in paths]
    if unknown:
        raise UsageError(
            f"ids are given for the table {unknown[0]!r}, which is not imported (tables: {', '.join(paths)}); "
            f"give its vectors with --table {unknown[0]}=SRC, or drop its ids"
        )
    structure = None
    if args.sides or args.symmetric:
        structure = resolve(tuple(paths), sides=args.sides, symmetric_all=args.symmetric, label="the imported version")
    sources = {name: _source(args, name, path, ids.get(name), options) for name, path in paths.items()}
    check_sources(sources)
    inputs = [u for src in sources.values() for u in (src.url, src.ids_url) if u]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, storage_options=options)
    with scheduler_from_args(args):
        version = import_version(
            args.out, sources, structure=structure, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
            storage_options=options, progress=_progress(args),
        )  # fmt: skip
    data = {"out": args.out, **_version_figures(version), "sources": {name: src.url for name, src in sources.items()}}
    return _finish(
        args, data, lambda: [f"wrote {args.out}: {version!r}" + (f", {structure}" if structure is not None else "")]
    )


def cmd_export(args: argparse.Namespace) -> int:
    from .interchange import export_version
    from .store import check_output, open_version

    options = _storage_options(args)
    version = open_version(args.version, options)
    check_output(
        args.out, inputs=[version.url] if version.url else [], overwrite=args.overwrite, storage_options=options
    )
    with scheduler_from_args(args, _tables(version)):
        written = export_version(
            version, args.out, layout=args.layout, overwrite=args.overwrite, storage_options=options,
            progress=_progress(args),
        )  # fmt: skip
    data = {
        "out": args.out,
        "layout": args.layout,
        "written": written,
        "tables": {n: t.n_rows for n, t in version.tables.items()},
    }
    return _finish(args, data, lambda: [f"wrote {', '.join(written)} (Parquet, {args.layout} layout)"])


def cmd_synth(args: argparse.Namespace) -> int:
    from .interchange import named_values
    from .store import check_output, open_version
    from .structure import resolve
    from .synth import (
        check_retrain,
        check_synth,
        check_synth_tables,
        synth,
        synth_like,
        synth_tables,
    )

    progress = _progress(args)
    if args.like:
        given = [name for name in ("items", "users", "dim", "rank") if getattr(args, name) is not None]
        given += ["table"] if args.table else []
        if given:
            raise UsageError(f"--like copies the shape of a version; drop --{', --'.join(given)}")
        like = open_version(args.like)
        if args.counts:
            raise UsageError("--like retrains carry the counts of the version they copy; drop --counts")
        structure = check_retrain(
            like, noise=args.noise, churn=args.churn, seed=args.seed, sides=args.sides, symmetric=args.symmetric
        )  # fmt: skip
        check_output(args.out, inputs=[args.like], overwrite=args.overwrite)
        with scheduler_from_args(args, _tables(like)):
            out = synth_like(
                args.out, like, noise=args.noise, churn=args.churn, seed=args.seed, sides=structure,
                overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
    elif args.table or args.sides or args.symmetric:
        # named tables (--items N and --users M are shorthands for --table items=N, --table users=M)
        shorthands = {
            name: None if getattr(args, name) is None else str(getattr(args, name)) for name in ("items", "users")
        }
        named = named_values("--table", args.table, "ROWS", shorthands, example="words=100000")
        tables = {}
        for name, text in named.items():
            try:
                tables[name] = int(text)
            except ValueError:
                raise UsageError(
                    f"--table {name}={text}: ROWS must be a whole number of rows, e.g. --table {name}=100000"
                ) from None
        if args.dim is None:
            raise UsageError("synth needs --dim D (the width of every table)")
        if args.noise or args.churn:
            raise UsageError("--noise and --churn apply to --like retrains only")
        check_synth_tables(
            tables, dim=args.dim, rank=args.rank, seed=args.seed, dtype=args.dtype, chunk_rows=args.chunk_rows
        )
        structure = resolve(
            tuple(tables), sides=args.sides, symmetric_all=args.symmetric, label="the synthetic version"
        )
        check_output(args.out, inputs=[], overwrite=args.overwrite)
        with scheduler_from_args(args):
            out = synth_tables(
                args.out, tables, dim=args.dim, structure=structure, rank=args.rank, seed=args.seed, dtype=args.dtype,
                chunk_rows=args.chunk_rows, counts=args.counts, overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
    else:
        missing = [name for name in ("items", "users", "dim") if getattr(args, name) is None]
        if missing:
            raise UsageError(
                f"synth needs --items, --users and --dim (or --table NAME=ROWS and --dim, or --like VERSION); "
                f"missing --{', --'.join(missing)}"
            )
        if args.noise or args.churn:
            raise UsageError("--noise and --churn apply to --like retrains only")
        check_synth(
            items=args.items, users=args.users, dim=args.dim, rank=args.rank, seed=args.seed, dtype=args.dtype,
            chunk_rows=args.chunk_rows,
        )  # fmt: skip
        check_output(args.out, inputs=[], overwrite=args.overwrite)
        with scheduler_from_args(args):
            out = synth(
                args.out, items=args.items, users=args.users, dim=args.dim, rank=args.rank, seed=args.seed,
                dtype=args.dtype, chunk_rows=args.chunk_rows, counts=args.counts, overwrite=args.overwrite,
                progress=progress,
            )  # fmt: skip
    data = {"out": args.out, **_version_figures(out), "seed": args.seed, "like": args.like}
    return _finish(
        args, data, lambda: [f"wrote {args.out}: {out!r}" + (f", {out.structure}" if out.structure is not None else "")]
    )


def cmd_nightly(args: argparse.Namespace) -> int:
    from . import nightly
    from .report import format_matching
    from .stabilize import check_request
    from .store import open_version
    from .structure import parse_sides

    options = _storage_options(args)
    source = os.fspath(args.source)
    stable = args.stable if args.stable is not None else nightly.join(source, "stable")
    gates = nightly.Gates(max_score_error=args.max_score_error, max_drift=args.max_drift)
    if args.sides:
        parse_sides(args.sides)  # a malformed --sides is refused before anything is opened
    names = nightly.list_raw_days(source, options)
    days = nightly.plan(source, names, (), stable=stable)
    done = nightly.find_done(days, options)
    todo = [day for day in days if day.name not in done]
    log.debug("nightly: %d days under %s: %d done, %d to do; stable versions in %s", len(days), nightly.join(source, "raw"),
              len(done), len(todo), stable)  # fmt: skip
    for day in days:
        log.debug("nightly: %s %s -> %s%s", "skip" if day.name in done else "todo", day.raw, day.stable,
                  f" (onto {day.reference})" if day.reference and day.name not in done else "")  # fmt: skip
    fit = {
        "sides": args.sides, "symmetric": args.symmetric, "rank": args.rank, "rtol": args.rtol, "anchor": args.anchor,
        "anchor_min_count": args.anchor_min_count, "anchor_weights": args.anchor_weights, "method": args.method,
    }  # fmt: skip
    tables: list[Table] = []
    if todo:
        # the first day to do, checked (structure, anchors, rank) before any cluster starts; its reference is done
        first = todo[0]
        new = open_version(first.raw, options)
        reference = done[first.reference] if first.reference is not None else None
        check_request(
            new, reference, **{k: v for k, v in fit.items() if reference is not None or not k.startswith("anchor")}
        )
        tables = _tables(new, reference)

    def said(record: dict[str, Any]) -> None:
        if not args.json:
            print(nightly.describe_day(record), flush=True)
            for line in format_matching(record.get("matching") or {}):
                print(f"  {line}", flush=True)
        for note in record.get("notes") or []:
            log.info("%s: note: %s", record["name"], note)

    night = nightly.Night(source=source, stable=stable, gates=gates)
    try:
        with scheduler_from_args(args, tables) if todo else contextlib.nullcontext():
            nightly.run(
                days, done, source=source, stable=stable, options=fit, gates=gates, storage_options=options,
                progress=_progress(args), on_day=said, night=night,
            )  # fmt: skip
    except DstabError as exc:
        exc.night = night  # type: ignore[attr-defined]  # the failure's JSON object says what the night did before it
        raise
    if args.json:
        print(_dumps({"ok": True, "command": "nightly", **night.as_dict()}))
    return 0


def add_structure_options(p: argparse.ArgumentParser, title: str, *, sides: str, symmetric: str) -> None:
    """``--sides Q:C`` or ``--symmetric`` (one of them): which tables score against which (:mod:`dstab.structure`)."""
    how = p.add_argument_group(f"which tables score against which ({title})").add_mutually_exclusive_group()
    how.add_argument(
        "--sides",
        metavar="Q1[,Q2]:C1[,C2]",
        help=f"two-sided: the query tables, a colon, the candidate tables; {sides}",
    )
    how.add_argument("--symmetric", action="store_true", help=f"every table is scored against every other; {symmetric}")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where the options are), exit 2, like every other error."""

    last_error: str | None = None  # the message of the last usage error, for --json

    def error(self, message: str) -> NoReturn:
        OneLineParser.last_error = f"{message} (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {OneLineParser.last_error}\n")


def add_output_options(p: argparse.ArgumentParser, json_help: str | None = None) -> None:
    """--json, -v and -q on a command (they are also accepted before it: ``dstab -q nightly ...``)."""
    g = p.add_argument_group("output")
    g.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help=json_help or 'print one JSON object on stdout ({"ok": true, ...} with what was written and its key figures; '
        '{"ok": false, "error": ..., "exit_code": N} on failure); progress and notes stay on stderr',
    )  # fmt: skip
    add_verbosity_options(g, default=argparse.SUPPRESS)


def add_verbosity_options(p: Any, default: Any) -> None:
    p.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                   help="also debug lines on stderr (the plan, the cluster)")  # fmt: skip
    p.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                   help="only warnings and errors on stderr (no progress, no notes)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dstab",
        description="Stabilize recommender embeddings across retrains: every user-item score kept, "
        "coordinates aligned to yesterday's.",
        epilog="Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the array, the row or id, "
        "and the fix; nothing written); 3 a quality gate crossed (nightly --max-score-error / --max-drift: that day "
        "is not published, the days before it stay); 1 an unexpected failure (a traceback). With --json, stdout is "
        'one JSON object, also on failure: {"ok": false, "error": ..., "exit_code": N}.',
    )
    parser.add_argument("--version", action="version", version=f"dstab {__version__}")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (any command; also after it)"
    )
    add_verbosity_options(parser, default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stabilize", help="stabilize a version (optionally onto a reference) and write it")
    p.add_argument("new", metavar="NEW", help="the new version (Zarr group: local path or fsspec URL)")
    p.add_argument("--out", required=True, metavar="OUT", help="where to write the stabilized version")
    p.add_argument("--reference", metavar="REF", help="yesterday's stabilized version to align to")
    p.add_argument("--rank", type=parse_rank, default="auto", metavar="auto|K", help="core rank (default auto)")
    p.add_argument("--rtol", type=float, metavar="X", help="auto rank: keep singular values above X * max")
    add_structure_options(
        p, "default: recorded in NEW or REF, else users:items for those two tables, symmetric for one",
        sides="one transform per side, from the pooled Gram of its tables",
        symmetric="one orthogonal transform (item2vec, graphs, factorization machines)",
    )  # fmt: skip
    p.add_argument(
        "--anchor", default="all", metavar="TABLES",
        help="the tables whose rows fix the rotation onto REF: comma-separated names, or all (the default)",
    )  # fmt: skip
    p.add_argument(
        "--anchor-min-count",
        type=float,
        default=0.0,
        metavar="N",
        help="only rows whose TABLE/counts (an array of the new version) is at least N anchor the rotation, "
        "so that rare and new rows do not drive it",
    )
    p.add_argument(
        "--anchor-weights",
        choices=ANCHOR_WEIGHTS,
        default="uniform",
        help="weight anchor rows equally (default) or by their counts",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="how R is found: gram (float64 Gram, IO-bound), tsqr (Householder, compute-bound), "
        "auto (tsqr for float64 or ill-conditioned tables, else gram; the default)",
    )
    p.add_argument(
        "--neighbours", type=int, default=0, metavar="K",
        help="also measure neighbour overlap@K with the reference before and after, for 1,000 sampled rows "
        "(two more reads of NEW, one of REF; default 0: off)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_scheduler_options(p)
    add_storage_option(p)
    add_output_options(p)
    p.set_defaults(func=cmd_stabilize)

    p = sub.add_parser("report", help="what is known of a version: sizes, spectrum, rank, drift, score error")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--reference", metavar="REF", help="also measure drift against this version")
    p.add_argument(
        "--base",
        metavar="FIRST",
        help="also measure the drift accumulated since FIRST (e.g. the first version of the chain) and list the steps",
    )
    add_output_options(p, json_help="print one JSON object: the report")
    p.add_argument("--plot", metavar="FILE.png", help="also draw spectra, drift per side and per dimension")
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("diagnose", help="dimension collapse: spectra and ranks of each table and of the interaction")
    p.add_argument("path", metavar="PATH", help="a version, or a table (a Zarr group with vectors)")
    add_output_options(
        p,
        json_help='print one JSON object: {"items": ..., "users": ..., "interaction": ...}, each table under its name '
        '(and all under "tables"), "pooled" for a symmetric model, "structure"; {"table": ...} for a loose table',
    )
    add_structure_options(
        p, "default: recorded in PATH, else users:items for those two tables, symmetric for one; otherwise each table is measured alone",
        sides="also measure the interaction of the pooled query tables with the pooled candidate tables",
        symmetric="also measure the pooled rows, each table as a field of them",
    )  # fmt: skip
    p.add_argument("--plot", metavar="FILE.png", help="also draw the spectra")
    p.add_argument(
        "--rtol", type=float, metavar="X", help="numerical rank: singular values above X * max (default for the dtype)"
    )
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "apply", help="map extra rows (a table) into a stabilized version's space with its saved transform"
    )
    p.add_argument("version", metavar="VERSION", help="a version written by dstab stabilize")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--table", metavar="NAME", help="the version's table the rows belong to (its transform maps them); with --rows"
    )
    which.add_argument("--items", metavar="TABLE", help="raw item rows (same as --table items --rows TABLE)")
    which.add_argument("--users", metavar="TABLE", help="raw user rows (same as --table users --rows TABLE)")
    p.add_argument(
        "--rows", metavar="TABLE", help="with --table: the raw rows, a Zarr group with vectors and optional ids"
    )
    p.add_argument("--out", required=True, metavar="TABLE_OUT", help="where to write the mapped table")
    p.add_argument("--overwrite", action="store_true", help="replace TABLE_OUT if it exists")
    add_scheduler_options(p)
    add_storage_option(p)
    add_output_options(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("log", help="the chain of versions a stabilized version was aligned onto, back to the first")
    p.add_argument("version", metavar="VERSION")
    add_output_options(p, json_help='print the chain as a JSON list, newest first ({"ok": false, ...} on failure)')
    add_storage_option(p)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("import", help="write a version from .npy files or Parquet tables (files or directories)")
    p.add_argument(
        "--table", action="append", metavar="NAME=SRC",
        help="a table of the version (repeatable): its vectors, FILE.npy, FILE.parquet or a directory of Parquet files",
    )  # fmt: skip
    p.add_argument(
        "--table-ids",
        action="append",
        metavar="NAME=IDS.npy",
        help=".npy sources: a table's ids (int or str), one per row",
    )
    p.add_argument("--items", metavar="SRC", help="shorthand for --table items=SRC")
    p.add_argument("--users", metavar="SRC", help="shorthand for --table users=SRC")
    p.add_argument("--items-ids", metavar="IDS.npy", help="shorthand for --table-ids items=IDS.npy")
    p.add_argument("--users-ids", metavar="IDS.npy", help="shorthand for --table-ids users=IDS.npy")
    add_structure_options(
        p, "optional: recorded for the next stabilize", sides="recorded in VERSION", symmetric="recorded in VERSION"
    )
    p.add_argument("--id-column", default="id", metavar="NAME", help="Parquet: the id column (default id; '' for none)")
    p.add_argument(
        "--vector-column", metavar="NAME", help="Parquet: the list column of vectors (default: the only list column)"
    )
    p.add_argument(
        "--vector-columns", metavar="COLS", help="Parquet: D scalar columns, as a glob ('v*') or a comma-separated list"
    )
    p.add_argument("--out", required=True, metavar="VERSION")
    p.add_argument("--chunk-rows", type=int, default=131_072, metavar="R", help="rows per Zarr chunk (default 131072)")
    add_storage_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace VERSION if it exists")
    add_scheduler_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a version's tables as Parquet: OUT/NAME/part-*.parquet for every table")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--layout", choices=("list", "columns"), default="list",
        help="vectors as one fixed-size list column 'vector' (default) or scalar columns v0..v{D-1}",
    )  # fmt: skip
    add_storage_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    add_scheduler_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write a synthetic version, or a synthetic retrain of one (--like)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--items", type=int, metavar="N", help="rows of the items table (shorthand for --table items=N)")
    p.add_argument("--users", type=int, metavar="M", help="rows of the users table (shorthand for --table users=M)")
    p.add_argument("--table", action="append", metavar="NAME=ROWS", help="a table of ROWS rows (repeatable)")
    p.add_argument("--dim", type=int, metavar="D")
    p.add_argument(
        "--rank", type=int, metavar="K", help="rank of the scores (default D); symmetric: of the basis all tables share"
    )
    add_structure_options(
        p, "default: users:items for those two, symmetric for one table; --like: recorded in VERSION",
        sides="query and candidate rows from two latent bases",
        symmetric="rows share one latent basis; --like: one random rotation",
    )  # fmt: skip
    p.add_argument(
        "--like", metavar="VERSION",
        help="retrain of VERSION: same scores, a random basis change (invertible two-sided, orthogonal symmetric)",
    )  # fmt: skip
    p.add_argument(
        "--noise", type=float, default=0.0, metavar="X", help="--like: relative noise added before the basis change"
    )
    p.add_argument(
        "--churn", type=float, default=0.0, metavar="X",
        help="--like: share of rows replaced by new ids, rows reordered (default 0: same ids, same order)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--chunk-rows", type=int, default=131_072, metavar="R", help="rows per Zarr chunk")
    p.add_argument(
        "--counts", action="store_true",
        help="also write NAME/counts for every table (synthetic interaction counts, 1 to 1,000; for --anchor-min-count)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_scheduler_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "nightly", help="stabilize SOURCE/raw/<date> into SOURCE/stable/<date> in order, each day onto the day before",
        description="Stabilize every day under SOURCE/raw/ in order, each onto the stabilized day before it, into "
        "SOURCE/stable/<date> (or --stable LOCATION/<date>). Days already stabilized are skipped: run it every night, "
        "and again after a night that died. Exit 3 when a day crosses a quality gate: that day is not published and "
        "the night stops there; the days before it stay published.",
    )  # fmt: skip
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a directory or fsspec URL (s3://bucket/prefix) with one raw version per day in raw/<date>/",
    )
    p.add_argument(
        "--stable", "--out-repo", dest="stable", metavar="LOCATION",
        help="where the stabilized days go, LOCATION/<date> (default SOURCE/stable): a directory, an fsspec URL, "
        "or an Icechunk repository (a URL with a .icechunk component)",
    )  # fmt: skip
    p.add_argument("--rank", type=parse_rank, default="auto", metavar="auto|K", help="core rank (default auto)")
    p.add_argument("--rtol", type=float, metavar="X", help="auto rank: keep singular values above X * max")
    add_structure_options(
        p, "default: recorded in the days, else users:items for those two tables, symmetric for one",
        sides="one transform per side", symmetric="one orthogonal transform",
    )  # fmt: skip
    p.add_argument(
        "--anchor", default="all", metavar="TABLES", help="the tables whose rows fix the rotation (default all)"
    )
    p.add_argument(
        "--anchor-min-count", type=float, default=0.0, metavar="N", help="only rows seen at least N times anchor"
    )
    p.add_argument(
        "--anchor-weights", choices=ANCHOR_WEIGHTS, default="uniform", help="weight anchor rows equally or by counts"
    )
    p.add_argument("--method", choices=METHODS, default="auto", help="how R is found (as for stabilize)")
    g = p.add_argument_group("quality gates (a day that crosses one is not published; the night stops, exit 3)")
    g.add_argument(
        "--max-score-error", type=parse_gate, metavar="X",
        help="the relative score error measured in the write pass must be at most X (e.g. 1e-5)",
    )  # fmt: skip
    g.add_argument(
        "--max-drift", type=parse_gate, metavar="X",
        help="the relative drift after stabilization, against the day before, must be at most X (not gated on the first day)",
    )  # fmt: skip
    add_scheduler_options(p)
    add_storage_option(p)
    add_output_options(p)
    p.set_defaults(func=cmd_nightly)
    return parser


def _configure_logging(verbosity: int) -> Callable[[], None]:
    """The ``dstab`` logger at the level -v / -q ask for, writing to stderr; returns what puts the level back."""
    from .executor import log_to_stderr

    logger = logging.getLogger("dstab")
    before = logger.level
    log_to_stderr()
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)
    return lambda: logger.setLevel(before)


def _failed(args: argparse.Namespace | None, code: int, message: str, extra: dict[str, Any] | None = None) -> int:
    """A failure: its one line on stderr, and with --json one JSON object on stdout."""
    print(f"dstab: error: {message}" if code != 130 else "dstab: interrupted", file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        command = getattr(args, "command", None)
        print(
            _dumps({"ok": False, "command": command, "error": message, "exit_code": code, **(extra or {})}), flush=True
        )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    OneLineParser.last_error = None
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help / --version exit 0
        code = int(exc.code or 0)
        if code and "--json" in argv:  # the one line is on stderr already
            print(
                _dumps(
                    {
                        "ok": False,
                        "command": None,
                        "error": OneLineParser.last_error or "usage error",
                        "exit_code": code,
                    }
                ),
                flush=True,
            )
        return code
    args.json = getattr(args, "json", False)
    restore = _configure_logging(args.verbosity)
    try:
        return _run(args)
    finally:
        restore()


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except DstabError as exc:
        # exit 2 for bad input or usage; a crossed quality gate (dstab.nightly.GateError) says 3, with the night so far
        night = getattr(exc, "night", None)
        return _failed(
            args, int(getattr(exc, "exit_code", 2)), str(exc), night.as_dict() if night is not None else None
        )
    except BrokenPipeError:
        # the reader went away (`dstab log V | head -1`): not an error; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _failed(args, 130, "interrupted")
    except OSError as exc:
        from .store import output_error

        error = output_error(getattr(args, "out", None) or "the output", exc)
        if error is exc:
            return _unexpected(args, exc)
        return _failed(args, 2, str(error))
    except Exception as exc:  # noqa: BLE001 - every failure still gives the one JSON object with --json
        return _unexpected(args, exc)


def _unexpected(args: argparse.Namespace, exc: BaseException) -> int:
    """A bug or an unforeseen failure: the traceback (exit 1); with --json also the one JSON object on stdout."""
    if not args.json:
        raise exc
    traceback.print_exc(file=sys.stderr)
    print(
        _dumps({"ok": False, "command": args.command, "error": f"{type(exc).__name__}: {exc}", "exit_code": 1}),
        flush=True,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
