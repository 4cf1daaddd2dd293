"""What a command prints: its text result, or exactly one JSON object on stdout; and the ``dstab`` logger's level."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dstab")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, paths: what json.dumps does not take by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def dumps(data: Any) -> str:
    return json.dumps(data, default=_jsonable)


def finish(args: argparse.Namespace, data: dict[str, Any], lines: Callable[[], list[str]]) -> int:
    """The command's result: ``{"ok": true, "command": ..., **data}`` with --json, else ``lines()`` on stdout."""
    if getattr(args, "json", False):
        print(dumps({"ok": True, "command": args.command, **data}))
    else:
        for line in lines():
            print(line)
    return 0


def notes(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """Notes as ``note:`` lines: on stdout with the text result, on stderr (the log) beside a JSON one."""
    lines = [f"note: {note}" for note in notes]
    if getattr(args, "json", False):
        for line in lines:
            log.info("%s", line)
        return []
    return lines


def progress(args: argparse.Namespace) -> bool:
    """Progress on stderr unless --no-progress or -q."""
    return not args.no_progress and args.verbosity >= 0


def configure_logging(verbosity: int) -> Callable[[], None]:
    """The ``dstab`` logger at the level -v / -q ask for, writing to stderr; returns what puts the level back."""
    from ..executor import log_to_stderr

    logger = logging.getLogger("dstab")
    before = logger.level
    log_to_stderr()
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)
    return lambda: logger.setLevel(before)


def failed(args: argparse.Namespace | None, code: int, message: str, extra: dict[str, Any] | None = None) -> int:
    """A failure: its one line on stderr, and with --json one JSON object on stdout."""
    print(f"dstab: error: {message}" if code != 130 else "dstab: interrupted", file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        command = getattr(args, "command", None)
        print(
            dumps({"ok": False, "command": command, "error": message, "exit_code": code, **(extra or {})}), flush=True
        )
    return code
