"""dstab: stabilize recommender embeddings across retrains, out of core with Dask and Zarr.

Every score the model defines is kept exactly (users against items, several tables per
side, or every table against every other); today's vectors are rotated as close as
possible to yesterday's stabilized ones. See README.md and docs/design.md.

The public names are loaded on first use (PEP 562): ``import dstab`` stays cheap
(no dask.array, zarr, scipy or distributed) so that the CLI's ``--help`` and
scripts that only read ``dstab.__version__`` start quickly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from .release import __version__

# The real imports, for type checkers and IDEs; at run time __getattr__ below loads each on first use.
if TYPE_CHECKING:
    from .apply import apply_table
    from .diagnose import diagnose
    from .errors import (
        DstabError,
        IncompleteVersionError,
        InputError,
        OutputExistsError,
        UsageError,
        VersionNotFoundError,
    )
    from .estimator import Stabilizer
    from .interchange import export_version, import_version, open_npy, open_parquet
    from .lineage import chain
    from .report import measure_drift
    from .stabilize import Stabilization, stabilize
    from .store import (
        Table,
        Version,
        from_arrays,
        from_tables,
        open_table,
        open_version,
    )
    from .structure import Structure

# public name -> the submodule (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "apply_table": ".apply",
    "diagnose": ".diagnose",
    "Stabilizer": ".estimator",
    "DstabError": ".errors",
    "IncompleteVersionError": ".errors",
    "InputError": ".errors",
    "OutputExistsError": ".errors",
    "UsageError": ".errors",
    "VersionNotFoundError": ".errors",
    "export_version": ".interchange",
    "import_version": ".interchange",
    "open_npy": ".interchange",
    "open_parquet": ".interchange",
    "chain": ".lineage",
    "measure_drift": ".report",
    "Stabilization": ".stabilize",
    "stabilize": ".stabilize",
    "Table": ".store",
    "Version": ".store",
    "from_arrays": ".store",
    "from_tables": ".store",
    "open_table": ".store",
    "open_version": ".store",
    "Structure": ".structure",
}

__all__ = [
    "DstabError",
    "IncompleteVersionError",
    "InputError",
    "OutputExistsError",
    "Stabilization",
    "Stabilizer",
    "Structure",
    "Table",
    "UsageError",
    "Version",
    "VersionNotFoundError",
    "__version__",
    "apply_table",
    "chain",
    "diagnose",
    "export_version",
    "from_arrays",
    "from_tables",
    "import_version",
    "measure_drift",
    "open_npy",
    "open_parquet",
    "open_table",
    "open_version",
    "stabilize",
]


def __getattr__(name: str) -> Any:
    """Import the submodule defining a public name on first access, and cache the name here.

    A submodule's own name (``dstab.report``, ``dstab.executor``) imports it, as the eager imports used to
    make every submodule an attribute of the package.
    """
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: a submodule named like the function it defines stays behind that function.

    ``dstab.stabilize`` and ``dstab.diagnose`` are both a submodule and a public function. Importing the
    submodule makes Python set it as an attribute of the package; eager imports used to overwrite it with the
    function straight after, and this keeps that behaviour now the function is loaded lazily.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}" and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
