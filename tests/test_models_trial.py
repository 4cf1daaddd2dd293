"""Defects a new user found in the models of issue 12, each kept fixed: names, structures, outputs inside versions, tiny tables."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

import dstab
from dstab.cli import main
from dstab.neighbours import overlap

FAST = ["--scheduler", "synchronous", "--no-progress"]


def write_raw(path: Path, tables: dict[str, int], dim: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w")
    for name, rows in tables.items():
        group.create_array(
            f"{name}/vectors", data=(rng.normal(size=(rows, dim)) + 0.2).astype(np.float32), chunks=(16, dim)
        )
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def digest(path: Path) -> str:
    """A checksum of every file under ``path``: what "unchanged" means."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["transform", "singular_values", "a,b", "x:y", "my table"])
def test_a_table_name_dstab_cannot_keep_apart_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str):
    """Before: 'transform' was silently dropped, 'singular_values' crashed the write, 'a,b' could not be anchored."""
    raw = write_raw(tmp_path / "raw", {name: 30, "b": 30})
    code, err = run(capsys, "stabilize", raw, "--out", tmp_path / "out", "--symmetric", *FAST)
    assert code == 2 and repr(name) in err and "cannot name a table" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_flag_that_contradicts_the_recorded_structure_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Before: --sides over a version recording another structure exited 0 with q2 x c1 scores 61% off."""
    raw = write_raw(tmp_path / "raw", {"q1": 30, "q2": 30, "c1": 40, "c2": 40})
    assert run(capsys, "stabilize", raw, "--out", tmp_path / "s", "--sides", "q1,q2:c1,c2", *FAST)[0] == 0
    code, err = run(capsys, "stabilize", tmp_path / "s", "--out", tmp_path / "t", "--sides", "q1:q2,c1,c2", *FAST)
    assert code == 2 and "records two-sided (q1,q2 scored against c1,c2)" in err and "drop --sides" in err
    code, err = run(capsys, "synth", tmp_path / "r", "--like", tmp_path / "s", "--symmetric", *FAST)
    assert code == 2 and "drop --symmetric" in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()
    # the same structure, tables listed in another order, is no contradiction
    assert run(capsys, "stabilize", tmp_path / "s", "--out", tmp_path / "t", "--sides", "q2,q1:c2,c1", *FAST)[0] == 0


def test_an_output_inside_a_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Before: apply --out RAW/NEW added a table to the raw version, which then failed every command."""
    raw = write_raw(tmp_path / "raw", {"users": 30, "items": 40})
    assert run(capsys, "stabilize", raw, "--out", tmp_path / "s", *FAST)[0] == 0
    before = digest(tmp_path / "raw")
    for command in (
        [
            "apply",
            tmp_path / "s",
            "--table",
            "items",
            "--rows",
            tmp_path / "raw" / "items",
            "--out",
            tmp_path / "raw" / "more",
        ],
        ["stabilize", tmp_path / "s", "--out", tmp_path / "raw" / "nested"],
        ["export", tmp_path / "s", "--out", tmp_path / "raw" / "users" / "parquet"],
    ):
        code, err = run(capsys, *command, *FAST)
        assert code == 2 and "lies inside the Zarr group" in err and str(tmp_path / "raw") in err
    assert digest(tmp_path / "raw") == before
    assert dstab.open_version(raw).names == ("items", "users")


def test_neighbour_overlap_of_a_tiny_table_is_a_share_of_the_neighbours_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Before: a 3-row table's identical neighbourhoods scored 0.1 at k=10 (2 neighbours over 10)."""
    same = [{1, 2}, {0, 2}, {0, 1}]
    assert overlap(same, same, 10) == 1.0
    assert overlap([{1, 2}], [{1, 3}], 10) == 0.5
    assert overlap([set(range(10))], [set(range(5, 15))], 10) == 0.5
    raw = write_raw(tmp_path / "raw", {"words": 60, "country": 3})
    assert run(capsys, "stabilize", raw, "--out", tmp_path / "s", *["--symmetric"], *FAST)[0] == 0
    report = dstab.report.measure_drift(dstab.open_version(tmp_path / "s"), dstab.open_version(tmp_path / "s"), k=10)
    assert report["country"]["neighbour_overlap"] == 1.0 and report["words"]["neighbour_overlap"] == 1.0


def test_anchor_and_structure_flags_say_what_was_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A repeated --anchor table is refused like a repeated --sides one; advice names only the flags given;
    a recorded structure that no longer fits the tables (one removed since) gives way to the flag."""
    raw = write_raw(tmp_path / "raw", {"q1": 30, "c1": 40, "c2": 40})
    assert run(capsys, "stabilize", raw, "--out", tmp_path / "s", "--sides", "q1:c1,c2", *FAST)[0] == 0
    code, err = run(capsys, "stabilize", raw, "--out", tmp_path / "t", "--sides", "q1:c1,c2",
                    "--reference", tmp_path / "s", "--anchor", "c1,c1", *FAST)  # fmt: skip
    assert code == 2 and "--anchor names 'c1' twice" in err
    code, err = run(capsys, "stabilize", raw, "--out", tmp_path / "t", "--sides", "q1:c1,c2", "--anchor", "c1", *FAST)
    assert code == 2 and err.count("--anchor") == 1 and "drop it" in err and "--anchor-min-count" not in err
    # a table removed from a version that records q1:c1,c2: the record is stale, the flag decides
    import shutil

    shutil.copytree(tmp_path / "s", tmp_path / "s2")
    shutil.rmtree(tmp_path / "s2" / "c2")
    code, err = run(capsys, "stabilize", tmp_path / "s2", "--out", tmp_path / "u", *FAST)
    assert code == 2 and "the structure recorded" in err and "'c2'" in err
    assert run(capsys, "stabilize", tmp_path / "s2", "--out", tmp_path / "u", "--sides", "q1:c1", *FAST)[0] == 0
