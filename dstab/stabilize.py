"""The user API: fit a stabilization (one read pass), then apply it (lazily, or written to Zarr).

    >>> import dstab
    >>> new = dstab.open_version("day2.zarr")
    >>> ref = dstab.open_version("day1-stable.zarr")
    >>> result = dstab.stabilize(new, ref)        # reads new and ref once
    >>> result                                     # readable summary
    >>> result.to_zarr("day2-stable.zarr")       # reads new again, writes once

The request is checked once (:func:`check_request`, metadata only), the pass
takes every statistic in one compute (:mod:`dstab.stats`), the small maths runs
locally on them (:mod:`dstab.linalg`), and the drift is measured from the same
statistics (:mod:`dstab.measures`).
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import Delayed

from . import config, executor, linalg, measures, residency
from .errors import InputError, UsageError
from .executor import compute, tree_reduce
from .faults import failpoint
from .pending import PendingVersion
from .release import __version__
from .spectrum import singular_values_from_gram
from .stats import (
    AnchorSpec,
    TableStats,
    check_pairable,
    own_statistics,
    pass_statistics,
)
from .store import (
    Staging,
    Version,
    canonical_url,
    checked_rows,
    load,
    open_version,
    row_starts,
    write_block,
)
from .store.coerce import as_version
from .store.write import merge_receipts
from .structure import (
    Structure,
    check_agrees,
    parse_anchor,
    resolve,
    same_structure,
)

# The write pass's score check (dask config, read on the client, see dstab.config):
# - dstab.probe-rows (64): rows of the other side (spread over its whole table)
#   that checked rows are scored against while writing;
# - dstab.check-rows (4096): rows of each block whose scores are checked.
#   Checking every row cost more than the transform and the write together; a
#   few thousand per block, from every block, measure the same float32 rounding.

# What the Python API takes as a version: see dstab.store.coerce.as_version.
VersionLike = Version | str | os.PathLike[str] | Mapping[str, Any]

Method = Literal["auto", "gram", "tsqr"]
METHODS: tuple[Method, ...] = ("auto", "gram", "tsqr")

AnchorWeights = Literal["uniform", "counts"]
ANCHOR_WEIGHTS: tuple[AnchorWeights, ...] = ("uniform", "counts")


# ----------------------------------------------------------------------------- per-block kernels


def _apply_write_check(
    source: Any,
    transform: np.ndarray,
    target: Any,
    start: int,
    probe_raw: np.ndarray,
    probe_out: np.ndarray,
    check_rows: int | None = None,
) -> tuple[np.ndarray, Any]:
    """Transform one block, write it, and measure the score error of its first rows against its partners' probe rows.

    Returns ``([sum dS^2, sum S^2, max |dS|, max |S|], receipt)`` over the first
    ``check_rows`` rows of the block (dstab.check-rows: a sample spread over the
    whole table, since every block contributes) against the probe rows, in float64.
    """
    check_rows = check_rows or config.get("check-rows")  # the graph passes it; a direct call reads the local config
    block = load(source)
    out = linalg.transform_rows(block, transform)
    receipt = write_block(out, target, start)
    rows = slice(0, min(check_rows, block.shape[0]))
    raw_scores = block[rows].astype(np.float64) @ probe_raw.T
    diff = out[rows].astype(np.float64) @ probe_out.T - raw_scores
    if diff.size == 0:
        return np.zeros(4), receipt
    return np.array(
        [np.vdot(diff, diff), np.vdot(raw_scores, raw_scores), np.abs(diff).max(), np.abs(raw_scores).max()]
    ), receipt


def _sum_checks(a: Any, b: Any) -> tuple[np.ndarray | None, Any]:
    """Merge two ``(score check, receipt)`` results; a bare receipt comes from tasks that only copy ids."""
    (ca, ra), (cb, rb) = (x if isinstance(x, tuple) else (None, x) for x in (a, b))
    receipt = merge_receipts(ra, rb)
    if ca is None or cb is None:
        return (cb if ca is None else ca), receipt
    return np.array([ca[0] + cb[0], ca[1] + cb[1], max(ca[2], cb[2]), max(ca[3], cb[3])]), receipt


def transform_lazy(name: str, rows: da.Array, transform: np.ndarray, width: int) -> da.Array:
    """``rows @ transform`` as a lazy Dask array, the rows' own row chunks and dtype; checked from metadata only."""
    if rows.ndim != 2 or rows.shape[1] != width:
        raise InputError(f"{name} rows must have shape (n, {width}) (the raw model's width), got {rows.shape}")
    if rows.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"{name} rows have dtype {rows.dtype}; pass float32 or float64 rows")
    if len(rows.chunks[1]) > 1:  # each task needs whole rows
        rows = rows.rechunk({1: -1})
    w = transform.shape[1]
    return rows.map_blocks(
        linalg.transform_rows,  # type: ignore[arg-type]  # dask types map_blocks as a method taking arrays
        transform,
        chunks=(rows.chunks[0], (w,)),
        dtype=rows.dtype,
        meta=np.empty((0, w), dtype=rows.dtype),
    )


# ----------------------------------------------------------------------------- the fitted result


@dataclass
class Stabilization:
    """A fitted stabilization of ``new`` (against ``reference`` if given).

    ``transforms[name]`` is the e x w matrix that maps raw rows of table
    ``name`` to stabilized ones (one matrix per side: tables of a side share
    it); :meth:`stabilized` gives a table as a lazy Dask array; :meth:`to_zarr`
    writes a complete version.
    """

    new: Version
    references: tuple[Version, ...]
    structure: Structure
    transforms: dict[str, np.ndarray]
    singular_values: np.ndarray
    rank: int
    params: dict[str, Any]
    report: dict[str, Any]
    reference_weights: tuple[float, ...] = ()  # one per reference, summing to 1
    # where the version sits in a chain, recorded in its lineage: the policy, the version before it in time
    # (which ``dstab log`` and ``report --chain`` follow) and the base (set by the nightly job)
    chain: dict[str, Any] | None = None
    _probes: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    # the new tables' blocks the statistics pass kept in memory (dstab.residency), written from and then let go
    _kept: residency.Kept = field(repr=False, default=residency.NOTHING_KEPT)

    @property
    def reference(self) -> Version | None:
        """The first reference (the one the drift figures of the report are against), or None."""
        return self.references[0] if self.references else None

    @property
    def dim_out(self) -> int:
        return int(next(iter(self.transforms.values())).shape[1])

    def __repr__(self) -> str:
        r = self.report
        drift = ""
        if r.get("drift_before") is not None:
            drift = f", drift {r['drift_before']:.3g} -> {r['drift_after']:.3g}"
        ref = " + ".join(
            f"{w:g} x {v.url or 'in-memory version'}" if len(self.references) > 1 else v.url or "in-memory version"
            for v, w in zip(self.references, self.reference_weights)
        )
        rows = ", ".join(f"{name} {t.n_rows:,}" for name, t in self.new.tables.items())
        return (
            f"<Stabilization of {self.new.url or 'in-memory version'} onto {ref or 'no reference'}: "
            f"{self.structure}, dim {self.new.dim} -> {self.dim_out}, rank {self.rank}, {rows}{drift}>"
        )

    def transform(self, name: str, rows: Any) -> Any:
        """Map raw rows of table ``name`` (k x e) into the stabilized space: numpy in, numpy out; Dask in, lazy Dask out."""
        if isinstance(rows, da.Array):
            return transform_lazy(name, rows, self._transform_of(name), self.new.dim)
        return linalg.transform_rows(checked_rows(name, rows, self.new.dim), self._transform_of(name))

    def _transform_of(self, name: str) -> np.ndarray:
        if name not in self.transforms:
            raise InputError(f"no table {name!r} in this stabilization; its tables are {', '.join(self.transforms)}")
        return self.transforms[name]

    def stabilized(self, name: str) -> da.Array:
        """The stabilized table ``name`` as a lazy Dask array (same row chunks as the read)."""
        transform = self._transform_of(name)
        table = self.new.table(name)
        x = table.read()
        w = self.dim_out
        return x.map_blocks(
            linalg.transform_rows,  # type: ignore[arg-type]  # (as above)
            transform,
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
        gate: Callable[[dict[str, Any]], None] | None = None,
        compute: bool = True,
    ) -> Any:
        """Write the stabilized version to ``out`` (second pass) and return it, opened.

        Nothing is visible at ``out`` until every block is written and the
        version is marked complete; on failure nothing is left behind. The
        score error is measured during the write, on the first
        ``dstab.check-rows`` rows of every block of each table against
        ``dstab.probe-rows`` rows spread over the tables it is scored against,
        as the written float32 values score them, and added to the report.

        ``gate(report)``, if given, runs after the write pass and before the
        version is published: raising there (a failed quality gate) publishes
        nothing and removes what was staged.

        ``compute=False`` returns a :class:`~dstab.pending.PendingVersion`
        instead: the write pass as a graph, staged but not run, that
        ``.compute()`` or ``dask.compute(pending, ...)`` writes and publishes
        (returning the opened version), as ``dask.array.to_zarr(...,
        compute=False)`` defers its write.
        """
        compute_now = compute
        out = os.fspath(out)
        inputs = [v.url for v in (self.new, *self.references) if v.url is not None]
        staging = Staging(out, inputs=inputs, overwrite=overwrite, storage_options=storage_options)
        try:
            write = self._write_pass(staging)
        except BaseException:
            staging.discard()
            raise
        finish = functools.partial(self._publish, staging, out, storage_options, gate)
        pending = PendingVersion(out, write, finish=finish, discard=self._discard(staging), compute=executor.compute)
        if not compute_now:
            return pending
        version: Version = pending.compute(progress=progress)
        return version

    def _write_pass(self, staging: Staging) -> Delayed:
        """The second pass as one graph: every block transformed and written, ids copied, score checks reduced."""
        checks = []
        w = self.dim_out
        for name, table in self.new.tables.items():
            target = staging.create_table(name, table, w)
            probe_raw, probe_out = self._probe_rows(name, table.dtype)
            chunks = table.row_chunks()
            blocks = self._kept.get(name) or table.blocks(chunks)  # the blocks kept in memory, else read again
            for block, start in zip(blocks, row_starts(chunks)):
                checks.append(
                    dask.delayed(_apply_write_check, pure=True)(
                        block, self.transforms[name], target, start, probe_raw, probe_out, config.get("check-rows")
                    )
                )
            checks += staging.copy_ids(name, table)
        return tree_reduce(checks, _sum_checks)

    def _discard(self, staging: Staging) -> Callable[[], None]:
        """What a failed or abandoned write pass runs: remove what was staged, and let the kept blocks go."""

        def discard() -> None:
            self._kept.release()
            staging.discard()

        return discard

    def _publish(
        self,
        staging: Staging,
        out: str,
        storage_options: dict[str, Any] | None,
        gate: Callable[[dict[str, Any]], None] | None,
        result: tuple[np.ndarray | None, Any],
    ) -> Version:
        """After the write pass: score error into the report, transforms, the gate, then publish (the caller discards on failure)."""
        self._kept.release()  # written: the kept blocks can go
        totals, receipt = result
        staging.merge(receipt)  # the write tasks' Icechunk forks (None for plain Zarr)
        if totals is None:  # no rows at all
            totals = np.zeros(4)
        self.report["score_error"] = float(np.sqrt(totals[0] / totals[1])) if totals[1] > 0 else 0.0
        self.report["score_max_abs_error"] = float(totals[2])
        self.report["score_max_abs"] = float(totals[3])
        for name, transform in self.transforms.items():
            staging.write_small(f"transform/{name}", transform)
        staging.write_small("transform/singular_values", self.singular_values)
        if gate is not None:
            gate(self.report)
        staging.publish(self.attrs())
        return open_version(out, storage_options)

    def _probe_rows(self, name: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the tables ``name`` is scored against, raw and as written (float64): the write pass's score check."""
        partners = self.structure.partners(name)
        per_table = max(1, config.get("probe-rows") // len(partners))
        raw, written = [], []
        for partner in partners:
            rows = self._probes[partner]
            rows = rows[:: max(1, len(rows) // per_table)][:per_table]
            raw.append(rows)
            written.append(linalg.transform_rows(rows.astype(dtype), self.transforms[partner]).astype(np.float64))
        return np.concatenate(raw), np.concatenate(written)

    def attrs(self) -> dict[str, Any]:
        """What goes into ``attrs["dstab"]`` of the output (JSON only)."""
        attrs = {
            "kind": "stabilized",
            "dstab_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "version_id": uuid.uuid4().hex,  # this publish, whatever is written at the same place later
            "input": canonical_url(self.new.url) if self.new.url else None,
            "reference": canonical_url(self.reference.url)
            if self.reference is not None and self.reference.url
            else None,
            # which version each reference was when used: a later --overwrite of it is then told (dstab.lineage)
            "references": [
                {"url": canonical_url(v.url) if v.url else None, "weight": w, "version_id": v.attrs.get("version_id")}
                for v, w in zip(self.references, self.reference_weights)
            ],
            "structure": self.structure.to_attrs(),
            "params": self.params,
            "report": self.report,
        }
        if self.chain is not None:
            attrs["chain"] = self.chain
        return json.loads(json.dumps(attrs))


# ----------------------------------------------------------------------------- the request, checked once


@dataclass(frozen=True)
class Request:
    """A stabilization request after every check that needs no data: what the fit runs on."""

    structure: Structure
    anchor_tables: tuple[str, ...]  # empty without a reference
    spec: AnchorSpec
    rank: int | Literal["auto"]
    rtol: float
    method: Method
    neighbours: int
    notes: tuple[str, ...]
    reference_weights: tuple[float, ...] = ()  # one per reference, summing to 1


def reference_list(reference: Any) -> tuple[Any, ...]:
    """``None``, one reference, or a list or tuple of them, as a tuple."""
    if reference is None:
        return ()
    if isinstance(reference, list | tuple):
        return tuple(reference)
    return (reference,)


# how close to 1 the weights must sum (they are typed as decimals: 0.3,0.3,0.4)
WEIGHT_SUM_TOLERANCE = 1e-6


def check_reference_weights(weights: Any, n_references: int) -> tuple[float, ...]:
    """One weight per reference, each > 0, summing to 1; equal weights when ``weights`` is None."""
    if weights is None:
        return tuple(1.0 / n_references for _ in range(n_references))
    if n_references == 0:
        raise UsageError("--reference-weights weighs references, but no --reference was given; give them or drop it")
    values = tuple(float(w) for w in weights)
    if len(values) != n_references:
        raise UsageError(
            f"--reference-weights has {len(values)} weight{'s' if len(values) != 1 else ''} for {n_references} "
            f"reference{'s' if n_references != 1 else ''}; give one weight per --reference, in the same order"
        )
    for i, w in enumerate(values):
        if not np.isfinite(w):
            raise UsageError(f"--reference-weights: weight {i + 1} is {w:g}; every weight must be a finite number")
        if w <= 0:
            raise UsageError(
                f"--reference-weights: weight {i + 1} is {w:g}; every weight must be above 0 (a reference not "
                "wanted is left out, not weighted 0)"
            )
    total = sum(values)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise UsageError(f"--reference-weights sum to {total:.7g}; they must sum to 1 (e.g. {_normalized(values)})")
    return values


def _normalized(values: tuple[float, ...]) -> str:
    """The weights scaled to sum to 1, written with 4 decimals, the last taking the rounding (they sum to 1)."""
    scaled = [round(w / sum(values), 4) for w in values]
    scaled[-1] = round(1.0 - sum(scaled[:-1]), 4)
    return ",".join(f"{w:g}" for w in scaled)


def check_distinct(references: tuple[Version, ...]) -> None:
    """A reference listed twice would count twice in the target: refuse it."""
    from .store.icechunk_repo import parse as parse_repo

    seen: dict[Any, int] = {}
    for i, ref in enumerate(references):
        key: Any = canonical_url(ref.url) if ref.url else id(ref)
        place = parse_repo(key) if ref.url else None
        if place is not None:  # REPO.icechunk/V and REPO.icechunk@main/V are the same version (main is the default)
            key = (canonical_url(place.repo), place.ref or "main", place.group)
        if key in seen:
            what = ref.url or "the same in-memory version"
            raise UsageError(
                f"reference {i + 1} ({what}) is reference {seen[key] + 1} again; list each reference once and "
                "weigh it with --reference-weights"
            )
        seen[key] = i


def check_request(
    new: Version,
    reference: Version | list[Version] | tuple[Version, ...] | None = None,
    *,
    reference_weights: Any = None,
    sides: str | Structure | None = None,
    symmetric: bool = False,
    rank: int | Literal["auto"] = "auto",
    rtol: float | None = None,
    anchor: str = "all",
    anchor_min_count: float = 0.0,
    anchor_weights: str = "uniform",
    method: str = "auto",
    neighbours: int = 0,
) -> Request:
    """Every check of a stabilization request that needs no data (metadata and options only).

    Raises :class:`UsageError` or :class:`InputError` naming the option or
    array and the fix; returns the :class:`Request` the fit runs on, with notes
    worth a line in the output (rows paired by position because only one
    version has ids; a raw reference). The CLI calls it before any cluster
    starts, so a request that cannot run is refused at once.

    ``reference`` may be a list of references (each checked on its own: same
    model, pairable rows), weighed by ``reference_weights``.
    """
    references = reference_list(reference)
    weights = check_reference_weights(reference_weights, len(references))
    check_distinct(references)
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
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
            raise UsageError(
                f"--rtol chooses the rank when it is auto; with --rank {rank} it would be ignored: drop one"
            )
    recorded = new.structure or next((r.structure for r in references if r.structure is not None), None)
    structure = resolve(
        new.names, sides=sides, symmetric_all=symmetric, recorded=recorded, label=f"the new version{_at(new)}"
    )
    if sides is not None or symmetric:
        check_agrees(structure, new.structure, f"the new version{_at(new)}", new.names)
    spec = AnchorSpec(min_count=float(anchor_min_count), weighted=anchor_weights == "counts")
    rtol_used = linalg.default_rtol(new.dtype, new.dim) if rtol is None else float(rtol)
    request = dict(structure=structure, spec=spec, rank=rank, rtol=rtol_used, method=method, neighbours=neighbours)
    if not references:
        if neighbours:
            raise UsageError("--neighbours measures overlap with a reference; give --reference or drop --neighbours")
        given = [flag for flag, used in (("--anchor", anchor not in ("all", "both")),
                                         ("--anchor-min-count", anchor_min_count > 0),
                                         ("--anchor-weights", anchor_weights == "counts")) if used]  # fmt: skip
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'chooses' if len(given) == 1 else 'choose'} the rows that fit the rotation "
                f"onto a reference; without --reference there is none: give --reference or drop {'it' if len(given) == 1 else 'them'}"
            )
        return Request(anchor_tables=(), notes=(), **request)  # type: ignore[arg-type]
    for ref in references:
        check_same_model(new, ref, structure)
    anchors = parse_anchor(anchor, structure)
    for ref in references:
        check_pairable(new, ref, anchors)
    if neighbours:
        # measured against the first reference
        fewest = min(min(new.table(s).n_rows, references[0].table(s).n_rows) for s in anchors)
        if neighbours >= fewest:
            raise UsageError(
                f"--neighbours {neighbours} asks for as many neighbours as a table has rows ({fewest:,}); "
                f"choose K below {fewest:,}" + (" (10 is usual)" if fewest > 10 else "")
            )
    for name in anchors:
        if spec.uses_counts and new.table(name).counts is None:
            raise InputError(
                f"{name}/counts is missing from the new version{_at(new)}, so --anchor-min-count / count weights "
                f"cannot apply to {name}; add a {name}/counts array (one count per row), drop those options, "
                f"or anchor on other tables (--anchor)"
            )
    notes = []
    for ref in references:
        notes += _reference_notes(new, ref, anchors)
    return Request(
        anchor_tables=anchors,
        notes=tuple(notes),
        reference_weights=weights,
        **request,  # type: ignore[arg-type]
    )


def _reference_notes(new: Version, reference: Version, anchors: tuple[str, ...]) -> list[str]:
    """Lines worth printing about one reference: a raw one; rows paired by position because one side lacks ids."""
    notes = []
    # in-memory tables carry no record of what made them: only a stored version can be told raw
    if reference.url is not None and reference.attrs.get("kind") != "stabilized":
        notes.append(
            f"the reference{_at(reference)} was never stabilized: today's version is aligned onto its raw basis; "
            "align onto yesterday's stabilized output (dstab stabilize YESTERDAY --out YESTERDAY-stable) instead"
        )
    for name in anchors:
        a, b = new.table(name), reference.table(name)
        if (a.ids is None) != (b.ids is None) and a.n_rows == b.n_rows:
            has, lacks = (
                ("the new version", "the reference") if a.ids is not None else ("the reference", "the new version")
            )
            notes.append(
                f"{name}: only {has} has {name}/ids, so rows are matched by position (row i with row i); "
                f"if {lacks}'s rows are in another order, give it {name}/ids to match them by id"
            )
    return notes


def check_same_model(
    new: Version, reference: Version, structure: Structure | None, *, what: str = "align a version onto"
) -> None:
    """The reference holds the same tables, in the same structure, as the new version (``what`` words the fix).

    With ``structure`` None (several tables, none recorded) only the tables are compared.
    """
    if set(reference.names) != set(new.names):
        raise InputError(
            f"the reference{_at(reference)} has the tables {', '.join(reference.names)} but the new version{_at(new)} "
            f"has {', '.join(new.names)}; {what} one of the same model (same tables)"
        )
    theirs = reference.known_structure
    if structure is not None and theirs is not None and not same_structure(theirs, structure):
        # a new version that records no structure of its own can be told the reference's
        told = f", or pass {theirs.flag()}" if new.structure is None and what.startswith("align") else ""
        raise InputError(
            f"the reference{_at(reference)} is {theirs} but the new version{_at(new)} is {structure}; "
            f"{what} one of the same structure{told}"
        )


def _at(version: Version) -> str:
    return f" ({version.url})" if version.url else ""


# ----------------------------------------------------------------------------- fitting


def stabilize(
    new: VersionLike,
    reference: VersionLike | list[Any] | tuple[Any, ...] | None = None,
    *,
    reference_weights: Any = None,
    ids: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
    reference_ids: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    sides: str | Structure | None = None,
    symmetric: bool = False,
    rank: int | Literal["auto"] = "auto",
    rtol: float | None = None,
    anchor: str = "all",
    anchor_min_count: float = 0.0,
    anchor_weights: AnchorWeights = "uniform",
    method: Method = "auto",
    id_sample_bytes: int | None = None,
    neighbours: int = 0,
    in_memory: residency.InMemory = "auto",
    progress: bool = False,
) -> Stabilization:
    """Fit the stabilization of ``new`` onto ``reference`` (yesterday's stabilized version).

    One pass reads every chunk of ``new`` and of the reference's anchor tables
    once, on the active Dask scheduler (a Client the caller made, or the local
    default; none is created here).

    The structure says which tables score against which (:mod:`dstab.structure`):
    ``sides="users:items,creators"`` (two-sided: every query table against
    every candidate table, one transform per side, from the side's pooled
    Gram), ``symmetric=True`` (every table against every other: one orthogonal
    transform), or, when neither is given, the structure recorded in ``new`` or
    the reference, else ``users:items`` for those two tables and symmetric for
    a single table. Every score the structure defines is kept; the rank step
    keeps score singular values above ``rtol * max`` (default
    :func:`dstab.linalg.default_rtol` for the dtype) or exactly ``rank``.

    Rows pair with the reference's by position when neither table has ids or
    both list the same ids in the same order, and by id otherwise (ids added,
    removed, reordered): the rotation is fitted on the ids present in both,
    estimated from a consistent hash sample of at most ``id_sample_bytes`` of
    rows per table (default: dask config ``dstab.id-sample-bytes``, 32 MiB; every
    common id when the tables are that small; see :mod:`dstab.ids`). ``anchor`` names the tables whose rows fit the rotation
    (comma-separated, or ``all``). ``anchor_min_count`` drops anchor rows whose
    ``counts`` is below it; ``anchor_weights="counts"`` weights them by it.

    ``method`` picks how each side's ``R`` is found: ``gram`` takes a square
    root of the float64 Gram (IO-bound; accurate to about eps64 * κ²),
    ``tsqr`` runs Householder TSQR in the same pass (compute-bound, accurate
    to eps64 * κ), and ``auto`` takes ``tsqr`` for float64 tables and ``gram``
    for float32 ones unless the Gram itself shows a condition number above
    :data:`dstab.linalg.GRAM_MAX_CONDITION`, in which case one more pass runs
    TSQR on the tables (the reference is not read again).

    ``reference`` may also be a list of references (today's yesterday and the
    chain's first version, say) with ``reference_weights`` (one per reference,
    each > 0, summing to 1; default equal): the rotation is then the
    orthogonal Procrustes solution onto their weighted combination, each
    reference's rows matched to the new version's on their own (by position or
    by id), so it minimises ``sum_j w_j ||X Q - R_j||^2`` over the rows each
    reference shares with ``new``. Every reference is read once, in the same
    pass. The drift figures of the report are against the first reference;
    ``report["references"]`` has them against each.

    The report holds the drift before and after (relative Frobenius per table
    and per output dimension, and the mean row cosine on a sample of common
    rows). ``neighbours=k`` also measures the neighbour overlap@k of 1,000
    sampled rows before and after, at the price of two more reads of the new
    tables and one of the reference's.

    ``in_memory`` (``"auto"``, ``True``, ``False``): keep the blocks of the new
    tables that the statistics pass reads in the memory of the workers (or of
    this process, on a local scheduler), so that :meth:`Stabilization.to_zarr`
    writes from them instead of reading the tables again. ``auto`` keeps them
    when they take at most half the memory free without spilling
    (:mod:`dstab.residency`); ``True`` keeps them whenever they fit and refuses
    when they do not. They are let go once written (or with the result).

    ``new`` and ``reference`` are each a :class:`Version`, the path or URL of
    one (opened with ``storage_options``), or a mapping ``{name: X}`` of numpy,
    Dask or Zarr arrays or paths of Zarr arrays or table groups
    (:func:`dstab.store.coerce.as_version`); ``ids={name: array}`` and
    ``counts={name: array}`` go with in-memory new tables, ``reference_ids``
    with in-memory reference tables.
    """
    new = as_version(new, ids=ids, counts=counts, label="new", storage_options=storage_options)
    given = reference_list(reference)
    if reference_ids and len(given) > 1:
        raise UsageError("reference_ids= goes with one in-memory reference; give each of several references its ids")
    references = tuple(
        as_version(r, ids=reference_ids, label="reference", storage_options=storage_options) for r in given
    )
    if not references and reference_ids:
        raise UsageError(
            "reference_ids= name ids of the reference's tables, but no reference was given; drop it or give reference="
        )
    request = check_request(
        new, references, reference_weights=reference_weights, sides=sides, symmetric=symmetric, rank=rank, rtol=rtol,
        anchor=anchor, anchor_min_count=anchor_min_count, anchor_weights=anchor_weights, method=method,
        neighbours=neighbours,
    )  # fmt: skip
    structure, anchors = request.structure, request.anchor_tables
    qr_now = method == "tsqr" or (method == "auto" and new.dtype == np.dtype(np.float64))
    kept = _keep_in_memory(new, residency.check_in_memory(in_memory))
    per_reference = pass_statistics(
        new, references, anchors, spec=request.spec, qr=qr_now, id_sample_bytes=id_sample_bytes, kept=kept,
        progress=progress,
    )  # fmt: skip
    stats = per_reference[0]
    failpoint("after-statistics")

    pooled = [pool_side(stats, side) for side in structure.sides]
    method_used = "tsqr" if qr_now else "gram"
    if method == "auto" and not qr_now and not all(linalg.gram_is_accurate(p.gram, new.dtype) for p in pooled):
        method_used = "tsqr"
        extra = compute(
            *(own_statistics(new.table(n), qr=True, blocks=kept.get(n)) for n in new.names),
            progress=progress,
            stage="QR pass",
        )
        stats = {n: replace(stats[n], r=more.r) for n, more in zip(new.names, extra)}
        pooled = [pool_side(stats, side) for side in structure.sides]
    factors = [linalg.gram_factor(p.gram) if method_used == "gram" or p.r is None else p.r for p in pooled]
    if structure.kind == "symmetric":
        canonical = linalg.symmetric_transform(factors[0], rank=rank, rtol=request.rtol)
    else:
        canonical = linalg.canonical_transforms(*factors, rank=rank, rtol=request.rtol)
    probes = [p.probe for p in pooled]
    if references:
        for ref, ref_stats in zip(references, per_reference):
            _check_anchor_rows(ref_stats, anchors, new.names, canonical.rank, request.spec, ref, len(references))
        ref_width = max(r.dim for r in references)
        crosses = [
            weighted_cross(per_reference, request.reference_weights, side, anchors, ref_width)
            for side in structure.sides
        ]
        omega = linalg.alignment(canonical, crosses, ref_width, probes)
    else:
        omega = linalg.sign_alignment(canonical, probes)
    transforms = {name: canonical.transforms[structure.side_of(name)] @ omega for name in new.names}

    reference = references[0] if references else None
    report = _fit_report(new, reference, request, stats, transforms, canonical, method_used)
    report["in_memory"] = bool(kept)
    if len(references) > 1:
        report["references"] = [
            {
                "url": canonical_url(ref.url) if ref.url else None,
                "weight": weight,
                **_drift_figures(ref_stats, anchors, transforms)[0],
                "matching": {name: matching_report(ref_stats[name], new, ref, name) for name in anchors},
            }
            for ref, weight, ref_stats in zip(references, request.reference_weights, per_reference)
        ]
    if neighbours and anchors:
        _measure_neighbours(new, reference, stats, transforms, anchors, report["drift"], neighbours, progress)  # type: ignore[arg-type]
    params = {
        "rank": rank, "rtol": request.rtol, "anchor": anchor, "anchor_tables": list(anchors),
        "anchor_min_count": request.spec.min_count, "anchor_weights": anchor_weights, "method": method,
        "reference_weights": list(request.reference_weights),
    }  # fmt: skip
    return Stabilization(
        new=new,
        references=references,
        reference_weights=request.reference_weights,
        structure=structure,
        transforms=transforms,
        singular_values=canonical.singular_values,
        rank=canonical.rank,
        params=params,
        report=report,
        _probes={name: s.sample for name, s in stats.items()},
        _kept=kept,
    )


def _keep_in_memory(new: Version, in_memory: residency.InMemory) -> residency.Kept:
    """The new tables' blocks, to be read once and kept for both passes when :func:`residency.decide` says so.

    Only tables read from storage: an in-memory table's blocks are in memory already.
    """
    from dask.utils import format_bytes

    stored = tuple(name for name, t in new.tables.items() if isinstance(t.vectors, zarr.Array))
    if in_memory is False or not stored:
        return residency.NOTHING_KEPT
    tables = [new.table(name) for name in stored]
    size = sum(t.n_rows * t.dim * t.dtype.itemsize for t in tables)
    block = max(min(t.block_rows(), t.n_rows) * t.dim * t.dtype.itemsize for t in tables)
    memory = residency.free_memory(block)
    if not residency.decide(in_memory, size, memory):
        executor.log.debug(
            "dstab: out of core: the new tables (%s) read twice; %s has %s free",
            format_bytes(size), memory.where, format_bytes(max(memory.free, 0)),
        )  # fmt: skip
        return residency.NOTHING_KEPT
    executor.log.debug(
        "dstab: in memory: the new tables (%s) are read once and kept in %s (%s free without spilling)",
        format_bytes(size), memory.where, format_bytes(memory.free),
    )  # fmt: skip
    return residency.keep_blocks(new, stored)


@dataclass(frozen=True)
class PooledSide:
    """The statistics of one side: its tables' Grams added, their R factors stacked, their probes pooled."""

    gram: np.ndarray
    r: np.ndarray | None
    probe: linalg.Probe


def pool_side(stats: dict[str, TableStats], names: tuple[str, ...]) -> PooledSide:
    """The tables of a side share one transform, so it is fitted from their pooled statistics."""
    parts = [stats[n] for n in names]
    rs = [p.r for p in parts if p.r is not None]
    r = None
    if len(rs) == len(parts):
        r = rs[0] if len(rs) == 1 else linalg.qr_factor(np.vstack(rs))
    return PooledSide(
        gram=np.sum([p.gram for p in parts], axis=0),
        r=r,
        probe=linalg.pooled_probe([(p.row_sum, p.sample, p.n_rows) for p in parts]),
    )


def weighted_cross(
    per_reference: list[dict[str, TableStats]],
    weights: tuple[float, ...],
    side: tuple[str, ...],
    anchors: tuple[str, ...],
    width: int,
) -> np.ndarray | None:
    """``sum_j w_j X^T R_j`` over a side's anchor tables (each reference's columns zero-padded to ``width``).

    Procrustes onto this maximises ``sum_j w_j tr(Q^T X^T R_j)``, which is
    minimising ``sum_j w_j ||X Q - R_j||^2`` (``||X Q||`` does not depend on an
    orthogonal ``Q``): the rotation onto the weighted combination of the
    references, each over the rows it shares with the new version.
    """
    names = [n for n in side if n in anchors]
    if not names:
        return None
    total: np.ndarray | None = None
    for stats, weight in zip(per_reference, weights):
        for name in names:
            cross = stats[name].cross
            assert cross is not None  # statistics taken against this reference
            part = weight * linalg.pad_columns(cross, width)
            total = part if total is None else total + part
    return total


def _drift_figures(
    stats: dict[str, TableStats], anchors: tuple[str, ...], transforms: dict[str, np.ndarray]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Drift before and after onto one reference, over its anchor tables (relative Frobenius, row cosine).

    Returns the report's figures (``drift`` per table, ``drift_before``, ``drift_after``) and each table's
    measures before and after (:func:`dstab.measures.table_drift`), for the figures per dimension.
    """
    drift: dict[str, dict[str, Any]] = {}
    before, after = [], []
    for name in anchors:
        b = measures.table_drift(stats[name], None)
        a = measures.table_drift(stats[name], transforms[name])
        before.append(b)
        after.append(a)
        drift[name] = {
            "before": measures.relative(b["sq"], b["scale"] or 1.0),
            "after": measures.relative(a["sq"], a["scale"] or 1.0),
        }
        if stats[name].pairs is not None:
            drift[name]["cosine_before"] = b["cosine"]
            drift[name]["cosine_after"] = a["cosine"]
    scale = sum(m["scale"] for m in after) or 1.0
    figures = {
        "drift": drift,
        "drift_before": measures.relative(sum(m["sq"] for m in before), scale) if anchors else None,
        "drift_after": measures.relative(sum(m["sq"] for m in after), scale) if anchors else None,
    }
    return figures, before, after


def _fit_report(
    new: Version,
    reference: Version | None,
    request: Request,
    stats: dict[str, TableStats],
    transforms: dict[str, np.ndarray],
    canonical: linalg.Canonical,
    method_used: str,
) -> dict[str, Any]:
    anchors = request.anchor_tables
    figures, before, after = _drift_figures(stats, anchors, transforms)
    report: dict[str, Any] = {
        "structure": request.structure.to_attrs(),
        "rank": canonical.rank,
        "dim_in": new.dim,
        "dim_out": int(next(iter(transforms.values())).shape[1]),
        "tables": {name: t.n_rows for name, t in new.tables.items()},
        "dtype": str(new.dtype),
        "rtol": request.rtol,
        "method": method_used,
        "singular_values": canonical.singular_values.tolist(),
        **figures,
        "drift_per_dim": _per_dim(before, after) if anchors else None,
        "side_spectra": {name: singular_values_from_gram(stats[name].gram).tolist() for name in new.names},
        "anchor": ",".join(anchors) if reference is not None else None,
        "matching": {name: matching_report(stats[name], new, reference, name) for name in anchors},
        "notes": list(request.notes),
        "score_error": None,
    }
    for name in ("items", "users"):  # the two-table model's counts, as reports have always had them
        if name in new.tables:
            report[f"n_{name}"] = new.tables[name].n_rows
    return report


def _per_dim(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    width = max(len(m["col_sq"]) for m in before + after)  # both lists the same length, for plots and tables
    return {"before": measures.relative_per_dim(before, width), "after": measures.relative_per_dim(after, width)}


def _measure_neighbours(
    new: Version,
    reference: Version,
    stats: dict[str, TableStats],
    transforms: dict[str, np.ndarray],
    anchors: tuple[str, ...],
    drift: dict[str, dict[str, Any]],
    k: int,
    progress: bool,
) -> None:
    """Neighbour overlap@k of sampled rows with the reference, before (raw) and after (stabilized)."""
    from .neighbours import overlap

    q = slice(0, config.get("query-rows"))
    groups, keys = {}, {}
    for name in anchors:
        pairs = stats[name].pairs
        if pairs is None or not len(pairs.keys):
            continue
        groups[name] = [
            (new.table(name), pairs.new[q], None),  # before: raw rows
            (new.table(name), pairs.new[q] @ transforms[name], transforms[name]),  # after: stabilized rows
            (reference.table(name), pairs.ref[q], None),
        ]
        keys[name] = pairs.keys[q]
    for name, (raw, out, ref) in measures.neighbour_overlaps(groups, keys, k, progress=progress).items():
        drift[name]["neighbours_k"] = k
        drift[name]["neighbour_overlap_before"] = overlap(raw, ref, k)
        drift[name]["neighbour_overlap_after"] = overlap(out, ref, k)


def matching_report(stats: TableStats, new: Version, reference: Version | None, name: str) -> dict[str, Any]:
    """How a table's rows were paired with the reference's, for the report."""
    n_ref = reference.table(name).n_rows if reference is not None else 0
    n_new = new.table(name).n_rows
    common = stats.ids.n_common if stats.matched_by == "id" and stats.ids is not None else min(n_new, n_ref)
    return {
        "by": stats.matched_by,
        "common": common,
        "added": n_new - common,
        "removed": n_ref - common,
        "anchor_rows": stats.n_anchor,
        "sample_fraction": stats.sample_fraction,
    }


def _check_anchor_rows(
    stats: dict[str, TableStats],
    anchors: tuple[str, ...],
    tables: tuple[str, ...],
    width: int,
    spec: AnchorSpec,
    reference: Version | None = None,
    n_references: int = 1,
) -> None:
    """Procrustes of width k needs at least k anchor rows to fix the rotation (against each reference)."""
    total = sum(stats[s].n_anchor for s in anchors)
    if total >= width:
        return
    detail = ", ".join(f"{s} {stats[s].n_anchor:,}" for s in anchors)
    fixes = []
    if spec.min_count > 0:
        detail += f" with count >= {spec.min_count:g}"
        fixes.append("lower --anchor-min-count")
    if set(anchors) != set(tables):
        fixes.append("anchor on every table (--anchor all)")
    fixes.append("or stabilize without --reference")
    rows = "anchor row" if total == 1 else "anchor rows"
    against = ""
    if n_references > 1 and reference is not None:
        against = f" shared with the reference {reference.url or 'in memory'}"
        fixes.insert(0, "leave that reference out")
    raise InputError(
        f"only {total:,} {rows}{against} ({detail}) to fit a rotation of width {width}; it needs at least {width} rows "
        f"present in both versions: {', '.join(fixes)}"
    )
