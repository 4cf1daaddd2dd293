"""PNG reports through matplotlib (the optional ``plot`` extra: ``pip install 'dstab[plot]'``)."""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

import numpy as np

from .errors import UsageError
from .extras import require
from .release import __version__

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOFTWARE_PREFIX = "dstab "  # the PNG tEXt "Software" value of every plot dstab draws: "dstab <version>"


def _software() -> str:
    return SOFTWARE_PREFIX + __version__


def png_text(path: str | os.PathLike[str], *, limit: int = 1 << 16) -> dict[str, str] | None:
    """The tEXt chunks of a PNG file (keyword -> text), or None when the file is not a readable PNG.

    Pure Python; reads chunk headers only and skips image data, stopping at the first IDAT or IEND
    (matplotlib writes its text chunks before the image data) or after ``limit`` bytes of text.
    """
    text: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            read = 0
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):
                    return text
                if kind == b"tEXt":
                    read += length
                    if read > limit:
                        return text
                    data = f.read(length)
                    if len(data) < length:
                        return None
                    key, sep, value = data.partition(b"\0")
                    if sep:
                        text[key.decode("latin-1")] = value.decode("latin-1")
                    f.seek(4, os.SEEK_CUR)  # CRC
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None


def is_dstab_plot(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a PNG file that dstab drew (its tEXt "Software" names dstab)."""
    text = png_text(path)
    return text is not None and text.get("Software", "").startswith(SOFTWARE_PREFIX)


def check_plot_target(path: str | os.PathLike[str]) -> None:
    """Refuse a --plot path without a .png suffix, or that holds something other than dstab's own earlier plot."""
    name = os.fspath(path)
    if os.path.splitext(name)[1].lower() != ".png":
        raise UsageError(f"--plot needs a .png file name, got {name}")
    if os.path.isdir(name):
        raise UsageError(f"--plot {name} is a directory: give a .png file name")
    if os.path.lexists(name) and not (os.path.isfile(name) and is_dstab_plot(name)):
        raise UsageError(
            f"--plot {name} exists and is not a plot dstab drew; dstab never overwrites other files: "
            "choose another name or remove it"
        )
    directory = os.path.dirname(os.path.abspath(name))
    try:  # can a file be made there (not /proc, not a read-only mount)? asked before any work, not after it
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".dstab-plot-", suffix=".png"):
            pass
    except OSError as exc:
        raise UsageError(
            f"--plot {name}: no file can be created in {directory} (the system said: {exc.strerror or exc}); "
            "choose a directory you may write to"
        ) from None


# Every size below is in points at the saved resolution (DPI): a 9-point note is 12.5 pixels high in the PNG.
DPI = 100
FONT = 10  # axis labels, titles and legends
NOTE_FONT = 9.5  # the values written beside bars
NOTE_GID = "dstab-note"  # the gid of every value note (tests and readers of the Figure find them by it)
BAR_GROUP = 0.8  # the share of each table's slot on the x-axis its bars fill

# Legends and tick labels stay readable for any number of tables: long names are
# shortened, and past this many entries a legend goes to two columns.
LABEL_CHARS = 24
LEGEND_ROWS = 14

SPECTRUM_X = "singular value index i (largest first)"


def _figure(width: float, height: float) -> Any:
    """An Agg-backed Figure (no pyplot: nothing global, nothing to close) with constrained layout."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` as a PNG tagged as dstab's (see :func:`is_dstab_plot`), at the size it was laid out for."""
    fig.savefig(os.fspath(path), dpi=DPI, format="png", metadata={"Software": _software()})


def _positive(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None or v <= 0 else v for v in values], dtype=float)


def _finite(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def _where(url: str | None) -> str:
    """A version's URL as a legend says it: its last path component (``day2-stable``), shortened."""
    if not url:
        return "its reference"
    return _short(url.rstrip("/").rsplit("/", 1)[-1] or url)


def _outside_legend(ax: Any, entries: int) -> None:
    """The legend right of the axes, where it covers no data (constrained layout makes the room)."""
    if entries:
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
            fontsize=9,
            ncol=1 if entries <= LEGEND_ROWS else 2,
            frameon=False,
        )


def _style(index: int) -> dict[str, Any]:
    """Colour and line style of the ``index``-th table: ten colours, then the same with another dash."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


# ----------------------------------------------------------------------------- report


class _Series:
    """One comparison the report holds (per table: drift, cosine, overlap), drawn in one colour everywhere."""

    def __init__(self, label: str, colour: str, values: dict[str, dict[str, float | None]], k: int | None) -> None:
        self.label, self.colour, self.values, self.k = label, colour, values, k

    def get(self, table: str, quantity: str) -> float | None:
        return (self.values.get(table) or {}).get(quantity)


def _report_series(report: dict[str, Any]) -> list[_Series]:
    """What the report compared: stabilize's own before/after (stored), and what report measured now."""
    series = []
    stored = report.get("drift") or {}
    if stored:
        ref = _where((report.get("lineage") or {}).get("reference"))
        k = next((d["neighbours_k"] for d in stored.values() if d.get("neighbours_k")), None)
        for when, colour, words in (("before", "C1", "raw rows"), ("after", "C0", "stabilized rows")):
            values = {
                table: {
                    "drift": d.get(when),
                    "cosine": d.get(f"cosine_{when}"),
                    "overlap": d.get(f"neighbour_overlap_{when}"),
                }
                for table, d in stored.items()
            }
            series.append(_Series(f"{words} vs {ref}, at stabilize ({when})", colour, values, k))
    for key, checked, colour, words in (
        ("drift_vs_reference", "reference_checked", "C2", "vs"),
        ("drift_vs_base", "base_checked", "C4", "vs base"),
    ):
        measured = report.get(key)
        if not measured:
            continue
        tables = measured.get("tables") or [t for t in ("items", "users") if t in measured]
        values = {
            t: {
                "drift": measured[t].get("frobenius"),
                "cosine": measured[t].get("mean_cosine"),
                "overlap": measured[t].get("neighbour_overlap"),
            }
            for t in tables
        }
        series.append(
            _Series(
                f"this version {words} {_where(report.get(checked))}, measured now", colour, values, measured.get("k")
            )
        )
    return series


def _spectra_panel(ax: Any, report: dict[str, Any]) -> None:
    """Each raw table's singular values, and the stabilized (or, for a raw version, the scores') spectrum."""
    spectra = report.get("side_spectra") or {}
    drawn = 0
    for i, (name, sv) in enumerate(spectra.items()):
        values = _positive(sv)
        if np.isnan(values).all():
            continue  # an all-zero table: nothing to draw on a log scale
        ax.plot(np.arange(1, len(sv) + 1), values, marker=".", label=f"{_short(name)}, raw rows", **_style(i))
        drawn += 1
    core = report.get("singular_values") or []
    rank = report.get("rank") or len(core)
    if core and not np.isnan(_positive(core[:rank])).all():
        if spectra or report.get("kind") == "stabilized":
            # stabilized rows have Gram diag(σ) per side (two-sided) or pooled (symmetric): their σ are √ of the core's
            values = np.sqrt(_positive(core[:rank]))
            symmetric = (report.get("structure") or {}).get("kind") == "symmetric"
            label = f"stabilized rows, {'all tables pooled' if symmetric else 'each side'}"
        else:
            values, label = _positive(core[:rank]), "scores (measured now)"
        # under the tables' curves (zorder): a symmetric model's one table has the same spectrum, and shows on top
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", color="k", linewidth=2.0, label=label, zorder=1.5)
        drawn += 1
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no spectrum recorded", ha="center", va="center", transform=ax.transAxes, fontsize=FONT)
    ax.set_title("singular values per table" if spectra else "singular values", fontsize=FONT + 1)
    ax.set_xlabel(SPECTRUM_X, fontsize=FONT)
    ax.set_ylabel("singular value σᵢ (log scale)" if drawn else "singular value σᵢ", fontsize=FONT)
    _outside_legend(ax, drawn)


def _per_dim_panel(ax: Any, per_dim: dict[str, list[float | None]], series: list[_Series]) -> None:
    """Relative drift of each output column, before and after, in the colours of stabilize's own series."""
    colours = {s.label.rsplit("(", 1)[-1].rstrip(")"): s.colour for s in series}
    for when in ("before", "after"):
        values = _positive(per_dim.get(when) or [])
        if len(values) and not np.isnan(values).all():
            words = "raw rows (before)" if when == "before" else "stabilized rows (after)"
            ax.plot(np.arange(1, len(values) + 1), values, marker=".", color=colours.get(when, "k"), label=words)
    ax.set_yscale("log")
    ax.set_title("drift per output dimension (all anchor tables, at stabilize)", fontsize=FONT + 1)
    ax.set_xlabel("output dimension (column of the stabilized rows)", fontsize=FONT)
    ax.set_ylabel("relative drift of the column (log scale)", fontsize=FONT)
    _outside_legend(ax, len(ax.get_lines()))


# quantity -> (title, y label, may be drawn on a log scale, note format)
BAR_PANELS: dict[str, tuple[str, str, bool, str]] = {
    "drift": ("relative drift per table", "relative Frobenius drift\n‖X − R‖ / ‖R‖ ({scale})", True, "{:.2g}"),
    "cosine": (
        "mean row cosine per table",
        "mean row cosine with the reference\n(1 = same direction)",
        False,
        "{:.3f}",
    ),
    "overlap": (
        "neighbour overlap per table",
        "neighbour overlap@{k}: share of the\n{k} nearest rows kept (0 to 1)",
        False,
        "{:.2f}",
    ),
}
SIDE_BY_SIDE_BARS = 24  # bars per panel (tables x comparisons) past which bar panels are stacked, full width
LOG_SPREAD = 20.0  # drift bars go on a log scale when the largest is this many times the smallest (before vs after)


class _Notes:
    """The value notes of one bar panel, placed in a band above the bars once the layout is known."""

    def __init__(self, ax: Any, notes: list[Any], bar_width: float, values: np.ndarray, log: bool, top: float) -> None:
        self.ax, self.notes, self.bar_width, self.values, self.log, self.top = ax, notes, bar_width, values, log, top


def _bar_panel(ax: Any, quantity: str, tables: list[str], series: list[_Series]) -> _Notes | None:
    title, ylabel, may_log, fmt = BAR_PANELS[quantity]
    drawn = [s for s in series if any(s.get(t, quantity) is not None for t in tables)]
    positive = _positive([s.get(t, quantity) for s in drawn for t in tables])
    positive = positive[np.isfinite(positive)]
    log = bool(may_log and positive.size and positive.max() > LOG_SPREAD * positive.min())
    x = np.arange(len(tables))
    width = BAR_GROUP / len(drawn)
    notes, heights = [], []
    for j, s in enumerate(drawn):
        offset = (j - (len(drawn) - 1) / 2) * width
        values = (_positive if log else _finite)([s.get(t, quantity) for t in tables])
        ax.bar(x + offset, np.nan_to_num(values), width, color=s.colour, label=s.label)
        heights.extend(values[np.isfinite(values)])
        for i, v in enumerate(values):
            if np.isfinite(v):
                # at the top of the axes (x in data, y in axes fraction); _place_notes makes the band free of bars
                notes.append(ax.annotate(fmt.format(v), (x[i] + offset, 1.0), xycoords=ax.get_xaxis_transform(),
                                         xytext=(0, -3), textcoords="offset points", ha="center", va="top",
                                         fontsize=NOTE_FONT, gid=NOTE_GID))  # fmt: skip
    if log:
        ax.set_yscale("log")  # (zero-height bars: matplotlib clips them, quietly; the text report has the numbers)
    many = len(tables) > 3 or max(len(t) for t in tables) > 10
    ax.set_xticks(x, [_short(t) for t in tables], rotation=30 if many else 0, ha="right" if many else "center",
                  rotation_mode="anchor", fontsize=9)  # fmt: skip
    ks = sorted({s.k for s in drawn if s.k})
    k = "/".join(map(str, ks)) or "k"
    ax.set_ylabel(ylabel.format(k=k, scale="log scale" if log else "ratio, linear"), fontsize=FONT)
    ax.set_xlabel("table", fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1)
    ax.set_xlim(-0.5, len(tables) - 0.5)
    # cosine and overlap are shares (at most 1): on their whole scale, 0.07 reads as small as it is
    top = 0.0 if quantity == "drift" else 1.0
    if not log and top:
        ax.set_ylim(min(0.0, min(heights) * 1.1), top * 1.05)
    return _Notes(ax, notes, width, np.array(heights), log, top) if notes else None


def _place_notes(fig: Any, panels: list[_Notes]) -> None:
    """Lay the figure out, then give each bar panel headroom so that its notes sit above every bar.

    The notes hang from the top of the axes; they are turned upright when wider than a bar, dropped when
    even upright they are wider than a bar (too many bars for readable numbers: the text report has them),
    and the y-limits are set so that the tallest bar ends below the lowest note.
    """
    if not panels:
        return
    fig.canvas.draw()  # constrained layout places the axes here; freeze it so the room measured below stays true
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for p in panels:
        ax = p.ax
        bbox = ax.get_window_extent(renderer)
        bar_px = p.bar_width * bbox.width / np.ptp(ax.get_xlim())
        if max(n.get_window_extent(renderer).width for n in p.notes) > bar_px - 4:  # a gap between neighbours
            for n in p.notes:
                n.set_rotation(90)
        if max(n.get_window_extent(renderer).width for n in p.notes) > bar_px - 4:  # a gap between neighbours
            for n in p.notes:
                n.remove()
            p.notes = []
            ax.set_title(ax.get_title() + " (too many bars to write values: see the text report)", fontsize=FONT + 1)
            continue
        band = (
            max(n.get_window_extent(renderer).height for n in p.notes) + 10
        ) / bbox.height  # + the 3-pt offset, a gap
        reach = max(0.3, 1.0 - band)  # the share of the axes' height the tallest bar may fill
        values = p.values
        if p.log:
            lo, hi = np.log10(values.min()) - 0.3, np.log10(values.max())
            ax.set_ylim(10**lo, 10 ** (lo + (hi - lo) / reach))
        else:
            lo = min(0.0, float(values.min()) * 1.1)
            hi = max(p.top, float(values.max()))
            ax.set_ylim(lo, lo + (hi - lo) / reach if hi > lo else 1.0)


def report_figure(report: dict[str, Any]) -> Any:
    """The report as a matplotlib Figure: spectra, drift per output dimension, and per table drift,
    row cosine and neighbour overlap for every comparison the report holds (stabilize's own before and
    after, and what ``report --reference``/``--base`` measured now)."""
    series = _report_series(report)
    tables: list[str] = []
    for s in series:
        tables += [t for t in s.values if t not in tables]
    bars = [q for q in BAR_PANELS if any(s.get(t, q) is not None for s in series for t in tables)]
    per_dim = report.get("drift_per_dim")
    per_dim = per_dim if per_dim and per_dim.get("after") else None
    # bar panels side by side while each bar keeps room for an upright note; past that, one above the other
    drawn = max((sum(any(s.get(t, q) is not None for t in tables) for s in series) for q in bars), default=0)
    stacked = len(bars) > 1 and len(tables) * drawn > SIDE_BY_SIDE_BARS
    bar_height = 1.12 * len(bars) * 0.75 if stacked else 1.12
    fig = _figure(16 if bars or per_dim else 10, 4.6 * (1 + (bar_height if bars else 0)) + 0.9)
    # one subfigure per row: each lays out its own columns, so the spectra's legend (right of its axes)
    # takes room from its own row only
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, bar_height]) if bars else (fig, None)
    if per_dim:
        spectra_ax, per_dim_ax = top.subplots(1, 2, width_ratios=[1.1, 1.0])
        _spectra_panel(spectra_ax, report)
        _per_dim_panel(per_dim_ax, per_dim, series)
    else:
        _spectra_panel(top.subplots(), report)
    notes = []
    if bottom is not None:
        for ax, quantity in zip(
            np.atleast_1d(bottom.subplots(len(bars), 1) if stacked else bottom.subplots(1, len(bars))), bars
        ):
            panel = _bar_panel(ax, quantity, tables, series)
            if panel is not None:
                notes.append(panel)
        from matplotlib.patches import Patch

        used = [s for s in series if any(s.get(t, q) is not None for q in bars for t in tables)]
        bottom.legend([Patch(color=s.colour) for s in used], [s.label for s in used], loc="outside lower center",
                      ncol=min(len(used), 2), fontsize=FONT, frameon=False)  # fmt: skip
    error = report.get("score_error")
    title = f"{report.get('url') or 'a version in memory'}: rank {report.get('rank')}, score error {'n/a' if error is None else f'{error:.2g}'}"
    if not series:
        title += "\nno reference: nothing to drift from (report --reference REF measures drift now)"
    fig.suptitle(title, fontsize=FONT + 1)
    _place_notes(fig, notes)
    return fig


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw :func:`report_figure` into the PNG ``path``."""
    save_figure(report_figure(report), path)


# ----------------------------------------------------------------------------- diagnose


def diagnosis_figure(diagnosis: dict[str, Any]) -> Any:
    """Singular values of each table and of the interaction (or the pooled rows), with their effective ranks."""
    fig = _figure(10, 4.8)
    ax = fig.add_subplot()
    tables = diagnosis.get("tables") or {k: diagnosis[k] for k in ("items", "users", "table") if diagnosis.get(k)}
    curves = [(name, m, _style(i)) for i, (name, m) in enumerate(tables.items())]
    for name in ("interaction", "pooled"):
        if diagnosis.get(name) and not (name == "pooled" and len(tables) == 1):
            curves.append((name, diagnosis[name], {"color": "k", "linewidth": 2.0}))
    drawn = 0
    for name, m, style in curves:
        sv = _positive(m["singular_values"])
        if np.isnan(sv).all():
            continue  # all zeros: nothing on a log scale
        flag = ", COLLAPSED" if m["collapsed"] else ""
        ax.plot(np.arange(1, len(sv) + 1), sv / np.nanmax(sv), marker=".",
                label=f"{_short(name)}: eff. rank {m['effective_rank']:.1f} of {m['dim']}{flag}", **style)  # fmt: skip
        drawn += 1
    if drawn:
        ax.set_yscale("log")
    ax.set_xlabel(SPECTRUM_X, fontsize=FONT)
    ax.set_ylabel("σᵢ / σ₁, singular value / largest (log scale)" if drawn else "σᵢ / σ₁", fontsize=FONT)
    ax.set_title(f"spectra of {diagnosis.get('url')}", fontsize=FONT + 1)
    _outside_legend(ax, drawn)
    return fig


def plot_diagnosis(diagnosis: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw :func:`diagnosis_figure` into the PNG ``path``."""
    save_figure(diagnosis_figure(diagnosis), path)


# ----------------------------------------------------------------------------- chain


def chain_figure(report: dict[str, Any]) -> Any:
    """Drift over time (``report --chain``): mean row cosine and relative drift of every version against the base
    and against the version before, by step; the eigenspace overlap with the version before on the cosine panel."""
    steps = report["steps"]
    fig = _figure(14, 5.2)
    if not steps:  # the version is the base: nothing to draw but that
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no steps: {report['base']} is the base of the chain", ha="center", va="center")
        return fig
    cos_ax, drift_ax = fig.subplots(1, 2)
    x = [s["step"] for s in steps]

    def series(to: str, key: str) -> list[float]:
        return [np.nan if s[to][key] is None else s[to][key] for s in steps]

    for ax, key, title, ylabel in (
        (cos_ax, "mean_cosine", "mean row cosine, and eigenspace overlap (dashed)", "mean row cosine / overlap"),
        (drift_ax, "drift", "relative drift (Frobenius, every common row)", "relative drift"),
    ):
        ax.plot(x, series("to_base", key), marker="o", color="C0", label="to the base")
        ax.plot(x, series("to_previous", key), marker="s", color="C1", label="to the version before")
        if key == "mean_cosine":
            ax.plot(x, series("to_previous", "eigenspace_overlap"), linestyle="--", color="C2",
                    label="eigenspace overlap with the version before")  # fmt: skip
        ax.set_xlabel("version (steps after the base)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9, framealpha=0.6)
        if x:  # the versions' names (dates, for nightly days) under their steps
            ticks = x if len(x) <= 20 else x[:: max(1, len(x) // 10)]
            names = {s["step"]: _short(os.path.basename(str(s["url"]).rstrip("/"))) for s in steps}
            ax.set_xticks(ticks, [f"{names[t]}\n({t})" for t in ticks], rotation=30, ha="right", fontsize=8)
    base = os.path.basename(str(report["base"]).rstrip("/"))
    fig.suptitle(
        f"drift over time: {len(steps)} step{'s' if len(steps) != 1 else ''} from the base {base}", fontsize=11
    )
    return fig


def plot_chain(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw :func:`chain_figure` into the PNG ``path``."""
    save_figure(chain_figure(report), path)
