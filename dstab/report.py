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
from .lineage import KIND_WORDS, chain, made_words, origin_words
from .stats import check_finite, pass_statistics, side_statistics
from .store import SIDES, Version, canonical_url

REPORT_KEYS = (
    "rank", "dim_in", "dim_out", "n_items", "n_users", "dtype", "singular_values",
    "score_error", "drift_before", "drift_after",
)  # fmt: skip


NEIGHBOURS_K = 10
QUERY_ROWS = 1000


def mean_row_cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    """Mean cosine between paired rows (widths zero-padded: the dot runs over the common columns)."""
    if len(x) == 0:
        return None
    w = min(x.shape[1], y.shape[1])
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    dots = np.einsum("ij,ij->i", x64[:, :w], y64[:, :w])
    norms = np.linalg.norm(x64, axis=1) * np.linalg.norm(y64, axis=1)
    return float(np.mean(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)))


def paired_score_error(items: tuple[np.ndarray, np.ndarray], users: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Relative Frobenius difference of the scores of sampled user x item pairs between two versions."""
    (t_new, t_ref), (w_new, w_ref) = items, users
    if min(len(t_new), len(w_new)) == 0:
        return None
    s_new = w_new.astype(np.float64) @ t_new.astype(np.float64).T
    s_ref = w_ref.astype(np.float64) @ t_ref.astype(np.float64).T
    scale = np.linalg.norm(s_ref)
    return float(np.linalg.norm(s_new - s_ref) / scale) if scale > 0 else None


def measure_drift(
    version: Version,
    reference: Version,
    *,
    k: int = NEIGHBOURS_K,
    queries: int = QUERY_ROWS,
    progress: bool = False,
) -> dict[str, Any]:
    """How far ``version`` is from ``reference``, over the rows both hold (paired as in :func:`dstab.stabilize`).

    Per side: ``frobenius`` (relative, every common row; widths zero-padded),
    ``mean_cosine`` (over a random sample of up to 1,024 common rows),
    ``neighbour_overlap`` (the share of each of ``queries`` sampled rows' ``k``
    nearest rows by cosine, in the whole table, that are the same in both
    versions; one more pass over both tables, ``k=0`` skips it); and
    ``total`` (Frobenius over both sides) and ``score_error`` (relative change
    of the scores of sampled users x sampled items).
    """
    from .neighbours import neighbour_sets, overlap

    results = pass_statistics(version, reference, SIDES, progress=progress)
    out: dict[str, Any] = {"k": k}
    total = scale = 0.0
    searched, groups, keys = [], [], []
    for side in SIDES:
        s = results[side]
        d = linalg.identity_drift(s.gram_of_anchors, s.cross, s.ref_sumsq)
        pairs = s.pairs
        out[side] = {
            "frobenius": float(np.sqrt(d / s.ref_sumsq)) if s.ref_sumsq > 0 else None,
            "mean_cosine": mean_row_cosine(pairs.new, pairs.ref) if pairs is not None else None,
            "pairs": 0 if pairs is None else len(pairs.keys),
            "neighbour_overlap": None,
            "queries": 0,
        }
        total, scale = total + d, scale + s.ref_sumsq
        if k > 0 and pairs is not None and len(pairs.keys):
            q = slice(0, queries)
            searched.append(side)
            groups.append([(version.table(side), pairs.new[q], None), (reference.table(side), pairs.ref[q], None)])
            keys.append(pairs.keys[q])
    out["total"] = float(np.sqrt(total / scale)) if scale > 0 else None
    pi, pu = results["items"].pairs, results["users"].pairs
    out["score_error"] = paired_score_error((pi.new, pi.ref), (pu.new, pu.ref)) if pi is not None and pu is not None else None
    for side, side_keys, (here, there) in zip(searched, keys, neighbour_sets(groups, keys, k, progress=progress)):
        out[side]["neighbour_overlap"] = overlap(here, there, k)
        out[side]["queries"] = len(side_keys)
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
        items_stats, users_stats = compute(*graphs, progress=progress, stage="statistics pass")
        for side, s in zip(SIDES, (items_stats, users_stats)):
            check_finite(f"{side}/vectors", s, version.table(side))
        rtol = linalg.default_rtol(version.dtype, version.dim)
        sv = linalg.core_svd(linalg.gram_factor(items_stats.gram), linalg.gram_factor(users_stats.gram))[1]
        report.update(singular_values=sv.tolist(), rank=linalg.choose_rank(sv, "auto", rtol), rtol=rtol)
    report["lineage"] = {
        key: attrs.get(key) for key in ("input", "reference", "created", "dstab_version", "params", "sources") if key in attrs
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


def _drift_lines(title: str, d: dict[str, Any]) -> list[str]:
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = [f"  {title}: relative Frobenius {num(d['total'])}, score error {num(d['score_error'])}"]
    for side in SIDES:
        m = d[side]
        lines.append(
            f"    {side}: Frobenius {num(m['frobenius'])}, mean row cosine {num(m['mean_cosine'])} ({m['pairs']} rows), "
            f"neighbour overlap@{d['k']} {num(m['neighbour_overlap'])} ({m['queries']} queries)"
        )
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
            f"  items {report['n_items']:,}  users {report['n_users']:,}  width {report['dim_in']} -> {report['dim_out']}",
            f"  rank kept {report.get('rank')} of {len(sv)}; top singular values {top}",
            f"  score error {num(report.get('score_error'))} (relative Frobenius, sampled rows of every block x sampled rows)",
        ]
        if report.get("drift_before") is None:
            lines.append("  no drift recorded: stabilized without a reference")
        else:
            lines.append(f"  drift onto the reference: before {num(report.get('drift_before'))}  after {num(report.get('drift_after'))}")
    else:
        rtol = report.get("rtol")
        above = f" (singular values above {rtol:.2g} x the largest)" if rtol is not None else ""
        lines += [
            f"  items {report['n_items']:,}  users {report['n_users']:,}  width {report['dim_in']}",
            f"  spectrum measured now: rank {report.get('rank')} of {len(sv)}{above}; top singular values {top}",
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
                f"  over {len(c['steps'])} steps of stabilization; step drifts after alignment: "
                + ", ".join(num(s["drift_after"]) for s in reversed(c["steps"]))
                + f" (sum {num(c['sum_of_step_drift_after'])})"
            )
        else:
            lines.append("  (the base is not in this version's chain of references; see `dstab log`)")
    return "\n".join(lines)
