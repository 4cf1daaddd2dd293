"""The ``dstab`` command: stabilize, apply, report, diagnose, log, import, export, synth.

Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the
array, the row or id, and the fix), 1 unexpected failure (with a traceback).
Inputs and the output location are checked before any cluster starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import dask

from .apply import apply_table
from .diagnose import (
    diagnose,
    diagnosis_json,
    diagnosis_structure,
    format_diagnosis,
    open_version_or_table,
)
from .errors import DstabError, UsageError
from .executor import spilled_bytes
from .interchange import (
    Source,
    check_sources,
    export_version,
    import_version,
    named_values,
    open_npy,
    open_parquet,
)
from .lineage import chain, format_chain
from .plots import check_plot_target, plot_diagnosis, plot_report
from .release import __version__
from .report import describe, format_matching, format_report, format_side_drift
from .stabilize import ANCHOR_WEIGHTS, METHODS, check_request, stabilize
from .store import (
    Table,
    Version,
    check_output,
    open_table,
    open_version,
    output_error,
    same_or_nested,
)
from .structure import resolve
from .synth import (
    check_retrain,
    check_synth,
    check_synth_tables,
    synth,
    synth_like,
    synth_tables,
)

LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")


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
    g.add_argument("--dashboard-address", default=":8787", metavar="ADDR", help="local cluster: dashboard (default :8787)")
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
    try:
        size = dask.utils.parse_bytes(value)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be a size such as 2GiB, 512MiB or 4e9 (or auto), got {value!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 2GiB, got {value!r}")
    return value


def _local_cluster_options(args: argparse.Namespace) -> list[str]:
    return [flag for flag, value in (("--workers", args.workers), ("--memory-limit", args.memory_limit)) if value is not None]


def _worker_need(tables: list[Table]) -> tuple[int, str]:
    """Bytes one worker needs to run a task on the largest block of ``tables``, and that block in words."""
    if not tables:
        return WORKER_BASE_BYTES, "no table"
    table = max(tables, key=lambda t: t.block_rows() * t.dim * t.dtype.itemsize)
    block = min(table.block_rows(), table.n_rows) * table.dim * table.dtype.itemsize
    words = f"blocks of {min(table.block_rows(), table.n_rows):,} rows x {table.dim} {table.dtype} ({dask.utils.format_bytes(block)})"
    need = WORKER_BASE_BYTES + BLOCKS_IN_FLIGHT * block
    return -(-need // (64 * 2**20)) * 64 * 2**20, words  # rounded up to 64 MiB: a figure to type


def _check_memory_limit(limit: str, n_workers: int, tables: list[Table]) -> None:
    """Refuse a per-worker memory limit that one block's working set cannot fit in, before any worker starts."""
    import psutil

    per_worker = psutil.virtual_memory().total // n_workers if limit == "auto" else dask.utils.parse_bytes(limit)
    need, words = _worker_need(tables)
    if per_worker >= need:
        return
    given = f"--memory-limit {limit}" if limit != "auto" else f"{n_workers} workers sharing this machine's memory"
    raise UsageError(
        f"{given} leaves {dask.utils.format_bytes(per_worker)} per worker, but a worker needs about "
        f"{need // 2**20} MiB for {words}: pass --memory-limit {need // 2**20}MiB or more "
        f"(or fewer --workers), or make blocks smaller with DASK_DSTAB__BLOCK_BYTES (down to one storage chunk)"
    )


@contextlib.contextmanager
def scheduler_from_args(args: argparse.Namespace, tables: list[Table] | None = None) -> Iterator[None]:
    """Make the scheduler the command asked for active; close what this created.

    Every check that needs no cluster runs first: options that do nothing with
    the chosen scheduler, and a memory limit too small for the blocks of ``tables``.
    """
    from distributed import Client, LocalCluster

    address = args.scheduler or dask.config.get("scheduler-address", None)
    if address and _local_cluster_options(args):
        where = f"--scheduler {address}" if args.scheduler else f"DASK_SCHEDULER_ADDRESS={address}"
        how = "runs in this process" if address in LOCAL_SCHEDULERS else "attaches to a cluster sized where it was started"
        raise UsageError(
            f"{' and '.join(_local_cluster_options(args))} size the local cluster dstab starts, but {where} {how}, "
            "so they would be ignored: drop them"
        )
    if address in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=address):
            yield
        return
    if address:
        kwargs: dict[str, Any]
        if address.endswith(".json") or os.path.isfile(address):
            if not os.path.isfile(address):
                raise UsageError(f"scheduler file {address} does not exist; start `dask scheduler --scheduler-file {address}`")
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
            print(f"dstab: attached to {client.scheduler.address} ({len(client.scheduler_info()['workers'])} workers)", file=sys.stderr)
            yield
        return
    n_workers = args.workers or os.cpu_count() or 1
    memory_limit = args.memory_limit or "auto"
    _check_memory_limit(memory_limit, n_workers, tables or [])
    # One thread per worker process: the kernels are BLAS and (de)compression,
    # which release the GIL but must not oversubscribe the cores.
    try:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=args.dashboard_address,
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
        print(f"dstab: local cluster of {n_workers} worker{'s' if n_workers > 1 else ''}; dashboard at {client.dashboard_link}", file=sys.stderr)
        with _killed_worker_as_error(f"--memory-limit {memory_limit}"):
            yield
        spilled = spilled_bytes(client)
        if spilled:
            print(f"dstab: workers spilled {spilled / 2**20:,.0f} MiB to disk (raise --memory-limit to avoid it)", file=sys.stderr)


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


# ----------------------------------------------------------------------------- commands


def parse_rank(value: str) -> int | str:
    return value if value == "auto" else _positive_int(value, "'auto' or a positive integer")


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stabilize options as :func:`dstab.stabilize` takes them."""
    return dict(
        sides=args.sides, symmetric=args.symmetric, rank=args.rank, rtol=args.rtol, anchor=args.anchor,
        anchor_min_count=args.anchor_min_count, anchor_weights=args.anchor_weights, method=args.method,
        neighbours=args.neighbours,
    )  # fmt: skip


def cmd_stabilize(args: argparse.Namespace) -> int:
    options = _storage_options(args)
    new = open_version(args.new, options)
    reference = open_version(args.reference, options) if args.reference else None
    inputs = [v.url for v in (new, reference) if v is not None and v.url]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, storage_options=options)
    request = check_request(new, reference, **_fit_options(args))
    started = time.perf_counter()
    with scheduler_from_args(args, _tables(new, reference)):
        result = stabilize(new, reference, **_fit_options(args), progress=not args.no_progress)
        result.to_zarr(args.out, overwrite=args.overwrite, storage_options=options, progress=not args.no_progress)
    r = result.report
    shapes = ", ".join(f"{name} {n:,} x {r['dim_out']}" for name, n in r["tables"].items())
    print(f"wrote {args.out}: {shapes}, rank {r['rank']} of {r['dim_in']}, {request.structure}, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    print(f"score error {r['score_error']:.3g} (relative), max abs {r['score_max_abs_error']:.3g} of {r['score_max_abs']:.3g}")
    if r["drift_before"] is not None:
        print(f"drift before {r['drift_before']:.4g}, after {r['drift_after']:.4g} (relative, anchors: {r['anchor']})")
    for line in format_side_drift(r.get("drift") or {}) + format_matching(r.get("matching") or {}):
        print(line)
    for note in r.get("notes") or []:
        print(f"note: {note}")
    return 0


def _tables(*versions: Version | None) -> list[Table]:
    return [table for v in versions if v is not None for table in v.tables.values()]


def _check_plot_path(args: argparse.Namespace) -> None:
    """A --plot file is a .png in an existing directory, outside every input, and not anyone else's file.

    Checked before any work starts; replacing a plot dstab drew earlier is fine.
    """
    if not args.plot:
        return

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
        print(json.dumps(data))
        return
    print(text())
    if args.plot:
        print(f"  plot: {args.plot}")


def cmd_report(args: argparse.Namespace) -> int:
    _check_plot_path(args)
    options = _storage_options(args)
    version = open_version(args.version, options)
    reference = open_version(args.reference, options) if args.reference else None
    base = open_version(args.base, options) if args.base else None
    needs_pass = reference is not None or base is not None or version.attrs.get("kind") != "stabilized"
    with scheduler_from_args(args, _tables(version, reference, base)) if needs_pass else contextlib.nullcontext():
        report = describe(version, reference, base=base, progress=needs_pass and not args.no_progress and not args.json)
    _emit(args, report, lambda: format_report(report), lambda path: plot_report(report, path))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    _check_plot_path(args)
    target = open_version_or_table(args.path, _storage_options(args))
    if args.rtol is not None and not (0.0 <= args.rtol < 1.0):
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol}")

    structure = {"sides": args.sides, "symmetric": args.symmetric}
    diagnosis_structure(target, **structure)  # bad --sides / --symmetric: refused before any cluster starts
    with scheduler_from_args(args, _tables(target) if isinstance(target, Version) else [target]):
        result = diagnose(target, **structure, rtol=args.rtol, progress=not args.no_progress and not args.json)
    _emit(args, diagnosis_json(result), lambda: format_diagnosis(result), lambda path: plot_diagnosis(result, path))
    return 0


def _apply_target(args: argparse.Namespace) -> tuple[str, str]:
    """(the version's table whose transform applies, the raw rows): --table NAME --rows T, or --items T / --users T."""
    given = [flag for flag in ("items", "users", "table") if getattr(args, flag)]
    if len(given) != 1:
        raise UsageError("say which table the rows belong to: --table NAME --rows TABLE (or --items TABLE / --users TABLE)")
    if args.table:
        if not args.rows:
            raise UsageError(f"--table {args.table} names the table; give the raw rows with --rows TABLE")
        return args.table, args.rows
    if args.rows:
        raise UsageError(f"--rows goes with --table NAME; --{given[0]} already gives the rows")
    return given[0], getattr(args, given[0])


def cmd_apply(args: argparse.Namespace) -> int:
    options = _storage_options(args)
    version = open_version(args.version, options)
    side, rows = _apply_target(args)
    table = open_table(rows, options)
    transform = version.saved_transform(side)  # fails early, before any cluster starts
    check_output(args.out, inputs=[u for u in (version.url, table.name) if u], overwrite=args.overwrite, storage_options=options)
    started = time.perf_counter()
    with scheduler_from_args(args, [table]):
        apply_table(version, side, table, args.out, overwrite=args.overwrite, storage_options=options, progress=not args.no_progress)
    print(f"wrote {args.out}: {table.n_rows:,} rows of {side} x {transform.shape[1]} in the space of {args.version}, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    entries = chain(open_version(args.version, _storage_options(args)))
    print(json.dumps(entries) if args.json else format_chain(entries))
    return 0


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options", metavar="JSON",
        help="fsspec options for remote versions (e.g. credentials, endpoint_url); never printed or stored",
    )  # fmt: skip


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.storage_options:
        return None
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def _source(args: argparse.Namespace, name: str, path: str, ids: str | None, options: dict[str, Any] | None) -> Source:
    """Table ``name`` of an import: a .npy file (ids from another .npy) or Parquet (ids from a column)."""
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


def cmd_import(args: argparse.Namespace) -> int:

    options = _storage_options(args)
    # every table option is checked (names, repeats, ids for tables that exist, the structure) before a file is opened
    paths = named_values("--table", args.table, "SRC", {"items": args.items, "users": args.users}, example="words=words.npy")
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
            storage_options=options, progress=not args.no_progress,
        )  # fmt: skip
    print(f"wrote {args.out}: {version!r}" + (f", {structure}" if structure is not None else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    options = _storage_options(args)
    version = open_version(args.version, options)
    check_output(args.out, inputs=[version.url] if version.url else [], overwrite=args.overwrite, storage_options=options)
    with scheduler_from_args(args, _tables(version)):
        written = export_version(
            version, args.out, layout=args.layout, overwrite=args.overwrite, storage_options=options,
            progress=not args.no_progress,
        )  # fmt: skip
    print(f"wrote {', '.join(written)} (Parquet, {args.layout} layout)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:

    progress = not args.no_progress
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
        shorthands = {name: None if getattr(args, name) is None else str(getattr(args, name)) for name in ("items", "users")}
        given = named_values("--table", args.table, "ROWS", shorthands, example="words=100000")
        tables = {}
        for name, text in given.items():
            try:
                tables[name] = int(text)
            except ValueError:
                raise UsageError(f"--table {name}={text}: ROWS must be a whole number of rows, e.g. --table {name}=100000") from None
        if args.dim is None:
            raise UsageError("synth needs --dim D (the width of every table)")
        if args.noise or args.churn:
            raise UsageError("--noise and --churn apply to --like retrains only")
        check_synth_tables(tables, dim=args.dim, rank=args.rank, seed=args.seed, dtype=args.dtype, chunk_rows=args.chunk_rows)
        structure = resolve(tuple(tables), sides=args.sides, symmetric_all=args.symmetric, label="the synthetic version")
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
    print(f"wrote {args.out}: {out!r}" + (f", {out.structure}" if out.structure is not None else ""))
    return 0


def add_structure_options(p: argparse.ArgumentParser, title: str, *, sides: str, symmetric: str) -> None:
    """``--sides Q:C`` or ``--symmetric`` (one of them): which tables score against which (:mod:`dstab.structure`)."""
    how = p.add_argument_group(f"which tables score against which ({title})").add_mutually_exclusive_group()
    how.add_argument("--sides", metavar="Q1[,Q2]:C1[,C2]", help=f"two-sided: the query tables, a colon, the candidate tables; {sides}")
    how.add_argument("--symmetric", action="store_true", help=f"every table is scored against every other; {symmetric}")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where the options are), exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dstab",
        description="Stabilize recommender embeddings across retrains: every user-item score kept, "
        "coordinates aligned to yesterday's.",
    )
    parser.add_argument("--version", action="version", version=f"dstab {__version__}")
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
    p.set_defaults(func=cmd_stabilize)

    p = sub.add_parser("report", help="what is known of a version: sizes, spectrum, rank, drift, score error")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--reference", metavar="REF", help="also measure drift against this version")
    p.add_argument(
        "--base",
        metavar="FIRST",
        help="also measure the drift accumulated since FIRST (e.g. the first version of the chain) and list the steps",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="also draw spectra, drift per side and per dimension")
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("diagnose", help="dimension collapse: spectra and ranks of each table and of the interaction")
    p.add_argument("path", metavar="PATH", help="a version, or a table (a Zarr group with vectors)")
    p.add_argument(
        "--json", action="store_true",
        help='print one JSON object: {"items": ..., "users": ..., "interaction": ...}, each table under its name '
        '(and all under "tables"), "pooled" for a symmetric model, "structure"; {"table": ...} for a loose table',
    )  # fmt: skip
    add_structure_options(
        p, "default: recorded in PATH, else users:items for those two tables, symmetric for one; otherwise each table is measured alone",
        sides="also measure the interaction of the pooled query tables with the pooled candidate tables",
        symmetric="also measure the pooled rows, each table as a field of them",
    )  # fmt: skip
    p.add_argument("--plot", metavar="FILE.png", help="also draw the spectra")
    p.add_argument("--rtol", type=float, metavar="X", help="numerical rank: singular values above X * max (default for the dtype)")
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("apply", help="map extra rows (a table) into a stabilized version's space with its saved transform")
    p.add_argument("version", metavar="VERSION", help="a version written by dstab stabilize")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--table", metavar="NAME", help="the version's table the rows belong to (its transform maps them); with --rows")
    which.add_argument("--items", metavar="TABLE", help="raw item rows (same as --table items --rows TABLE)")
    which.add_argument("--users", metavar="TABLE", help="raw user rows (same as --table users --rows TABLE)")
    p.add_argument("--rows", metavar="TABLE", help="with --table: the raw rows, a Zarr group with vectors and optional ids")
    p.add_argument("--out", required=True, metavar="TABLE_OUT", help="where to write the mapped table")
    p.add_argument("--overwrite", action="store_true", help="replace TABLE_OUT if it exists")
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("log", help="the chain of versions a stabilized version was aligned onto, back to the first")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--json", action="store_true", help="print a JSON list, newest first")
    add_storage_option(p)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("import", help="write a version from .npy files or Parquet tables (files or directories)")
    p.add_argument(
        "--table", action="append", metavar="NAME=SRC",
        help="a table of the version (repeatable): its vectors, FILE.npy, FILE.parquet or a directory of Parquet files",
    )  # fmt: skip
    p.add_argument("--table-ids", action="append", metavar="NAME=IDS.npy", help=".npy sources: a table's ids (int or str), one per row")
    p.add_argument("--items", metavar="SRC", help="shorthand for --table items=SRC")
    p.add_argument("--users", metavar="SRC", help="shorthand for --table users=SRC")
    p.add_argument("--items-ids", metavar="IDS.npy", help="shorthand for --table-ids items=IDS.npy")
    p.add_argument("--users-ids", metavar="IDS.npy", help="shorthand for --table-ids users=IDS.npy")
    add_structure_options(
        p, "optional: recorded for the next stabilize", sides="recorded in VERSION", symmetric="recorded in VERSION"
    )
    p.add_argument("--id-column", default="id", metavar="NAME", help="Parquet: the id column (default id; '' for none)")
    p.add_argument("--vector-column", metavar="NAME", help="Parquet: the list column of vectors (default: the only list column)")
    p.add_argument(
        "--vector-columns", metavar="COLS", help="Parquet: D scalar columns, as a glob ('v*') or a comma-separated list"
    )
    p.add_argument("--out", required=True, metavar="VERSION")
    p.add_argument("--chunk-rows", type=int, default=131_072, metavar="R", help="rows per Zarr chunk (default 131072)")
    add_storage_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace VERSION if it exists")
    add_scheduler_options(p)
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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write a synthetic version, or a synthetic retrain of one (--like)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--items", type=int, metavar="N", help="rows of the items table (shorthand for --table items=N)")
    p.add_argument("--users", type=int, metavar="M", help="rows of the users table (shorthand for --table users=M)")
    p.add_argument("--table", action="append", metavar="NAME=ROWS", help="a table of ROWS rows (repeatable)")
    p.add_argument("--dim", type=int, metavar="D")
    p.add_argument("--rank", type=int, metavar="K", help="rank of the scores (default D); symmetric: of the basis all tables share")
    add_structure_options(
        p, "default: users:items for those two, symmetric for one table; --like: recorded in VERSION",
        sides="query and candidate rows from two latent bases",
        symmetric="rows share one latent basis; --like: one random rotation",
    )  # fmt: skip
    p.add_argument(
        "--like", metavar="VERSION",
        help="retrain of VERSION: same scores, a random basis change (invertible two-sided, orthogonal symmetric)",
    )  # fmt: skip
    p.add_argument("--noise", type=float, default=0.0, metavar="X", help="--like: relative noise added before the basis change")
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
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help / --version exit 0
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except DstabError as exc:
        print(f"dstab: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`dstab log V | head -1`): not an error; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        error = output_error(getattr(args, "out", None) or "the output", exc)
        if error is exc:
            raise
        print(f"dstab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dstab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
