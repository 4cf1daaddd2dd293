"""The release of dstab, recorded in every output it writes (kept apart so that any module can read it without importing the package's face)."""

__version__ = "0.1.0"
