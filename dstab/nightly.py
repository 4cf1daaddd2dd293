"""Nightly: stabilize a location of dated versions in order, each onto the stabilized days before it.

    SOURCE/raw/2026-11-20/      raw versions from training, one per day, named by date (YYYY-MM-DD[suffix])
    SOURCE/raw/2026-11-21/
    SOURCE/stable/2026-11-20/   written by the nightly (or STABLE/<date> with --stable / --out-repo)
    SOURCE/stable/2026-11-21/

SOURCE is a local directory or an fsspec URL (``s3://bucket/prefix``). The
first day is stabilized without a reference (deterministic signs); each later
one is aligned by the chain's :class:`Policy`: onto the stabilized day before
it (``previous``), onto the base (``base``: the first day, or ``--base DAY``),
or onto ``w`` x the day before + ``(1 - w)`` x the base (``mix``, the
default, ``w`` = 0.5: on real retrains it keeps both the cosine to the base
and the cosine to the day before within 0.01 of the better pure policy,
benchmarks/chain.py). Days whose stabilized
version opens as complete are skipped, so the same command runs every night,
and a night that died is simply run again.

The plan (:func:`day_names`, :func:`plan`, :func:`Gates.crossed`) is pure;
:func:`list_raw_days` and :func:`find_done` look at the stores, and
:func:`run` stabilizes the days not done, each written through
:meth:`Stabilization.to_zarr`, so any location ``open_version`` and the
staging writer accept (an Icechunk repository's version group included) is
a stable location. Quality gates run inside ``to_zarr`` after the write pass
and before publishing: a day that crosses one is not published, the night
stops there (:class:`GateError`), and the days before it stay published.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

from .errors import (
    DstabError,
    IncompleteVersionError,
    InputError,
    OutputExistsError,
    UsageError,
    VersionNotFoundError,
)
from .store import Version, canonical_url, is_local, local_path, open_version, same_or_nested
from .store.icechunk_repo import is_repo_url

log = logging.getLogger("dstab.nightly")

# the exit code of a night stopped by a quality gate (bad input is 2, a bug 1)
GATE_EXIT = 3


class GateError(DstabError):
    """A stabilized day crossed a quality gate: it was not published and the night stopped there."""

    exit_code = GATE_EXIT

    def __init__(self, message: str, night: Night | None = None) -> None:
        super().__init__(message)
        self.night = night


# ----------------------------------------------------------------------------- the plan (pure)


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL (no normalisation of the URL beyond one slash)."""
    return os.path.join(root, name) if is_local(root) else f"{root.rstrip('/')}/{name}"


# A day is named by its date, ISO 8601 (zero-padded, so that names sort as the days do), with an optional
# suffix after T, _, - or . (2026-11-20T06, 2026-11-20_eu, 2026-11-20.zarr). Any other name would put the
# chain in a wrong order.
DAY_NAME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})(?:[T_.-].*)?$")


def _dated(name: str) -> bool:
    match = DAY_NAME.match(name)
    if match is None:
        return False
    try:
        date.fromisoformat(match["date"])  # 2026-13-45 is no day
    except ValueError:
        return False
    return True


def day_names(entries: Iterable[tuple[str, bool]], where: str = "SOURCE/raw") -> list[str]:
    """The days, in date order, from (name, is a directory) entries of ``SOURCE/raw``: hidden names and files are
    not days; a directory not named by a date is refused (one line naming it), never ordered by guess."""
    names = sorted(name for name, is_dir in entries if is_dir and name and not name.startswith("."))
    odd = [name for name in names if not _dated(name)]
    if odd:
        raise InputError(
            f"{join(where, odd[0])} is not named by a date: the nightly orders days by their names, which must be "
            f"YYYY-MM-DD, a real date, zero-padded (2026-11-09), optionally followed by T, _, - or . and more; rename it or "
            f"move it out of {where}" + (f" ({len(odd)} such names)" if len(odd) > 1 else "")
        )
    return names


PolicyKind = Literal["previous", "base", "mix"]
POLICIES: tuple[PolicyKind, ...] = ("previous", "base", "mix")

# The mix policy's default weight on the day before (the base gets the rest).
# Measured on 15 real retrains of implicit ALS on MovieLens 100k (benchmarks/chain.py,
# five chains at 64 factors and five at 32): 0.5 kept both the cosine to the base
# after 14 steps and the mean cosine to the day before within 0.015 of the better
# pure policy in every chain; 0.7 missed by up to 0.03, 0.3 gave up more of the
# step cosine for little more of the base cosine.
DEFAULT_PREVIOUS_WEIGHT = 0.5


@dataclass(frozen=True)
class Policy:
    """What each day is aligned onto: the day before, the base, or their weighted mix."""

    kind: PolicyKind = "mix"
    previous_weight: float = DEFAULT_PREVIOUS_WEIGHT  # mix only: the weight of the day before
    base: str | None = None  # the base day's name (None: the first day)

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise UsageError(f"--policy must be one of {', '.join(POLICIES)}; got {self.kind!r}")
        if not (0.0 < self.previous_weight < 1.0):
            raise UsageError(
                f"--previous-weight must be between 0 and 1 (exclusive), got {self.previous_weight:g}; "
                "0 and 1 are --policy base and --policy previous"
            )

    def references(self, previous: str | None, base: str | None) -> list[tuple[str, float]]:
        """The days (names) a day is aligned onto, with weights, given the day before it and its base."""
        if previous is None:
            return []
        if base is None or base == previous or self.kind == "previous":
            return [(previous, 1.0)]
        if self.kind == "base":
            return [(base, 1.0)]
        return [(previous, self.previous_weight), (base, 1.0 - self.previous_weight)]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.kind, "base": self.base}
        if self.kind == "mix":
            out["previous_weight"] = self.previous_weight
        return out


@dataclass(frozen=True)
class Day:
    name: str
    raw: str  # where the raw version is
    stable: str  # where its stabilized version goes
    done: bool  # its stabilized version is there, complete
    reference: str | None  # the day before it (None: the first day)
    base: str | None = None  # its chain's base day (itself for the base day; None before the base)
    references: tuple[tuple[str, float], ...] = ()  # the days it is aligned onto, with weights


def plan(
    source: str,
    names: list[str],
    done: Iterable[str],
    stable: str | None = None,
    policy: Policy = Policy(),
    *,
    base_kept: bool = False,
) -> list[Day]:
    """Every day in order, whether it is done, the day before it, its base and the days it is aligned onto.

    ``base_kept``: ``policy.base`` is a day whose raw version is gone (pruned) but whose stabilized version
    the chain recorded as its base: every day is aligned with it.
    """
    finished = set(done)
    root = stable if stable is not None else join(source, "stable")
    base = policy.base if policy.base is not None else (names[0] if names else None)
    if base is not None and base not in names and not base_kept:
        raise UsageError(
            f"--base {base} is not a day under {join(source, 'raw')}; give one of its days ({names[0]} to {names[-1]})"
            if names
            else f"--base {base}: there are no days under {join(source, 'raw')}"
        )
    days, before, reached = [], None, base_kept and base not in names
    for name in names:
        refs = tuple(policy.references(before, base if reached else None))
        day_base = base if reached or name == base else None  # the base day records itself as the chain's base
        days.append(
            Day(name, join(join(source, "raw"), name), join(root, name), name in finished, before, day_base, refs)
        )
        reached = reached or name == base
        before = name
    return days


@dataclass(frozen=True)
class Gates:
    """Quality gates a day must pass to be published (None: no gate)."""

    max_score_error: float | None = None
    max_drift: float | None = None

    def crossed(self, report: dict[str, Any]) -> tuple[str, str, float, float] | None:
        """(measure, flag, value, gate) of the first gate ``report`` crosses, or None.

        A value that is not a number (NaN) crosses its gate; drift is not
        gated on the first day, which has no reference to drift from.
        """
        for measure, flag, key, gate in (
            ("score error", "--max-score-error", "score_error", self.max_score_error),
            ("drift after", "--max-drift", "drift_after", self.max_drift),
        ):
            value = report.get(key)
            if gate is None or value is None:
                continue
            if not float(value) <= gate:  # NaN crosses too
                return measure, flag, float(value), gate
        return None

    def as_dict(self) -> dict[str, float | None]:
        return {"max_score_error": self.max_score_error, "max_drift": self.max_drift}


# ----------------------------------------------------------------------------- what the stores hold


def list_raw_days(source: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The day names under ``SOURCE/raw``, sorted; one line naming the location when there is none."""
    raw = join(source, "raw")
    missing = f"{raw} does not exist; put one raw version per day under SOURCE/raw/ (SOURCE/raw/2026-11-01/, ...)"
    if is_local(raw):
        path = local_path(raw)
        if not path.is_dir():
            raise VersionNotFoundError(missing)
        return day_names(((p.name, p.is_dir()) for p in path.iterdir()), raw)
    from .store.remote import probe, storage_error

    if not probe(raw, storage_options, what="directory of raw days"):
        raise VersionNotFoundError(missing)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(raw, **(storage_options or {}))
        entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
    except Exception as exc:  # noqa: BLE001 - a store failure is one line naming the URL
        raise storage_error(raw, exc, storage_options, what="directory of raw days") from None
    return day_names(
        ((str(e["name"]).rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory") for e in entries), raw
    )


def check_stable_location(source: str, stable: str) -> None:
    """The stable versions go where no raw day is: refused before anything is opened when they would not."""
    raw = join(source, "raw")
    if is_local(stable) and not is_repo_url(stable) and local_path(stable).exists() and not local_path(stable).is_dir():
        raise UsageError(
            f"{stable}, where the stable versions go (--stable; SOURCE/stable by default), is a file: "
            "move it, or give --stable a directory (created if missing) or a URL"
        )
    if is_local(stable) and not is_repo_url(stable):
        path = local_path(stable)
        for place in (path, *path.parents):
            if (place / "zarr.json").is_file():
                raise UsageError(
                    f"--stable {stable} is or lies inside the Zarr group {place} (a version or a table): the "
                    "stabilized days would become part of it; give a directory outside every version"
                )
    if same_or_nested(canonical_url(stable), canonical_url(raw)):
        raise UsageError(
            f"--stable {stable} is {raw} or inside it, where the raw days are: the nightly never writes among its "
            "inputs; give another location (the default is SOURCE/stable)"
        )


def find_done(days: list[Day], storage_options: dict[str, Any] | None = None) -> dict[str, Version]:
    """The days whose stabilized version opens as complete, opened (a killed run's incomplete one is not done)."""
    done = {}
    for day in days:
        local_dir = is_local(day.stable) and not is_repo_url(day.stable)  # a version in a repository is no directory
        if local_dir and not local_path(day.stable).exists() and not _staged_aside(day.stable):
            continue  # the common case, without opening anything
        try:
            version = open_version(day.stable, storage_options)
        except (VersionNotFoundError, IncompleteVersionError):
            continue  # not there, or a run died writing it: the writer replaces it (or refuses what is not its own)
        check_is_day(version, day)
        done[day.name] = version
    return done


def check_is_day(version: Version, day: Day) -> None:
    """A version at STABLE/<day> counts as that day done only if it is the stabilized raw day, never by its place."""
    made_from = version.attrs.get("input")
    if version.attrs.get("kind") == "stabilized" and made_from and _same_day(made_from, day):
        return
    what = f"a {version.attrs.get('kind') or 'raw'} version" + (f" made from {made_from}" if made_from else "")
    raise InputError(
        f"{day.stable} holds {what}, not the stabilized {day.raw}: the nightly neither counts it as done nor "
        "replaces it; move it away or give another --stable"
    )


def _same_day(made_from: str, day: Day) -> bool:
    """The recorded input is this raw day: the same place, or ``.../raw/<day>`` of a SOURCE since moved or copied
    (lineage records absolute paths; a renamed directory, a restored backup or another mount must not make
    every day look foreign)."""
    if canonical_url(made_from) == canonical_url(day.raw):
        return True
    return made_from.rstrip("/").split("/")[-2:] == ["raw", day.name]


def late_days(days: list[Day], done: Iterable[str]) -> list[Day]:
    """Days to do that come before a day already done: they arrived late, and the chain branches at them."""
    finished = set(done)
    last_done = max((i for i, day in enumerate(days) if day.name in finished), default=0)
    return [day for day in days[:last_done] if day.name not in finished]


def recorded_base(
    days: list[Day], done: dict[str, Version], storage_options: dict[str, Any] | None = None
) -> tuple[str, Version] | None:
    """The base the chain recorded: (its day name, its stabilized version), from the last day done before the
    first day to do. The chain keeps its base whatever raw days are pruned; None when none is recorded or it
    cannot be opened (then the default applies, and :func:`chain_changes` says so)."""
    todo = [d for d in days if d.name not in done]
    last = todo[0].reference if todo else None
    if last is None or last not in done:
        return None
    url = (done[last].attrs.get("chain") or {}).get("base")
    if not url:
        return None
    try:
        version = open_version(url, storage_options)
    except DstabError:
        return None
    return url.rstrip("/").rsplit("/", 1)[-1], version


def chain_changes(days: list[Day], done: dict[str, Version], policy: Policy, known: dict[str, Version]) -> list[str]:
    """Notes when the first day to do is aligned otherwise than the day before it recorded: another policy,
    another base (``--base``), or the same base replaced (overwritten) since. Said before any work."""
    todo = [d for d in days if d.name not in done]
    if not todo or todo[0].reference not in done:
        return []
    first, before = todo[0], done[todo[0].reference]
    chain = before.attrs.get("chain") or {}
    notes = []
    if chain.get("policy") and chain.get("policy") != policy.kind:
        notes.append(
            f"{first.name} is aligned by --policy {policy.kind}, but {first.reference} was aligned by "
            f"--policy {chain['policy']}: the chain changes policy here (give --policy {chain['policy']} to keep it)"
        )
    recorded, base = chain.get("base"), first.base
    if not recorded or base is None:
        return notes
    now = next((d.stable for d in days if d.name == base), None)
    if now is not None and canonical_url(now) != recorded:
        notes.append(
            f"{first.name} gets the base {base}, but {first.reference} was aligned with the base {recorded}: "
            f"the chain's base is {base} from here on"
        )
        return notes
    version = {**known, **done}.get(base)
    recorded_id = chain.get("base_version_id")
    if version is not None and recorded_id and version.attrs.get("version_id") != recorded_id:
        notes.append(
            f"the base {recorded} was replaced after {first.reference} was aligned with it: {first.name} and later "
            "days are aligned with what is there now (restore the old base to keep the chain's)"
        )
    return notes


def _staged_aside(url: str) -> bool:
    """A local version moved aside by a publish killed between its renames: opening it puts it back."""
    path = local_path(url)
    return path.parent.is_dir() and any(p.name.startswith(f".{path.name}.dstab-old-") for p in path.parent.iterdir())


# ----------------------------------------------------------------------------- the run


@dataclass
class Night:
    """What a night did, day by day (``status``: done, skipped or failed), as a scheduler can read it."""

    source: str
    stable: str
    gates: Gates
    policy: Policy = Policy()
    days: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(day["status"] == status for day in self.days)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "stable": self.stable,
            "gates": self.gates.as_dict(),
            **self.policy.as_dict(),
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "days": self.days,
        }


def summary(name: str, out: str, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The key figures of a stabilized day."""
    keys = ("rank", "dim_in", "dim_out", "tables", "drift_before", "drift_after", "score_error", "anchor", "notes")
    return {"name": name, "out": out, **{k: report.get(k) for k in keys}, "seconds": round(seconds, 3)}


def run(
    days: list[Day],
    done: dict[str, Version],
    *,
    source: str,
    stable: str,
    options: dict[str, Any],
    gates: Gates = Gates(),
    policy: Policy = Policy(),
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    on_day: Callable[[dict[str, Any]], None] | None = None,
    night: Night | None = None,
    known: dict[str, Version] | None = None,
) -> Night:
    """Stabilize the days not ``done`` in order, each onto the days :func:`plan` chose for it by the policy.

    ``known`` holds stabilized days that are not among ``days`` (a kept base whose raw day is gone).

    ``options`` are :func:`dstab.stabilize`'s (sides, symmetric, rank, rtol,
    anchor, anchor_min_count, anchor_weights, method); the anchor options are
    dropped for a day with no reference. Each day records the day before it
    and the policy in its lineage (``chain``), so ``dstab log`` and
    ``dstab report --chain`` follow the days in order whatever it was aligned
    onto. ``on_day(record)`` is called as each stabilized day is published. A
    day crossing ``gates`` raises :class:`GateError` (carrying the night so
    far) and nothing of it is published. Any other failure of a day (bad
    input, a store) is recorded in ``night`` (given by the caller, who reports
    it with the error) as that day failed.
    """
    night = night if night is not None else Night(source=source, stable=stable, gates=gates, policy=policy)
    versions: dict[str, Version] = dict(known or {})
    for day in days:
        if day.name in done:
            versions[day.name] = done[day.name]
            night.days.append({"name": day.name, "out": day.stable, "status": "skipped"})
            log.info("%s: already stabilized, skipped", day.name)
            continue
        try:
            versions[day.name] = _one_day(
                day, versions, night, options, gates, policy, storage_options, progress, on_day
            )
        except GateError:
            raise  # recorded by the gate, with its measure
        except DstabError as exc:
            night.days.append({"name": day.name, "out": day.stable, "status": "failed", "error": str(exc)})
            raise
    return night


def _one_day(
    day: Day,
    versions: dict[str, Version],
    night: Night,
    options: dict[str, Any],
    gates: Gates,
    policy: Policy,
    storage_options: dict[str, Any] | None,
    progress: bool,
    on_day: Callable[[dict[str, Any]], None] | None,
) -> Version:
    """Stabilize one day onto its references, publish it if it passes the gates; the version later days align onto."""
    from .stabilize import stabilize

    references = [versions[name] for name, _ in day.references]
    weights = [w for _, w in day.references]
    weighed = " + ".join(f"{w:g} x {name}" for name, w in day.references)
    onto = f"onto {weighed}" if weighed else "first: no reference"
    log.log(logging.INFO if progress else logging.DEBUG, "%s: stabilizing (%s)", day.name, onto)
    started = time.perf_counter()
    fit = dict(options)
    if not references:  # the anchor options choose rows that fit the rotation onto a reference: the first day has none
        for key in ("anchor", "anchor_min_count", "anchor_weights"):
            fit.pop(key, None)
    # the structure: as asked, else recorded in the raw version or in yesterday's stable one, else the default
    result = stabilize(
        open_version(day.raw, storage_options),
        references,
        reference_weights=weights if references else None,
        **fit,
        progress=progress,
    )
    before = versions.get(day.reference) if day.reference is not None else None
    base = versions.get(day.base) if day.base is not None and day.base != day.name else None
    base_url = canonical_url(day.stable) if day.base == day.name else base.url if base is not None else None
    result.chain = {
        **policy.as_dict(),
        "base": canonical_url(base_url) if base_url else None,
        "previous": canonical_url(before.url) if before is not None and before.url else None,
        "previous_version_id": before.attrs.get("version_id") if before is not None else None,
        "base_version_id": base.attrs.get("version_id") if base is not None else None,
    }
    try:
        written = result.to_zarr(
            day.stable, storage_options=storage_options, progress=progress, gate=_gate(night, gates, day, started)
        )
    except OutputExistsError as exists:
        # two nights at once (a cron overlap): the other run published this day first, and it is the same day;
        # anything else there (a directory of the user's) is refused as the writer said
        try:
            theirs = open_version(day.stable, storage_options)
            check_is_day(theirs, day)
        except DstabError:
            raise exists from None
        night.days.append({"name": day.name, "out": day.stable, "status": "skipped"})
        log.info("%s: stabilized by another run meanwhile, kept as it is", day.name)
        return theirs
    record = {**summary(day.name, day.stable, result.report, time.perf_counter() - started), "status": "done",
              "onto": [{"day": name, "weight": w} for name, w in day.references],
              "matching": result.report.get("matching") or {}}  # fmt: skip
    night.days.append(record)
    if on_day is not None:
        on_day(record)
    return written


def _gate(night: Night, gates: Gates, day: Day, started: float) -> Callable[[dict[str, Any]], None]:
    """The check ``to_zarr`` runs after the write pass, before publishing: raising there publishes nothing."""

    def gate(report: dict[str, Any]) -> None:
        crossed = gates.crossed(report)
        if crossed is None:
            log.debug("%s: gates passed (%s)", day.name, gates.as_dict())
            return
        measure, flag, value, limit = crossed
        record = summary(day.name, day.stable, report, time.perf_counter() - started)
        night.days.append(
            {**record, "status": "failed", "gate": {"measure": measure, "flag": flag, "value": value, "limit": limit}}
        )
        before = "; the days before it stay published" if night.count("done") + night.count("skipped") else ""
        raise GateError(
            f"{day.name}: {measure} {value:.4g} crosses the gate {flag} {limit:g}: not published, the night stops here{before}",
            night,
        )

    return gate


def describe_day(record: dict[str, Any]) -> str:
    """A published day in one line: rank, score error, drift, time."""
    drift = ""
    if record.get("drift_after") is not None:
        drift = f", drift {record['drift_before']:.4g} -> {record['drift_after']:.4g}"
    return f"{record['name']}: rank {record['rank']}, score error {record['score_error']:.2e}{drift}, {record['seconds']:.1f} s"
