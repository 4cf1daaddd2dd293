"""Lineage: which version each stabilized version was made from and aligned onto, back to the first."""

from __future__ import annotations

from typing import Any

from .errors import DstabError
from .version import Version, canonical_url, open_version


def chain(version: Version, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """The version, its reference, that one's reference, ... back to the first (newest first).

    Each entry holds the version's URL, when and from what it was made, the
    reference it was aligned onto and the drift before and after. The walk
    stops at a version made without a reference (the first), or at a reference
    that can no longer be opened (``missing`` then says why).
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
            "rank": report.get("rank"),
            "dim_out": report.get("dim_out"),
            "drift_before": report.get("drift_before"),
            "drift_after": report.get("drift_after"),
            "params": attrs.get("params"),
        }
        entries.append(entry)
        if url is not None:
            seen.add(url)
        ref_url = attrs.get("reference")
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
    return entries


def format_chain(entries: list[dict[str, Any]]) -> str:
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = []
    for i, e in enumerate(entries):
        head = f"{len(entries) - i:>3}. {e['url']}  ({e['kind']}, made {e['created'] or '?'} by dstab {e['dstab_version'] or '?'})"
        lines.append(head)
        if e["kind"] == "stabilized":
            lines.append(f"     from {e['input']}, rank {e['rank']}, width {e['dim_out']}")
            if e["reference"]:
                lines.append(f"     onto {e['reference']}: drift {num(e['drift_before'])} -> {num(e['drift_after'])}")
            else:
                lines.append("     first of the chain (no reference: deterministic signs)")
        if "missing" in e:
            lines.append(f"     chain ends here: {e['missing']}")
    return "\n".join(lines)
