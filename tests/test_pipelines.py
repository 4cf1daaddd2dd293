"""The runnable pipelines: the README's quickstart and the nightly directory job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dstab
from dstab.synth import synth, synth_like
from pipelines import nightly, quickstart

from conftest import read_tables, relative_score_error


@pytest.mark.slow
def test_quickstart_runs_and_stabilizes_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    directory = tmp_path / "qs"
    assert quickstart.main(["--dir", str(directory), "--items", "6000", "--users", "4000", "--dim", "16"]) == 0
    out, err = capsys.readouterr()
    # the numbers come with their meaning, and progress (stderr is no terminal here) is plain lines
    assert "drift = " in out and "score error = " in out and "good: below 1e-5" in out
    assert "\r" not in err and "quickstart: day2: stabilizing onto day1-stable" in err and "dstab: " in err
    lines = [line.split() for line in out.splitlines() if line.startswith("day")]
    assert [line[0] for line in lines] == ["day0-stable", "day1-stable", "day2-stable"]
    for line in lines[1:]:
        before, after, score_error = float(line[2]), float(line[3]), float(line[4])
        assert after < before / 20 and score_error < 1e-5
    # running again reuses its own directory, but never one it did not make
    assert quickstart.main(["--dir", str(directory), "--items", "3000", "--users", "2000", "--dim", "8"]) == 0
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "precious").write_text("x")
    with pytest.raises(SystemExit, match="not made by the quickstart"):
        quickstart.run(other, 10, 10, 2, 0.0)
    assert (other / "precious").exists()


def test_nightly_processes_in_order_and_skips_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    raw = tmp_path / "raw"
    base = synth(raw / "2026-11-01", items=2000, users=1500, dim=12, seed=3, chunk_rows=500)
    for day, seed in (("2026-11-02", 1), ("2026-11-03", 2)):
        synth_like(raw / day, base, noise=0.0, seed=seed)
    args = [str(tmp_path), "--scheduler", "synchronous", "--no-progress"]
    assert nightly.main(args) == 0
    stable = [read_tables(str(tmp_path / "stable" / d)) for d in ("2026-11-01", "2026-11-02", "2026-11-03")]
    T0, W0 = read_tables(str(raw / "2026-11-01"))
    for T, W in stable:
        assert relative_score_error(T0, W0, T, W) < 1e-5
        # noise-free retrains land back on the first stabilized version
        assert np.linalg.norm(T - stable[0][0]) / np.linalg.norm(stable[0][0]) < 1e-4
    v = dstab.open_version(tmp_path / "stable" / "2026-11-03")
    assert v.attrs["reference"].endswith("2026-11-02")
    capsys.readouterr()
    # a second night: nothing to do; then a new day arrives and only it is processed
    assert nightly.main(args) == 0
    assert capsys.readouterr().err.count("already stabilized") == 3
    synth_like(raw / "2026-11-04", base, noise=0.0, seed=9)
    assert nightly.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("2026-11-04:") and captured.err.count("already stabilized") == 3


def test_nightly_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert nightly.main([str(tmp_path / "nothing"), "--scheduler", "synchronous"]) == 2
    assert "raw does not exist" in capsys.readouterr().err


def test_nightly_runs_any_structure_from_the_flag_then_from_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Raw days record no structure: --sides fixes it the first night; later nights read it from the stable days."""
    import zarr

    raw = tmp_path / "raw"
    rng = np.random.default_rng(5)
    users, items, creators = (rng.normal(size=(n, 6)).astype(np.float32) for n in (300, 400, 50))
    g = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    days = {
        "2026-11-01": (users, items, creators),
        "2026-11-02": (users @ np.linalg.inv(g).T, items @ g, creators @ g),
    }
    for day, (u, i, c) in days.items():
        group = zarr.open_group(str(raw / day), mode="w")
        for name, rows in (("users", u), ("items", i), ("creators", c)):
            group.create_array(f"{name}/vectors", data=rows.astype(np.float32), chunks=(100, 6))
    # several tables and no structure anywhere: a usage error listing the tables
    assert nightly.main([str(tmp_path), "--scheduler", "synchronous", "--no-progress"]) == 2
    assert "--sides" in capsys.readouterr().err
    args = [str(tmp_path), "--scheduler", "synchronous", "--no-progress", "--sides", "users:items,creators"]
    assert nightly.main(args) == 0
    first = dstab.open_version(tmp_path / "stable" / "2026-11-01")
    second = dstab.open_version(tmp_path / "stable" / "2026-11-02")
    assert second.structure == first.structure and second.structure.query == ("users",)
    raw_scores = users.astype(np.float64) @ np.vstack([items, creators]).astype(np.float64).T
    for version in (first, second):
        u = version.table("users").vectors[:].astype(np.float64)
        cand = np.vstack([version.table(n).vectors[:] for n in ("items", "creators")]).astype(np.float64)
        assert np.linalg.norm(u @ cand.T - raw_scores) / np.linalg.norm(raw_scores) < 1e-5
    # noise-free retrain: day 2 lands on day 1
    assert np.abs(second.table("creators").vectors[:] - first.table("creators").vectors[:]).max() < 1e-3
    # a third day needs no flag: the structure comes from the stabilized day before
    group = zarr.open_group(str(raw / "2026-11-03"), mode="w")
    for name, rows in (("users", users), ("items", items), ("creators", creators)):
        group.create_array(f"{name}/vectors", data=rows, chunks=(100, 6))
    assert nightly.main(args[:-2]) == 0
    assert dstab.open_version(tmp_path / "stable" / "2026-11-03").structure == first.structure
