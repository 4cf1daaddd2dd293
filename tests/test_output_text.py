"""What people read: progress in a log file is a few plain lines, and `report` / `log` speak in words."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest

import dstab
from dstab.cli import main
from dstab.executor import compute, run_all
from dstab.synth import synth, synth_like

from conftest import random_tables, write_version

FAST = ["--scheduler", "synchronous", "--no-progress"]
PLAIN = re.compile(r"dstab: [a-z][^\r]*: (\d[\d,]* tasks? \.\.\.|done in \d+\.\d s)")


def dstab_exe() -> str:
    return str(Path(sys.executable).with_name("dstab"))


def run_logged(tmp_path: Path, *argv: str, name: str = "stderr.log") -> list[str]:
    """Run a command with stderr going to a file (not a terminal), as a nightly job's log; its stderr lines."""
    log = tmp_path / name
    with open(log, "w") as handle:
        proc = subprocess.run(
            list(argv), check=False, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=tmp_path, timeout=240
        )
    raw = log.read_bytes()  # bytes: reading text would turn every "\r" into a newline
    assert proc.returncode == 0, raw
    assert b"\r" not in raw and b"\x1b" not in raw, raw
    return raw.decode().splitlines()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- progress without a terminal


def test_progress_into_a_log_file_is_a_few_plain_lines(tmp_path: Path):
    exe = dstab_exe()
    threads = ["--scheduler", "threads"]
    lines = run_logged(
        tmp_path,
        exe,
        "synth",
        "v0",
        "--items",
        "3000",
        "--users",
        "2000",
        "--dim",
        "8",
        "--chunk-rows",
        "500",
        *threads,
    )
    assert 1 <= len(lines) <= 4 and all(PLAIN.fullmatch(line) for line in lines), lines
    assert lines[-1].startswith("dstab: ") and " done in " in lines[-1]
    lines = run_logged(tmp_path, exe, "synth", "v1", "--like", "v0", "--noise", "0.01", "--seed", "2", *threads)
    assert 1 <= len(lines) <= 4 and all(PLAIN.fullmatch(line) for line in lines), lines
    lines = run_logged(tmp_path, exe, "stabilize", "v0", "--out", "s0", *threads)
    assert 2 <= len(lines) <= 10 and all(PLAIN.fullmatch(line) for line in lines), lines
    # the default: a local cluster of worker processes (progress reported by the scheduler)
    lines = run_logged(
        tmp_path,
        exe,
        "stabilize",
        "v1",
        "--reference",
        "s0",
        "--out",
        "s1",
        "--workers",
        "1",
        "--dashboard-address",
        ":0",
    )
    assert len(lines) <= 16, lines
    assert any(line.startswith("dstab: local cluster of 1 worker") for line in lines), lines
    stages = [line for line in lines if PLAIN.fullmatch(line)]
    assert len(stages) >= 4 and sum(" done in " in line for line in stages) * 2 == len(stages), lines


def test_nightly_progress_into_a_log_file(tmp_path: Path):
    raw = tmp_path / "raw"
    base = synth(raw / "2026-11-01", items=1500, users=1000, dim=6, seed=3, chunk_rows=400)
    synth_like(raw / "2026-11-02", base, noise=0.01, seed=1)
    lines = run_logged(tmp_path, dstab_exe(), "nightly", str(tmp_path), "--scheduler", "threads")
    assert lines[0] == "2026-11-01: stabilizing (first: no reference)", lines
    assert any(line.startswith("2026-11-02: stabilizing (onto ") for line in lines), lines
    assert all(PLAIN.fullmatch(line) or ": stabilizing (" in line for line in lines) and len(lines) <= 14, lines


def test_compute_names_its_stage_in_plain_lines(scheduler: str, capsys: pytest.CaptureFixture[str]):
    x = dask.array.ones((1000, 4), chunks=(100, 4))
    capsys.readouterr()
    (total,) = compute(x.sum(), progress=True, stage="adding up")
    assert total == 4000
    err = capsys.readouterr().err
    assert "\r" not in err
    start, done = err.splitlines()
    assert re.fullmatch(r"dstab: adding up: \d+ tasks \.\.\.", start) and re.fullmatch(
        r"dstab: adding up: done in \d+\.\d s", done
    )
    run_all([dask.delayed(len)([1])], progress=True)  # the default stage of writes
    assert re.fullmatch(r"dstab: writing: 1 task \.\.\.\ndstab: writing: done in \d+\.\d s\n", capsys.readouterr().err)
    compute(x.sum(), progress=False, stage="quiet")
    assert capsys.readouterr().err == ""


def test_compute_on_a_terminal_keeps_its_bar(monkeypatch: pytest.MonkeyPatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with dask.config.set(scheduler="threads"):
        compute(dask.array.ones(10, chunks=5).sum(), progress=True, stage="adding up")
    assert (
        err.getvalue().startswith("dstab: adding up\n")
        and "\r[" in err.getvalue()
        and "100% Completed" in err.getvalue()
    )


def test_failing_stage_says_it_stopped(capsys: pytest.CaptureFixture[str]):
    def boom() -> None:
        raise ValueError("boom")

    with dask.config.set(scheduler="synchronous"), pytest.raises(ValueError, match="boom"):
        compute(dask.delayed(boom)(), progress=True, stage="failing")
    assert re.search(r"dstab: failing: stopped after \d+\.\d s\n$", capsys.readouterr().err)


# ----------------------------------------------------------------------------- report and log in words


def assert_words(text: str) -> None:
    """No Python repr: no braces, no None, no question marks standing in for what is unknown."""
    for bad in ("{", "}", "None", "?", "'", "[", "]"):
        assert bad not in text, f"{bad!r} in:\n{text}"


def test_report_and_log_speak_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(21, 500, 300, 6)
    raw = write_version(tmp_path / "raw", T, W)
    np.save(tmp_path / "x.npy", T)
    np.save(tmp_path / "y.npy", W)
    np.save(tmp_path / "x_ids.npy", np.arange(500, dtype=np.int64) + 7)
    syn, retrain, imported, s0, s1 = (tmp_path / n for n in ("syn", "retrain", "imported", "s0", "s1"))
    assert (
        run_cli(
            capsys, "synth", syn, "--items", "800", "--users", "600", "--dim", "6", "--rank", "4", "--seed", "3", *FAST
        )[0]
        == 0
    )
    assert run_cli(capsys, "synth", retrain, "--like", syn, "--noise", "0.02", "--seed", "4", *FAST)[0] == 0
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "x.npy", "--items-ids", tmp_path / "x_ids.npy", "--users", tmp_path / "y.npy",
        "--out", imported, *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert run_cli(capsys, "stabilize", syn, "--out", s0, *FAST)[0] == 0
    assert run_cli(capsys, "stabilize", retrain, "--reference", s0, "--out", s1, *FAST)[0] == 0

    reports, logs = {}, {}
    for name, path in (
        ("raw", raw),
        ("synth", syn),
        ("retrain", retrain),
        ("imported", imported),
        ("s0", s0),
        ("s1", s1),
    ):
        code, reports[name], err = run_cli(capsys, "report", path, *FAST)
        assert code == 0, err
        code, logs[name], err = run_cli(capsys, "log", path)
        assert code == 0, err
        assert_words(reports[name])
        assert_words(logs[name])
    for name in ("raw", "synth", "retrain", "imported"):
        assert "rank kept" not in reports[name] and "spectrum measured now: rank" in reports[name]
        assert "not stabilized" in reports[name]
    assert (
        "raw version" in reports["raw"]
        and "not written by dstab" in reports["raw"]
        and "not written by dstab" in logs["raw"]
    )
    assert "rank 6 of 6" in reports["raw"]
    version = f"by dstab {dstab.__version__}"
    for text in (reports["synth"], logs["synth"]):
        assert version in text and "synthetic: 800 items and 600 users of width 6, scores of rank 4, seed 3" in text
    for text in (reports["retrain"], logs["retrain"]):
        assert "a synthetic retrain of" in text and "relative noise 0.02" in text and "seed 4" in text
    for text in (reports["imported"], logs["imported"]):
        assert "imported version" in text and version in text
        assert (
            f"items {tmp_path / 'x.npy'} (ids from {tmp_path / 'x_ids.npy'})" in text
            and f"users {tmp_path / 'y.npy'}" in text
        )
    assert (
        "rank kept 4 of 6" in reports["s0"]
        and "first of the chain" in reports["s0"]
        and "first of the chain" in logs["s0"]
    )
    assert (
        f"stabilized from {retrain} onto {s0}" in reports["s1"] and "drift onto the reference: before" in reports["s1"]
    )
    assert "  2. " in logs["s1"] and f"stabilized from {syn}" in logs["s1"]

    # the imported version's lineage, as recorded
    attrs = dstab.open_version(imported).attrs
    assert attrs["kind"] == "imported" and attrs["dstab_version"] == dstab.__version__ and attrs["created"]
    assert attrs["sources"]["items"]["url"] == str(tmp_path / "x.npy") and attrs["sources"]["items"]["format"] == "npy"
    assert attrs["sources"]["items"]["ids"] == str(tmp_path / "x_ids.npy") and attrs["sources"]["users"]["ids"] is None
    code, out, _ = run_cli(capsys, "report", imported, "--json", *FAST)
    lineage = json.loads(out)["lineage"]
    assert lineage["dstab_version"] == dstab.__version__ and lineage["sources"]["users"]["url"] == str(
        tmp_path / "y.npy"
    )
    code, out, _ = run_cli(capsys, "log", imported, "--json")
    assert json.loads(out)["chain"][0]["sources"]["items"]["url"] == str(tmp_path / "x.npy")


def test_report_of_a_parquet_import_names_its_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    T, W = random_tables(22, 200, 150, 5)
    for name, table in (("items", T), ("users", W)):
        columns = {"key": pa.array(np.arange(len(table)))} | {f"v{j}": pa.array(table[:, j]) for j in range(5)}
        pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet")
    out = tmp_path / "v"
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items.parquet", "--users", tmp_path / "users.parquet",
        "--id-column", "key", "--vector-columns", "v*", "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err
    code, text, _ = run_cli(capsys, "log", out)
    assert_words(text)
    assert f"items {tmp_path / 'items.parquet'} (id column key; vectors from 5 columns v0 to v4)" in text


def test_report_of_a_version_with_old_or_partial_lineage(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Lineage written before dstab recorded its version and the import's column options still reads as words."""
    import zarr

    T, W = random_tables(23, 100, 80, 4)
    path = write_version(tmp_path / "old", T, W)
    zarr.open_group(path).attrs["dstab"] = {
        "kind": "imported", "sources": {"items": "/data/items.npy", "users": "/data/users.npy"},
        "created": "2025-01-02T03:04:05+00:00", "format": 1, "complete": True,
    }  # fmt: skip
    code, text, _ = run_cli(capsys, "report", path, *FAST)
    assert code == 0
    code, log, _ = run_cli(capsys, "log", path)
    for t in (text, log):
        assert_words(t)
        assert "made 2025-01-02 03:04:05 UTC by an unrecorded version of dstab" in t
        assert "imported from items /data/items.npy and users /data/users.npy" in t
