"""`--json` on every command (one JSON object on stdout, on success and on failure), -v / -q, and a light start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dstab
from dstab.cli import main
from dstab.cli.parser import ANCHOR_WEIGHTS, METHODS

from conftest import random_tables, read_tables, relative_score_error, write_version

FAST = ["--scheduler", "synchronous", "--no-progress"]
THREADS = ["--scheduler", "threads"]  # progress on: stderr is no terminal here, so it is plain lines


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_object(out: str) -> dict:
    """stdout is exactly one JSON object on one line, and nothing else."""
    lines = out.splitlines()
    assert len(lines) == 1, out
    data = json.loads(lines[0])
    assert isinstance(data, dict), data
    return data


def failed(capsys: pytest.CaptureFixture[str], code_expected: int, *argv: object) -> dict:
    """A failing command with --json: the exit code, one JSON object saying so, and its one line on stderr."""
    code, out, err = run(capsys, *argv)
    assert code == code_expected, err
    data = one_object(out)
    assert data["ok"] is False and data["exit_code"] == code_expected and data["error"], data
    assert data["error"] in err and "Traceback" not in err
    return data


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """day1, a noisy retrain day2, and day1 stabilized: the inputs the commands below work on."""
    from dstab.synth import synth, synth_like

    root = tmp_path_factory.mktemp("chain")
    day1 = synth(root / "day1", items=600, users=400, dim=6, seed=1, chunk_rows=200)
    synth_like(root / "day2", day1, noise=0.01, seed=2)
    assert main(["stabilize", str(root / "day1"), "--out", str(root / "day1-stable"), *FAST]) == 0
    return {name: root / name for name in ("day1", "day2", "day1-stable")}


# ----------------------------------------------------------------------------- success: one object with the key figures


def test_stabilize_json(chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "day2-stable"
    code, text, err = run(
        capsys, "stabilize", chain["day2"], "--reference", chain["day1-stable"], "--out", out, "--json", *THREADS
    )
    assert code == 0, err
    data = one_object(text)
    assert data["ok"] is True and data["command"] == "stabilize" and data["out"] == str(out)
    assert data["rank"] == 6 and data["tables"] == {"items": 600, "users": 400}
    # the figures are the written version's: checked against numpy on what is on disk
    T0, W0 = read_tables(str(chain["day2"]))
    T1, W1 = read_tables(str(out))
    assert data["score_error"] < 1e-5 and relative_score_error(T0, W0, T1, W1) < 1e-5
    S0 = read_tables(str(chain["day1-stable"]))[0].astype(np.float64)
    assert data["drift_after"] < data["drift_before"] / 10
    assert data["drift_after"] == pytest.approx(dstab.open_version(out).attrs["report"]["drift_after"])
    assert np.linalg.norm(T1 - S0) / np.linalg.norm(S0) < 0.1
    # progress stays on stderr, as plain lines
    assert "dstab: statistics pass: " in err and "dstab: write pass: done in" in err


def test_synth_import_export_apply_json(chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, text, err = run(capsys, "synth", tmp_path / "s", "--table", "words=500", "--dim", "4", "--json", *FAST)
    assert code == 0, err
    data = one_object(text)
    assert data["ok"] and data["command"] == "synth" and data["tables"] == {"words": 500} and data["dim"] == 4
    assert data["structure"] == dstab.open_version(tmp_path / "s").structure.to_attrs()

    T, W = random_tables(3, 300, 200, 5)
    np.save(tmp_path / "items.npy", T)
    np.save(tmp_path / "users.npy", W)
    code, text, err = run(capsys, "import", "--items", tmp_path / "items.npy", "--users", tmp_path / "users.npy",
                          "--out", tmp_path / "imp", "--json", *FAST)  # fmt: skip
    assert code == 0, err
    data = one_object(text)
    assert data["command"] == "import" and data["tables"] == {"items": 300, "users": 200} and data["dtype"] == "float32"
    np.testing.assert_array_equal(read_tables(str(tmp_path / "imp"))[0], T)

    pytest.importorskip("pyarrow")
    code, text, err = run(capsys, "export", tmp_path / "imp", "--out", tmp_path / "pq", "--json", *FAST)
    assert code == 0, err
    data = one_object(text)
    assert data["command"] == "export" and data["layout"] == "list" and data["tables"] == {"items": 300, "users": 200}
    assert data["written"] and all(os.path.exists(p) for p in data["written"])

    code, text, err = run(capsys, "apply", chain["day1-stable"], "--users", chain["day1"] / "users",
                          "--out", tmp_path / "users-stable", "--json", *FAST)  # fmt: skip
    assert code == 0, err
    data = one_object(text)
    assert data["command"] == "apply" and data["table"] == "users" and data["rows"] == 400 and data["dim_out"] == 6
    mapped = dstab.open_table(tmp_path / "users-stable").vectors[:]
    np.testing.assert_allclose(mapped, read_tables(str(chain["day1-stable"]))[1], rtol=1e-4, atol=1e-5)


def test_report_diagnose_log_json_as_before(chain: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    code, text, _ = run(capsys, "report", chain["day1-stable"], "--json")
    assert code == 0 and one_object(text)["rank"] == 6
    code, text, _ = run(capsys, "diagnose", chain["day1"], "--json", *FAST)
    assert code == 0 and "interaction" in one_object(text)
    code, text, _ = run(capsys, "log", chain["day1-stable"], "--json")
    assert (
        code == 0 and len(text.splitlines()) == 1 and one_object(text)["chain"][0]["kind"] == "stabilized"
    )  # one object like every command's, the chain under "chain"
    # --json also before the command
    code, text, _ = run(capsys, "--json", "report", chain["day1-stable"])
    assert code == 0 and one_object(text)["rank"] == 6


# ----------------------------------------------------------------------------- failure: one object, exit code as documented


def test_bad_input_gives_one_json_object_for_every_command(
    chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    missing = tmp_path / "nope"
    cases = {
        "stabilize": ["stabilize", missing, "--out", tmp_path / "o"],
        "apply": ["apply", chain["day1"], "--users", chain["day1"] / "users", "--out", tmp_path / "o"],  # a raw version
        "import": ["import", "--out", tmp_path / "o"],
        "export": ["export", missing, "--out", tmp_path / "o"],
        "synth": ["synth", tmp_path / "o", "--items", "10"],
        "nightly": ["nightly", missing],
        "report": ["report", missing],
        "diagnose": ["diagnose", missing],
        "log": ["log", missing],
    }
    expected = {"stabilize": "does not exist", "apply": "no transform", "import": "at least one table", "export": "does not exist",
                "synth": "missing --users, --dim", "nightly": "raw does not exist", "report": "does not exist",
                "diagnose": "does not exist", "log": "does not exist"}  # fmt: skip
    for command, argv in cases.items():
        data = failed(capsys, 2, *argv, "--json", *([] if command == "log" else FAST))  # log runs no graph
        assert data["command"] == command and expected[command] in data["error"], (command, data)
    assert not (tmp_path / "o").exists()
    # an output that exists: refused, exit 2, one object
    data = failed(capsys, 2, "stabilize", chain["day1"], "--out", chain["day1-stable"], "--json", *FAST)
    assert "--overwrite" in data["error"]


def test_usage_errors_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = failed(capsys, 2, "stabilize", tmp_path, "--json")  # --out missing: argparse's own error
    assert "--out" in data["error"] and data["command"] is None
    data = failed(capsys, 2, "nightly", tmp_path, "--max-drift", "-1", "--json")
    assert "--max-drift" in data["error"]
    data = failed(capsys, 2, "stabilize", tmp_path, "--out", tmp_path / "o", "--storage-options", "[1]", "--json")
    assert "--storage-options must be a JSON object" in data["error"]
    # without --json, nothing on stdout
    code, out, err = run(capsys, "stabilize", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1


def test_console_script_json_on_stdout_only(chain: dict[str, Path], tmp_path: Path):
    """The installed executable: stdout is the object, stderr the progress and the error line."""
    exe = str(Path(sys.executable).with_name("dstab"))
    proc = subprocess.run([exe, "stabilize", str(chain["day1"]), "--out", str(tmp_path / "o"), "--json", "--scheduler", "threads"],
                          check=False, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert one_object(proc.stdout)["out"] == str(tmp_path / "o") and "dstab: write pass" in proc.stderr
    proc = subprocess.run(
        [exe, "report", str(tmp_path / "missing"), "--json"], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and one_object(proc.stdout)["exit_code"] == 2
    assert proc.stderr.startswith("dstab: error: ") and proc.stderr.count("\n") == 1


def test_unexpected_failure_exit_1_still_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A chunk that is not what its codec says (a corrupt file): no check foresees it, so exit 1 with the traceback."""
    path = write_version(tmp_path / "v", *random_tables(5, 300, 200, 6))
    (tmp_path / "v" / "items" / "vectors" / "c" / "0" / "0").write_bytes(np.random.default_rng(0).bytes(200))
    code, out, err = run(capsys, "stabilize", path, "--out", tmp_path / "o", "--json", *FAST)
    assert code == 1 and "Traceback" in err
    data = one_object(out)
    assert (
        data["ok"] is False
        and data["exit_code"] == 1
        and data["command"] == "stabilize"
        and "decompression" in data["error"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # nothing staged is left
    with pytest.raises(
        RuntimeError, match="decompression"
    ):  # without --json: the exception itself (exit 1 in the console script)
        main(["stabilize", path, "--out", str(tmp_path / "o"), *FAST])
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- -v and -q


def test_quiet_silences_progress_and_notes(chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # the default: progress lines on stderr
    code, out, err = run(capsys, "stabilize", chain["day1"], "--out", tmp_path / "a", *THREADS)
    assert code == 0 and "dstab: statistics pass: " in err and out.startswith("wrote ")
    for argv in (["-q", "stabilize", chain["day1"], "--out", tmp_path / "b", *THREADS],
                 ["stabilize", chain["day1"], "--out", tmp_path / "c", *THREADS, "--quiet"]):  # fmt: skip
        code, out, err = run(capsys, *argv)
        assert code == 0 and err == "" and out.startswith("wrote ")  # the result stays
    # a note (a raw reference) is said on stderr beside --json, and -q silences it there too
    argv = ["stabilize", chain["day2"], "--reference", chain["day1"], "--json", *THREADS]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "d")
    assert code == 0 and "note: the reference" in err and one_object(out)["notes"]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "e", "-q")
    assert code == 0 and err == "" and one_object(out)["notes"]
    # errors still come through -q
    code, _, err = run(capsys, "-q", "report", tmp_path / "missing")
    assert code == 2 and err.startswith("dstab: error: ")


def test_verbose_adds_debug_lines(chain: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run(capsys, "stabilize", chain["day1"], "--out", tmp_path / "a", *FAST)
    assert code == 0 and err == ""
    code, _, err = run(capsys, "-v", "stabilize", chain["day1"], "--out", tmp_path / "b", *FAST)
    assert code == 0 and "dstab: scheduler synchronous, in this process" in err
    # the level is put back after the command: a library call after it speaks at INFO again
    import logging

    assert logging.getLogger("dstab").getEffectiveLevel() == logging.INFO


# ----------------------------------------------------------------------------- start-up and the dashboard extra


def test_choices_match_the_library():
    from dstab.stabilize import ANCHOR_WEIGHTS as weights
    from dstab.stabilize import METHODS as methods

    assert METHODS == methods and ANCHOR_WEIGHTS == weights


def test_help_imports_nothing_heavy():
    """Building the parser and printing the help leave dask, zarr, scipy, distributed and the command modules unimported."""
    code = (
        "import sys, contextlib, io\n"
        "from dstab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0 and main(['nightly', '--help']) == 0\n"
        "heavy = ('dask', 'dask.array', 'zarr', 'scipy', 'distributed', 'dstab.stabilize', 'dstab.store', 'dstab.nightly',\n"
        "         'dstab.report', 'dstab.diagnose', 'dstab.interchange', 'dstab.executor')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported by --help: {proc.stdout}"


@pytest.mark.slow
def test_local_cluster_without_bokeh(tmp_path: Path):
    """No bokeh (the dashboard extra): the local cluster starts without a dashboard and says how to get one."""
    new = write_version(tmp_path / "new", *random_tables(0, 300, 200, 6))
    code = (
        "import sys\n"
        "sys.modules['bokeh'] = None  # as if it were not installed: find_spec gives None, import raises\n"
        "from dstab.cli import main\n"
        f"sys.exit(main(['stabilize', {new!r}, '--out', {str(tmp_path / 'o')!r}, '--workers', '1', '--dashboard-address', ':0']))\n"
    )
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    assert "dstab: local cluster of 1 worker (no dashboard: pip install 'dstab[dashboard]' for one)" in proc.stderr
    assert "dashboard at" not in proc.stderr and "Traceback" not in proc.stderr
    assert dstab.open_version(tmp_path / "o").attrs["kind"] == "stabilized"
