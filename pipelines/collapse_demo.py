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
from typing import Any

import dask
import numpy as np

import dstab
from dstab.diagnose import diagnose
from dstab.extras import require

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
        versions = [
            m.write_version(directory / f"lambda-{lam:g}" / f"seed-{i}", overwrite=True)
            for i, m in enumerate(models, 1)
        ]
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


def collapse_figure(histories: dict) -> Any:
    """V_A's singular values at each recorded step, one panel per lambda (a matplotlib Figure).

    The steps share one legend, outside the axes to their right, so it never covers the fall of the
    singular values past the second (the collapse this picture is about); early steps are pale, late dark.
    """
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(histories) + 1.8, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(histories), squeeze=False, sharey=True)[0]
    for ax, (lam, history) in zip(axes, histories.items()):
        shades = np.linspace(0.15, 0.95, len(history))
        for h, shade in zip(history, shades):
            sv = np.maximum(np.asarray(h.singular_values_a), 1e-12)  # exact zeros would leave the log scale
            ax.semilogy(np.arange(1, len(sv) + 1), sv, marker=".", color=_viridis(shade), label=f"step {h.step}")
        ax.set_title(f"V_A spectrum over training, lambda = {lam:g}", fontsize=11)
        ax.set_xlabel("singular value index i (largest first)", fontsize=10)
        ax.set_ylabel("singular value σᵢ of V_A (log scale)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside right center", title="training step", fontsize=9, title_fontsize=10, frameon=False
    )
    return fig


def _viridis(shade: float) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis_r"](shade)


def _plot(histories: dict, path: Path) -> None:
    collapse_figure(histories).savefig(path, dpi=100)


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
