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

One module per job: :mod:`.parser` (the commands and their options),
:mod:`.commands` (the ``cmd_*`` handlers), :mod:`.cluster` (where a command
runs), :mod:`.output` (text or one JSON object, the log level); here, ``main``
and the mapping of failures to exit codes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from ..errors import DstabError
from . import output
from .parser import OneLineParser, build_parser

# options whose value is a comma-separated list of numbers: argparse takes "-0.5,1.5" for an option, so a
# negative first number would never reach the option's own one-line check
LIST_OPTIONS = ("--reference-weights",)


def _attach_negative_lists(argv: list[str]) -> list[str]:
    """``--reference-weights -0.5,1.5`` as ``--reference-weights=-0.5,1.5``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in LIST_OPTIONS and i + 1 < len(argv) and re.match(r"-[0-9.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


# BLAS thread counts a user may have set; when none is, this process's BLAS runs on one thread (see main)
BLAS_THREAD_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS")


def main(argv: list[str] | None = None) -> int:
    # One BLAS thread for every BLAS library this process loads from here on: threadpoolctl (in _run and around
    # each compute) limits only the libraries loaded already, and scipy's own OpenBLAS loads inside the job, where
    # its threads spun against Dask's (a 5,000 x 1,024 stabilize took 12-15 s on a busy machine, 4.5 s with one
    # thread; found by the new-user trial). Tasks run one per core; worker processes get one thread from Dask anyway.
    if not any(name in os.environ for name in BLAS_THREAD_SETTINGS):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    parser = build_parser()
    argv = _attach_negative_lists(sys.argv[1:] if argv is None else list(argv))
    OneLineParser.last_error = None
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help / --version exit 0
        code = int(exc.code or 0)
        if code and "--json" in argv:  # the one line is on stderr already
            print(
                output.dumps(
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
    restore = output.configure_logging(args.verbosity)
    try:
        return _run(args)
    finally:
        restore()


def _run(args: argparse.Namespace) -> int:
    try:
        from .. import config  # not at the top: --help needs no dask

        config.check_all()  # every knob, before anything is opened or started
        if hasattr(args, "scheduler"):  # also for a command that finds nothing to do and starts no scheduler
            from .cluster import check_scheduler_options

            check_scheduler_options(args)
        from threadpoolctl import threadpool_limits

        # This process's own maths (Grams' square roots, the core SVD, the drift figures) on one BLAS thread:
        # at embedding widths that is well under a second, while OpenBLAS's threads spinning on a busy machine
        # made a 512-wide fit's eigenvalues 15x slower (0.67 vs 0.04 s). Tasks are pinned to one thread anyway.
        with threadpool_limits(limits=1, user_api="blas"):
            return int(args.func(args))
    except DstabError as exc:
        # exit 2 for bad input or usage; a crossed quality gate (dstab.nightly.GateError) says 3, with the night so far
        night = getattr(exc, "night", None)
        return output.failed(
            args, int(getattr(exc, "exit_code", 2)), str(exc), night.as_dict() if night is not None else None
        )
    except BrokenPipeError:
        # the reader went away (`dstab log V | head -1`): not an error; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return output.failed(args, 130, "interrupted")
    except OSError as exc:
        from ..store import output_error

        error = output_error(getattr(args, "out", None) or "the output", exc)
        if error is exc:
            return _unexpected(args, exc)
        return output.failed(args, 2, str(error))
    except Exception as exc:  # noqa: BLE001 - every failure still gives the one JSON object with --json
        return _unexpected(args, exc)


def _unexpected(args: argparse.Namespace, exc: BaseException) -> int:
    """A bug or an unforeseen failure: the traceback (exit 1); with --json also the one JSON object on stdout."""
    if not args.json:
        raise exc
    traceback.print_exc(file=sys.stderr)
    print(
        output.dumps({"ok": False, "command": args.command, "error": f"{type(exc).__name__}: {exc}", "exit_code": 1}),
        flush=True,
    )
    return 1
