"""Drift over time along a lineage: each version against the base and against the step before it.

``dstab report VERSION --chain`` walks VERSION's lineage back to its first
version (or to ``--base``), then measures, for every version after the base,
in one pass per version (each version and its two references read once):

* to the base and to the version before it: relative Frobenius drift, mean row
  cosine (sampled common rows) and eigenspace overlap (from the Grams and the
  cross-Gram of the same pass), pooled over the tables and per table;
* the rows that moved most since the version before, with their ids.

The figures are those of :func:`dstab.report.measure_drift` without the
neighbour search, so a chain of any length costs one pass per version.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import measures
from .errors import InputError
from .lineage import chain
from .stabilize import check_same_model
from .stats import TableStats, pass_statistics
from .store import Version, canonical_url, open_version


def chain_versions(version: Version, base: Version | None = None) -> list[Version]:
    """The versions from the base to ``version``, oldest first.

    The walk follows each version's recorded ``chain.previous`` (the nightly
    job's day before) or its (first) reference. With ``base`` it stops there,
    and a base not on the lineage is refused; without, a lineage that stops
    early (a version gone or replaced) is refused.
    """
    entries = chain(version)
    urls = [e["url"] for e in entries]
    missing = next((e["missing"] for e in entries if "missing" in e), None)
    if base is not None:
        target = canonical_url(base.url) if base.url else None
        if target not in urls:
            stops = f"; it stops early: {missing}" if missing else ""
            raise InputError(
                f"--base {base.url} is not on the lineage of {version.url} ({len(urls)} version"
                f"{'s' if len(urls) != 1 else ''} back to "
                f"{urls[-1]}{stops}); give a version of that chain (see dstab log {version.url})"
            )
        urls = urls[: urls.index(target) + 1]
    elif missing:
        # a base quietly moved to wherever the walk stopped would measure drift from the wrong version
        raise InputError(
            f"the lineage of {version.url} stops at {urls[-1]}: {missing}; restore that version, or pass "
            f"--base with a version from {urls[-1]} on to measure from there"
        )
    versions = [version] + [open_version(url, version.storage_options) for url in urls[1:]]
    return versions[::-1]


def _pooled(version: Version, per_table: dict[str, TableStats]) -> dict[str, Any]:
    """Drift, mean row cosine and eigenspace overlap over every table, and each table's."""
    sq = scale = 0.0
    cos_sum, cos_n = 0.0, 0
    tables: dict[str, Any] = {}
    for name in version.names:
        s = per_table[name]
        d = measures.table_drift(s, None)
        sq, scale = sq + d["sq"], scale + d["scale"]
        n_pairs = 0 if s.pairs is None else len(s.pairs.keys)
        if d["cosine"] is not None:
            cos_sum, cos_n = cos_sum + d["cosine"] * n_pairs, cos_n + n_pairs
        tables[name] = {
            "drift": measures.relative(d["sq"], d["scale"]),
            "mean_cosine": d["cosine"],
            "eigenspace_overlap": measures.stats_overlap(s),
        }
    overlaps = [t["eigenspace_overlap"] for t in tables.values() if t["eigenspace_overlap"] is not None]
    return {
        "drift": measures.relative(sq, scale),
        "mean_cosine": cos_sum / cos_n if cos_n else None,
        "eigenspace_overlap": float(np.mean(overlaps)) if overlaps else None,
        "tables": tables,
    }


def chain_report(version: Version, base: Version | None = None, *, progress: bool = False) -> dict[str, Any]:
    """The drift-over-time report of ``version``'s lineage (JSON-ready): :func:`measure_chain` of
    :func:`chain_versions`."""
    return measure_chain(chain_versions(version, base), progress=progress)


def measure_chain(versions: list[Version], *, progress: bool = False) -> dict[str, Any]:
    """Every version after the first (the base) against it and against the version before, oldest first.

    ``steps[i]`` holds the i-th version after the base: ``to_base`` and
    ``to_previous`` (each: ``drift``, ``mean_cosine``, ``eigenspace_overlap``,
    pooled and per table) and ``moved`` (per table, the rows that moved most
    since the version before: ``id``, ``distance``, ``cosine``).
    """
    first, version = versions[0], versions[-1]
    steps: list[dict[str, Any]] = []
    for i, current in enumerate(versions[1:], start=1):
        previous = versions[i - 1]
        references = (previous,) if previous is first else (previous, first)
        for ref in references:
            check_same_model(current, ref, current.known_structure, what="compare a version with")
        results = pass_statistics(current, references, current.names, measure=True, progress=progress)
        to_previous = _pooled(current, results[0])
        to_base = to_previous if len(results) == 1 else _pooled(current, results[1])
        steps.append(
            {
                "step": i,
                "url": canonical_url(current.url) if current.url else None,
                "created": current.attrs.get("created"),
                "chain": current.attrs.get("chain"),
                "references": current.attrs.get("references") or [],
                "to_base": to_base,
                "to_previous": to_previous,
                "moved": {name: measures.moved_rows(results[0][name]) for name in current.names},
            }
        )
    return {
        "version": canonical_url(version.url) if version.url else None,
        "base": canonical_url(first.url) if first.url else None,
        "versions": len(versions),
        "steps": steps,
        "summary": _summary(steps),
    }


def _summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """At the end of the chain, and over every step: what a dashboard or a gate reads."""
    if not steps:
        return {"cosine_to_base_at_end": None, "mean_step_cosine": None, "drift_to_base_at_end": None}
    cos = [s["to_previous"]["mean_cosine"] for s in steps if s["to_previous"]["mean_cosine"] is not None]
    drift = [s["to_previous"]["drift"] for s in steps if s["to_previous"]["drift"] is not None]
    return {
        "cosine_to_base_at_end": steps[-1]["to_base"]["mean_cosine"],
        "drift_to_base_at_end": steps[-1]["to_base"]["drift"],
        "mean_step_cosine": float(np.mean(cos)) if cos else None,
        "mean_step_drift": float(np.mean(drift)) if drift else None,
    }


def format_chain_report(report: dict[str, Any], moved: int = 3) -> str:
    """The chain report as a table, one line per version, and the ids that moved most at the last step."""

    def num(value: Any, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"drift over time: {report['versions']} version{'s' if report['versions'] != 1 else ''} from {report['base']} "
        f"to {report['version']}",
        f"  {'step':>4}  {'version':<40} {'cos base':>9} {'drift base':>10} {'cos prev':>9} {'drift prev':>10} "
        f"{'overlap':>8}",
    ]
    for s in report["steps"]:
        name = str(s["url"] or "in memory")
        name = name if len(name) <= 40 else "..." + name[-37:]
        b, p = s["to_base"], s["to_previous"]
        lines.append(
            f"  {s['step']:>4}  {name:<40} {num(b['mean_cosine']):>9} {num(b['drift']):>10} "
            f"{num(p['mean_cosine']):>9} {num(p['drift']):>10} {num(p['eigenspace_overlap']):>8}"
        )
    summary = report["summary"]
    if report["steps"]:
        lines.append(
            f"  at the end: cosine to the base {num(summary['cosine_to_base_at_end'])}, drift "
            f"{num(summary['drift_to_base_at_end'])}; mean step cosine {num(summary['mean_step_cosine'])}"
        )
        last = report["steps"][-1]
        for name, rows in last["moved"].items():
            if rows and max(r["distance"] for r in rows) == 0.0:
                lines.append(f"  moved most at the last step, {name}: no row moved")
            elif rows:
                shown = ", ".join(f"{r['id']!r} ({r['distance']:.3g}, cos {r['cosine']:.3f})" for r in rows[:moved])
                lines.append(f"  moved most at the last step, {name}: {shown}")
    else:
        lines.append("  no steps: the version is the base of its chain")
    lines.append("  (cos: mean row cosine of sampled common rows; drift: relative Frobenius; overlap: eigenspace")
    lines.append("   overlap with the version before, 1 = the same subspace)")
    return "\n".join(lines)
