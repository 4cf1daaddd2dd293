"""The ``dstab`` argument parser: its commands, their options and the validators of their values.

Start-up: this module imports argparse and the light modules only (no dask,
zarr, scipy or distributed, none of the pipeline modules), so ``dstab --help``
answers at once.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from ..release import __version__
from . import commands
from .cluster import DEFAULT_DASHBOARD

# The choices of --method and --anchor-weights, written here so that building the parser does not import
# dstab.stabilize (and with it dask.array); tests/test_cli_json.py checks they are stabilize's METHODS and ANCHOR_WEIGHTS.
METHODS = ("auto", "gram", "tsqr")
ANCHOR_WEIGHTS = ("uniform", "counts")


def add_scheduler_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="attach to a running dask.distributed scheduler: tcp://host:port, or a scheduler file "
        "(JSON) written by `dask scheduler --scheduler-file`; also 'threads' or 'synchronous' to run "
        "in this process. Default: $DASK_SCHEDULER_ADDRESS if set; else this process's threads for a job "
        "of at most dstab.in-process-bytes (1GiB) of vectors, and a local cluster of worker processes "
        "for a larger one (or when --workers, --memory-limit or --dashboard-address is given)",
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
        "--dashboard-address", default=DEFAULT_DASHBOARD, metavar="ADDR",
        help="local cluster: dashboard (default :8787; needs the dashboard extra, pip install 'dstab[dashboard]')",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_in_memory(value: str) -> Any:
    """``--in-memory auto|yes|no`` as :func:`dstab.stabilize` takes it."""
    choices = {"auto": "auto", "yes": True, "no": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, yes or no, got {value!r}")
    return choices[value]


def add_in_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--in-memory", type=parse_in_memory, default="auto", metavar="auto|yes|no",
        help="keep the new tables' blocks in memory between the two passes, so they are read once: auto (the "
        "default) when they take at most half the memory the workers (or this process) have free without "
        "spilling; yes whenever they fit (refused when they do not); no: read them again",
    )  # fmt: skip


def _positive_int(value: str, wording: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be {wording}, got {value!r}")
    return number


def parse_weights(value: str) -> list[float]:
    """``0.5,0.5``: one number per --reference (each > 0, summing to 1 is checked with the references)."""
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.5,0.5, got {value!r}") from None


def parse_fraction(value: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be between 0 and 1 (exclusive), got {value!r}; 0 and 1 are --policy base and --policy previous"
        )
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
    if not 0 <= number < float("inf"):  # NaN and inf too: no gate is no flag, and JSON has no Infinity
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, e.g. 1e-5, got {value!r}")
    return number


def parse_rank(value: str) -> int | str:
    return value if value == "auto" else _positive_int(value, "'auto' or a positive integer")


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options", metavar="JSON",
        help="fsspec options for remote versions (e.g. credentials, endpoint_url); never printed or stored",
    )  # fmt: skip


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
    p.add_argument(
        "--reference", metavar="REF", action="append",
        help="yesterday's stabilized version to align to; give it more than once (e.g. yesterday's and the chain's "
        "first) to align onto their weighted combination, each matched by id on its own",
    )  # fmt: skip
    p.add_argument(
        "--reference-weights", type=parse_weights, metavar="W1,W2,...",
        help="one weight per --reference, in order, each above 0 and summing to 1 (default: equal)",
    )  # fmt: skip
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
    add_in_memory_option(p)
    add_scheduler_options(p)
    add_storage_option(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_stabilize)

    p = sub.add_parser("report", help="what is known of a version: sizes, spectrum, rank, drift, score error")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--reference", metavar="REF", help="also measure drift against this version")
    p.add_argument(
        "--base",
        metavar="FIRST",
        help="also measure the drift accumulated since FIRST (e.g. the first version of the chain) and list the steps; "
        "with --chain, where the chain starts",
    )
    p.add_argument(
        "--chain", action="store_true",
        help="drift over time: every version of VERSION's lineage (back to its first, or --base) against the base "
        "and the version before it (drift, mean row cosine, eigenspace overlap), and the ids that moved most; "
        "one pass per version",
    )  # fmt: skip
    add_output_options(p, json_help="print one JSON object: the report")
    p.add_argument("--plot", metavar="FILE.png", help="also draw spectra, drift per side and per dimension")
    add_scheduler_options(p)
    add_storage_option(p)
    p.set_defaults(func=commands.cmd_report)

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
    p.set_defaults(func=commands.cmd_diagnose)

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
    p.set_defaults(func=commands.cmd_apply)

    p = sub.add_parser("log", help="the chain of versions a stabilized version was aligned onto, back to the first")
    p.add_argument("version", metavar="VERSION")
    add_output_options(
        p, json_help='print one JSON object, {"ok": true, "command": "log", "chain": [...]}, the chain newest first'
    )
    add_storage_option(p)
    p.set_defaults(func=commands.cmd_log)

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
    p.add_argument(
        "--chunk-rows", type=int, default=None, metavar="R",
        help="rows per Zarr chunk (default 131072, fewer above width 64: at most 32 MiB of float32 a chunk)",
    )  # fmt: skip
    add_storage_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace VERSION if it exists")
    add_scheduler_options(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_import)

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
    p.set_defaults(func=commands.cmd_export)

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
    p.add_argument(
        "--chunk-rows", type=int, default=None, metavar="R",
        help="rows per Zarr chunk (default 131072, fewer above width 64: at most 32 MiB of float32 a chunk)",
    )  # fmt: skip
    p.add_argument(
        "--counts", action="store_true",
        help="also write NAME/counts for every table (synthetic interaction counts, 1 to 1,000; for --anchor-min-count)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_scheduler_options(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_synth)

    p = sub.add_parser(
        "nightly", help="stabilize SOURCE/raw/<date> into SOURCE/stable/<date> in order, each day onto the days before",
        description="Stabilize every day under SOURCE/raw/ in order into SOURCE/stable/<date> (or --stable "
        "LOCATION/<date>), each aligned onto 0.5 x the stabilized day before + 0.5 x the base (the first day), or as "
        "--policy says. Days already stabilized are skipped: run it every night, "
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
    g = p.add_argument_group("what each day is aligned onto (the first day: nothing)")
    g.add_argument(
        "--policy", choices=("previous", "base", "mix"), default="mix",
        help="previous: the stabilized day before (steps small, drift from the base grows); base: the base day "
        "(stays near it, bigger steps); mix (default): W x the day before + (1 - W) x the base, near the best of both",
    )  # fmt: skip
    g.add_argument(
        "--previous-weight", type=parse_fraction, metavar="W",
        help="--policy mix: the weight W of the day before, between 0 and 1 (default 0.5; the base gets 1 - W)",
    )  # fmt: skip
    g.add_argument(
        "--base", metavar="DAY",
        help="the base day of --policy base or mix, a day under SOURCE/raw (default: the first); days up to it "
        "are aligned onto the day before",
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
        help="the relative drift after stabilization, against the first day it is aligned onto (the day before, or the "
        "base with --policy base), must be at most X (not gated on the first day)",
    )  # fmt: skip
    add_in_memory_option(p)
    add_scheduler_options(p)
    add_storage_option(p)
    add_output_options(p)
    p.set_defaults(func=commands.cmd_nightly)
    return parser
