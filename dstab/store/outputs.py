"""What is at an output location, and which run may write there.

dstab replaces only its own outputs. Before a command writes OUT it looks at
what is there, from metadata alone:

- nothing, or an empty directory: free;
- a dstab output (a Zarr group whose attributes carry ``dstab``, or a Parquet
  export carrying its ``_dstab.json`` marker): replaced only with ``--overwrite``;
- an object-store output a killed run left incomplete: free (it never opened);
- anything else (a user's directory, a file, a Zarr group dstab did not write):
  never touched, whatever the flags.

On object stores there is no rename, so a run writes OUT in place and must
own it first: it creates a *claim* beside OUT (``PARENT/.NAME.dstab-claim``)
with an exclusive create (S3's ``If-None-Match: *``), keeps it fresh with a
heartbeat while it works, and checks it still owns it before it marks the
output complete. A second run that finds a live claim stops with a one-line
error; a claim whose writer is dead (same host, pid gone) or silent for longer
than the lease (``dask.config`` ``dstab.claim-lease``, seconds) can be taken over.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import config
from ..errors import OutputBusyError, OutputExistsError

Kind = Literal["absent", "empty", "abandoned", "dstab", "foreign"]
EXPORT_MARKER = "_dstab.json"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser().resolve()


@dataclass(frozen=True)
class Existing:
    """What an output location holds: ``kind`` for the decision, ``what`` in words for the message."""

    kind: Kind
    what: str = ""

    @property
    def free(self) -> bool:
        return self.kind in ("absent", "empty", "abandoned")


def _dstab_attrs(raw: bytes | None) -> dict[str, Any] | None:
    """``attributes.dstab`` of a Zarr v3 ``zarr.json``, read as data; None if it is not a dstab group."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes")
    dstab = attrs.get("dstab") if isinstance(attrs, dict) else None
    return dstab if isinstance(dstab, dict) else None


def _listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    more = f", ... ({len(names)} entries)" if len(names) > 3 else ""
    return shown + more


_CHUNK_KEY = re.compile(r"^(?P<array>(?:[^/]+/)*?)c(?:/\d+)+$")
_EXPORT_FILE = re.compile(r"^(?:_dstab\.json|_SUCCESS|(?:[^/]+)/part-\d+\.parquet)$")


def _foreign(files: list[str], export: bool) -> list[str]:
    """Files under a dstab output that dstab does not write there (a user's notes, another tool's output)."""
    if export:
        return [f for f in files if not _EXPORT_FILE.match(f)]
    nodes = {f[: -len("zarr.json")] for f in files if f == "zarr.json" or f.endswith("/zarr.json")}
    foreign = []
    for f in files:
        if f == "zarr.json" or f.endswith("/zarr.json"):
            continue
        chunk = _CHUNK_KEY.match(f)
        if chunk is None or chunk.group("array") not in nodes:
            foreign.append(f)
    return foreign


def _classify(files: list[str], read: Any, remote: bool) -> Existing:
    """Decide from every file's path under OUT (relative, ``/``-separated) and a reader of small files."""
    if not files:
        return Existing("empty")
    names = sorted({f.split("/", 1)[0] for f in files})
    if "zarr.json" in files:
        attrs = _dstab_attrs(read("zarr.json"))
        if attrs is None:
            return Existing("foreign", "a Zarr group or array that dstab did not write")
        kind = (
            Existing("abandoned", "an incomplete dstab version") if remote and attrs.get("complete") is False else None
        )
        what, export = "a dstab version", False
    elif EXPORT_MARKER in files:
        kind, what, export = None, "a dstab Parquet export", True
    else:
        return Existing("foreign", f"a directory that is not a dstab output (it holds {_listing(names)})")
    foreign = _foreign(files, export)
    if foreign:
        return Existing("foreign", f"{what} with files dstab did not write in it ({_listing(foreign)})")
    return kind or Existing("dstab", what)


def _local_files(path: Path) -> list[str]:
    files = []
    for folder, dirs, names in os.walk(path):  # symlinks are listed, never followed
        rel = Path(folder).relative_to(path)
        files += [str((rel / n).as_posix()) for n in names]
        files += [str((rel / d).as_posix()) for d in dirs if (Path(folder) / d).is_symlink()]
    return [f.removeprefix("./") for f in files]


def inspect_output(url: str, storage_options: dict[str, Any] | None = None) -> Existing:
    """Look at what ``url`` holds now (metadata and file names only)."""
    if is_local(url):
        path = local_path(url)
        if not path.exists() and not path.is_symlink():
            return Existing("absent")
        if path.is_symlink() or not path.is_dir():
            return Existing("foreign", "a file, not a directory" if path.is_file() else "not a directory")

        def read(name: str) -> bytes | None:
            try:
                return (path / name).read_bytes()
            except OSError:
                return None

        return _classify(_local_files(path), read, remote=False)
    import fsspec

    from .remote import probe

    if not probe(url, storage_options, output=True):  # one line within seconds if the store cannot answer
        return Existing("absent")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.isfile(root):
        return Existing("foreign", "a file, not a directory")
    try:
        found = fs.find(root, withdirs=False)
    except FileNotFoundError:
        return Existing("absent")
    files = [str(f)[len(root) + 1 :] for f in found if str(f).startswith(root + "/")]

    def read_remote(name: str) -> bytes | None:
        try:
            return bytes(fs.cat_file(f"{root}/{name}"))
        except (FileNotFoundError, OSError):
            return None

    return _classify(files, read_remote, remote=True)


def check_replaceable(out: str, existing: Existing, *, overwrite: bool) -> None:
    """Refuse to write ``out`` unless it is free, or a dstab output and ``overwrite`` is given."""
    if existing.free:
        return
    if existing.kind == "foreign":
        raise OutputExistsError(
            f"{out} is {existing.what}; dstab only ever replaces its own outputs, even with --overwrite: "
            "choose another --out, or move it away yourself"
        )
    if not overwrite:
        raise OutputExistsError(f"{out} already holds {existing.what}; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- claims (object stores)


def host() -> str:
    """This machine's name as dstab records it (staging names, claims): ``-`` becomes ``_`` so names split on ``-``."""
    return platform.node().replace("-", "_") or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_lease() -> float:
    """Seconds a claim stays valid without a heartbeat: dask config ``dstab.claim-lease`` (120 by default)."""
    return config.get("claim-lease")


class Claim:
    """Exclusive ownership of an object-store output while a run writes it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        parent, _, name = root.rstrip("/").rpartition("/")
        self.path = f"{parent}/.{name}.dstab-claim" if parent else f".{name}.dstab-claim"
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {"token": self.token, "host": host(), "pid": os.getpid(), "started": self.started, "heartbeat": time.time()}
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        """The claim as written (None when there is none; ``{}`` when it is not a claim dstab can read)."""
        try:
            data = json.loads(bytes(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == host() and isinstance(holder.get("pid"), int):
            return not pid_alive(holder["pid"])
        beat = holder.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - float(beat) > claim_lease()

    def acquire(self) -> None:
        """Create the claim exclusively (taking over a dead writer's), and start the heartbeat."""
        for attempt in range(5):
            try:
                self.fs.pipe_file(self.path, self._body(), mode="create")
                break
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    time.sleep(0.1 * (attempt + 1))  # released meanwhile: try again
                    continue
                if holder.get("token") == self.token:
                    break  # our own create went through and only its answer was lost (a retried request)
                if not self._stale(holder):
                    raise OutputBusyError(
                        f"{self.url} is being written by another dstab run (host {holder.get('host', '?')}, "
                        f"pid {holder.get('pid', '?')}); wait for it to finish, or choose another --out"
                    ) from None
                # a dead writer's claim: remove it (only if unchanged) and try again
                if self._read() == holder:
                    try:
                        self.fs.rm_file(self.path)
                    except FileNotFoundError:
                        pass
        else:
            # the store kept refusing the create while the claim could not be read back: another run holds OUT
            raise OutputBusyError(
                f"{self.url} is being written by another dstab run (its claim could not be read); wait for it to "
                "finish, or choose another --out"
            )
        self._beat = threading.Thread(target=self._heartbeat, name="dstab-claim-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(claim_lease() / 4):
            holder = self._read()
            if not holder or holder.get("token") != self.token:
                return  # lost: verify() will say so
            try:
                self.fs.pipe_file(self.path, self._body())
            except OSError:
                pass

    def verify(self) -> None:
        """Raise unless this run still owns the output (checked just before it is marked complete)."""
        holder = self._read()
        if not holder or holder.get("token") != self.token:
            raise OutputExistsError(
                f"{self.url} was taken over by another run while this one wrote it; this run's output was not "
                "published: check what is there, and rerun with --overwrite to replace it"
            )

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder = self._read()
        if holder and holder.get("token") == self.token:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
