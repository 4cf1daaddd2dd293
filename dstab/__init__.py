"""dstab: stabilize recommender embeddings across retrains, out of core with Dask and Zarr.

Every score the model defines is kept exactly (users against items, several tables per
side, or every table against every other); today's vectors are rotated as close as
possible to yesterday's stabilized ones. See README.md and docs/design.md.
"""

from __future__ import annotations

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
from .interchange import export_version, import_version, open_npy, open_parquet
from .lineage import chain
from .release import __version__
from .report import measure_drift
from .stabilize import Stabilization, stabilize
from .store import Table, Version, from_arrays, from_tables, open_table, open_version
from .structure import Structure

__all__ = [
    "DstabError",
    "IncompleteVersionError",
    "InputError",
    "OutputExistsError",
    "Stabilization",
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
