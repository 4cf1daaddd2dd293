"""Optional parts of dstab and the extra that installs each.

The core (stabilize, apply, report, diagnose on local or fsspec Zarr) needs only
the dependencies in ``pyproject.toml``; plots, the dashboard, Parquet and cloud
stores are extras. :func:`require` imports an optional module or raises one line
naming the extra, so a missing package never surfaces as a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingExtraError

# module -> (extra, what it is for); the extras are declared in pyproject.toml
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("plot", "plots (--plot)"),
    "bokeh": ("dashboard", "the Dask dashboard"),
    "pyarrow": ("parquet", "Parquet import and export"),
    "s3fs": ("cloud", "s3:// URLs"),
    "icechunk": ("cloud", "Icechunk repositories"),
}


def install_hint(module: str) -> str:
    """``pip install 'dstab[EXTRA]'`` for an optional module (or the module itself when it is no extra's)."""
    top = module.split(".")[0]
    if top in EXTRAS:
        return f"pip install 'dstab[{EXTRAS[top][0]}]'"
    return f"pip install {top}"


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"pyarrow.parquet"``) or raise :class:`MissingExtraError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        purpose = EXTRAS.get(top, ("", "this"))[1]
        raise MissingExtraError(f"{purpose} needs {top}, which is not installed: {install_hint(module)}") from exc


def available(module: str) -> bool:
    """Whether an optional module can be imported (without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None
