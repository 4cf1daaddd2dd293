"""The user API: fit a stabilization (one read pass), then apply it (lazily, or written to Zarr).

    >>> import dstab
    >>> new = dstab.open_version("day2.zarr")
    >>> ref = dstab.open_version("day1-stable.zarr")
    >>> result = dstab.stabilize(new, ref)        # reads new and ref once
    >>> result                                     # readable summary
    >>> result.to_zarr("day2-stable.zarr")       # reads new again, writes once
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np

from . import linalg
from .errors import InputError, UsageError
from .executor import compute, tree_reduce
from .faults import failpoint
from .report import mean_row_cosine
from .spectrum import singular_values_from_gram
from .stats import (
    ID_SAMPLE_BYTES,
    AnchorSpec,
    SideStats,
    check_pairable,
    pass_statistics,
    side_statistics,
)
from .store import (
    SIDES,
    Side,
    Staging,
    Version,
    canonical_url,
    checked_rows,
    load,
    open_version,
    row_starts,
    write_block,
)

# Rows of the other side (spread over its whole table) that checked rows are
# scored against while writing.
PROBE_ROWS = 64
# Rows of each block whose scores are checked: checking every row cost more than
# the transform and the write together; a few thousand per block, from every
# block, measure the same float32 rounding.
CHECK_ROWS = 4096

Method = Literal["auto", "gram", "tsqr"]
METHODS: tuple[Method, ...] = ("auto", "gram", "tsqr")

AnchorWeights = Literal["uniform", "counts"]
ANCHOR_WEIGHTS: tuple[AnchorWeights, ...] = ("uniform", "counts")

ANCHOR_SIDES: dict[str, tuple[Side, ...]] = {"items": ("items",), "users": ("users",), "both": ("items", "users")}


def _version_string() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- per-block kernels


def _apply_write_check(
    source: Any,
    transform: np.ndarray,
    target: Any,
    start: int,
    probe_raw: np.ndarray,
    probe_out: np.ndarray,
) -> np.ndarray:
    """Transform one block, write it, and measure the score error of its first rows against the other side's probe rows.

    Returns ``[sum dS^2, sum S^2, max |dS|, max |S|]`` over the first
    :data:`CHECK_ROWS` rows of the block (a sample spread over the whole table,
    since every block contributes) against the probe rows, in float64.
    """
    block = load(source)
    out = linalg.transform_rows(block, transform)
    write_block(out, target, start)
    rows = slice(0, min(CHECK_ROWS, block.shape[0]))
    raw_scores = block[rows].astype(np.float64) @ probe_raw.T
    diff = out[rows].astype(np.float64) @ probe_out.T - raw_scores
    if diff.size == 0:
        return np.zeros(4)
    return np.array(
        [np.vdot(diff, diff), np.vdot(raw_scores, raw_scores), np.abs(diff).max(), np.abs(raw_scores).max()]
    )


def _sum_checks(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Merge two score checks; ``None`` comes from tasks that only copy ids."""
    if a is None or b is None:
        return b if a is None else a
    return np.array([a[0] + b[0], a[1] + b[1], max(a[2], b[2]), max(a[3], b[3])])


# ----------------------------------------------------------------------------- the fitted result


@dataclass
class Stabilization:
    """A fitted stabilization of ``new`` (against ``reference`` if given).

    ``transforms[side]`` is the e x w matrix that maps raw rows of that side to
    stabilized ones; ``items`` / ``users`` are the stabilized tables as lazy Dask
    arrays; :meth:`to_zarr` writes a complete version.
    """

    new: Version
    reference: Version | None
    transforms: dict[str, np.ndarray]
    singular_values: np.ndarray
    rank: int
    params: dict[str, Any]
    report: dict[str, Any]
    _probes: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def dim_out(self) -> int:
        return int(self.transforms["items"].shape[1])

    def __repr__(self) -> str:
        r = self.report
        drift = ""
        if r.get("drift_before") is not None:
            drift = f", drift {r['drift_before']:.3g} -> {r['drift_after']:.3g}"
        ref = self.reference.url if self.reference is not None else None
        return (
            f"<Stabilization of {self.new.url or 'in-memory version'} onto {ref or 'no reference'}: "
            f"dim {self.new.dim} -> {self.dim_out}, rank {self.rank}, "
            f"items {self.new.items.n_rows:,}, users {self.new.users.n_rows:,}{drift}>"
        )

    def transform(self, side: Side, rows: np.ndarray) -> np.ndarray:
        """Map raw rows of ``side`` (numpy, k x e) into the stabilized space."""
        return linalg.transform_rows(checked_rows(side, rows, self.new.dim), self.transforms[side])

    def stabilized(self, side: Side) -> da.Array:
        """The stabilized table of ``side`` as a lazy Dask array (same row chunks as the read)."""
        table = self.new.table(side)
        x = table.read()
        w = self.dim_out
        return x.map_blocks(
            linalg.transform_rows,
            self.transforms[side],
            chunks=(x.chunks[0], (w,)),
            dtype=table.dtype,
            meta=np.empty((0, w), dtype=table.dtype),
        )

    @property
    def items(self) -> da.Array:
        return self.stabilized("items")

    @property
    def users(self) -> da.Array:
        return self.stabilized("users")

    def to_zarr(
        self,
        out: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> Version:
        """Write the stabilized version to ``out`` (second pass) and return it, opened.

        Nothing is visible at ``out`` until every block is written and the
        version is marked complete; on failure nothing is left behind. The
        score error is measured during the write, on the first
        :data:`CHECK_ROWS` rows of every block of each side against
        :data:`PROBE_ROWS` rows spread over the other side, as the written
        float32 values score them, and added to the report.
        """
        out = os.fspath(out)
        inputs = [v.url for v in (self.new, self.reference) if v is not None and v.url is not None]
        staging = Staging(out, inputs=inputs, overwrite=overwrite, storage_options=storage_options)
        try:
            checks = []
            w = self.dim_out
            for side, other in (("items", "users"), ("users", "items")):
                table = self.new.table(side)
                target = staging.create_table(side, table, w)
                probe_raw = self._probes[other]
                probe_raw = probe_raw[:: max(1, len(probe_raw) // PROBE_ROWS)][:PROBE_ROWS]
                probe_out = linalg.transform_rows(probe_raw.astype(table.dtype), self.transforms[other]).astype(np.float64)
                chunks = table.row_chunks()
                for block, start in zip(table.blocks(chunks), row_starts(chunks)):
                    checks.append(
                        dask.delayed(_apply_write_check, pure=True)(
                            block, self.transforms[side], target, start, probe_raw, probe_out
                        )
                    )
                checks += staging.copy_ids(side, table)
            (totals,) = compute(tree_reduce(checks, _sum_checks), progress=progress, stage="write pass")
            self.report["score_error"] = float(np.sqrt(totals[0] / totals[1])) if totals[1] > 0 else 0.0
            self.report["score_max_abs_error"] = float(totals[2])
            self.report["score_max_abs"] = float(totals[3])
            for side in SIDES:
                staging.write_small(f"transform/{side}", self.transforms[side])
            staging.write_small("transform/singular_values", self.singular_values)
            staging.publish(self.attrs())
        except BaseException:
            staging.discard()
            raise
        return open_version(out, storage_options)

    def attrs(self) -> dict[str, Any]:
        """What goes into ``attrs["dstab"]`` of the output (JSON only)."""
        attrs = {
            "kind": "stabilized",
            "dstab_version": _version_string(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": canonical_url(self.new.url) if self.new.url else None,
            "reference": canonical_url(self.reference.url) if self.reference is not None and self.reference.url else None,
            "params": self.params,
            "report": self.report,
        }
        return json.loads(json.dumps(attrs))


# ----------------------------------------------------------------------------- fitting


def check_request(
    new: Version,
    reference: Version | None = None,
    *,
    rank: int | Literal["auto"] = "auto",
    rtol: float | None = None,
    anchor: str = "both",
    anchor_min_count: float = 0.0,
    anchor_weights: str = "uniform",
    method: str = "auto",
    neighbours: int = 0,
) -> list[str]:
    """Every check of a stabilization request that needs no data (metadata and options only).

    Raises :class:`UsageError` or :class:`InputError` naming the option or
    array and the fix; returns notes worth a line in the output (rows paired by
    position because only one version has ids). The CLI calls it before any
    cluster starts, so a request that cannot run is refused at once.
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if anchor not in ANCHOR_SIDES:
        raise UsageError(f"anchor must be one of items, users, both; got {anchor!r}")
    if anchor_weights not in ANCHOR_WEIGHTS:
        raise UsageError(f"anchor_weights must be one of {', '.join(ANCHOR_WEIGHTS)}; got {anchor_weights!r}")
    if not (anchor_min_count >= 0):
        raise UsageError(f"anchor_min_count must be >= 0, got {anchor_min_count}")
    if rtol is not None and not (0.0 <= rtol < 1.0):
        raise UsageError(f"rtol must be in [0, 1), got {rtol}")
    if not (isinstance(neighbours, int) and neighbours >= 0):
        raise UsageError(f"neighbours must be a whole number >= 0, got {neighbours!r}")
    if rank != "auto":
        linalg.choose_rank(np.ones(new.dim), rank, 0.0)  # validates the value against the width
        if rtol is not None:
            raise UsageError(f"--rtol chooses the rank when it is auto; with --rank {rank} it would be ignored: drop one")
    uses_counts = anchor_min_count > 0 or anchor_weights == "counts"
    if reference is None:
        if neighbours:
            raise UsageError("--neighbours measures overlap with a reference; give --reference or drop --neighbours")
        if uses_counts or anchor != "both":
            raise UsageError(
                "--anchor, --anchor-min-count and --anchor-weights choose the rows that fit the rotation onto a "
                "reference; without --reference there is none: give --reference or drop them"
            )
        return []
    anchors = ANCHOR_SIDES[anchor]
    check_pairable(new, reference, anchors)
    if neighbours:
        fewest = min(min(new.table(s).n_rows, reference.table(s).n_rows) for s in anchors)
        if neighbours >= fewest:
            raise UsageError(
                f"--neighbours {neighbours} asks for as many neighbours as a table has rows ({fewest:,}); "
                f"choose K below {fewest:,} (10 is usual)"
            )
    for side in anchors:
        if uses_counts and new.table(side).counts is None:
            raise InputError(
                f"{side}/counts is missing from the new version{_at(new)}, so --anchor-min-count / count weights "
                f"cannot apply to {side}; add a {side}/counts array (one count per row), drop those options, "
                f"or anchor on the other side (--anchor)"
            )
    notes = []
    if reference.attrs.get("kind") != "stabilized":
        where = f" ({reference.url})" if reference.url else ""
        notes.append(
            f"the reference{where} was never stabilized: today's version is aligned onto its raw basis; "
            "align onto yesterday's stabilized output (dstab stabilize YESTERDAY --out YESTERDAY-stable) instead"
        )
    for side in anchors:
        a, b = new.table(side), reference.table(side)
        if (a.ids is None) != (b.ids is None) and a.n_rows == b.n_rows:
            has, lacks = ("the new version", "the reference") if a.ids is not None else ("the reference", "the new version")
            notes.append(
                f"{side}: only {has} has {side}/ids, so rows are matched by position (row i with row i); "
                f"if {lacks}'s rows are in another order, give it {side}/ids to match them by id"
            )
    return notes


def _at(version: Version) -> str:
    return f" ({version.url})" if version.url else ""


def stabilize(
    new: Version,
    reference: Version | None = None,
    *,
    rank: int | Literal["auto"] = "auto",
    rtol: float | None = None,
    anchor: linalg.Anchor = "both",
    anchor_min_count: float = 0.0,
    anchor_weights: AnchorWeights = "uniform",
    method: Method = "auto",
    id_sample_bytes: int = ID_SAMPLE_BYTES,
    neighbours: int = 0,
    progress: bool = False,
) -> Stabilization:
    """Fit the stabilization of ``new`` onto ``reference`` (yesterday's stabilized version).

    One pass reads every chunk of ``new`` and of the reference's anchor tables
    once, on the active Dask scheduler (a Client the caller made, or the local
    default; none is created here). Scores ``<user, item>`` are kept exactly;
    the rank step keeps core singular values above ``rtol * max`` (default
    :func:`dstab.linalg.default_rtol` for the dtype) or exactly ``rank``.

    Rows pair with the reference's by position when neither side has ids or
    both list the same ids in the same order, and by id otherwise (ids added,
    removed, reordered): the rotation is fitted on the ids present in both,
    estimated from a consistent hash sample of at most ``id_sample_bytes`` of
    rows per table (every common id when the tables are that small; see
    :mod:`dstab.ids`). Every row of ``new`` is transformed and keeps its id and
    place. ``anchor_min_count`` drops anchor rows whose ``counts`` (an array of
    the new version) is below it; ``anchor_weights="counts"`` weights them by it.

    ``method`` picks how each table's ``R`` is found: ``gram`` takes a square
    root of the float64 Gram (IO-bound; accurate to about eps64 * κ²),
    ``tsqr`` runs Householder TSQR in the same pass (compute-bound, accurate
    to eps64 * κ), and ``auto`` takes ``tsqr`` for float64 tables and ``gram``
    for float32 ones unless the Gram itself shows a condition number above
    :data:`dstab.linalg.GRAM_MAX_CONDITION`, in which case one more pass runs
    TSQR on the tables (the reference is not read again).

    The report holds the drift before and after (relative Frobenius per side
    and per output dimension, and the mean row cosine on a sample of common
    rows). ``neighbours=k`` also measures the neighbour overlap@k of 1,000
    sampled rows before and after, at the price of two more reads of the new
    tables and one of the reference's.
    """
    notes = check_request(
        new, reference, rank=rank, rtol=rtol, anchor=anchor, anchor_min_count=anchor_min_count,
        anchor_weights=anchor_weights, method=method, neighbours=neighbours,
    )  # fmt: skip
    anchors = ANCHOR_SIDES[anchor] if reference is not None else ()
    spec = AnchorSpec(min_count=float(anchor_min_count), weighted=anchor_weights == "counts")

    qr_now = method == "tsqr" or (method == "auto" and new.dtype == np.dtype(np.float64))
    stats = pass_statistics(new, reference, anchors, anchors=spec, qr=qr_now, id_sample_bytes=id_sample_bytes, progress=progress)
    items_stats, users_stats = stats["items"], stats["users"]
    failpoint("after-statistics")

    method_used = "tsqr" if qr_now else "gram"
    if method == "auto" and not qr_now and not all(linalg.gram_is_accurate(stats[s].gram, new.dtype) for s in SIDES):
        method_used = "tsqr"
        extra = compute(*(side_statistics(new.table(s), qr=True) for s in SIDES), progress=progress, stage="QR pass")
        for side, more in zip(SIDES, extra):
            stats[side].r = more.r
    factors = [stats[s].r if method_used == "tsqr" else linalg.gram_factor(stats[s].gram) for s in SIDES]

    rtol_used = linalg.default_rtol(new.dtype, new.dim) if rtol is None else float(rtol)
    canonical = linalg.canonical_transforms(*factors, rank=rank, rtol=rtol_used)
    probes = [(s.row_sum, s.sample, s.n_rows) for s in (items_stats, users_stats)]
    if reference is not None:
        _check_anchor_rows(stats, anchors, canonical.rank, spec)
        omega = linalg.alignment(
            canonical,
            items_stats.cross if "items" in anchors else None,
            users_stats.cross if "users" in anchors else None,
            reference.dim,
            probes,
        )
    else:
        omega = linalg.sign_alignment(canonical, probes)
    transforms = {"items": canonical.m_items @ omega, "users": canonical.m_users @ omega}

    drift: dict[str, dict[str, Any]] = {}
    before_sq = after_sq = ref_sq = 0.0
    per_dim = {"before": 0.0, "after": 0.0, "scale": 0.0}
    for side in anchors:
        s = stats[side]
        gram, transform = s.gram_of_anchors, transforms[side]
        b = linalg.identity_drift(gram, s.cross, s.ref_sumsq)
        a = linalg.squared_drift(transform, gram, s.cross, s.ref_sumsq)
        scale = s.ref_sumsq if s.ref_sumsq > 0 else 1.0
        drift[side] = {"before": float(np.sqrt(b / scale)), "after": float(np.sqrt(a / scale))}
        if s.pairs is not None:
            drift[side]["cosine_before"] = mean_row_cosine(s.pairs.new, s.pairs.ref)
            drift[side]["cosine_after"] = mean_row_cosine(s.pairs.new @ transform, s.pairs.ref)
        before_sq, after_sq, ref_sq = before_sq + b, after_sq + a, ref_sq + s.ref_sumsq
        width = max(transform.shape[1], reference.dim, new.dim)  # type: ignore[union-attr]
        per_dim["before"] = per_dim["before"] + linalg.pad_vector(linalg.column_drift(np.eye(new.dim), gram, s.cross, s.ref_col_sumsq), width)  # type: ignore[arg-type]
        per_dim["after"] = per_dim["after"] + linalg.pad_vector(linalg.column_drift(transform, gram, s.cross, s.ref_col_sumsq), width)  # type: ignore[arg-type]
        per_dim["scale"] = per_dim["scale"] + linalg.pad_vector(s.ref_col_sumsq, width)  # type: ignore[arg-type]
    ref_sq = ref_sq if ref_sq > 0 else 1.0
    if neighbours and anchors:
        _measure_neighbours(new, reference, stats, transforms, anchors, drift, neighbours, progress)  # type: ignore[arg-type]

    params = {
        "rank": rank, "rtol": rtol_used, "anchor": anchor, "anchor_min_count": spec.min_count,
        "anchor_weights": anchor_weights, "method": method,
    }  # fmt: skip
    report: dict[str, Any] = {
        "rank": canonical.rank,
        "dim_in": new.dim,
        "dim_out": int(transforms["items"].shape[1]),
        "n_items": new.items.n_rows,
        "n_users": new.users.n_rows,
        "dtype": str(new.dtype),
        "rtol": rtol_used,
        "method": method_used,
        "singular_values": canonical.singular_values.tolist(),
        "drift_before": float(np.sqrt(before_sq / ref_sq)) if anchors else None,
        "drift_after": float(np.sqrt(after_sq / ref_sq)) if anchors else None,
        "drift": drift,
        "drift_per_dim": _relative_per_dim(per_dim) if anchors else None,
        "side_spectra": {side: singular_values_from_gram(stats[side].gram).tolist() for side in SIDES},
        "anchor": anchor if reference is not None else None,
        "matching": {side: matching_report(stats[side], new, reference, side) for side in anchors},
        "notes": notes,
        "score_error": None,
    }
    return Stabilization(
        new=new,
        reference=reference,
        transforms=transforms,
        singular_values=canonical.singular_values,
        rank=canonical.rank,
        params=params,
        report=report,
        _probes={"items": items_stats.sample, "users": users_stats.sample},
    )


def _relative_per_dim(per_dim: dict[str, Any]) -> dict[str, list[float | None]]:
    scale = np.asarray(per_dim["scale"], dtype=np.float64)
    out: dict[str, list[float | None]] = {}
    for key in ("before", "after"):
        sq = np.asarray(per_dim[key], dtype=np.float64)
        out[key] = [float(np.sqrt(v / c)) if c > 0 else None for v, c in zip(sq, scale)]
    return out


def _measure_neighbours(
    new: Version,
    reference: Version,
    stats: dict[Side, SideStats],
    transforms: dict[str, np.ndarray],
    anchors: tuple[Side, ...],
    drift: dict[str, dict[str, Any]],
    k: int,
    progress: bool,
) -> None:
    """Neighbour overlap@k of sampled rows with the reference, before (raw) and after (stabilized)."""
    from .neighbours import neighbour_sets, overlap
    from .report import QUERY_ROWS

    sides = [s for s in anchors if stats[s].pairs is not None and len(stats[s].pairs.keys)]  # type: ignore[union-attr]
    q = slice(0, QUERY_ROWS)
    groups, keys = [], []
    for side in sides:
        pairs = stats[side].pairs
        assert pairs is not None
        groups.append([
            (new.table(side), pairs.new[q], None),  # before: raw rows
            (new.table(side), pairs.new[q] @ transforms[side], transforms[side]),  # after: stabilized rows
            (reference.table(side), pairs.ref[q], None),
        ])  # fmt: skip
        keys.append(pairs.keys[q])
    for side, (raw, out, ref) in zip(sides, neighbour_sets(groups, keys, k, progress=progress)):
        drift[side]["neighbours_k"] = k
        drift[side]["neighbour_overlap_before"] = overlap(raw, ref, k)
        drift[side]["neighbour_overlap_after"] = overlap(out, ref, k)


def matching_report(stats: SideStats, new: Version, reference: Version | None, side: Side) -> dict[str, Any]:
    """How a side's rows were paired with the reference's, for the report."""
    n_ref = reference.table(side).n_rows if reference is not None else 0
    n_new = new.table(side).n_rows
    common = stats.ids.n_common if stats.matched_by == "id" and stats.ids is not None else min(n_new, n_ref)
    return {
        "by": stats.matched_by,
        "common": common,
        "added": n_new - common,
        "removed": n_ref - common,
        "anchor_rows": stats.n_anchor,
        "sample_fraction": stats.sample_fraction,
    }


def _check_anchor_rows(stats: dict[Side, SideStats], anchors: tuple[Side, ...], width: int, spec: AnchorSpec) -> None:
    """Procrustes of width k needs at least k anchor rows to fix the rotation."""
    total = sum(stats[s].n_anchor for s in anchors)
    if total >= width:
        return
    detail = ", ".join(f"{s} {stats[s].n_anchor:,}" for s in anchors)
    hint = f" with count >= {spec.min_count:g}; lower --anchor-min-count" if spec.min_count > 0 else ""
    raise InputError(
        f"only {total:,} anchor rows ({detail}{hint}) to fit a rotation of width {width}; "
        f"it needs at least {width} rows present in both versions: anchor on both sides (--anchor both), "
        "or stabilize without --reference"
    )
