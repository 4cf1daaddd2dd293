"""`dstab diagnose`: dimension collapse in a version of any tables, or in a loose table, from one statistics pass.

What is measured (every measure is :func:`spectrum.spectrum_metrics` of a spectrum):

* every table: the singular values of its rows;
* a two-sided structure: the **interaction**, the singular values of the scores
  between the pooled sides (the core ``R_C R_Q^T`` of the pooled Grams' factors,
  candidate side first, as the stabilizer fits it);
* a symmetric structure: the **pooled** rows (every table stacked: the singular
  values from the summed Grams). Each table is a "field" there: a field with
  few distinct rows has a low effective rank and shows as collapsed;
* no structure (several tables, none recorded, no flag): the tables one by one;
  nothing says which rows meet which, so no interaction is measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import linalg
from .errors import UsageError
from .executor import compute
from .spectrum import (
    COLLAPSE_EXPLANATION,
    COLLAPSE_FRACTION,
    score_singular_values,
    singular_values_from_gram,
    spectrum_metrics,
)
from .stats import check_finite, own_statistics
from .store import Table, Version, open_group, open_table, open_version
from .structure import Structure, resolve

# Keys of a diagnosis besides the tables'. A table of one of these names is found
# under ``diagnosis["tables"][name]`` only (every table is there).
RESERVED_KEYS = ("url", "structure", "tables", "interaction", "pooled", "table", "note", "collapse_rule")
# The key of a loose table's measures, as `dstab diagnose TABLE --json` has always printed it.
LOOSE_TABLE_KEY = "table"


def open_version_or_table(path: str, storage_options: dict[str, Any] | None = None) -> Version | Table:
    """A loose table if ``path`` holds a ``vectors`` array at its top, else a version."""
    group = open_group(
        path, storage_options, what="version or table",
        layout="a Zarr group of tables NAME/vectors (e.g. items/ and users/), or one with vectors at its top",
    )  # fmt: skip
    if "vectors" in group:
        return open_table(path, storage_options)
    return open_version(path, storage_options)


def diagnosis_structure(
    target: Version | Table, *, sides: str | Structure | None = None, symmetric: bool = False
) -> Structure | None:
    """The structure a diagnosis measures: the flags, else the one recorded, else the default for the tables; or none.

    Unlike stabilizing, diagnosing needs no structure: several tables with none
    recorded and no flag give ``None`` (each table is measured alone). Bad flags
    (unparsable, naming missing tables, leaving tables out) raise here, before
    any work starts. A loose table is alone: ``--symmetric`` changes nothing, ``--sides`` is refused.
    """
    if isinstance(target, Table):
        if sides is not None:
            raise UsageError(
                f"--sides needs a version of several tables; {target.name} is a single table (vectors at its top): "
                "drop --sides"
            )
        return None
    label = target.url or "the version"
    if sides is not None or symmetric:
        # measuring another structure than the recorded one is a question, not a change: nothing is written
        return resolve(target.names, sides=sides, symmetric_all=symmetric, label=label)
    if target.known_structure is None:
        return None
    return resolve(target.names, recorded=target.structure, label=label)


def diagnose(
    target: Version | Table,
    *,
    sides: str | Structure | None = None,
    symmetric: bool = False,
    rtol: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Spectrum measures of every table, and of the interaction (two-sided) or the pooled rows (symmetric).

    Returns a JSON-ready dict: ``tables`` (name -> measures, every table), the
    same measures under each table's own name (``items``, ``users``, ...; a loose
    table under ``table``), ``interaction`` or ``pooled`` when the structure
    gives one, ``structure`` (its attrs, or ``None``), ``url``, ``collapse_rule``,
    and ``note`` when no interaction is measured.
    """
    structure = diagnosis_structure(target, sides=sides, symmetric=symmetric)
    if isinstance(target, Version):
        tables = dict(target.tables)
        labels = {name: f"{name}/vectors" for name in tables}
    else:
        tables = {LOOSE_TABLE_KEY: target}
        labels = {LOOSE_TABLE_KEY: f"{target.name}/vectors"}
    first = next(iter(tables.values()))
    dim = first.dim  # one width for every table (checked when the version was opened)
    rtol_used = linalg.default_rtol(first.dtype, dim) if rtol is None else float(rtol)
    # one compute for every table: one pass over the data, whatever the number of tables
    computed = compute(*(own_statistics(t) for t in tables.values()), progress=progress, stage="statistics pass")
    stats = dict(zip(tables, computed))
    for name, s in stats.items():
        check_finite(labels[name], s, tables[name])
    grams = {name: s.gram for name, s in stats.items()}
    per_table = {
        name: spectrum_metrics(singular_values_from_gram(g), tables[name].dim, rtol_used) for name, g in grams.items()
    }

    out: dict[str, Any] = {"url": getattr(target, "url", None) or getattr(target, "name", None)}
    out["structure"] = structure.to_attrs() if structure is not None else None
    out["tables"] = per_table
    for name, measures in per_table.items():
        if name not in RESERVED_KEYS or (name == LOOSE_TABLE_KEY and isinstance(target, Table)):
            out[name] = measures
    if structure is not None and structure.kind == "two-sided":
        core = score_singular_values([np.sum([grams[n] for n in side], axis=0) for side in structure.sides])
        out["interaction"] = spectrum_metrics(core, dim, rtol_used)
    elif structure is not None:
        out["pooled"] = spectrum_metrics(
            singular_values_from_gram(np.sum(list(grams.values()), axis=0)), dim, rtol_used
        )
    elif isinstance(target, Version) and len(tables) > 1:
        out["note"] = (
            f"no interaction is measured: nothing says which of the tables {', '.join(tables)} score against which; "
            "pass --sides QUERY:CANDIDATE or --symmetric"
        )
    out["collapse_rule"] = COLLAPSE_EXPLANATION.format(frac=COLLAPSE_FRACTION)
    return out


def diagnosis_json(d: dict[str, Any]) -> dict[str, Any]:
    """What ``dstab diagnose --json`` prints: the measures and the structure (no url, no prose)."""
    return {k: v for k, v in d.items() if k not in ("url", "collapse_rule")}


def _measure_lines(label: str, m: dict[str, Any], width: int) -> list[str]:
    sv = m["singular_values"]
    flag = "  COLLAPSED" if m["collapsed"] else ""
    measures = (
        f"  {label:<{width}} dim {m['dim']:>4}  numerical rank {m['numerical_rank']:>4}  effective rank "
        f"{m['effective_rank']:8.2f}  stable rank {m['stable_rank']:7.2f}  information abundance "
        f"{m['information_abundance']:7.2f}{flag}"
    )
    values = " " * (width + 3) + "σ: " + ", ".join(f"{v:.3g}" for v in sv[:8]) + (" ..." if len(sv) > 8 else "")
    return [measures, values]


def format_diagnosis(d: dict[str, Any]) -> str:
    structure = Structure.from_attrs(d.get("structure"))
    header = f"{d['url']}"
    if structure is not None:
        header += f": {structure}"
    lines = [header]
    tables = d.get("tables") or {k: d[k] for k in ("items", "users", "table") if k in d}
    extra = [k for k in ("interaction", "pooled") if k in d]
    width = max([11, *(len(n) for n in tables)])
    for name, m in tables.items():
        lines += _measure_lines(name, m, width)
    for name in extra:
        if name == "pooled" and len(tables) == 1:
            continue  # one table: the pooled rows are that table's rows
        lines += _measure_lines(name, d[name], width)
    if structure is not None and structure.kind == "symmetric" and len(tables) > 1:
        collapsed = [n for n, m in tables.items() if m["collapsed"]]
        if collapsed:
            lines.append(
                f"  collapsed fields: {', '.join(collapsed)} (few distinct rows, or rows confined to few dimensions)"
            )
    if d.get("note"):
        lines.append(f"  {d['note']}")
    lines.append(f"  ({d['collapse_rule']})")
    return "\n".join(lines)
