"""Nightly: stabilize a directory (or fsspec URL) of dated versions in order, each onto the previous stabilized one.

This script is ``dstab nightly`` (see ``dstab nightly --help`` and dstab/nightly.py), kept so that
jobs written against it keep working; every option is the command's:

    python pipelines/nightly.py DIR [--scheduler ADDRESS] [--rank auto|K] [--sides Q:C | --symmetric] [--anchor all]
                                    [--max-score-error X] [--max-drift X] [--json] [-v | -q] ...

Exit codes as the command's: 0, 2 bad input or usage, 3 a quality gate crossed, 1 a bug.
"""

from __future__ import annotations

import sys

from dstab.cli import main as dstab_main


def main(argv: list[str] | None = None) -> int:
    return dstab_main(["nightly", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
