"""dstab's tuning knobs, kept in ``dask.config`` under ``dstab.*``.

Each knob is set like any Dask setting: ``dask.config.set({"dstab.sample-rows": 512})``
in code, the environment variable ``DASK_DSTAB__SAMPLE_ROWS=512``, or a YAML file in
``~/.config/dask/`` (``dstab: {sample-rows: 512}``). :data:`DEFAULTS` holds the
defaults; docs/design.md ("Configuration") says what each knob does.

Workers do not see a ``dask.config.set`` made in the client (a distributed worker
is another process), so every knob is read with :func:`get` on the client while
the graph is built, and what a kernel needs travels into it as an argument.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import dask.config
import dask.utils

from .errors import UsageError

IntKey = Literal[
    "sample-rows",
    "id-bucket-rows",
    "pair-rows",
    "join-rows",
    "query-rows",
    "neighbours-k",
    "neighbour-slice-rows",
    "probe-rows",
    "check-rows",
    "moved-rows",
]
BytesKey = Literal["block-bytes", "id-sample-bytes", "slice-bytes", "in-process-bytes"]
SecondsKey = Literal["settle-seconds", "claim-lease", "probe-timeout"]
Key = IntKey | BytesKey | SecondsKey

# The defaults, as dask.config holds them under "dstab" (documented in docs/design.md, "Configuration").
DEFAULTS: dict[str, Any] = {
    "block-bytes": "64MiB",
    "sample-rows": 256,
    "id-sample-bytes": "32MiB",
    "slice-bytes": "1MiB",
    "in-process-bytes": "1GiB",
    "id-bucket-rows": 4_194_304,
    "pair-rows": 1024,
    "join-rows": 65_536,
    "query-rows": 1000,
    "neighbours-k": 10,
    "neighbour-slice-rows": 8192,
    "probe-rows": 64,
    "check-rows": 4096,
    "moved-rows": 10,
    "settle-seconds": 120,
    "claim-lease": 120,
    "probe-timeout": 25,
}

_BYTES: frozenset[str] = frozenset(BytesKey.__args__)  # type: ignore[attr-defined]
_SECONDS: frozenset[str] = frozenset(SecondsKey.__args__)  # type: ignore[attr-defined]

# a value already there (from DASK_DSTAB__* or a user's YAML file) wins over these defaults
dask.config.update_defaults({"dstab": DEFAULTS})


def env_var(key: str) -> str:
    """The environment variable that sets ``dstab.KEY``: ``DASK_DSTAB__SAMPLE_ROWS`` for ``sample-rows``."""
    return "DASK_DSTAB__" + key.upper().replace("-", "_")


def _refuse(key: str, value: object, what: str) -> UsageError:
    return UsageError(f"dask config dstab.{key} (env {env_var(key)}) must be {what}, got {value!r}")


@overload
def get(key: IntKey | BytesKey) -> int: ...
@overload
def get(key: SecondsKey) -> float: ...
def get(key: Key) -> int | float:
    """The knob ``dstab.KEY`` from ``dask.config``, checked: sizes in bytes and row counts as positive ints, times as
    positive seconds. A bad value raises a one-line :class:`UsageError` naming the key, the value and its env var.

    Read it on the client, when the graph is built (see the module's docstring).
    """
    if key not in DEFAULTS:
        raise KeyError(f"no dstab knob {key!r}; the knobs are {', '.join(sorted(DEFAULTS))}")
    value = dask.config.get(f"dstab.{key}", None)
    if value is None:  # set to null in a YAML file: the default
        value = DEFAULTS[key]
    if key in _SECONDS:
        return _seconds(key, value)
    if key in _BYTES:
        return _positive_int(key, value, "a size such as 64MiB", bytes_ok=True)
    return _positive_int(key, value, "a whole number above 0", bytes_ok=False)


def _positive_int(key: str, value: object, what: str, *, bytes_ok: bool) -> int:
    number: object = value
    try:
        if isinstance(value, str):
            number = dask.utils.parse_bytes(value) if bytes_ok else int(value.replace("_", ""))
    except (ValueError, TypeError):
        raise _refuse(key, value, what) from None
    # bool is an int to Python, but True rows is a mistake; floats only when whole (2**20 read from YAML as 1048576.0)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number) or number < 1:
        raise _refuse(key, value, what)
    return int(number)


def _seconds(key: str, value: object) -> float:
    try:
        seconds = dask.utils.parse_timedelta(value, default="seconds")  # type: ignore[call-overload]
    except (ValueError, TypeError, KeyError):
        raise _refuse(key, value, "a time above 0 such as 120 or 2 minutes") from None
    if isinstance(value, bool) or seconds is None or not seconds > 0 or seconds == float("inf"):
        raise _refuse(key, value, "a time above 0 such as 120 or 2 minutes")
    return float(seconds)


def check_all() -> None:
    """Every dstab knob set now, checked at once (the CLI calls it before it opens anything): a bad value, or a
    key that is no knob (a misspelt ``DASK_DSTAB__...``, which would otherwise be ignored), is one line."""
    settings = dask.config.get("dstab", None) or {}
    if not isinstance(settings, dict):
        raise UsageError(f"dask config dstab must be a mapping of knobs, got {settings!r}; see docs/design.md")
    unknown = sorted(str(key) for key in settings if str(key).replace("_", "-") not in DEFAULTS)
    if unknown:
        raise UsageError(
            f"dask config dstab.{unknown[0]} (env {env_var(unknown[0])}) is no dstab knob; the knobs are "
            f"{', '.join(sorted(DEFAULTS))} (docs/design.md, Configuration)"
        )
    for key in DEFAULTS:
        get(key)  # type: ignore[call-overload]  # every key of DEFAULTS is a Key
