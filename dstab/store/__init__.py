"""The store: the data model (:mod:`.model`), opening and validating (:mod:`.read`), and writing and publishing
(:mod:`.write`, with :mod:`.outputs` deciding what may be replaced and :mod:`.remote` probing object stores).

This package is the I/O edge: the maths never sees a store.
"""

from .model import (
    SIDES,
    RowBlock,
    Side,
    Table,
    Version,
    block_sources,
    check_tables,
    checked_rows,
    default_chunk_rows,
    from_arrays,
    from_tables,
    load,
    row_starts,
)
from .outputs import (
    EXPORT_MARKER,
    Claim,
    check_replaceable,
    inspect_output,
    is_local,
    local_path,
)
from .read import canonical_url, open_group, open_table, open_version, read_attrs
from .write import (
    FORMAT,
    ArrayTarget,
    Staging,
    check_output,
    copy_block,
    move_into_place,
    output_error,
    recover_local,
    same_or_nested,
    staging_name,
    write_block,
)

__all__ = [
    "EXPORT_MARKER",
    "FORMAT",
    "SIDES",
    "ArrayTarget",
    "Claim",
    "RowBlock",
    "Side",
    "Staging",
    "Table",
    "Version",
    "block_sources",
    "canonical_url",
    "check_output",
    "check_replaceable",
    "check_tables",
    "checked_rows",
    "copy_block",
    "default_chunk_rows",
    "from_arrays",
    "from_tables",
    "inspect_output",
    "is_local",
    "load",
    "local_path",
    "move_into_place",
    "open_group",
    "open_table",
    "open_version",
    "output_error",
    "read_attrs",
    "recover_local",
    "row_starts",
    "same_or_nested",
    "staging_name",
    "write_block",
]
