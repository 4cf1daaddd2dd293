"""The command handlers, ``cmd_*``, and the small helpers they share.

Start-up: each handler imports the modules it needs (dask, zarr, the pipeline)
inside itself, so that building the parser imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DstabError, UsageError
from . import output
from .cluster import scheduler_from_args

if TYPE_CHECKING:
    from ..store import Table, Version

log = logging.getLogger("dstab")


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stabilize options as :func:`dstab.stabilize` takes them."""
    return {
        "reference_weights": args.reference_weights,
        "sides": args.sides, "symmetric": args.symmetric, "rank": args.rank, "rtol": args.rtol, "anchor": args.anchor,
        "anchor_min_count": args.anchor_min_count, "anchor_weights": args.anchor_weights, "method": args.method,
        "neighbours": args.neighbours,
    }  # fmt: skip


def _key_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What a scheduler gates on, from a stabilization's report."""
    keys = ("rank", "dim_in", "dim_out", "structure", "tables", "dtype", "method", "drift_before", "drift_after",
            "score_error", "score_max_abs_error", "score_max_abs", "anchor", "drift", "references", "in_memory",
            "notes")  # fmt: skip
    return {key: report.get(key) for key in keys}


def cmd_stabilize(args: argparse.Namespace) -> int:
    from ..report import format_matching, format_side_drift
    from ..stabilize import check_request, stabilize
    from ..store import check_output, open_version

    options = _storage_options(args)
    new = open_version(args.new, options)
    references = [open_version(ref, options) for ref in args.reference or ()]
    inputs = [v.url for v in (new, *references) if v.url]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, storage_options=options)
    request = check_request(new, references, **_fit_options(args))
    started = time.perf_counter()
    with scheduler_from_args(args, _tables(new, *references)):
        result = stabilize(
            new, references, **_fit_options(args), in_memory=args.in_memory, progress=output.progress(args)
        )
        result.to_zarr(args.out, overwrite=args.overwrite, storage_options=options, progress=output.progress(args))
    r = result.report
    seconds = time.perf_counter() - started

    def lines() -> list[str]:
        shapes = ", ".join(f"{name} {n:,} x {r['dim_out']}" for name, n in r["tables"].items())
        text = [
            f"wrote {args.out}: {shapes}, rank {r['rank']} of {r['dim_in']}, {request.structure}, {seconds:.1f} s",
            f"score error {r['score_error']:.3g} (relative), max abs {r['score_max_abs_error']:.3g} of {r['score_max_abs']:.3g}",
        ]
        if r["drift_before"] is not None:
            onto = " onto the first reference" if r.get("references") else ""
            text.append(
                f"drift{onto} before {r['drift_before']:.4g}, after {r['drift_after']:.4g} (relative, anchors: {r['anchor']})"
            )
        several = r.get("references") or []
        for i, ref in enumerate(several):
            text.append(
                f"reference {i + 1} ({ref['url']}, weight {ref['weight']:g}): drift before {ref['drift_before']:.4g}, "
                f"after {ref['drift_after']:.4g}"
            )
        text += format_side_drift(r.get("drift") or {})
        if several:  # how each reference's rows were paired with today's
            for i, ref in enumerate(several):
                text += [f"reference {i + 1}: {line}" for line in format_matching(ref.get("matching") or {})]
        else:
            text += format_matching(r.get("matching") or {})
        return text + notes

    notes = output.notes(args, r.get("notes") or [])
    data = {"out": args.out, **_key_figures(r), "matching": r.get("matching") or {}, "seconds": round(seconds, 3)}
    return output.finish(args, data, lines)


def _tables(*versions: Version | None) -> list[Table]:
    return [table for v in versions if v is not None for table in v.tables.values()]


def _check_plot_path(args: argparse.Namespace) -> None:
    """A --plot file is a .png in an existing directory, outside every input, and not anyone else's file.

    Checked before any work starts; replacing a plot dstab drew earlier is fine.
    """
    if not args.plot:
        return
    from ..extras import require
    from ..plots import check_plot_target
    from ..store import same_or_nested

    require("matplotlib")  # the plot extra, named before any work

    plot = os.fspath(args.plot)
    if os.path.splitext(plot)[1].lower() != ".png":
        raise UsageError(f"--plot needs a .png file name, got {plot}")
    blocker = next((p for p in Path(os.path.abspath(plot)).parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(
            f"--plot {plot} lies under {blocker}, which is a file, not a directory; choose a .png in a directory"
        )
    if not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise UsageError(
            f"--plot {plot}: the directory {os.path.dirname(os.path.abspath(plot))} does not exist; create it or "
            "choose a .png in an existing directory"
        )
    for name in ("version", "reference", "base", "path"):
        source = getattr(args, name, None)
        if source and same_or_nested(plot, os.fspath(source)):
            raise UsageError(f"--plot {plot} is or lies inside the input {source}; dstab never writes into its inputs")
    for parent in Path(os.path.abspath(plot)).parents:
        if (parent / "zarr.json").is_file():  # a version or a table: the PNG would become a foreign file in it
            raise UsageError(f"--plot {plot} lies inside the Zarr group {parent}; choose a place outside every version")
    check_plot_target(plot)


def _emit(args: argparse.Namespace, data: Any, text: Any, plot: Any) -> None:
    """Print ``data`` as JSON (--json) or ``text()``, and draw ``plot(path)`` when --plot is given."""
    if args.plot:
        plot(args.plot)
    if args.json:
        print(output.dumps(data))
        return
    print(text())
    if args.plot:
        print(f"  plot: {args.plot}")


def cmd_report(args: argparse.Namespace) -> int:
    from ..plots import plot_report
    from ..report import describe, format_report
    from ..store import open_version

    _check_plot_path(args)
    options = _storage_options(args)
    if args.chain:
        if args.reference:
            raise UsageError("--chain measures each version against the base and the version before; drop --reference")
        return _chain_report(args, options)
    version = open_version(args.version, options)
    reference = open_version(args.reference, options) if args.reference else None
    base = open_version(args.base, options) if args.base else None
    needs_pass = reference is not None or base is not None or version.attrs.get("kind") != "stabilized"
    with scheduler_from_args(args, _tables(version, reference, base)) if needs_pass else contextlib.nullcontext():
        report = describe(
            version, reference, base=base, progress=needs_pass and output.progress(args) and not args.json
        )
    _emit(args, report, lambda: format_report(report), lambda path: plot_report(report, path))
    return 0


def _chain_report(args: argparse.Namespace, options: dict[str, Any] | None) -> int:
    """``report VERSION --chain [--base FIRST]``: drift over time along the lineage (text, JSON, PNG)."""
    from ..chain import chain_versions, format_chain_report, measure_chain
    from ..plots import plot_chain
    from ..store import open_version

    version = open_version(args.version, options)
    base = open_version(args.base, options) if args.base else None
    versions = chain_versions(version, base)  # walked once; a broken lineage is refused before any cluster starts
    with scheduler_from_args(args, _tables(*versions[-2:])) if len(versions) > 1 else contextlib.nullcontext():
        report = measure_chain(versions, progress=output.progress(args) and not args.json)
    _emit(args, report, lambda: format_chain_report(report), lambda path: plot_chain(report, path))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..diagnose import (
        diagnose,
        diagnosis_json,
        diagnosis_structure,
        format_diagnosis,
        open_version_or_table,
    )
    from ..plots import plot_diagnosis
    from ..store import Version

    _check_plot_path(args)
    target = open_version_or_table(args.path, _storage_options(args))
    if args.rtol is not None and not (0.0 <= args.rtol < 1.0):
        raise UsageError(f"--rtol must be in [0, 1), got {args.rtol}")

    structure = {"sides": args.sides, "symmetric": args.symmetric}
    diagnosis_structure(target, **structure)  # bad --sides / --symmetric: refused before any cluster starts
    with scheduler_from_args(args, _tables(target) if isinstance(target, Version) else [target]):
        result = diagnose(target, **structure, rtol=args.rtol, progress=output.progress(args) and not args.json)
    _emit(args, diagnosis_json(result), lambda: format_diagnosis(result), lambda path: plot_diagnosis(result, path))
    return 0


def _apply_target(args: argparse.Namespace) -> tuple[str, str]:
    """(the version's table whose transform applies, the raw rows): --table NAME --rows T, or --items T / --users T."""
    given = [flag for flag in ("items", "users", "table") if getattr(args, flag)]
    if len(given) != 1:
        raise UsageError(
            "say which table the rows belong to: --table NAME --rows TABLE (or --items TABLE / --users TABLE)"
        )
    if args.table:
        if not args.rows:
            raise UsageError(f"--table {args.table} names the table; give the raw rows with --rows TABLE")
        return args.table, args.rows
    if args.rows:
        raise UsageError(f"--rows goes with --table NAME; --{given[0]} already gives the rows")
    return given[0], getattr(args, given[0])


def cmd_apply(args: argparse.Namespace) -> int:
    from ..apply import apply_table
    from ..store import check_output, open_table, open_version

    options = _storage_options(args)
    version = open_version(args.version, options)
    side, rows = _apply_target(args)
    table = open_table(rows, options)
    transform = version.saved_transform(side)  # fails early, before any cluster starts
    check_output(
        args.out, inputs=[u for u in (version.url, table.name) if u], overwrite=args.overwrite, storage_options=options
    )
    started = time.perf_counter()
    with scheduler_from_args(args, [table]):
        apply_table(
            version,
            side,
            table,
            args.out,
            overwrite=args.overwrite,
            storage_options=options,
            progress=output.progress(args),
        )
    seconds = time.perf_counter() - started
    data = {"out": args.out, "version": args.version, "table": side, "rows": table.n_rows, "dim_in": int(transform.shape[0]),
            "dim_out": int(transform.shape[1]), "seconds": round(seconds, 3)}  # fmt: skip
    return output.finish(args, data, lambda: [
        f"wrote {args.out}: {table.n_rows:,} rows of {side} x {transform.shape[1]} in the space of {args.version}, {seconds:.1f} s"
    ])  # fmt: skip


def cmd_log(args: argparse.Namespace) -> int:
    from ..lineage import chain, format_chain
    from ..store import open_version

    entries = chain(open_version(args.version, _storage_options(args)))
    # one JSON object, as every command's (the chain, newest first, under "chain")
    print(output.dumps({"ok": True, "command": "log", "chain": entries}) if args.json else format_chain(entries))
    return 0


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def _source(args: argparse.Namespace, name: str, path: str, ids: str | None, options: dict[str, Any] | None) -> Any:
    """Table ``name`` of an import: a .npy file (ids from another .npy) or Parquet (ids from a column)."""
    from ..interchange import open_npy, open_parquet

    if path.endswith(".npy"):
        if args.vector_column or args.vector_columns:
            raise UsageError("--vector-column / --vector-columns apply to Parquet sources, not .npy files")
        return open_npy(path, ids=ids, label=name)
    if ids:
        flag = f"--{name}-ids" if getattr(args, f"{name}_ids", None) == ids else f"--table-ids {name}={ids}"
        raise UsageError(f"{flag} applies to .npy sources; a Parquet source names its id column with --id-column")
    columns = args.vector_columns
    if columns and "," in columns:
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    return open_parquet(
        path, id_column=args.id_column or None, vector_column=args.vector_column, vector_columns=columns,
        storage_options=options, label=name,
    )  # fmt: skip


def _version_figures(version: Version) -> dict[str, Any]:
    """A written version's key figures: rows per table, width, dtype, structure."""
    structure = version.structure
    return {
        "tables": {name: t.n_rows for name, t in version.tables.items()},
        "dim": version.dim,
        "dtype": str(version.dtype),
        "structure": structure.to_attrs() if structure is not None else None,
    }


def cmd_import(args: argparse.Namespace) -> int:
    from ..interchange import check_sources, import_version, named_values
    from ..store import check_output
    from ..structure import resolve

    options = _storage_options(args)
    # every table option is checked (names, repeats, ids for tables that exist, the structure) before a file is opened
    paths = named_values(
        "--table", args.table, "SRC", {"items": args.items, "users": args.users}, example="words=words.npy"
    )
    ids = named_values(
        "--table-ids", args.table_ids, "IDS.npy", {"items": args.items_ids, "users": args.users_ids}, example="words=ids.npy"
    )  # fmt: skip
    if not paths:
        raise UsageError("import needs at least one table: --table NAME=SRC (repeatable), or --items SRC / --users SRC")
    unknown = [name for name in ids if name not in paths]
    if unknown:
        raise UsageError(
            f"ids are given for the table {unknown[0]!r}, which is not imported (tables: {', '.join(paths)}); "
            f"give its vectors with --table {unknown[0]}=SRC, or drop its ids"
        )
    structure = None
    if args.sides or args.symmetric:
        structure = resolve(tuple(paths), sides=args.sides, symmetric_all=args.symmetric, label="the imported version")
    sources = {name: _source(args, name, path, ids.get(name), options) for name, path in paths.items()}
    check_sources(sources)
    inputs = [u for src in sources.values() for u in (src.url, src.ids_url) if u]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite, storage_options=options)
    size = sum(src.n_rows * src.dim * src.dtype.itemsize for src in sources.values())
    with scheduler_from_args(args, nbytes=size):
        version = import_version(
            args.out, sources, structure=structure, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
            storage_options=options, progress=output.progress(args),
        )  # fmt: skip
    data = {"out": args.out, **_version_figures(version), "sources": {name: src.url for name, src in sources.items()}}
    return output.finish(
        args, data, lambda: [f"wrote {args.out}: {version!r}" + (f", {structure}" if structure is not None else "")]
    )


def cmd_export(args: argparse.Namespace) -> int:
    from ..extras import require
    from ..interchange import export_version
    from ..store import check_output, open_version

    require("pyarrow.parquet")  # the parquet extra, named before any cluster starts
    options = _storage_options(args)
    version = open_version(args.version, options)
    check_output(
        args.out, inputs=[version.url] if version.url else [], overwrite=args.overwrite, storage_options=options
    )
    with scheduler_from_args(args, _tables(version)):
        written = export_version(
            version, args.out, layout=args.layout, overwrite=args.overwrite, storage_options=options,
            progress=output.progress(args),
        )  # fmt: skip
    data = {
        "out": args.out,
        "layout": args.layout,
        "written": written,
        "tables": {n: t.n_rows for n, t in version.tables.items()},
    }
    return output.finish(args, data, lambda: [f"wrote {', '.join(written)} (Parquet, {args.layout} layout)"])


def cmd_synth(args: argparse.Namespace) -> int:
    import numpy as np

    from ..interchange import named_values
    from ..store import check_output, open_version
    from ..structure import resolve
    from ..synth import (
        check_retrain,
        check_synth,
        check_synth_tables,
        synth,
        synth_like,
        synth_tables,
    )

    progress = output.progress(args)
    if args.like:
        given = [name for name in ("items", "users", "dim", "rank") if getattr(args, name) is not None]
        given += ["table"] if args.table else []
        if given:
            raise UsageError(f"--like copies the shape of a version; drop --{', --'.join(given)}")
        like = open_version(args.like)
        if args.counts:
            raise UsageError("--like retrains carry the counts of the version they copy; drop --counts")
        structure = check_retrain(
            like, noise=args.noise, churn=args.churn, seed=args.seed, sides=args.sides, symmetric=args.symmetric
        )  # fmt: skip
        check_output(args.out, inputs=[args.like], overwrite=args.overwrite)
        with scheduler_from_args(args, _tables(like)):
            out = synth_like(
                args.out, like, noise=args.noise, churn=args.churn, seed=args.seed, sides=structure,
                overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
    elif args.table or args.sides or args.symmetric:
        # named tables (--items N and --users M are shorthands for --table items=N, --table users=M)
        shorthands = {
            name: None if getattr(args, name) is None else str(getattr(args, name)) for name in ("items", "users")
        }
        named = named_values("--table", args.table, "ROWS", shorthands, example="words=100000")
        tables = {}
        for name, text in named.items():
            try:
                tables[name] = int(text)
            except ValueError:
                raise UsageError(
                    f"--table {name}={text}: ROWS must be a whole number of rows, e.g. --table {name}=100000"
                ) from None
        if args.dim is None:
            raise UsageError("synth needs --dim D (the width of every table)")
        if args.noise or args.churn:
            raise UsageError("--noise and --churn apply to --like retrains only")
        check_synth_tables(
            tables, dim=args.dim, rank=args.rank, seed=args.seed, dtype=args.dtype, chunk_rows=args.chunk_rows
        )
        structure = resolve(
            tuple(tables), sides=args.sides, symmetric_all=args.symmetric, label="the synthetic version"
        )
        check_output(args.out, inputs=[], overwrite=args.overwrite)
        with scheduler_from_args(args, nbytes=sum(tables.values()) * args.dim * np.dtype(args.dtype).itemsize):
            out = synth_tables(
                args.out, tables, dim=args.dim, structure=structure, rank=args.rank, seed=args.seed, dtype=args.dtype,
                chunk_rows=args.chunk_rows, counts=args.counts, overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
    else:
        missing = [name for name in ("items", "users", "dim") if getattr(args, name) is None]
        if missing:
            raise UsageError(
                f"synth needs --items, --users and --dim (or --table NAME=ROWS and --dim, or --like VERSION); "
                f"missing --{', --'.join(missing)}"
            )
        if args.noise or args.churn:
            raise UsageError("--noise and --churn apply to --like retrains only")
        check_synth(
            items=args.items, users=args.users, dim=args.dim, rank=args.rank, seed=args.seed, dtype=args.dtype,
            chunk_rows=args.chunk_rows,
        )  # fmt: skip
        check_output(args.out, inputs=[], overwrite=args.overwrite)
        with scheduler_from_args(args, nbytes=(args.items + args.users) * args.dim * np.dtype(args.dtype).itemsize):
            out = synth(
                args.out, items=args.items, users=args.users, dim=args.dim, rank=args.rank, seed=args.seed,
                dtype=args.dtype, chunk_rows=args.chunk_rows, counts=args.counts, overwrite=args.overwrite,
                progress=progress,
            )  # fmt: skip
    data = {"out": args.out, **_version_figures(out), "seed": args.seed, "like": args.like}
    return output.finish(
        args, data, lambda: [f"wrote {args.out}: {out!r}" + (f", {out.structure}" if out.structure is not None else "")]
    )


def cmd_nightly(args: argparse.Namespace) -> int:
    from .. import nightly
    from ..report import format_matching
    from ..stabilize import check_request
    from ..store import check_output, open_version
    from ..structure import parse_sides

    options = _storage_options(args)
    source = os.fspath(args.source)
    stable = args.stable if args.stable is not None else nightly.join(source, "stable")
    gates = nightly.Gates(max_score_error=args.max_score_error, max_drift=args.max_drift)
    if args.previous_weight is not None and args.policy != "mix":
        raise UsageError(
            f"--previous-weight weighs the day before in --policy mix; with --policy {args.policy} drop it"
        )
    if args.base is not None and args.policy == "previous":
        raise UsageError("--base names the day --policy base or mix aligns onto; --policy previous has none: drop it")
    weight = nightly.DEFAULT_PREVIOUS_WEIGHT if args.previous_weight is None else args.previous_weight
    policy = nightly.Policy(args.policy, weight, args.base)
    if args.sides:
        parse_sides(args.sides)  # a malformed --sides is refused before anything is opened
    nightly.check_stable_location(source, stable)
    names = nightly.list_raw_days(source, options)
    if not names:
        log.info("nightly: no days under %s yet: nothing to do", nightly.join(source, "raw"))
    days = nightly.plan(source, names, (), stable=stable, policy=policy)
    done = nightly.find_done(days, options)
    known: dict[str, Version] = {}
    if args.base is None:  # the chain keeps its base, whatever raw days are gone (and through previous nights)
        kept = nightly.recorded_base(days, done, options)
        if kept is not None:
            policy = nightly.Policy(policy.kind, policy.previous_weight, kept[0])
            known = {kept[0]: kept[1]} if kept[0] not in names else {}
            days = nightly.plan(source, names, (), stable=stable, policy=policy, base_kept=True)
    todo = [day for day in days if day.name not in done]
    for day in nightly.late_days(days, done):
        log.warning(
            "dstab: note: %s arrived after a later day was stabilized: it is aligned onto %s, and the days after "
            "it stay as they were (the chain branches here)", day.name,
            " + ".join(f"{w:g} x {name}" for name, w in day.references) or "nothing (the first day)",
        )  # fmt: skip
    for change in nightly.chain_changes(days, done, policy, known):
        log.warning("dstab: note: %s", change)
    log.debug("nightly: %d days under %s: %d done, %d to do; stable versions in %s", len(days), nightly.join(source, "raw"),
              len(done), len(todo), stable)  # fmt: skip
    for day in days:
        log.debug("nightly: %s %s -> %s%s", "skip" if day.name in done else "todo", day.raw, day.stable,
                  f" (onto {day.reference})" if day.reference and day.name not in done else "")  # fmt: skip
    fit = {
        "sides": args.sides, "symmetric": args.symmetric, "rank": args.rank, "rtol": args.rtol, "anchor": args.anchor,
        "anchor_min_count": args.anchor_min_count, "anchor_weights": args.anchor_weights, "method": args.method,
    }  # fmt: skip
    tables: list[Table] = []
    if todo:
        # the first day to do, checked (structure, anchors, rank) before any cluster starts; its reference is done
        first = todo[0]
        new = open_version(first.raw, options)
        # every day before the first to do is done (or is the kept base)
        references = [{**known, **done}[name] for name, _ in first.references]
        for day in todo:  # a folder of the user's at any STABLE/<day>: refused before the first day is stabilized
            check_output(day.stable, inputs=[day.raw], overwrite=False, storage_options=options)
        check_request(
            new, references, reference_weights=[w for _, w in first.references] if references else None,
            **{k: v for k, v in fit.items() if references or not k.startswith("anchor")},
        )  # fmt: skip
        tables = _tables(new, *references)
    fit["in_memory"] = args.in_memory  # how the days are read, not what they are fitted with: not checked above

    def said(record: dict[str, Any]) -> None:
        if not args.json:
            print(nightly.describe_day(record), flush=True)
            for line in format_matching(record.get("matching") or {}):
                print(f"  {line}", flush=True)
        for note in record.get("notes") or []:
            log.info("%s: note: %s", record["name"], note)

    night = nightly.Night(source=source, stable=stable, gates=gates, policy=policy)  # the policy as applied
    try:
        with scheduler_from_args(args, tables) if todo else contextlib.nullcontext():
            nightly.run(
                days, done, source=source, stable=stable, options=fit, gates=gates, policy=policy,
                storage_options=options, progress=output.progress(args), on_day=said, night=night, known=known,
            )  # fmt: skip
    except DstabError as exc:
        exc.night = night  # type: ignore[attr-defined]  # the failure's JSON object says what the night did before it
        raise
    if args.json:
        print(output.dumps({"ok": True, "command": "nightly", **night.as_dict()}))
    return 0
