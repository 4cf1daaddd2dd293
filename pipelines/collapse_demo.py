"""Dimension collapse, seen and handled: the two-field model of docs/design.md with a 2-valued field.

    python pipelines/collapse_demo.py [--dir DIR] [--n-a 2000] [--d 16] [--steps 2000] [--plot spectra.png]

Trains field A (n_a values, as users) against field B (n_b = 2 values, as items)
with BCE and L2, once with lambda > 0 and once with lambda = 0, on the same
labels; prints V_A's spectrum over training, so that only the first collapses
to rank 2. Then trains a second "retrain" of each (another seed), writes all
four as versions, runs `dstab diagnose` on them, and stabilizes each retrain
onto the first: scores kept, the collapsed dimensions dropped by the rank step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import dask
import numpy as np

import dstab
from dstab.diagnose import diagnose

if __package__:  # imported as pipelines.collapse_demo (tests)
    from .collapse_model import make_dataset, train
else:  # run as `python pipelines/collapse_demo.py`: this folder is first on sys.path
    from collapse_model import make_dataset, train  # type: ignore[import-not-found,no-redef]

LAMBDAS = (1e-3, 0.0)


def run(directory: Path, *, n_a: int, n_b: int, d: int, steps: int, plot: Path | None) -> dict:
    data = make_dataset(n_a, n_b, seed=0)
    summary: dict = {}
    histories = {}
    for lam in LAMBDAS:
        print(f"\nlambda = {lam:g}: V_A ({n_a} x {d}) while training, full-batch gradient descent")
        print(f"  {'step':>6} {'loss':>8} {'num. rank':>9} {'eff. rank':>9}  top singular values")
        models = [train(data, d=d, lam=lam, steps=steps, seed=seed, record_every=max(1, steps // 8)) for seed in (1, 2)]
        histories[lam] = models[0].history
        for h in models[0].history:
            top = ", ".join(f"{v:.3g}" for v in h.singular_values_a[:4])
            print(f"  {h.step:>6} {h.loss:8.4f} {h.numerical_rank_a:>9} {h.effective_rank_a:9.2f}  {top}")
        versions = [m.write_version(directory / f"lambda-{lam:g}" / f"seed-{i}", overwrite=True) for i, m in enumerate(models, 1)]
        diag = diagnose(versions[0])
        users = diag["users"]
        print(f"  dstab diagnose: users (field A) numerical rank {users['numerical_rank']} of {users['dim']}, "
              f"effective rank {users['effective_rank']:.2f}, collapsed {users['collapsed']}; "
              f"interaction rank {diag['interaction']['numerical_rank']}")  # fmt: skip
        first = dstab.stabilize(versions[0]).to_zarr(directory / f"lambda-{lam:g}" / "seed-1-stable", overwrite=True)
        result = dstab.stabilize(versions[1], first)
        result.to_zarr(directory / f"lambda-{lam:g}" / "seed-2-stable", overwrite=True)
        r = result.report
        print(f"  stabilized the seed-2 retrain onto seed 1: width {r['dim_in']} -> {r['dim_out']} (rank {r['rank']}), "
              f"drift {r['drift_before']:.3g} -> {r['drift_after']:.3g}, score error {r['score_error']:.2e}")  # fmt: skip
        summary[lam] = {"numerical_rank_a": users["numerical_rank"], "collapsed": users["collapsed"], **r}
    if plot is not None:
        _plot(histories, plot)
        print(f"\nspectra over training: {plot}")
    return summary


def _plot(histories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for ax, (lam, history) in zip(axes[0], histories.items()):
        for h in history:
            sv = np.maximum(np.asarray(h.singular_values_a), 1e-12)
            ax.semilogy(np.arange(1, len(sv) + 1), sv, marker=".", label=f"step {h.step}")
        ax.set_title(f"V_A spectrum over training, lambda = {lam:g}")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to write the versions (default: a temporary directory)")
    parser.add_argument("--n-a", type=int, default=2000)
    parser.add_argument("--n-b", type=int, default=2)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--plot", type=Path, help="write V_A's spectra over training as a PNG")
    args = parser.parse_args(argv)
    tmp = None if args.dir else tempfile.mkdtemp(prefix="dstab-collapse-")
    directory = args.dir or Path(tmp)  # type: ignore[arg-type]
    try:
        with dask.config.set(scheduler="threads"):  # small tables: no cluster needed
            summary = run(directory, n_a=args.n_a, n_b=args.n_b, d=args.d, steps=args.steps, plot=args.plot)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    collapsed = [lam for lam, s in summary.items() if s["collapsed"]]
    print(f"\ncollapsed: lambda = {', '.join(f'{lam:g}' for lam in collapsed) or 'none'}; "
          + "; ".join(f"lambda = {lam:g}: rank of V_A {s['numerical_rank_a']}" for lam, s in summary.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
