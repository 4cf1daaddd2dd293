"""What is known of a version: sizes, spectrum, rank, drift, score error, lineage.

For a version dstab wrote, the report stored at stabilization time is used as
is; for a raw version the spectrum is computed with one statistics pass. With a
reference, drift against it is measured with one pass over both.
"""

from __future__ import annotations

from typing import Any

from . import config, linalg, measures
from .executor import compute
from .lineage import KIND_WORDS, chain, made_words, origin_words
from .spectrum import score_singular_values
from .stabilize import check_same_model
from .stats import check_finite, own_statistics, pass_statistics
from .store import Version, canonical_url
from .structure import Structure, default_structure

REPORT_KEYS = (
    "rank", "dim_in", "dim_out", "tables", "dtype", "singular_values",
    "score_error", "drift_before", "drift_after",
)  # fmt: skip


def measure_drift(
    version: Version,
    reference: Version,
    *,
    k: int | None = None,
    queries: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """How far ``version`` is from ``reference``, over the rows both hold (paired as in :func:`dstab.stabilize`).

    Per table: ``frobenius`` (relative, every common row; widths zero-padded),
    ``mean_cosine`` (over a random sample of up to 1,024 common rows),
    ``neighbour_overlap`` (the share of each of ``queries`` sampled rows' ``k``
    nearest rows by cosine, in the whole table, that are the same in both
    versions; one more pass over both tables, ``k=0`` skips it); and
    ``total`` (Frobenius over every table) and ``score_error`` (relative change
    of the scores of sampled rows against the sampled rows of the tables they
    are scored against, when the structure is known). ``k`` and ``queries``
    default to dask config ``dstab.neighbours-k`` (10) and ``dstab.query-rows`` (1,000).
    """
    from .neighbours import overlap

    k = config.get("neighbours-k") if k is None else k
    queries = config.get("query-rows") if queries is None else queries

    structure = version.known_structure
    check_same_model(version, reference, structure, what="compare a version with")
    (results,) = pass_statistics(version, (reference,), version.names, measure=True, progress=progress)
    out: dict[str, Any] = {"k": k, "tables": list(version.names)}
    total = scale = 0.0
    groups, keys = {}, {}
    for name in version.names:
        s = results[name]
        d = measures.table_drift(s, None)
        pairs = s.pairs
        out[name] = {
            "frobenius": measures.relative(d["sq"], d["scale"]),
            "mean_cosine": d["cosine"],
            "pairs": 0 if pairs is None else len(pairs.keys),
            "eigenspace_overlap": measures.stats_overlap(s),
            "neighbour_overlap": None,
            "queries": 0,
            "moved": measures.moved_rows(s),
            "moved_among": "sampled common ids"
            if s.matched_by == "id" and s.sample_fraction < 1
            else "every common row",
        }
        total, scale = total + d["sq"], scale + d["scale"]
        if k > 0 and pairs is not None and len(pairs.keys):
            q = slice(0, queries)
            groups[name] = [(version.table(name), pairs.new[q], None), (reference.table(name), pairs.ref[q], None)]
            keys[name] = pairs.keys[q]
    out["total"] = measures.relative(total, scale)
    out["score_error"] = None
    if structure is not None:
        query = measures.pooled_pairs(results, structure.query)
        candidate = measures.pooled_pairs(results, structure.candidate or structure.query)
        if query is not None and candidate is not None:
            out["score_error"] = measures.paired_score_error(query, candidate)
    for name, (here, there) in measures.neighbour_overlaps(groups, keys, k, progress=progress).items():
        out[name]["neighbour_overlap"] = overlap(here, there, k)
        out[name]["queries"] = len(keys[name])
    return out


def describe(
    version: Version, reference: Version | None = None, *, base: Version | None = None, progress: bool = False
) -> dict[str, Any]:
    """The report of ``version`` as one JSON-ready dict (see :data:`REPORT_KEYS`).

    With ``reference``, drift against it is measured now; with ``base`` (the
    first version of its chain, say), the drift accumulated since then is
    measured now over the ids both hold, and the chain's steps in between are
    listed from the versions' own reports.
    """
    attrs = version.attrs
    stored = attrs.get("report") if attrs.get("kind") == "stabilized" else None
    report: dict[str, Any] = {key: None for key in REPORT_KEYS}
    structure = version.known_structure
    report.update(
        url=version.url,
        kind=attrs.get("kind", "raw"),
        tables={name: t.n_rows for name, t in version.tables.items()},
        structure=structure.to_attrs() if structure is not None else None,
        dim_in=version.dim,
        dim_out=version.dim,
        dtype=str(version.dtype),
    )
    for name in ("items", "users"):  # the two-table model's counts, as reports have always had them
        if name in version.tables:
            report[f"n_{name}"] = version.tables[name].n_rows
    if stored:
        report.update(stored)
        report.setdefault("tables", {name: t.n_rows for name, t in version.tables.items()})
    elif structure is not None:
        stats = dict(
            zip(
                version.names,
                compute(
                    *(own_statistics(t) for t in version.tables.values()), progress=progress, stage="statistics pass"
                ),
            )
        )
        for name, s in stats.items():
            check_finite(f"{name}/vectors", s, version.table(name))
        rtol = linalg.default_rtol(version.dtype, version.dim)
        sv = score_singular_values([sum(stats[n].gram for n in side) for side in structure.sides])
        report.update(singular_values=sv.tolist(), rank=linalg.choose_rank(sv, "auto", rtol), rtol=rtol)
    report["lineage"] = {
        key: attrs.get(key)
        for key in (
            "input",
            "reference",
            "references",
            "chain",
            "created",
            "dstab_version",
            "structure",
            "params",
            "sources",
        )
        if key in attrs
    }
    if reference is not None:
        report["reference_checked"] = reference.url
        report["drift_vs_reference"] = measure_drift(version, reference, progress=progress)
    if base is not None:
        report["base_checked"] = base.url
        report["drift_vs_base"] = measure_drift(version, base, progress=progress)
        base_url = canonical_url(base.url) if base.url else None
        steps = []
        reached = False
        for entry in chain(version):
            if entry["url"] == base_url:
                reached = True
                break
            steps.append(
                {"url": entry["url"], "drift_before": entry["drift_before"], "drift_after": entry["drift_after"]}
            )
        report["chain_to_base"] = {
            "base_in_chain": reached,
            "steps": steps,
            "sum_of_step_drift_after": sum(s["drift_after"] or 0.0 for s in steps),
        }
    return report


def _drift_lines(title: str, d: dict[str, Any]) -> list[str]:
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = [f"  {title}: relative Frobenius {num(d['total'])}, score error {num(d['score_error'])}"]
    for side in d.get("tables") or [k for k in ("items", "users") if k in d]:
        m = d[side]
        lines.append(
            f"    {side}: Frobenius {num(m['frobenius'])}, mean row cosine {num(m['mean_cosine'])} ({m['pairs']} rows), "
            f"neighbour overlap@{d['k']} {num(m['neighbour_overlap'])} ({m['queries']} queries), "
            f"eigenspace overlap {num(m.get('eigenspace_overlap'))}"
        )
        moved = m.get("moved") or []
        if moved and max(r["distance"] for r in moved) == 0.0:
            lines.append("      moved most: no row moved")
        elif moved:
            shown = ", ".join(f"{r['id']!r} ({r['distance']:.3g}, cos {r['cosine']:.3f})" for r in moved[:5])
            lines.append(f"      moved most (of {m.get('moved_among', 'every common row')}): {shown}")
    return lines


def format_side_drift(drift: dict[str, Any]) -> list[str]:
    """One line per anchor side: drift, row cosine and neighbour overlap, before -> after stabilization."""

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = []
    for side, d in drift.items():
        line = f"{side}: drift {num(d.get('before'))} -> {num(d.get('after'))}"
        if "cosine_before" in d:
            line += f", mean row cosine {num(d['cosine_before'])} -> {num(d['cosine_after'])}"
        if "neighbour_overlap_before" in d:
            line += (
                f", neighbour overlap@{d['neighbours_k']} {num(d['neighbour_overlap_before'])} -> "
                f"{num(d['neighbour_overlap_after'])}"
            )
        lines.append(line)
    return lines


def format_matching(matching: dict[str, Any]) -> list[str]:
    """One line per anchor side: how its rows were paired with the reference's."""
    lines = []
    for side, m in matching.items():
        if m.get("by") == "id":
            sample = "" if m["sample_fraction"] >= 1 else f", fitted on a {m['sample_fraction']:.1%} hash sample of ids"
            lines.append(
                f"{side}: matched by id: {m['common']:,} common, {m['added']:,} added, {m['removed']:,} removed; "
                f"{m['anchor_rows']:,} anchor rows{sample}"
            )
        else:
            lines.append(f"{side}: matched by position ({m['anchor_rows']:,} anchor rows)")
    return lines


def _table_words(report: dict[str, Any]) -> str:
    """``items 1,000  users 500`` for every table, and the structure when it is not the default one."""
    tables = report.get("tables") or {k[2:]: report[k] for k in ("n_items", "n_users") if report.get(k) is not None}
    words = "  ".join(f"{name} {n:,}" for name, n in tables.items())
    structure = Structure.from_attrs(report.get("structure"))
    if structure is not None and structure != default_structure(tables):
        words += f"  ({structure})"
    return words


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable lines: what the version is, how it was made, what was measured."""

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    kind = report.get("kind") or "raw"
    sv = report.get("singular_values") or []
    top = ", ".join(f"{v:.4g}" for v in sv[:8]) + (" ..." if len(sv) > 8 else "")
    lineage = {"kind": kind, **(report.get("lineage") or {})}
    made = "" if kind == "raw" else f", {made_words(lineage)}"
    lines = [
        f"{report.get('url') or 'a version in memory'}  ({KIND_WORDS.get(kind, kind)}, {report.get('dtype')}{made})",
        f"  {origin_words(lineage)}",
    ]
    if kind == "stabilized":
        lines += [
            f"  {_table_words(report)}  width {report['dim_in']} -> {report['dim_out']}",
            f"  rank kept {report.get('rank')} of {len(sv)}; top singular values {top}",
            f"  score error {num(report.get('score_error'))} (relative Frobenius, sampled rows of every block x sampled rows)",
        ]
        several = report.get("references") or []
        if report.get("drift_before") is None:
            lines.append("  no drift recorded: stabilized without a reference")
        elif not several:
            lines.append(
                f"  drift onto the reference: before {num(report.get('drift_before'))}  after {num(report.get('drift_after'))}"
            )
        for i, ref in enumerate(several):
            lines.append(
                f"  drift onto reference {i + 1} ({ref.get('url')}, weight {ref.get('weight'):g}): "
                f"before {num(ref.get('drift_before'))}  after {num(ref.get('drift_after'))}"
            )
    else:
        rtol = report.get("rtol")
        above = f" (singular values above {rtol:.2g} x the largest)" if rtol is not None else ""
        spectrum = (
            f"  spectrum measured now: rank {report.get('rank')} of {len(sv)}{above}; top singular values {top}"
            if sv
            else "  no score spectrum: the tables' structure is not recorded (say --sides or --symmetric when stabilizing)"
        )
        lines += [
            f"  {_table_words(report)}  width {report['dim_in']}",
            spectrum,
            "  not stabilized, so no score error or drift of its own"
            + ("" if "drift_vs_reference" in report else " (`dstab stabilize` it; --reference measures drift now)"),
        ]
    lines += ["  " + line for line in format_side_drift(report.get("drift") or {})]
    lines += ["  " + line for line in format_matching(report.get("matching") or {})]
    if "drift_vs_reference" in report:
        lines += _drift_lines(f"drift vs {report['reference_checked']}", report["drift_vs_reference"])
    if "drift_vs_base" in report:
        d, c = report["drift_vs_base"], report["chain_to_base"]
        lines += _drift_lines(f"accumulated drift since {report['base_checked']} (measured now)", d)
        if c["base_in_chain"]:
            lines.append(
                f"  over {len(c['steps'])} steps of stabilization; each step's drift after alignment onto its "
                "(first) reference: "
                + ", ".join(num(s["drift_after"]) for s in reversed(c["steps"]))
                + f" (sum {num(c['sum_of_step_drift_after'])})"
            )
        else:
            lines.append("  (the base is not in this version's chain of references; see `dstab log`)")
    return "\n".join(lines)
