"""What is known of a version: sizes, spectrum, rank, drift, score error, lineage.

For a version dstab wrote, the report stored at stabilization time is used as
is; for a raw version the spectrum is computed with one statistics pass. With a
reference, drift against it is measured with one pass over both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import linalg
from .executor import compute
from .stats import pass_statistics, side_statistics
from .lineage import chain
from .version import SIDES, Version, canonical_url

REPORT_KEYS = (
    "rank", "dim_in", "dim_out", "n_items", "n_users", "dtype", "singular_values",
    "score_error", "drift_before", "drift_after",
)  # fmt: skip


def measure_drift(version: Version, reference: Version, *, progress: bool = False) -> dict[str, Any]:
    """Relative Frobenius distance of each side to the reference, over the rows both hold.

    Rows pair as in :func:`dstab.stabilize` (by position, or by id when the ids
    differ); widths that differ are zero-padded.
    """
    results = pass_statistics(version, reference, SIDES, progress=progress)
    out: dict[str, Any] = {}
    total = scale = 0.0
    for side in SIDES:
        s = results[side]
        d = linalg.identity_drift(s.gram_of_anchors, s.cross, s.ref_sumsq)
        out[side] = float(np.sqrt(d / s.ref_sumsq)) if s.ref_sumsq > 0 else None
        total, scale = total + d, scale + s.ref_sumsq
    out["total"] = float(np.sqrt(total / scale)) if scale > 0 else None
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
    report.update(
        url=version.url,
        kind=attrs.get("kind", "raw"),
        n_items=version.items.n_rows,
        n_users=version.users.n_rows,
        dim_in=version.dim,
        dim_out=version.dim,
        dtype=str(version.dtype),
    )
    if stored:
        report.update(stored)
    else:
        graphs = [side_statistics(version.table(side)) for side in SIDES]
        items_stats, users_stats = compute(*graphs, progress=progress)
        rtol = linalg.default_rtol(version.dtype, version.dim)
        sv = linalg.core_svd(linalg.gram_factor(items_stats.gram), linalg.gram_factor(users_stats.gram))[1]
        report.update(singular_values=sv.tolist(), rank=linalg.choose_rank(sv, "auto", rtol), rtol=rtol)
    report["lineage"] = {
        key: attrs.get(key) for key in ("input", "reference", "created", "dstab_version", "params") if key in attrs
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
            steps.append({"url": entry["url"], "drift_before": entry["drift_before"], "drift_after": entry["drift_after"]})
        report["chain_to_base"] = {
            "base_in_chain": reached,
            "steps": steps,
            "sum_of_step_drift_after": sum(s["drift_after"] or 0.0 for s in steps),
        }
    return report


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


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable lines."""

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    sv = report.get("singular_values") or []
    lines = [
        f"{report.get('url')}  ({report.get('kind')}, {report.get('dtype')})",
        f"  items {report['n_items']:,}  users {report['n_users']:,}  dim {report['dim_in']} -> {report['dim_out']}",
        f"  rank kept {report.get('rank')} of {len(sv)}; top singular values "
        + ", ".join(f"{v:.4g}" for v in sv[:8])
        + (" ..." if len(sv) > 8 else ""),
        f"  score error {num(report.get('score_error'))} (relative Frobenius, sampled rows of every block x sampled rows)",
        f"  drift before {num(report.get('drift_before'))}  after {num(report.get('drift_after'))}",
    ]
    lines += ["  " + line for line in format_matching(report.get("matching") or {})]
    lineage = report.get("lineage") or {}
    if lineage:
        lines.append(
            f"  made {lineage.get('created', '?')} by dstab {lineage.get('dstab_version', '?')} "
            f"from {lineage.get('input') or lineage.get('params')} onto {lineage.get('reference')}"
        )
    if "drift_vs_reference" in report:
        d = report["drift_vs_reference"]
        lines.append(
            f"  drift vs {report['reference_checked']}: items {num(d['items'])}  users {num(d['users'])}  "
            f"total {num(d['total'])}"
        )
    if "drift_vs_base" in report:
        d, c = report["drift_vs_base"], report["chain_to_base"]
        lines.append(
            f"  accumulated drift since {report['base_checked']}: items {num(d['items'])}  users {num(d['users'])}  "
            f"total {num(d['total'])} (measured now, over the ids both hold)"
        )
        if c["base_in_chain"]:
            lines.append(
                f"  over {len(c['steps'])} steps of stabilization; step drifts after alignment: "
                + ", ".join(num(s["drift_after"]) for s in reversed(c["steps"]))
                + f" (sum {num(c['sum_of_step_drift_after'])})"
            )
        else:
            lines.append("  (the base is not in this version's chain of references; see `dstab log`)")
    return "\n".join(lines)
