"""Three alignment policies for a long chain of retrains, computed exactly in memory (numpy reference).

    python benchmarks/chain_policies.py [--days 15] [--factors 64] [--seeds0 0] [--json PATH]

A two-sided model (users x items, scores ``U @ I.T``) is retrained every day (``chain_data.retrains``:
implicit ALS on MovieLens 100K, one seed a day). Each day's raw version is balanced and then turned by
one orthogonal matrix onto a target, following dstab's maths:

- balancing: ``G_u = U^T U = R_u^T R_u``, ``G_i = I^T I = R_i^T R_i`` (Cholesky, upper); the SVD
  ``R_u R_i^T = A diag(s) B^T`` gives ``T_u = R_u^-1 A diag(s)^1/2`` and ``T_i = R_i^-1 B diag(s)^1/2``, so
  ``(U T_u)(I T_i)^T = U I^T`` and both sides have Gram ``diag(s)``;
- alignment: one orthogonal ``Q`` for both sides (the scores stay), the orthogonal Procrustes solution
  maximizing ``tr(Q^T M)``, ``M = sum_r w_r sum_side (X T)^T Y_r`` over the rows matched by id with
  reference ``r`` (so for several references the target is the weighted sum of their matched rows).

Day 0 is balanced only (each column's sign fixed so that its largest user entry is positive). Day d:
``previous`` aligns onto day d-1 stabilized, ``base`` onto day 0 stabilized, ``mix(w)`` onto
``w * previous + (1 - w) * base``. Per day, pooled over users and items: the mean row cosine and the
relative Frobenius drift of day d stabilized against day 0 stabilized and against day d-1 stabilized.
The issue's acceptance: with mix, both "cosine to day 0 after the chain" and "mean cosine to the day
before" within 0.02 of the better of the two pure policies. The computation runs in float64 on the
float32 factors, and checks that the scores are kept and every Q is orthogonal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOLERANCE = 0.02  # the acceptance margin on both measures
MIX_WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)  # w_prev; w_base = 1 - w_prev


@dataclass
class Side:
    """One side of a stabilized version: rows in the order of ``ids``."""

    vectors: np.ndarray
    ids: np.ndarray


@dataclass
class Version:
    users: Side
    items: Side


@dataclass
class ChainResult:
    """Per-day measures of one policy over one chain (index 0 = day 0)."""

    policy: str
    cos_base: list[float] = field(default_factory=list)
    cos_prev: list[float] = field(default_factory=list)
    drift_base: list[float] = field(default_factory=list)
    drift_prev: list[float] = field(default_factory=list)
    score_error: float = 0.0  # max over days of max|U'I'^T - UI^T| / max|UI^T|
    orth_error: float = 0.0  # max over days of max|Q^T Q - 1|

    def summary(self) -> dict[str, float]:
        return {
            "cos_base_last": self.cos_base[-1],
            "cos_prev_mean": float(np.mean(self.cos_prev[1:])),
            "drift_base_last": self.drift_base[-1],
            "drift_prev_mean": float(np.mean(self.drift_prev[1:])),
        }


def _upper_cholesky(gram: np.ndarray) -> np.ndarray:
    """``R`` upper triangular with ``gram = R^T R``."""
    return np.linalg.cholesky(gram).T


def balance(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(T_u, T_i, s)``: canonical transforms keeping ``U I^T``; both sides get Gram ``diag(s)``."""
    r_u = _upper_cholesky(users.T @ users)
    r_i = _upper_cholesky(items.T @ items)
    a, s, b_t = np.linalg.svd(r_u @ r_i.T)
    root = np.sqrt(s)
    # R^-1 X by triangular solves (R is well conditioned here; solve keeps it exact to rounding).
    t_u = np.linalg.solve(r_u, a * root)
    t_i = np.linalg.solve(r_i, b_t.T * root)
    return t_u, t_i, s


def _matched(ids: np.ndarray, ref_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the ids both tables hold: ``(rows in ids, rows in ref_ids)``."""
    _, rows, ref_rows = np.intersect1d(ids, ref_ids, assume_unique=True, return_indices=True)
    return rows, ref_rows


def procrustes(m: np.ndarray) -> np.ndarray:
    """The orthogonal ``Q`` maximizing ``tr(Q^T M)``: ``Q = P V^T`` for ``M = P S V^T``."""
    p, _, v_t = np.linalg.svd(m)
    return p @ v_t


def cross_gram(balanced: Version, refs: list[tuple[float, Version]]) -> np.ndarray:
    """``M = sum_r w_r sum_side X_side^T Y_r,side`` over the rows matched by id."""
    e = balanced.users.vectors.shape[1]
    m = np.zeros((e, e))
    for weight, ref in refs:
        for side, ref_side in ((balanced.users, ref.users), (balanced.items, ref.items)):
            rows, ref_rows = _matched(side.ids, ref_side.ids)
            m += weight * (side.vectors[rows].T @ ref_side.vectors[ref_rows])
    return m


def _fix_signs(version: Version) -> Version:
    """Day 0: flip each column (both sides alike, so scores stay) so its largest |user entry| is > 0."""
    u = version.users.vectors
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return Version(Side(u * signs, version.users.ids), Side(version.items.vectors * signs, version.items.ids))


def stabilize(
    users: np.ndarray,
    items: np.ndarray,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    refs: list[tuple[float, Version]],
) -> tuple[Version, np.ndarray]:
    """Balance one raw version and turn it onto the weighted references; returns ``(version, Q)``."""
    u = users.astype(np.float64)
    i = items.astype(np.float64)
    t_u, t_i, _ = balance(u, i)
    balanced = Version(Side(u @ t_u, user_ids), Side(i @ t_i, item_ids))
    if not refs:
        return _fix_signs(balanced), np.eye(u.shape[1])
    q = procrustes(cross_gram(balanced, refs))
    return Version(Side(balanced.users.vectors @ q, user_ids), Side(balanced.items.vectors @ q, item_ids)), q


def _pooled(a: Version, b: Version) -> tuple[np.ndarray, np.ndarray]:
    """Users and items of ``a`` and ``b`` stacked, rows matched by id."""
    xs, ys = [], []
    for side_a, side_b in ((a.users, b.users), (a.items, b.items)):
        rows, ref_rows = _matched(side_a.ids, side_b.ids)
        xs.append(side_a.vectors[rows])
        ys.append(side_b.vectors[ref_rows])
    return np.concatenate(xs), np.concatenate(ys)


def mean_cosine(a: Version, b: Version) -> float:
    x, y = _pooled(a, b)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(np.sum(x * y, axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)))


def relative_drift(a: Version, b: Version) -> float:
    """``||a - b||_F / ||b||_F`` over the matched rows of both sides."""
    x, y = _pooled(a, b)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def run_chain(
    policy: str,
    users: list[np.ndarray],
    items: list[np.ndarray],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    w_prev: float = 0.5,
) -> ChainResult:
    """Stabilize the chain under ``policy`` (``previous``, ``base`` or ``mix``) and measure every day."""
    name = f"mix({w_prev:g})" if policy == "mix" else policy
    result = ChainResult(name)
    chain: list[Version] = []
    for day, (u, i) in enumerate(zip(users, items, strict=True)):
        refs: list[tuple[float, Version]] = []
        if day > 0:
            refs = {
                "previous": [(1.0, chain[-1])],
                "base": [(1.0, chain[0])],
                "mix": [(w_prev, chain[-1]), (1.0 - w_prev, chain[0])],
            }[policy]
        version, q = stabilize(u, i, user_ids, item_ids, refs)
        chain.append(version)
        # Checks: the scores of the raw factors are kept, Q is orthogonal.
        raw = u.astype(np.float64) @ i.astype(np.float64).T
        kept = version.users.vectors @ version.items.vectors.T
        result.score_error = max(result.score_error, float(np.abs(kept - raw).max() / np.abs(raw).max()))
        result.orth_error = max(result.orth_error, float(np.abs(q.T @ q - np.eye(q.shape[0])).max()))
        result.cos_base.append(mean_cosine(version, chain[0]))
        result.drift_base.append(relative_drift(version, chain[0]))
        previous = chain[-2] if day > 0 else version
        result.cos_prev.append(mean_cosine(version, previous))
        result.drift_prev.append(relative_drift(version, previous))
    return result


def policies(
    users: list[np.ndarray], items: list[np.ndarray], user_ids: np.ndarray, item_ids: np.ndarray
) -> list[ChainResult]:
    """``previous``, ``base`` and ``mix`` at every weight of ``MIX_WEIGHTS`` over one chain."""
    results = [run_chain(p, users, items, user_ids, item_ids) for p in ("previous", "base")]
    results += [run_chain("mix", users, items, user_ids, item_ids, w) for w in MIX_WEIGHTS]
    return results


def acceptance(results: list[ChainResult]) -> dict[str, dict[str, float | bool]]:
    """Per mix policy: its shortfall on each measure against the better pure policy, and pass / fail."""
    pure = {r.policy: r.summary() for r in results if not r.policy.startswith("mix")}
    best_base = max(s["cos_base_last"] for s in pure.values())
    best_prev = max(s["cos_prev_mean"] for s in pure.values())
    verdict: dict[str, dict[str, float | bool]] = {}
    for r in results:
        if r.policy.startswith("mix"):
            s = r.summary()
            gap_base = best_base - s["cos_base_last"]
            gap_prev = best_prev - s["cos_prev_mean"]
            verdict[r.policy] = {
                "gap_cos_base": gap_base,
                "gap_cos_prev": gap_prev,
                "worst_gap": max(gap_base, gap_prev),
                "passes": bool(gap_base <= TOLERANCE and gap_prev <= TOLERANCE),
            }
    return verdict


def _table(results: list[ChainResult], steps: int) -> str:
    verdict = acceptance(results)
    lines = [
        f"{'policy':<10} {'cos day0 @' + str(steps):>13} {'mean cos prev':>14} {'drift day0':>11} "
        f"{'mean drift prev':>16} {'gap0':>7} {'gapP':>7} {'pass':>5} {'score err':>10} {'Q err':>8}"
    ]
    for r in results:
        s = r.summary()
        v = verdict.get(r.policy)
        tail = f"{v['gap_cos_base']:7.4f} {v['gap_cos_prev']:7.4f} {str(v['passes']):>5}" if v else " " * 21
        lines.append(
            f"{r.policy:<10} {s['cos_base_last']:13.4f} {s['cos_prev_mean']:14.4f} {s['drift_base_last']:11.4f} "
            f"{s['drift_prev_mean']:16.4f} {tail} {r.score_error:10.1e} {r.orth_error:8.1e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from chain_data import dataset_path, retrains  # beside this file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--seeds0", type=int, nargs="+", default=[0], help="one chain per first seed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, object] = {"data": str(dataset_path()), "days": args.days, "factors": args.factors}
    chains = []
    for seed0 in args.seeds0:
        start = time.perf_counter()
        users, items, user_ids, item_ids = retrains(args.days, args.factors, seed0, args.iterations)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        results = policies(users, items, user_ids, item_ids)
        aligned = time.perf_counter() - start
        print(
            f"\nchain seeds {seed0}..{seed0 + args.days - 1}: {args.days} retrains {trained:.2f} s, "
            f"{len(results)} policies {aligned:.2f} s ({user_ids.size} users, {item_ids.size} items)"
        )
        print(_table(results, args.days - 1))
        chains.append(
            {
                "seed0": seed0,
                "train_s": trained,
                "policies": {
                    r.policy: {
                        **r.summary(),
                        "cos_base": r.cos_base,
                        "cos_prev": r.cos_prev,
                        "drift_base": r.drift_base,
                        "drift_prev": r.drift_prev,
                        "score_error": r.score_error,
                        "orth_error": r.orth_error,
                    }
                    for r in results
                },
                "acceptance": acceptance(results),
            }
        )
    report["chains"] = chains
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
