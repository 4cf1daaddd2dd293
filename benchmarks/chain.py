"""Long chains on real retrains: dstab's nightly job under the three policies, against an exact in-memory reference.

    python benchmarks/chain.py [--days 15] [--factors 64] [--seed0 0] [--dir DIR]
                               [--json benchmarks/results/chain.json] [--plot benchmarks/results/chain.png]
    python benchmarks/chain.py --quick     # smoke: 5 synthetic retrains (dstab synth --like), no extra packages

The retrains (``chain_data.retrains``): implicit's ALS on MovieLens 100K as shipped inside RecBole's wheel,
one seed a day, the same data every day (the `bench` extra, plus ``pip install --no-deps recbole==1.2.1``;
nothing is downloaded). Each day is written as a raw version ``DIR/raw/<date>`` (users and items with the
dataset's int64 ids), then for each policy ``dstab nightly DIR --stable DIR/stable-POLICY --policy POLICY``
stabilizes the chain (in-process, threaded scheduler), and ``dstab report LAST --chain`` measures every
day against day 0 and against the day before (mean row cosine over every common row: dstab.pair-rows is
raised above the tables' sizes; relative Frobenius drift; eigenspace overlap). The same chain is computed
exactly in memory by ``chain_policies.run_chain`` (numpy, float64) and printed beside it.

Acceptance (the issue): with the mix policy, the cosine to day 0 at the end of the chain and the mean
cosine to the day before must each be within 0.02 of the better of the two pure policies. Exit 1 if not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chain_data, chain_policies beside this file

import dstab  # noqa: E402
from dstab.chain import chain_report  # noqa: E402
from dstab.cli import main as dstab_main  # noqa: E402

POLICIES = ("previous", "base", "mix")
TOLERANCE = 0.02
FIRST_DAY = date(2026, 11, 1)


def day_name(i: int) -> str:
    return (FIRST_DAY + timedelta(days=i)).isoformat()


def write_raw(
    directory: Path, users: np.ndarray, items: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray
) -> None:
    """One raw version: users and items with their ids, written with plain zarr (as a training job would)."""
    group = zarr.open_group(str(directory), mode="w")
    for name, vectors, ids in (("users", users, user_ids), ("items", items, item_ids)):
        group.create_array(
            f"{name}/vectors", data=np.ascontiguousarray(vectors, dtype=np.float32), chunks=(512, vectors.shape[1])
        )
        group.create_array(f"{name}/ids", data=np.asarray(ids, dtype=np.int64), chunks=(512,))


def synthetic_retrains(
    directory: Path, days: int, dim: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """The smoke run's retrains: ``dstab synth``, and ``--like`` retrains of it with 5% noise, each of the first (the
    same model, another seed: as the real retrains are), users 300, items 500."""
    from dstab.synth import synth, synth_like

    first = directory / "synth-0"
    with dask.config.set(scheduler="threads"):
        synth(first, items=500, users=300, dim=dim, seed=1)
        for i in range(1, days):
            synth_like(directory / f"synth-{i}", dstab.open_version(first), noise=0.05, seed=i + 1)
    users, items = [], []
    for i in range(days):
        v = dstab.open_version(directory / f"synth-{i}")
        users.append(np.asarray(v.table("users").vectors[:]))
        items.append(np.asarray(v.table("items").vectors[:]))
    return users, items, np.arange(300, dtype=np.int64), np.arange(500, dtype=np.int64)


def dstab_chain(source: Path, policy: str, days: int) -> tuple[dict[str, Any], float]:
    """Run the nightly job under ``policy``, then measure the chain; the chain report and the job's seconds."""
    stable = source / f"stable-{policy}"
    started = time.perf_counter()
    code = dstab_main(
        ["nightly", str(source), "--stable", str(stable), "--policy", policy, "--scheduler", "threads", "-q"]
    )
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"dstab nightly --policy {policy} exited {code}")
    with dask.config.set({"dstab.pair-rows": 1 << 20, "scheduler": "threads"}):  # every common row in the cosines
        report = chain_report(dstab.open_version(stable / day_name(days - 1)))
    return report, seconds


def curves(report: dict[str, Any]) -> dict[str, list[float]]:
    """Per day (day 0 first): cosine and drift to day 0 and to the day before, and the overlap with the day before."""
    steps = report["steps"]
    return {
        "cos_base": [1.0] + [s["to_base"]["mean_cosine"] for s in steps],
        "cos_prev": [1.0] + [s["to_previous"]["mean_cosine"] for s in steps],
        "drift_base": [0.0] + [s["to_base"]["drift"] for s in steps],
        "drift_prev": [0.0] + [s["to_previous"]["drift"] for s in steps],
        "overlap_prev": [1.0] + [s["to_previous"]["eigenspace_overlap"] for s in steps],
    }


def summary(c: dict[str, list[float]]) -> dict[str, float]:
    return {
        "cos_base_end": c["cos_base"][-1],
        "cos_prev_mean": float(np.mean(c["cos_prev"][1:])),
        "drift_base_end": c["drift_base"][-1],
        "drift_prev_mean": float(np.mean(c["drift_prev"][1:])),
    }


def acceptance(summaries: dict[str, dict[str, float]]) -> dict[str, Any]:
    best_base = max(summaries["previous"]["cos_base_end"], summaries["base"]["cos_base_end"])
    best_prev = max(summaries["previous"]["cos_prev_mean"], summaries["base"]["cos_prev_mean"])
    gap_base = best_base - summaries["mix"]["cos_base_end"]
    gap_prev = best_prev - summaries["mix"]["cos_prev_mean"]
    return {"gap_cos_base_end": gap_base, "gap_cos_prev_mean": gap_prev,
            "passes": bool(gap_base <= TOLERANCE and gap_prev <= TOLERANCE)}  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    from dstab.plots import _figure, save_figure

    fig = _figure(14, 5.8)
    axes = fig.subplots(1, 2)
    colors = {"previous": "C1", "base": "C0", "mix": "C2"}
    for ax, key, title, first in (
        (axes[0], "cos_base", "mean row cosine to day 0", 0),
        (axes[1], "cos_prev", "mean row cosine to the day before", 1),  # day 0 has no day before
    ):
        for policy in POLICIES:
            c = results["dstab"][policy]["curves"][key][first:]
            label = policy + (f" ({results['previous_weight']:g} x the day before)" if policy == "mix" else "")
            days = range(first, first + len(c))
            ax.plot(days, c, marker="o", markersize=4, color=colors[policy], label=f"dstab nightly --policy {label}")
            exact = results["exact"][policy][key][first:]
            ax.plot(days, exact, linestyle=":", linewidth=2.5, color=colors[policy],
                    label=f"exact in-memory reference, {policy}")  # fmt: skip
        ax.set_xlabel("day (retrain)")
        ax.set_ylabel("mean row cosine (users and items, every common row)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(f"{results['days']} retrains: {results['data_words']}", fontsize=11)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="where the versions go (default: a temporary directory)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quick", action="store_true", help="5 synthetic retrains: a smoke run with no extra package")
    args = parser.parse_args(argv)
    from chain_policies import Side, Version, run_chain  # noqa: F401  # beside this file

    with tempfile.TemporaryDirectory() as tmp:
        source = args.dir or Path(tmp)
        started = time.perf_counter()
        if args.quick:
            days = 5
            users, items, user_ids, item_ids = synthetic_retrains(source / "synthetic", days, 8)
            words = "synthetic (dstab synth --like, 5% noise)"
        else:
            from chain_data import dataset_path, retrains

            days = args.days
            users, items, user_ids, item_ids = retrains(days, args.factors, args.seed0)
            words = (
                f"implicit ALS, {args.factors} factors, on MovieLens 100K ({dataset_path().name}), seeds {args.seed0}.."
            )
        trained = time.perf_counter() - started
        for i in range(days):
            write_raw(source / "raw" / day_name(i), users[i], items[i], user_ids, item_ids)
        results: dict[str, Any] = {"days": days, "data_words": words, "train_seconds": trained,
                                   "previous_weight": dstab.nightly.DEFAULT_PREVIOUS_WEIGHT, "dstab": {}, "exact": {}}  # fmt: skip
        for policy in POLICIES:
            report, seconds = dstab_chain(source, policy, days)
            c = curves(report)
            results["dstab"][policy] = {"curves": c, "summary": summary(c), "nightly_seconds": seconds}
            exact = run_chain(policy, users, items, user_ids, item_ids, dstab.nightly.DEFAULT_PREVIOUS_WEIGHT)
            results["exact"][policy] = {"cos_base": exact.cos_base, "cos_prev": exact.cos_prev,
                                        "drift_base": exact.drift_base, "drift_prev": exact.drift_prev,
                                        "summary": summary({"cos_base": exact.cos_base, "cos_prev": exact.cos_prev,
                                                            "drift_base": exact.drift_base, "drift_prev": exact.drift_prev})}  # fmt: skip
        verdict = acceptance({p: results["dstab"][p]["summary"] for p in POLICIES})
        results["acceptance"] = verdict

        print(f"{days} retrains ({days - 1} steps): {words}; trained in {trained:.1f} s")
        print(f"{'policy':<10} {'cos day0 @end':>14} {'(exact)':>8} {'mean cos prev':>14} {'(exact)':>8} "
              f"{'drift day0 @end':>16} {'mean drift prev':>16} {'nightly s':>10}")  # fmt: skip
        for policy in POLICIES:
            s, e = results["dstab"][policy]["summary"], results["exact"][policy]["summary"]
            print(f"{policy:<10} {s['cos_base_end']:14.4f} {e['cos_base_end']:8.4f} {s['cos_prev_mean']:14.4f} "
                  f"{e['cos_prev_mean']:8.4f} {s['drift_base_end']:16.4f} {s['drift_prev_mean']:16.4f} "
                  f"{results['dstab'][policy]['nightly_seconds']:10.1f}")  # fmt: skip
        print(f"mix vs the better pure policy: cosine to day 0 at the end -{verdict['gap_cos_base_end']:.4f}, "
              f"mean step cosine -{verdict['gap_cos_prev_mean']:.4f} (limit {TOLERANCE}): "
              f"{'PASS' if verdict['passes'] else 'FAIL'}")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if args.plot:
            plot(results, args.plot)
    return 0 if verdict["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
