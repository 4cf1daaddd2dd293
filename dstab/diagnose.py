"""`dstab diagnose`: dimension collapse in a version or a table, from the one statistics pass."""

from __future__ import annotations

from typing import Any

from . import linalg
from .executor import compute
from .spectrum import (
    COLLAPSE_EXPLANATION,
    COLLAPSE_FRACTION,
    singular_values_from_gram,
    spectrum_metrics,
)
from .stats import check_finite, side_statistics
from .store import SIDES, Table, Version, open_group, open_table, open_version


def open_version_or_table(path: str, storage_options: dict[str, Any] | None = None) -> Version | Table:
    """A loose table if ``path`` holds a ``vectors`` array at its top, else a version."""
    group = open_group(path, storage_options, what="version or table", layout="a Zarr group with items/ and users/, or with vectors")
    if "vectors" in group:
        return open_table(path, storage_options)
    return open_version(path, storage_options)


def diagnose(target: Version | Table, *, rtol: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Spectrum measures per side and for the interaction (``R_T R_W^T``); a table gives one side only."""
    tables = {s: target.table(s) for s in SIDES} if isinstance(target, Version) else {"table": target}
    first = next(iter(tables.values()))
    rtol_used = linalg.default_rtol(first.dtype, first.dim) if rtol is None else float(rtol)
    stats = dict(zip(tables, compute(*(side_statistics(t) for t in tables.values()), progress=progress, stage="statistics pass")))
    for name, s in stats.items():
        check_finite(f"{name}/vectors" if name != "table" else f"{first.name}/vectors", s, tables[name])
    out: dict[str, Any] = {
        name: spectrum_metrics(singular_values_from_gram(s.gram), tables[name].dim, rtol_used) for name, s in stats.items()
    }
    if isinstance(target, Version):
        core = linalg.core_svd(linalg.gram_factor(stats["items"].gram), linalg.gram_factor(stats["users"].gram))[1]
        out["interaction"] = spectrum_metrics(core, target.dim, rtol_used)
    out["url"] = getattr(target, "url", None) or getattr(target, "name", None)
    out["collapse_rule"] = COLLAPSE_EXPLANATION.format(frac=COLLAPSE_FRACTION)
    return out


def format_diagnosis(d: dict[str, Any]) -> str:
    lines = [f"{d['url']}"]
    for name in ("items", "users", "table", "interaction"):
        if name not in d:
            continue
        m = d[name]
        sv = m["singular_values"]
        flag = "  COLLAPSED" if m["collapsed"] else ""
        lines.append(
            f"  {name:<11} dim {m['dim']:>4}  numerical rank {m['numerical_rank']:>4}  effective rank "
            f"{m['effective_rank']:8.2f}  stable rank {m['stable_rank']:7.2f}  information abundance "
            f"{m['information_abundance']:7.2f}{flag}"
        )
        lines.append("              σ: " + ", ".join(f"{v:.3g}" for v in sv[:8]) + (" ..." if len(sv) > 8 else ""))
    lines.append(f"  ({d['collapse_rule']})")
    return "\n".join(lines)
