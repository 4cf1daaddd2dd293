"""Versions in Icechunk repositories: publishing is one commit, so readers and concurrent writers see old or new, never none.

A path or URL with a component ending in ``.icechunk`` names a repository; the
rest of the path is the version's group inside it::

    s3://bucket/stable.icechunk/2026-11-02     /data/chain.icechunk/day2     file:///data/chain.icechunk/day2
    /data/chain.icechunk@TAG/day1              (read the state at a branch, tag or snapshot id)

Reading uses the head of branch ``main`` (or ``@REF``). Writing (:class:`RepoStaging`)
opens a writable session on ``main``, forks it (the fork travels to the write
tasks, each write returns the fork it wrote into: a *receipt*), merges the
receipts back, and publishes with one commit, rebased over other writers'
commits. ``--overwrite`` deletes the old group and writes the new one in that
same commit. A run killed before the commit leaves the repository as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import zarr

from ..errors import OutputExistsError, UsageError, VersionNotFoundError
from ..extras import require
from .outputs import Existing, is_local, local_path

SUFFIX = ".icechunk"
BRANCH = "main"
# ``NAME.icechunk`` or ``NAME.icechunk@REF`` as one path component
_REPO_PART = re.compile(r"^(?P<name>.+\.icechunk)(?:@(?P<ref>[^/@]+))?$")
# Seconds a first writer waits for a repository another writer is creating at the same prefix.
CREATE_RACE_SECONDS = 5.0
SCHEMES = "local paths, file:// URLs and s3:// URLs"

_logs_quiet = False


def _icechunk() -> Any:
    """The icechunk module, its Rust logs limited to errors (a warning line would break the one-line errors) unless ICECHUNK_LOG says."""
    global _logs_quiet
    icechunk = require("icechunk")  # the cloud extra: one line naming it when missing

    if not _logs_quiet:
        if not os.environ.get("ICECHUNK_LOG"):
            icechunk.set_logs_filter("error")
        _logs_quiet = True
    return icechunk


def quiet_logs() -> None:
    """Called where a fork lands (a worker process) before it writes: the same quiet logs as the coordinator's."""
    _icechunk()


@dataclass(frozen=True)
class RepoURL:
    """A version's place: the repository (``repo``, a path or URL), an optional ``ref`` and the group inside."""

    url: str
    repo: str
    ref: str | None
    group: str

    @property
    def where(self) -> str:
        """The repository as the user named it (with ``@REF``), for messages."""
        return f"{self.repo}@{self.ref}" if self.ref else self.repo


def parse(url: str) -> RepoURL | None:
    """The repository, ref and group named by ``url``; None when no component ends in ``.icechunk``."""
    url = os.fspath(url)
    head, sep, rest = url.partition("://")
    prefix, path = (head + sep, rest) if sep else ("", url)
    parts = path.split("/")
    for i, part in enumerate(parts):
        m = _REPO_PART.match(part)
        if m is None:
            continue
        repo = prefix + "/".join(parts[:i] + [m.group("name")])
        group = "/".join(p for p in parts[i + 1 :] if p)
        return RepoURL(url=url, repo=repo, ref=m.group("ref"), group=group)
    return None


def is_repo_url(url: str | os.PathLike[str]) -> bool:
    return parse(os.fspath(url)) is not None


def _need(url: str) -> RepoURL:
    r = parse(url)
    if r is None:  # pragma: no cover - callers ask is_repo_url first
        raise UsageError(f"{url} does not name an Icechunk repository (a path component ending in {SUFFIX})")
    if not r.group:
        raise UsageError(
            f"{url} names the Icechunk repository itself; a version is a group inside it: use {r.repo}/VERSION"
        )
    return r


# ----------------------------------------------------------------------------- storage


def _option(options: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` set in the fsspec-style options or their ``client_kwargs``."""
    client = options.get("client_kwargs") or {}
    for name in names:
        for place in (options, client):
            if place.get(name) is not None:
                return place[name]
    return None


def storage(r: RepoURL, storage_options: dict[str, Any] | None) -> Any:
    """The icechunk Storage for ``r``'s repository, from the same storage options dstab takes for fsspec URLs."""
    ic = _icechunk()
    if is_local(r.repo):
        return ic.local_filesystem_storage(str(local_path(r.repo)))
    scheme, _, path = r.repo.partition("://")
    if scheme not in ("s3", "s3a"):
        raise UsageError(
            f"{r.url}: Icechunk repositories are supported on {SCHEMES}, not {scheme}://; "
            f"use an s3:// URL or a local path, or a plain Zarr version (no {SUFFIX}) for other stores"
        )
    bucket, _, prefix = path.partition("/")
    options = storage_options or {}
    endpoint = _option(options, "endpoint_url")
    key, secret = (
        _option(options, "key", "aws_access_key_id"),
        _option(options, "secret", "aws_secret_access_key"),
    )
    anonymous = bool(options.get("anon")) or None
    return ic.s3_storage(
        bucket=bucket,
        prefix=prefix or None,
        # a custom endpoint has no region to discover (icechunk would ask the EC2 metadata service, and log each miss)
        region=_option(options, "region_name", "region")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or ("us-east-1" if endpoint else None),
        endpoint_url=endpoint,
        allow_http=bool(endpoint and str(endpoint).startswith("http://")),
        access_key_id=key,
        secret_access_key=secret,
        session_token=_option(options, "token", "aws_session_token"),
        anonymous=anonymous,
        from_env=None if (key or anonymous) else True,
        force_path_style=bool(endpoint),  # a custom endpoint (MinIO, moto, Ceph) serves buckets by path
    )


def _probe(r: RepoURL, storage_options: dict[str, Any] | None, *, output: bool) -> bool:
    """Whether anything is stored at the repository; one-line errors for an unreachable store or refused credentials."""
    if is_local(r.repo):
        path = local_path(r.repo)
        return path.exists() and (not path.is_dir() or any(path.iterdir()))
    storage(r, storage_options)  # an unsupported scheme is refused before any network call
    from .remote import probe

    return probe(r.repo, storage_options, what="Icechunk repository", output=output)


def _store_error(
    r: RepoURL,
    exc: BaseException,
    storage_options: dict[str, Any] | None,
    *,
    output: bool,
) -> Exception:
    """What the store said, as one line naming the repository (credentials are never in it)."""
    from .remote import storage_error

    if is_local(r.repo):
        head = "cannot write" if output else "cannot open"
        return VersionNotFoundError(f"{head} Icechunk repository {r.repo}: {str(exc).splitlines()[0]}")
    return storage_error(r.repo, exc, storage_options, what="Icechunk repository", output=output)


class _AbsentError(VersionNotFoundError):
    """Nothing is stored where the repository should be."""


class _ForeignError(VersionNotFoundError):
    """Something that is not a repository is stored there."""


# Repositories this process has opened, by place and options: one probe each, not one per open (a command opens
# its reference, checks its output, writes and reopens it: four probes of up to a second each on an object store).
_opened: dict[tuple[str, str], Any] = {}


def _cache_key(r: RepoURL, storage_options: dict[str, Any] | None) -> tuple[str, str]:
    return r.repo, json.dumps(storage_options or {}, sort_keys=True, default=repr)


def open_repository(r: RepoURL, storage_options: dict[str, Any] | None, *, create: bool) -> Any:
    """The repository at ``r`` (created when ``create`` and nothing is there); refuses a place holding something else."""
    key = _cache_key(r, storage_options)
    if key in _opened:
        return _opened[key]
    repo = _open_repository(r, storage_options, create=create)
    _opened[key] = repo
    return repo


def _open_repository(r: RepoURL, storage_options: dict[str, Any] | None, *, create: bool) -> Any:
    ic = _icechunk()
    st = storage(r, storage_options)
    if not create:
        found = _probe(r, storage_options, output=False)
        try:
            exists = bool(found and ic.Repository.exists(st))
            if exists:
                return ic.Repository.open(st)
        except ic.IcechunkError as exc:
            raise _store_error(r, exc, storage_options, output=False) from None
        if found:
            raise _ForeignError(_foreign(r))
        raise _AbsentError(f"no Icechunk repository at {r.repo}: nothing is stored there; check the path or URL")
    # Two first writers may create the repository at once. On local storage they take turns (the commit lock).
    # On object stores the loser finds the winner's half-written prefix (not yet a repository) or fails to
    # create over it: it waits a moment for the repository to appear and opens it; a prefix that stays
    # something else is another's data.
    deadline = time.monotonic() + CREATE_RACE_SECONDS
    with _commit_lock(r):
        while True:
            found = _probe(r, storage_options, output=True)
            failure: BaseException | None = None
            try:
                if found and ic.Repository.exists(st):
                    repo = ic.Repository.open(st)
                    break
                if not found:
                    repo = ic.Repository.create(st)
                    break
            except ic.IcechunkError as exc:
                failure = exc
            if time.monotonic() > deadline:
                if failure is not None:
                    raise _store_error(r, failure, storage_options, output=True) from None
                raise OutputExistsError(_foreign(r))
            time.sleep(0.2)
        _ensure_root(repo)
    return repo


def _foreign(r: RepoURL) -> str:
    return (
        f"{r.repo} holds something that is not an Icechunk repository; dstab never writes into it: "
        "choose another repository path (a new one is created on first write)"
    )


def _ensure_root(repo: Any) -> None:
    """Commit the root group once, on its own: two first writers both creating it would conflict on every version."""
    ic = _icechunk()
    session = repo.writable_session(BRANCH)
    try:
        zarr.open_group(session.store, mode="r")
        return
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, KeyError):
        pass
    zarr.open_group(session.store, mode="w-", zarr_format=3)
    try:
        session.commit("dstab: create repository", rebase_with=ic.ConflictDetector())
    except (ic.ConflictError, ic.RebaseFailedError):
        pass  # another writer created it meanwhile: theirs serves


def readonly_session(r: RepoURL, repo: Any) -> Any:
    """A read-only session at the head of ``main``, or at ``@REF`` (a branch, a tag, or a snapshot id)."""
    ic = _icechunk()
    if r.ref is None:
        return repo.readonly_session(branch=BRANCH)
    try:
        if r.ref in repo.list_branches():
            return repo.readonly_session(branch=r.ref)
        if r.ref in repo.list_tags():
            return repo.readonly_session(tag=r.ref)
        return repo.readonly_session(snapshot_id=r.ref)
    except (ic.IcechunkError, ValueError) as exc:
        raise VersionNotFoundError(
            f"{r.url}: {r.ref} is not a branch, tag or snapshot of {r.repo} ({str(exc).splitlines()[0]}); "
            "run `dstab log` on a version there to see its snapshots"
        ) from None


def _node(root: zarr.Group, group: str) -> Any | None:
    try:
        return root[group]
    except KeyError:
        return None


def open_group(url: str, storage_options: dict[str, Any] | None, *, what: str = "version") -> zarr.Group:
    """The version's group, read-only, at the head of ``main`` (or ``@REF``): committed state only."""
    r = _need(url)
    repo = open_repository(r, storage_options, create=False)
    session = readonly_session(r, repo)
    try:
        root = zarr.open_group(session.store, mode="r")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, KeyError):
        raise VersionNotFoundError(f"no {what} at {url}: the repository {r.where} holds no versions yet") from None
    node = _node(root, r.group)
    if node is None:
        held = sorted(name for name, _ in root.groups())
        listing = f" (it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''})" if held else " (it is empty)"
        raise VersionNotFoundError(
            f"no {what} at {url}: the repository {r.where} has no group {r.group}{listing}; check the name"
        )
    if not isinstance(node, zarr.Group):
        raise VersionNotFoundError(f"{url} is a Zarr array in {r.where}, not a group; a {what} is a group of tables")
    return node


# ----------------------------------------------------------------------------- what is at an output


def _dstab_attrs(node: Any) -> dict[str, Any] | None:
    meta = node.attrs.get("dstab") if isinstance(node, zarr.Group) else None
    return dict(meta) if isinstance(meta, dict) else None


def inspect(root: zarr.Group | None, r: RepoURL) -> Existing:
    """What the repository holds at the version's group (and refuses a version nested in another)."""
    if root is None:
        return Existing("absent")
    parts = r.group.split("/")
    for i in range(1, len(parts)):
        parent = _node(root, "/".join(parts[:i]))
        if parent is None:
            break
        if not isinstance(parent, zarr.Group) or _dstab_attrs(parent) is not None:
            raise UsageError(
                f"output {r.url} lies inside {'/'.join(parts[:i])} in {r.repo} (a dstab version or an array): writing "
                "there would change what it holds; choose a version name outside it"
            )
    node = _node(root, r.group)
    if node is None:
        return Existing("absent")
    attrs = _dstab_attrs(node)
    if attrs is None:
        return Existing("foreign", "a Zarr group or array that dstab did not write")
    return Existing("dstab", "a dstab version")


def _root(session: Any) -> zarr.Group | None:
    try:
        return zarr.open_group(session.store, mode="r")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, KeyError):
        return None


def inspect_output(url: str, storage_options: dict[str, Any] | None = None) -> Existing:
    """What ``url`` holds now (head of ``main``); an absent repository is free."""
    r = _need(url)
    if r.ref is not None:
        raise UsageError(f"{url}: a version is written at the head of branch {BRANCH}; drop @{r.ref} from the output")
    try:
        repo = open_repository(r, storage_options, create=False)
    except _ForeignError as exc:
        raise OutputExistsError(str(exc)) from None
    except _AbsentError:
        return Existing("absent")  # no repository yet: the first write creates it
    return inspect(_root(repo.readonly_session(branch=BRANCH)), r)


# ----------------------------------------------------------------------------- writing: one commit


@contextlib.contextmanager
def _commit_lock(r: RepoURL) -> Iterator[None]:
    """Local repositories only: icechunk's file storage has no atomic conditional writes, so commits take turns (flock)."""
    if not is_local(r.repo):
        yield  # object stores: the branch update is a conditional write, conflicts are detected there
        return
    # the lock lives in the temporary directory, keyed by the repository's real path: never a file of
    # dstab's beside or inside the user's repository
    key = hashlib.sha1(str(local_path(r.repo).resolve()).encode()).hexdigest()[:20]
    lock = Path(tempfile.gettempdir()) / f"dstab-icechunk-{key}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_forks(a: Any, b: Any) -> Any:
    """Two receipts as one: ``b``'s writes merged into ``a`` (the same fork twice, on a threaded scheduler, is one)."""
    if a is None or b is None or a is b:
        return b if a is None else a
    a.merge(b)
    return a


class RepoStaging:
    """A version being written into a repository: a fork of a writable session on ``main``, committed by :meth:`publish`."""

    def __init__(self, url: str, *, overwrite: bool, storage_options: dict[str, Any] | None) -> None:
        from .outputs import check_replaceable

        self.r = _need(url)
        if self.r.ref is not None:
            raise UsageError(
                f"{url}: a version is written at the head of branch {BRANCH}; drop @{self.r.ref} from the output"
            )
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.repo = open_repository(self.r, storage_options, create=True)
        self.session = self.repo.writable_session(BRANCH)
        existing = inspect(_root(self.session), self.r)
        check_replaceable(url, existing, overwrite=overwrite)
        self.replacing = existing.kind == "dstab"
        # the fork carries every write (metadata here, chunks in the tasks); the session only merges and commits
        self.fork = self.session.fork()
        # mode "w" removes the old group: with the new one, in the same commit
        self.group = zarr.open_group(self.fork.store, path=self.r.group, mode="w", zarr_format=3)

    def merge(self, receipt: Any) -> None:
        """Bring the write tasks' forks back (a receipt from :func:`merge_forks`); before anything reads or publishes."""
        if receipt is not None and receipt is not self.fork:
            self.fork.merge(receipt)

    def commit(self, attrs: dict[str, Any]) -> str:
        """Mark complete and commit: one snapshot on ``main``, rebased over other writers' commits."""
        ic = _icechunk()
        self.group.attrs["dstab"] = attrs
        self.session.merge(self.fork)
        metadata = {"dstab_version": self.r.group, "replaced": self.replacing}
        with _commit_lock(self.r):
            try:
                return str(
                    self.session.commit(
                        f"dstab: publish {self.r.group}",
                        metadata=metadata,
                        rebase_with=ic.ConflictDetector(),
                    )
                )
            except (ic.ConflictError, ic.RebaseFailedError):
                pass
            except ic.IcechunkError as exc:  # the store refused the commit: one line, nothing published
                raise _store_error(self.r, exc, self.storage_options, output=True) from None
        if self.overwrite:
            raise OutputExistsError(
                f"{self.r.url} was changed by another run while this run was writing it; this run's output was not "
                "published (the repository holds the other run's): check what is there, and rerun to replace it"
            )
        raise OutputExistsError(
            f"{self.r.url} appeared while this run was writing it (another run published there first); "
            "this run's output was not published: check what is there, and rerun with --overwrite to replace it"
        )

    def discard(self) -> None:
        """Nothing was committed: the writes stay invisible (their chunks are garbage icechunk can collect)."""
        self.session = None


# ----------------------------------------------------------------------------- history (lineage)


def history(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The commits of the version's branch (or ``@REF``) that published its group, newest first: id, time, message."""
    r = _need(url)
    repo = open_repository(r, storage_options, create=False)
    session = readonly_session(r, repo)
    found = []
    for snap in repo.ancestry(snapshot_id=session.snapshot_id):
        meta = snap.metadata or {}
        if meta.get("dstab_version") == r.group:
            found.append(
                {
                    "snapshot": snap.id,
                    "committed": _iso(snap.written_at),
                    "message": snap.message,
                    "replaced": bool(meta.get("replaced")),
                }
            )
    return found


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds")
