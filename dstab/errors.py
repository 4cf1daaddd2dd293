"""The errors dstab raises on purpose.

Every class also inherits the builtin a caller would catch without knowing dstab
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``), in the manner of
zarr-python. The CLI maps every :class:`DstabError` to exit code 2 and prints
its message as one line; anything else is an unexpected failure (exit 1).
"""

from __future__ import annotations


class DstabError(Exception):
    """Base class: a problem with the user's input or request, not a bug."""


class InputError(DstabError, ValueError):
    """An input version or table is malformed: the message names the array, the row or id, and the fix."""


class VersionNotFoundError(DstabError, FileNotFoundError):
    """Nothing that looks like a version exists at the given location."""


class IncompleteVersionError(InputError):
    """A version exists but was never marked complete (a run died while writing it)."""


class OutputExistsError(DstabError, FileExistsError):
    """The output location already holds something and ``overwrite`` was not given."""


class OutputBusyError(OutputExistsError):
    """Another run is writing the output location now."""


class OutputWriteError(DstabError, OSError):
    """The machine refused a write to the output (disk full, read-only, no permission)."""


class UsageError(DstabError, ValueError):
    """A parameter is out of range or two parameters contradict each other."""


class StorageError(DstabError, OSError):
    """An object store cannot be reached or refuses the request: the message names the URL, the cause and the fix."""


class MissingExtraError(UsageError, ImportError):
    """An optional part of dstab was asked for and its packages are not installed: the message names the extra."""
