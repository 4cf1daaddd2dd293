"""PNG reports through matplotlib (the optional ``plot`` extra: ``pip install 'dstab[plot]'``)."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from .errors import UsageError
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
    return bool(text) and text.get("Software", "").startswith(SOFTWARE_PREFIX)


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


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    fig.savefig(os.fspath(path), dpi=100, format="png", metadata={"Software": _software()})


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'dstab[plot]'") from None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def _positive(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None or v <= 0 else v for v in values], dtype=float)


# Legends and tick labels stay readable for any number of tables: long names are
# shortened, and past this many entries a legend goes to two columns.
LABEL_CHARS = 24
LEGEND_ROWS = 7


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def _legend(ax: Any, entries: int) -> None:
    if entries:
        ax.legend(fontsize=7 if entries > LEGEND_ROWS else 8, ncol=1 if entries <= LEGEND_ROWS else 2)


def _style(index: int) -> dict[str, Any]:
    """Colour and line style of the ``index``-th table: ten colours, then the same with another dash."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Spectra before and after, drift before and after per table, and drift per output dimension."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    spectra = report.get("side_spectra") or {}
    drawn = 0
    for i, (name, sv) in enumerate(spectra.items()):
        values = _positive(sv)
        if np.isnan(values).all():
            continue  # an all-zero table: nothing to draw on a log scale
        ax.semilogy(np.arange(1, len(sv) + 1), values, marker=".", label=f"{_short(name)}, raw (before)", **_style(i))
        drawn += 1
    core = report.get("singular_values") or []
    rank = report.get("rank") or len(core)
    kind = (report.get("structure") or {}).get("kind")
    if core and not np.isnan(_positive(core[:rank])).all():
        # stabilized rows have Gram diag(σ) per side (two-sided) or diag(σ) pooled (symmetric, σ = squares of the rows')
        after = np.sqrt(_positive(core[:rank]))
        what = "all tables pooled" if kind == "symmetric" else "each side"
        ax.semilogy(np.arange(1, len(after) + 1), after, marker="o", color="k", label=f"{what}, stabilized (after)")
        drawn += 1
    ax.set_title("singular values per table")
    ax.set_xlabel("index")
    _legend(ax, drawn)

    ax = axes[1]
    drift = report.get("drift") or {}
    if drift:
        names = list(drift)
        x = np.arange(len(names))
        before = _positive([drift[s].get("before") for s in names])
        after = _positive([drift[s].get("after") for s in names])
        ax.bar(x - 0.2, np.nan_to_num(before), 0.4, label="before")
        ax.bar(x + 0.2, np.nan_to_num(after), 0.4, label="after")
        many = len(names) > 3 or max(len(n) for n in names) > 10
        ax.set_xticks(x, [_short(n) for n in names], rotation=30 if many else 0, ha="right" if many else "center", fontsize=8)
        if np.isfinite(np.concatenate([before, after])).any():
            ax.set_yscale("log")  # (log of zero-height bars: matplotlib clips them, quietly)
        font = 7 if len(names) <= 3 else 6
        for i, s in enumerate(names):
            d = drift[s]
            notes = []
            if d.get("cosine_after") is not None and d.get("cosine_before") is not None:
                notes.append(f"cos {d['cosine_before']:.3f}→{d['cosine_after']:.3f}")
            if d.get("neighbour_overlap_after") is not None and d.get("neighbour_overlap_before") is not None:
                notes.append(f"overlap@{d['neighbours_k']} {d['neighbour_overlap_before']:.2f}→{d['neighbour_overlap_after']:.2f}")
            top = np.nanmax([before[i], after[i]]) if np.isfinite([before[i], after[i]]).any() else None
            if notes and top is not None:
                ax.annotate("\n".join(notes), (i, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=font)
        ax.legend(fontsize=8)
        ax.set_title("relative drift from the reference")
    else:
        ax.text(0.5, 0.5, "no reference: nothing to drift from", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[2]
    per_dim = report.get("drift_per_dim")
    if per_dim and per_dim.get("after"):
        dims = np.arange(1, len(per_dim["after"]) + 1)
        ax.semilogy(dims, _positive(per_dim["before"]), marker=".", label="before")
        ax.semilogy(dims, _positive(per_dim["after"]), marker=".", label="after")
        ax.set_xlabel("output dimension")
        ax.set_title("relative drift per dimension (all anchor tables)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    error = report.get("score_error")
    fig.suptitle(
        f"{report.get('url')}: rank {report.get('rank')}, score error {'n/a' if error is None else f'{error:.2g}'}", fontsize=9
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_diagnosis(diagnosis: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Singular values of each table and of the interaction (or the pooled rows), with their effective ranks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
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
        ax.semilogy(np.arange(1, len(sv) + 1), sv / np.nanmax(sv), marker=".",
                    label=f"{_short(name)}: eff. rank {m['effective_rank']:.1f} of {m['dim']}{flag}", **style)  # fmt: skip
        drawn += 1
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(f"spectra of {diagnosis.get('url')}", fontsize=9)
    _legend(ax, drawn)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
