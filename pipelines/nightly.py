"""Nightly: stabilize a directory of dated versions in order, each onto the previous stabilized one.

    DIR/raw/2026-11-20/      raw versions from training, one per day (any sortable names)
    DIR/raw/2026-11-21/
    DIR/stable/2026-11-20/   written by this script
    DIR/stable/2026-11-21/

The first version is stabilized without a reference (deterministic signs);
each later one is aligned to the stabilized version before it. Versions
already stabilized are skipped, so the script can run every night on the same
directory, and a run that died is simply run again. Progress goes to stderr: a
bar per pass on a terminal, a few plain lines in a log file, none with --no-progress.

    python pipelines/nightly.py DIR [--scheduler ADDRESS] [--rank auto|K] [--sides Q:C | --symmetric] [--anchor all]
                                    [--anchor-min-count N] [--anchor-weights uniform|counts]

Catalogues may churn from day to day (ids added, removed, reordered): rows are
matched by id. `dstab log DIR/stable/LAST` shows the chain and
`dstab report DIR/stable/LAST --base DIR/stable/FIRST` the drift accumulated over it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import dstab
from dstab.cli import (
    OneLineParser,
    add_scheduler_options,
    add_structure_options,
    parse_rank,
    scheduler_from_args,
)
from dstab.errors import DstabError, OutputExistsError, VersionNotFoundError
from dstab.report import format_matching
from dstab.stabilize import ANCHOR_WEIGHTS
from dstab.structure import parse_sides


def pending(directory: Path) -> list[tuple[Path, Path]]:
    """(raw, stable) pairs in date order."""
    raw = directory / "raw"
    if not raw.is_dir():
        raise VersionNotFoundError(f"{raw} does not exist; put one raw version per day under DIR/raw/")
    names = sorted(p.name for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(raw / name, directory / "stable" / name) for name in names]


def run(
    directory: Path,
    *,
    rank: int | str = "auto",
    sides: str | None = None,
    symmetric: bool = False,
    anchor: str = "all",
    anchor_min_count: float = 0.0,
    anchor_weights: str = "uniform",
    progress: bool = False,
) -> list[dict]:
    reference = None
    done = []
    for raw_path, stable_path in pending(directory):
        if stable_path.exists():
            reference = dstab.open_version(stable_path)  # complete by construction, or this raises
            print(f"{raw_path.name}: already stabilized, skipped", file=sys.stderr)
            continue
        if progress:
            onto = f"onto {reference.url}" if reference is not None and reference.url else "first: no reference"
            print(f"{raw_path.name}: stabilizing ({onto})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        # the anchor options choose rows that fit the rotation onto a reference: the first day has none
        anchoring = {"anchor": anchor, "anchor_min_count": anchor_min_count, "anchor_weights": anchor_weights}
        result = dstab.stabilize(
            # the structure: as asked, else recorded in the raw version or in yesterday's stable one, else the default
            dstab.open_version(raw_path), reference, sides=sides, symmetric=symmetric, rank=rank, progress=progress,  # type: ignore[arg-type]
            **(anchoring if reference is not None else {}),  # type: ignore[arg-type]
        )  # fmt: skip
        try:
            reference = result.to_zarr(stable_path, progress=progress)
        except OutputExistsError:
            # two nights at once (a cron overlap): the other run published this day first, and it is the same day
            reference = dstab.open_version(stable_path)
            print(f"{raw_path.name}: stabilized by another run meanwhile, kept as it is", file=sys.stderr)
            continue
        report = {"name": raw_path.name, "seconds": time.perf_counter() - started, **result.report}
        done.append(report)
        drift = "" if report["drift_after"] is None else f", drift {report['drift_before']:.4g} -> {report['drift_after']:.4g}"
        print(f"{raw_path.name}: rank {report['rank']}, score error {report['score_error']:.2e}{drift}, {report['seconds']:.1f} s")
        for line in format_matching(report.get("matching") or {}):
            print(f"  {line}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--rank", type=parse_rank, default="auto")
    add_structure_options(
        parser, "default: recorded in the versions, else users:items for those two tables, symmetric for one",
        sides="one transform per side", symmetric="one orthogonal transform",
    )  # fmt: skip
    parser.add_argument("--anchor", default="all", metavar="TABLES", help="tables that fix the rotation (default all)")
    parser.add_argument("--anchor-min-count", type=float, default=0.0, metavar="N")
    parser.add_argument("--anchor-weights", choices=ANCHOR_WEIGHTS, default="uniform")
    add_scheduler_options(parser)
    args = parser.parse_args(argv)
    try:
        todo = [p for p in pending(args.directory) if not p[1].exists()]
        if args.sides:
            parse_sides(args.sides)  # a malformed --sides is refused before any cluster starts
        with scheduler_from_args(args) if todo else contextlib.nullcontext():
            run(
                args.directory, rank=args.rank, sides=args.sides, symmetric=args.symmetric, anchor=args.anchor, anchor_min_count=args.anchor_min_count,
                anchor_weights=args.anchor_weights, progress=not args.no_progress,
            )  # fmt: skip
    except DstabError as exc:
        print(f"nightly: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
