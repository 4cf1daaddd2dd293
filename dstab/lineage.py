"""Lineage: which version each stabilized version was made from and aligned onto, back to the first.

A version in an Icechunk repository also carries its place in the repository's
history: the snapshots (id, commit time) that published it, newest first.
"""

from __future__ import annotations

from typing import Any

from .errors import DstabError
from .store import Version, canonical_url, open_version
from .store.icechunk_repo import history, is_repo_url


def chain(version: Version, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """The version, the one before it, that one's, ... back to the first (newest first).

    The one before is the version recorded as ``chain.previous`` (the nightly
    job records the day before, whatever it aligned onto), else the (first)
    reference. Each entry holds the version's URL, when and from what it was
    made, the references it was aligned onto with their weights, and the
    drift before and after. The walk stops at a version made without a
    reference (the first), or at one that can no longer be opened
    (``missing`` then says why).
    """
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: Version | None = version
    while current is not None and len(entries) < limit:
        attrs = current.attrs
        report = attrs.get("report") or {}
        url = canonical_url(current.url) if current.url else None
        entry: dict[str, Any] = {
            "url": url,
            "kind": attrs.get("kind", "raw"),
            "created": attrs.get("created"),
            "dstab_version": attrs.get("dstab_version"),
            "input": attrs.get("input"),
            "reference": attrs.get("reference"),
            "references": attrs.get("references") or [],
            "chain": attrs.get("chain"),
            "rank": report.get("rank"),
            "dim_out": report.get("dim_out"),
            "drift_before": report.get("drift_before"),
            "drift_after": report.get("drift_after"),
            "params": attrs.get("params"),
            "sources": attrs.get("sources"),
            "structure": attrs.get("structure"),
        }
        if url is not None and is_repo_url(url):
            try:
                entry["snapshots"] = history(url, current.storage_options)
            except DstabError as exc:
                entry["snapshots"] = []
                entry["history_missing"] = str(exc)
        entries.append(entry)
        if url is not None:
            seen.add(url)
        ref_url, expected = _before(attrs)
        if not ref_url:
            break
        if ref_url in seen:
            entry["missing"] = f"the chain loops back to {ref_url}"
            break
        try:
            current = open_version(ref_url, current.storage_options)
        except DstabError as exc:
            entry["missing"] = f"reference {ref_url} cannot be opened: {exc}"
            break
        found = current.attrs.get("version_id")
        if expected and found != expected:
            made = current.attrs.get("created") or "at an unrecorded time"
            entry["missing"] = (
                f"{ref_url} was replaced after this version was made from it (what is there now was made {made}); "
                "the figures measured against it no longer apply"
            )
            break
    return entries


def _before(attrs: dict[str, Any]) -> tuple[str | None, str | None]:
    """The version before this one (the nightly's day before, else the first reference) and its recorded publish id."""
    chain_attrs = attrs.get("chain") or {}
    if chain_attrs.get("previous"):
        return chain_attrs["previous"], chain_attrs.get("previous_version_id")
    references = attrs.get("references") or []
    recorded = references[0].get("version_id") if references and isinstance(references[0], dict) else None
    return attrs.get("reference"), recorded


KIND_WORDS = {
    "raw": "raw version",
    "synthetic": "synthetic version",
    "imported": "imported version",
    "stabilized": "stabilized version",
}


def _words(value: Any) -> str:
    """A recorded (JSON) value in words: no braces, quotes or None."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_words(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {_words(v)}" for k, v in value.items()) or "none"
    return str(value)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _words(value)


def made_words(entry: dict[str, Any]) -> str:
    """When and by which dstab a version was written, in words ("made 2026-11-20 03:12:09 UTC by dstab 0.1.0")."""
    created = entry.get("created")
    if isinstance(created, str) and created:
        when = f"made {created.replace('T', ' ').replace('+00:00', ' UTC')}"
    else:
        when = f"made {_words(created)}" if created else "made at an unrecorded time"
    version = entry.get("dstab_version")
    return f"{when} by dstab {_words(version)}" if version else f"{when} by an unrecorded version of dstab"


def _source_words(side: str, source: Any) -> str:
    """One imported table (any name): its file or directory, and where its ids and vectors were read from."""
    if not isinstance(source, dict):  # versions imported before the column options were recorded: the URL only
        return f"{side} {_words(source)}"
    details = []
    if source.get("ids"):
        details.append(f"ids from {source['ids']}")
    if source.get("format") == "parquet":
        details.append(f"id column {source['id_column']}" if source.get("id_column") else "no id column (row numbers)")
        columns = source.get("vector_columns") or []
        if columns:
            shown = ", ".join(columns) if len(columns) <= 4 else f"{columns[0]} to {columns[-1]}"
            details.append(f"vectors from {len(columns)} columns {shown}")
        elif source.get("vector_column"):
            details.append(f"vectors from list column {source['vector_column']}")
    text = f"{side} {_words(source.get('url'))}"
    return f"{text} ({'; '.join(details)})" if details else text


def _and(parts: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _structure_words(value: Any) -> str | None:
    """A recorded structure in words (``two-sided (users scored against items,creators)``), or ``None``."""
    from .structure import Structure

    structure = Structure.from_attrs(value)
    return str(structure) if structure is not None else None


def _synthetic_tables_words(params: dict[str, Any]) -> str:
    """``6,000,000 rows of words, width 64`` / ``1,000 rows of users, 2,000 of items and 300 of creators, width 8, ...``."""
    tables = params["tables"]
    counts = [f"{_count(n)} {'rows ' if i == 0 else ''}of {name}" for i, (name, n) in enumerate(tables.items())]
    text = f"synthetic: {_and(counts)}, width {_words(params.get('dim'))}"
    shape = _structure_words(params.get("structure"))
    if shape and len(tables) > 1:  # one table is scored against itself: nothing to say
        text += f", {shape}"
    return text + (
        f", scores of rank {_words(params.get('rank'))}, seed {_words(params.get('seed'))}, {_words(params.get('dtype'))}"
    )


def origin_words(entry: dict[str, Any]) -> str:
    """How a version was made, in words, from its recorded lineage (an entry of :func:`chain`, or a report's)."""
    kind = entry.get("kind") or "raw"
    if kind == "raw":
        return "not written by dstab: no lineage recorded"
    params = entry.get("params")
    params = params if isinstance(params, dict) else {}
    if kind == "synthetic" and "like" in params:
        noise, churn = params.get("noise") or 0.0, params.get("churn") or 0.0
        churned = f"{churn:.1%}" if isinstance(churn, float) else _words(churn)
        moved = (
            "the same dot products, every table rotated by one random orthogonal matrix"
            if params.get("basis") == "orthogonal"
            else "the same scores in a new random basis"
        )
        return (
            f"a synthetic retrain of {_words(params['like'])}: {moved}, "
            + (f"relative noise {_words(noise)}" if noise else "no noise")
            + (f", {churned} of ids replaced and rows reordered" if churn else ", the same ids in the same order")
            + f", seed {_words(params.get('seed'))}"
        )
    if kind == "synthetic" and isinstance(params.get("tables"), dict) and params["tables"]:
        return _synthetic_tables_words(params)
    if kind == "synthetic" and {"items", "users", "dim"} <= params.keys():
        return (
            f"synthetic: {_count(params['items'])} items and {_count(params['users'])} users of width "
            f"{_words(params['dim'])}, scores of rank {_words(params.get('rank'))}, seed {_words(params.get('seed'))}, "
            f"{_words(params.get('dtype'))}"
        )
    if kind == "imported":
        sources = entry.get("sources")
        if not sources:
            return "imported from sources that were not recorded"
        if isinstance(sources, dict):
            text = "imported from " + _and([_source_words(name, src) for name, src in sources.items()])
            shape = _structure_words(entry.get("structure"))
            return f"{text}; recorded as {shape}" if shape and len(sources) > 1 else text
        return f"imported from {_words(sources)}"
    if kind == "stabilized":
        text = f"stabilized from {_words(entry.get('input') or 'an input that was not recorded')}"
        several = entry.get("references") or []
        if len(several) > 1:
            return f"{text} onto " + " + ".join(f"{_words(r.get('weight'))} x {_words(r.get('url'))}" for r in several)
        if entry.get("reference"):
            return f"{text} onto {_words(entry['reference'])}"
        return f"{text}, with no reference: the first of the chain (deterministic signs)"
    return f"{_words(kind)}" + (f" with {_words(params)}" if params else "")


def _snapshot_lines(entry: dict[str, Any]) -> list[str]:
    """Where an Icechunk version sits in its repository's history: the snapshot that published it, and any before."""
    if "snapshots" not in entry:
        return []
    snaps = entry["snapshots"]
    if not snaps:
        return [
            f"     no commit of the repository names it{': ' + entry['history_missing'] if 'history_missing' in entry else ''}"
        ]
    when = str(snaps[0]["committed"]).replace("T", " ").replace("+00:00", " UTC")
    line = f"     snapshot {snaps[0]['snapshot']}, committed {when}"
    if len(snaps) > 1:
        line += f"; replaced {len(snaps) - 1} earlier publish{'es' if len(snaps) > 2 else ''} ({', '.join(s['snapshot'] for s in snaps[1:4])}{', ...' if len(snaps) > 4 else ''})"
    return [line]


def format_chain(entries: list[dict[str, Any]]) -> str:
    """The chain in words, newest first: what each version is, how and when it was made."""

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = []
    for i, e in enumerate(entries):
        kind = e.get("kind") or "raw"
        head = f"{len(entries) - i:>3}. {e['url'] or 'a version in memory'}  ({KIND_WORDS.get(kind, kind)}"
        lines.append(head + (")" if kind == "raw" else f", {made_words(e)})"))
        lines.append(f"     {origin_words(e)}")
        if kind == "stabilized":
            onto = "the first reference" if len(e.get("references") or []) > 1 else "the reference"
            drift = f"; drift onto {onto} {num(e['drift_before'])} -> {num(e['drift_after'])}" if e["reference"] else ""
            lines.append(f"     rank {_words(e['rank'])}, width {_words(e['dim_out'])}{drift}")
            policy = (e.get("chain") or {}).get("policy")
            if policy:
                weight = (e.get("chain") or {}).get("previous_weight")
                said = f" ({_words(weight)} x the day before)" if policy == "mix" and weight is not None else ""
                lines.append(f"     nightly --policy {policy}{said}")
        lines += _snapshot_lines(e)
        if "missing" in e:
            lines.append(f"     chain ends here: {e['missing']}")
    return "\n".join(lines)
