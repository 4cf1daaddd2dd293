"""The dstab command: its happy paths, and every bad input giving exit 2, one clear line, nothing on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from dstab.cli import main

from conftest import random_tables, read_tables, relative_score_error, write_version

FAST = ["--scheduler", "synchronous", "--no-progress"]


def dstab_exe() -> str:
    return str(Path(sys.executable).with_name("dstab"))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synth_stabilize_report_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    v0, v1, s0, s1 = (str(tmp_path / n) for n in ("v0", "v1", "s0", "s1"))
    assert (
        run_cli(capsys, "synth", v0, "--items", "3000", "--users", "2000", "--dim", "16", "--chunk-rows", "700", *FAST)[
            0
        ]
        == 0
    )
    assert run_cli(capsys, "synth", v1, "--like", v0, "--noise", "0", "--seed", "5", *FAST)[0] == 0
    T0, W0 = read_tables(v0)
    T1, W1 = read_tables(v1)
    # a retrain keeps the scores and moves the basis (not only a rotation)
    assert relative_score_error(T0, W0, T1, W1) < 1e-5
    assert np.linalg.norm(T1 - T0) / np.linalg.norm(T0) > 0.1
    assert not np.allclose(np.linalg.norm(T1, axis=1), np.linalg.norm(T0, axis=1), rtol=1e-2)
    assert run_cli(capsys, "stabilize", v0, "--out", s0, *FAST)[0] == 0
    code, out, _ = run_cli(capsys, "stabilize", v1, "--reference", s0, "--out", s1, *FAST)
    assert code == 0 and "drift before" in out
    code, out, _ = run_cli(capsys, "report", s1, "--json")
    report = json.loads(out)
    for key in (
        "rank",
        "dim_in",
        "dim_out",
        "n_items",
        "n_users",
        "singular_values",
        "score_error",
        "drift_before",
        "drift_after",
    ):
        assert key in report
    assert report["rank"] == 16 and report["n_items"] == 3000 and report["n_users"] == 2000
    assert report["drift_after"] < 1e-4 < report["drift_before"]
    assert report["score_error"] < 1e-5
    S0, S1 = read_tables(s0), read_tables(s1)
    assert np.linalg.norm(S1[0] - S0[0]) / np.linalg.norm(S0[0]) < 1e-4
    code, out, _ = run_cli(capsys, "report", s1, "--reference", s0, "--json", *FAST)
    assert code == 0 and json.loads(out)["drift_vs_reference"]["total"] < 1e-4
    code, out, _ = run_cli(capsys, "report", v0, *FAST)
    assert code == 0 and "rank 16 of 16" in out


def test_synth_rank_and_float64(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = str(tmp_path / "v")
    assert (
        run_cli(
            capsys,
            "synth",
            out,
            "--items",
            "500",
            "--users",
            "400",
            "--dim",
            "12",
            "--rank",
            "3",
            "--dtype",
            "float64",
            *FAST,
        )[0]
        == 0
    )
    T, W = read_tables(out)
    assert T.dtype == np.float64 and np.linalg.matrix_rank(W @ T.T) == 3
    code, text, _ = run_cli(capsys, "report", out, "--json", *FAST)
    assert json.loads(text)["rank"] == 3


# ----------------------------------------------------------------------------- bad inputs


def _bad(tmp_path: Path, T, W, **kw) -> str:
    return write_version(tmp_path / "bad", T, W, **kw)


GOOD_T, GOOD_W = random_tables(0, 300, 200, 8, "float32")


def nan_in_one_chunk(tmp_path: Path) -> str:
    T = GOOD_T.copy()
    T[157, 3] = np.nan
    return _bad(tmp_path, T, GOOD_W, chunk_rows=50)


def inf_in_users(tmp_path: Path) -> str:
    W = GOOD_W.copy()
    W[123, 0] = np.inf
    return _bad(tmp_path, GOOD_T, W, chunk_rows=50)


BAD_INPUTS = {
    "missing path": (lambda p: str(p / "nope"), "does not exist"),
    "not a zarr group": (lambda p: (p / "file.txt").write_text("hello") and str(p / "file.txt"), "not a Zarr group"),
    # a table group without vectors (a lone items/ is a valid one-table version now)
    "no users array": (
        lambda p: (
            zarr.open_group(str(p / "g"), mode="w").create_array("items/vectors", shape=(3, 2), dtype="f4").store
            and zarr.open_group(str(p / "g"), mode="a").create_array("users/ids", shape=(3,), dtype="i8").store
            and str(p / "g")
        ),
        "no users/vectors",
    ),  # noqa: E501
    "1-D vectors": (lambda p: _bad(p, GOOD_T[:, 0], GOOD_W), "items/vectors must be 2-D"),
    "integer dtype": (
        lambda p: _bad(p, GOOD_T.astype(np.int64), GOOD_W.astype(np.int64)),
        "items/vectors has dtype int64",
    ),
    "dim mismatch": (lambda p: _bad(p, GOOD_T, GOOD_W[:, :5]), "width 8 but users/vectors has width 5"),
    "nan in one chunk": (nan_in_one_chunk, "items/vectors row 157"),
    "inf in users": (inf_in_users, "users/vectors row 123"),
    "empty table": (lambda p: _bad(p, GOOD_T[:0], GOOD_W), "items/vectors is empty"),
    "all-zero table": (lambda p: _bad(p, np.zeros_like(GOOD_T), GOOD_W), "all zeros"),
    "ids of wrong length": (
        lambda p: _bad(p, GOOD_T, GOOD_W, item_ids=np.arange(299, dtype=np.int64)),
        "299 ids for 300",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "stabilize", path, "--out", str(out), *FAST)
    assert code == 2, err
    assert expected in err
    assert err.startswith("dstab: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging litter


def test_nan_error_names_the_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T = GOOD_T.copy()
    T[42, 0] = np.nan
    path = _bad(tmp_path, T, GOOD_W, item_ids=np.arange(300, dtype=np.int64) + 1000)
    code, _, err = run_cli(capsys, "stabilize", path, "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "row 42 (id 1042)" in err


def test_nan_in_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    new = write_version(tmp_path / "new", GOOD_T, GOOD_W)
    R = GOOD_T.copy()
    R[7, 1] = np.nan
    ref = write_version(tmp_path / "ref", R, GOOD_W)
    code, _, err = run_cli(capsys, "stabilize", new, "--reference", ref, "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "items/vectors of the reference row 7" in err


def test_refuses_to_write_over_inputs_or_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    new = write_version(tmp_path / "new", GOOD_T, GOOD_W)
    ref = write_version(tmp_path / "ref", GOOD_T, GOOD_W)
    before = read_tables(new)
    for out in (new, ref, str(tmp_path), str(Path(new) / "inside")):
        code, _, err = run_cli(capsys, "stabilize", new, "--reference", ref, "--out", out, "--overwrite", *FAST)
        assert code == 2 and "never writes over its inputs" in err
    np.testing.assert_array_equal(read_tables(new)[0], before[0])
    out = tmp_path / "out"
    assert run_cli(capsys, "stabilize", new, "--out", str(out), *FAST)[0] == 0
    code, _, err = run_cli(capsys, "stabilize", new, "--out", str(out), *FAST)
    assert code == 2 and "already holds a dstab version; pass --overwrite" in err
    assert run_cli(capsys, "stabilize", new, "--out", str(out), "--overwrite", "--rank", "3", *FAST)[0] == 0
    assert read_tables(str(out))[0].shape == (300, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out", "ref"]


def test_incomplete_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write_version(tmp_path / "v", GOOD_T, GOOD_W)
    zarr.open_group(path, mode="r+").attrs["dstab"] = {"format": 1, "complete": False}
    code, _, err = run_cli(capsys, "report", path)
    assert code == 2 and "incomplete" in err
    code, _, err = run_cli(capsys, "stabilize", path, "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "incomplete" in err


def test_reference_with_other_rows_and_no_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    new = write_version(tmp_path / "new", GOOD_T, GOOD_W, item_ids=np.arange(300, dtype=np.int64))
    short = write_version(tmp_path / "short", GOOD_T[:250], GOOD_W)
    code, _, err = run_cli(capsys, "stabilize", new, "--reference", short, "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "items: the new version has 300 rows but the reference has 250" in err
    assert "the reference has no items/ids" in err and "give both versions items/ids" in err
    assert not (tmp_path / "o").exists()


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    new = write_version(tmp_path / "new", GOOD_T, GOOD_W)
    assert run_cli(capsys, "stabilize", new, "--out", str(tmp_path / "o"), "--rank", "zero", *FAST)[0] == 2
    code, _, err = run_cli(capsys, "stabilize", new, "--out", str(tmp_path / "o"), "--rank", "9", *FAST)
    assert code == 2 and "larger than the embedding width 8" in err
    code, _, err = run_cli(capsys, "synth", str(tmp_path / "s"), "--items", "10", *FAST)
    assert code == 2 and "missing --users, --dim" in err
    assert run_cli(capsys, "frobnicate")[0] == 2
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_console_script_exit_codes(tmp_path: Path):
    """The installed `dstab` executable: exit 2 and one line on stderr, no traceback."""
    proc = subprocess.run([dstab_exe(), "report", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_console_script_default_local_cluster(tmp_path: Path):
    """No --scheduler: a local cluster of worker processes is started, with a memory limit, and says where its dashboard is."""
    new = write_version(tmp_path / "new", GOOD_T, GOOD_W)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    proc = subprocess.run(
        [dstab_exe(), "stabilize", new, "--out", str(tmp_path / "o"), "--workers", "2", "--memory-limit", "1GiB", "--dashboard-address", ":0"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "local cluster of 2 workers; dashboard at http" in proc.stderr
    T, W = read_tables(str(tmp_path / "o"))
    assert relative_score_error(GOOD_T, GOOD_W, T, W) < 1e-5


BLAS_THREADS_AFTER_A_JOB = """
import sys, threadpoolctl
from dstab.cli import main
code = main(["synth", sys.argv[1], "--items", "300", "--users", "200", "--dim", "16", "-q"])
code |= main(["stabilize", sys.argv[1], "--out", sys.argv[2], "-q"])
assert code == 0, code
print(max(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"))
"""


@pytest.mark.parametrize("user_setting", [None, "2"], ids=["default", "user-set"])
def test_the_cli_runs_blas_on_one_thread_unless_told(tmp_path: Path, user_setting: str | None):
    """Every BLAS library the CLI loads, scipy's included (loaded inside the job), runs on one thread, unless the
    user set a thread count: OpenBLAS threads spinning against Dask's made small wide jobs 3x slower."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS")
    }
    if user_setting:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    proc = subprocess.run(
        [sys.executable, "-c", BLAS_THREADS_AFTER_A_JOB, str(tmp_path / "v"), str(tmp_path / "s")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = 1 if user_setting is None else min(int(user_setting), os.cpu_count() or 1)
    assert int(proc.stdout.strip().splitlines()[-1]) == expected


def test_scheduler_options_are_checked_when_there_is_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A nightly whose days are all done (and a report that needs no pass) starts no scheduler, but options that
    contradict --scheduler are still refused: the same command would fail the night there is work (trial)."""
    raw = tmp_path / "n" / "raw" / "2026-11-01"
    assert main(["synth", str(raw), "--items", "40", "--users", "30", "--dim", "4", "-q"]) == 0
    assert main(["nightly", str(tmp_path / "n"), "--scheduler", "synchronous", "-q"]) == 0
    capsys.readouterr()
    for args in (["nightly", str(tmp_path / "n")], ["report", str(raw)]):
        code = main([*args, "--scheduler", "threads", "--workers", "2"])
        err = capsys.readouterr().err
        assert code == 2 and "--workers only applies to the local cluster" in err, err


def test_default_chunks_hold_at_most_32_mib(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """synth and import lay out 131,072-row chunks up to width 64 and 32 MiB of float32 above it: a fixed 131,072
    rows made 512 MiB chunks at width 1,024, and every task then needed 2.3 GiB."""
    for dim, rows in ((64, 140_000), (1024, 20_000)):
        out = tmp_path / f"s{dim}"
        assert main(["synth", str(out), "--items", str(rows), "--users", "10", "--dim", str(dim), "-q"]) == 0
        chunks = zarr.open_array(str(out / "items" / "vectors"), mode="r").chunks
        assert chunks == ({64: 131_072, 1024: 8_192}[dim], dim)
    np.save(tmp_path / "wide.npy", np.zeros((20_000, 512), np.float32))
    assert main(["import", "--table", f"w={tmp_path / 'wide.npy'}", "--out", str(tmp_path / "imp"), "-q"]) == 0
    assert zarr.open_array(str(tmp_path / "imp" / "w" / "vectors"), mode="r").chunks == (16_384, 512)
    assert main(["synth", str(tmp_path / "c"), "--items", "50", "--users", "9", "--dim", "4", "--chunk-rows", "7"]) == 0
    assert zarr.open_array(str(tmp_path / "c" / "users" / "vectors"), mode="r").chunks == (7, 4)
    capsys.readouterr()
