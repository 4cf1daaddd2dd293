"""PNG reports through matplotlib (the optional ``plot`` extra: ``pip install 'dstab[plot]'``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import UsageError


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


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Spectra before and after, drift before and after per side, and drift per output dimension."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    spectra = report.get("side_spectra") or {}
    for side, sv in spectra.items():
        ax.semilogy(np.arange(1, len(sv) + 1), _positive(sv), marker=".", label=f"{side}, raw (before)")
    core = report.get("singular_values") or []
    rank = report.get("rank") or len(core)
    if core:
        after = np.sqrt(_positive(core[:rank]))
        ax.semilogy(np.arange(1, len(after) + 1), after, marker="o", color="k", label="each side, stabilized (after)")
    ax.set_title("singular values per side")
    ax.set_xlabel("index")
    ax.legend(fontsize=8)

    ax = axes[1]
    drift = report.get("drift") or {}
    if drift:
        sides = list(drift)
        x = np.arange(len(sides))
        ax.bar(x - 0.2, [drift[s]["before"] for s in sides], 0.4, label="before")
        ax.bar(x + 0.2, [drift[s]["after"] for s in sides], 0.4, label="after")
        ax.set_xticks(x, sides)
        ax.set_yscale("log")
        for i, s in enumerate(sides):
            d = drift[s]
            notes = []
            if d.get("cosine_after") is not None:
                notes.append(f"cos {d['cosine_before']:.3f}→{d['cosine_after']:.3f}")
            if d.get("neighbour_overlap_after") is not None:
                notes.append(f"overlap@{d['neighbours_k']} {d['neighbour_overlap_before']:.2f}→{d['neighbour_overlap_after']:.2f}")
            ax.annotate("\n".join(notes), (i, d["after"]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        ax.legend(fontsize=8)
        ax.set_title("relative drift from the reference")
    else:
        ax.text(0.5, 0.5, "no reference: nothing to drift from", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[2]
    per_dim = report.get("drift_per_dim")
    if per_dim:
        dims = np.arange(1, len(per_dim["after"]) + 1)
        ax.semilogy(dims, _positive(per_dim["before"]), marker=".", label="before")
        ax.semilogy(dims, _positive(per_dim["after"]), marker=".", label="after")
        ax.set_xlabel("output dimension")
        ax.set_title("relative drift per dimension")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    error = report.get("score_error")
    fig.suptitle(
        f"{report.get('url')}: rank {report.get('rank')}, score error {'n/a' if error is None else f'{error:.2g}'}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)


def plot_diagnosis(diagnosis: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Singular values of each side and of the interaction, with their effective ranks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for name in ("items", "users", "table", "interaction"):
        m = diagnosis.get(name)
        if not m:
            continue
        sv = _positive(m["singular_values"])
        flag = ", COLLAPSED" if m["collapsed"] else ""
        ax.semilogy(np.arange(1, len(sv) + 1), sv / np.nanmax(sv), marker=".",
                    label=f"{name}: eff. rank {m['effective_rank']:.1f} of {m['dim']}{flag}")  # fmt: skip
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(f"spectra of {diagnosis.get('url')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
