"""What the plots show, read from matplotlib's object model (not pixels): labelled axes, readable notes
that cover no bar, legends that cover no data, and report's own measurement drawn.

The figures are built from real runs (synthetic versions written to Zarr, stabilized, reported), for the
model shapes dstab knows: two tables, three tables two-sided, one table symmetric, five tables.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import dask
import matplotlib.image
import numpy as np
import pytest
from matplotlib.transforms import Bbox

import dstab
from dstab.diagnose import diagnose
from dstab.errors import MissingExtraError
from dstab.plots import DPI, NOTE_GID, diagnosis_figure, plot_report, report_figure
from dstab.report import describe
from dstab.store import open_version
from dstab.synth import synth_like, synth_tables

MODELS: dict[str, dict[str, Any]] = {
    "two-tables": {"tables": {"users": 300, "items": 500}},
    "three-two-sided": {"tables": {"users": 300, "items": 500, "creators": 120}, "structure": "users:items,creators"},
    "one-symmetric": {"tables": {"nodes": 400}},
    "five-tables": {
        "tables": {
            "users": 300,
            "tags": 80,
            "items": 500,
            "creators": 120,
            "a_rather_long_table_name_of_some_model": 150,
        },
        "structure": "users,tags:items,creators,a_rather_long_table_name_of_some_model",
    },
}
DIM = 8


@pytest.fixture(scope="module", params=list(MODELS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """day1 stabilized alone, day2 (a noisy retrain) stabilized onto it WITHOUT --neighbours, and
    ``report day2-stable --reference day1-stable``, which measures neighbour overlap itself."""
    root = tmp_path_factory.mktemp(request.param)
    spec = MODELS[request.param]
    with dask.config.set(scheduler="synchronous"):
        day1 = synth_tables(
            root / "day1", spec["tables"], dim=DIM, structure=spec.get("structure"), seed=1, chunk_rows=128
        )
        day2 = synth_like(root / "day2", day1, noise=0.05, seed=2)
        stable1 = dstab.stabilize(day1).to_zarr(root / "day1-stable")
        dstab.stabilize(day2, stable1).to_zarr(root / "day2-stable")
        report = describe(open_version(str(root / "day2-stable")), open_version(str(root / "day1-stable")))
        diagnosis = diagnose(open_version(str(root / "day2")))
    return {"root": root, "report": report, "diagnosis": diagnosis, "tables": list(spec["tables"])}


def renderer(fig: Any) -> Any:
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def bars(ax: Any) -> list[Any]:
    return [p for p in ax.patches if type(p).__name__ == "Rectangle"]


def notes(fig: Any) -> list[Any]:
    return [t for t in fig.findobj(lambda a: a.get_gid() == NOTE_GID) if t.get_visible() and t.get_text()]


def overlaps(a: Any, b: Any) -> bool:
    """Whether two display boxes share area (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def panel(fig: Any, words: str) -> Any:
    found = [ax for ax in fig.axes if words in ax.get_ylabel()]
    assert len(found) == 1, [ax.get_ylabel() for ax in fig.axes]
    return found[0]


def check_readable(fig: Any) -> None:
    """Every axis labelled, log scales said so, notes >= 9 pt clear of every bar and of each other,
    legends clear of every axes (so of every curve and bar)."""
    r = renderer(fig)
    assert fig.axes
    for ax in fig.axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), ax.get_title()
        if ax.get_yscale() == "log":
            assert "log scale" in ax.get_ylabel(), ax.get_ylabel()
    all_bars = []  # what shows of each bar: its box clipped to its axes (a log axis clips bars from 0)
    for ax in fig.axes:
        frame = ax.get_window_extent(r)
        all_bars += [Bbox.intersection(b.get_window_extent(r), frame) for b in bars(ax) if b.get_height()]
    all_bars = [b for b in all_bars if b is not None]
    boxes = [n.get_window_extent(r) for n in notes(fig)]
    for n, box in zip(notes(fig), boxes):
        assert n.get_fontsize() >= 9
        assert not any(overlaps(box, b) for b in all_bars), n.get_text()
        ax_box = n.axes.get_window_extent(r)
        assert ax_box.y0 <= box.y0 and box.y1 <= ax_box.y1 + 0.5, f"note {n.get_text()} leaves its axes"
    for i, a in enumerate(boxes):
        assert not any(overlaps(a, b) for b in boxes[i + 1 :]), "two notes overlap"
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    legends += [leg for sub in fig.subfigs for leg in sub.legends]
    for legend in legends:
        box = legend.get_window_extent(r)
        for ax in fig.axes:
            assert not overlaps(box, ax.get_window_extent(r)), f"a legend covers {ax.get_title()}"
        assert all(t.get_fontsize() >= 9 for t in legend.get_texts())


def test_report_figure_reads(run: dict[str, Any]):
    report = run["report"]
    fig = report_figure(report)
    check_readable(fig)
    assert notes(fig), "the cosine and overlap values are written out"
    titles = [ax.get_title() for ax in fig.axes]
    assert any("singular values" in t for t in titles) and any("per output dimension" in t for t in titles)


def test_report_draws_the_overlap_it_measured(run: dict[str, Any]):
    """stabilize ran without --neighbours, so only report's own measurement has overlap: it is drawn."""
    report = run["report"]
    assert all("neighbour_overlap_after" not in d for d in report["drift"].values())
    measured = report["drift_vs_reference"]
    tables = list(report["drift"])
    expected = np.array([measured[t]["neighbour_overlap"] for t in tables])
    assert np.all((expected > 0) & (expected <= 1))
    fig = report_figure(report)
    ax = panel(fig, "neighbour overlap@10")
    heights = np.array([b.get_height() for b in bars(ax)])
    np.testing.assert_allclose(heights, expected, rtol=1e-12)  # one bar per table: only report measured overlap
    assert [t.get_text() for t in ax.get_xticklabels()] == [t if len(t) <= 24 else t[:23] + "…" for t in tables]
    # the cosine panel holds stabilize's before and after and report's own measurement, per table
    cos = panel(fig, "mean row cosine")
    assert len(bars(cos)) == 3 * len(tables)
    np.testing.assert_allclose(sorted(b.get_height() for b in bars(cos)),
                               sorted([report["drift"][t][k] for t in tables for k in ("cosine_before", "cosine_after")]
                                      + [measured[t]["mean_cosine"] for t in tables]), rtol=1e-12)  # fmt: skip


def test_diagnosis_figure_reads(run: dict[str, Any]):
    fig = diagnosis_figure(run["diagnosis"])
    check_readable(fig)
    (ax,) = fig.axes
    assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) >= len(run["tables"])


def test_saved_png_is_the_size_the_fonts_were_checked_at(run: dict[str, Any], tmp_path: Path):
    fig = report_figure(run["report"])
    width, height = fig.get_size_inches() * DPI
    plot_report(run["report"], tmp_path / "r.png")
    assert matplotlib.image.imread(tmp_path / "r.png").shape[:2] == (round(height), round(width))


def synthetic_report(n_tables: int) -> dict[str, Any]:
    """A stored report with many tables (the plots must stay readable or leave the numbers to the text)."""
    rng = np.random.default_rng(n_tables)
    names = [f"table_{i}" for i in range(n_tables)]
    drift = {n: {"before": float(rng.uniform(0.5, 2)), "after": float(rng.uniform(1e-3, 1e-2)), "cosine_before": float(rng.uniform(-0.1, 0.2)),
                 "cosine_after": float(rng.uniform(0.9, 1)), "neighbour_overlap_before": 0.1, "neighbour_overlap_after": 0.8, "neighbours_k": 5}
             for n in names}  # fmt: skip
    return {
        "url": "many", "rank": DIM, "score_error": 1e-7, "structure": {"kind": "symmetric"}, "singular_values": list(range(DIM, 0, -1)),
        "side_spectra": {n: sorted(rng.uniform(0.1, 10, DIM), reverse=True) for n in names}, "drift": drift,
        "drift_per_dim": {"before": rng.uniform(0.5, 2, DIM).tolist(), "after": rng.uniform(1e-3, 1e-1, DIM).tolist()},
        "lineage": {"reference": "/data/yesterday"},
    }  # fmt: skip


@pytest.mark.parametrize("n_tables", [1, 6, 16, 40])
def test_many_tables_stay_readable(n_tables: int):
    fig = report_figure(synthetic_report(n_tables))
    check_readable(fig)
    assert "log scale" in panel(fig, "relative Frobenius drift").get_ylabel()  # before ~1, after ~1e-2: a log scale
    assert "@5" in panel(fig, "neighbour overlap").get_ylabel()


def test_without_matplotlib_one_line_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives: ImportError
    with pytest.raises(MissingExtraError) as info:
        report_figure(synthetic_report(2))
    message = str(info.value)
    assert "\n" not in message and "dstab[plot]" in message and "matplotlib" in message


def test_collapse_demo_legend_leaves_the_drop_visible():
    """The fall of V_A's singular values past the second (lambda > 0) is the point: the legend covers none of it."""
    from pipelines.collapse_demo import LAMBDAS, collapse_figure
    from pipelines.collapse_model import make_dataset, train

    data = make_dataset(300, 2, seed=0)
    histories = {lam: train(data, d=8, lam=lam, steps=600, seed=1, record_every=75).history for lam in LAMBDAS}
    fig = collapse_figure(histories)
    r = renderer(fig)
    collapsed = fig.axes[0]
    last = np.asarray(histories[LAMBDAS[0]][-1].singular_values_a)
    assert last[2] < 1e-2 * last[1], "the drop this test is about did not happen"
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1 and len(legends[0].get_texts()) == len(histories[LAMBDAS[0]])
    box = legends[0].get_window_extent(r)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and "log scale" in ax.get_ylabel()
        assert not overlaps(box, ax.get_window_extent(r))
        frame = ax.get_window_extent(r)
        for line in ax.get_lines():
            points = ax.transData.transform(np.column_stack(line.get_data()))
            inside = (
                (points[:, 0] >= box.x0)
                & (points[:, 0] <= box.x1)
                & (points[:, 1] >= box.y0)
                & (points[:, 1] <= box.y1)
            )
            assert not inside.any()
            if ax is collapsed:  # indices 2 to 4, where the spectrum falls: drawn inside the axes, in the open
                drop = points[1:4]
                assert (
                    (drop[:, 0] >= frame.x0)
                    & (drop[:, 0] <= frame.x1)
                    & (drop[:, 1] >= frame.y0)
                    & (drop[:, 1] <= frame.y1)
                ).all()
