"""A missing optional package is one line naming the extra that installs it, and exit 2: never a traceback.

Each case runs the CLI in a fresh interpreter where the package cannot be
imported (``sys.modules[name] = None`` makes every ``import name`` fail, as if
it were not installed), with real inputs: a real Parquet file, a real version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import random_tables, write_version

ROOT = Path(__file__).resolve().parent.parent


def run_without(blocked: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``dstab ARGS`` in a subprocess where importing any of ``blocked`` fails."""
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from dstab.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_parquet_import_without_pyarrow_names_the_parquet_extra(tmp_path: Path) -> None:
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"id": np.arange(5), "vector": [np.ones(3, np.float32)] * 5}), items)
    out = tmp_path / "v"
    proc = run_without(
        ["pyarrow", "pyarrow.parquet"], ["import", "--items", str(items), "--out", str(out), "--no-progress"], tmp_path
    )
    assert_one_line(proc, "pyarrow", "pip install 'dstab[parquet]'")
    assert not out.exists()


def test_report_plot_without_matplotlib_names_the_plot_extra(tmp_path: Path) -> None:
    T, W = random_tables(0, 60, 40, 4, "float32")
    version = write_version(tmp_path / "v", T, W)
    png = tmp_path / "drift.png"
    proc = run_without(
        ["matplotlib", "matplotlib.pyplot"],
        ["report", version, "--plot", str(png), "--scheduler", "synchronous", "--no-progress"],
        tmp_path,
    )
    assert_one_line(proc, "matplotlib", "pip install 'dstab[plot]'")
    assert not png.exists()


@pytest.mark.parametrize("command", [["report"], ["diagnose"]])
def test_s3_url_without_s3fs_names_the_cloud_extra(tmp_path: Path, command: list[str]) -> None:
    # no server is needed: the store's client library is looked for before any connection
    proc = run_without(["s3fs"], [*command, "s3://dstab-test-bucket/v1", "--no-progress"], tmp_path)
    assert_one_line(proc, "s3://dstab-test-bucket/v1", "s3fs", "pip install 'dstab[cloud]'")


@pytest.mark.parametrize("command", ["stabilize", "log", "report"])
def test_icechunk_without_icechunk_names_the_cloud_extra(tmp_path: Path, command: str) -> None:
    """Found by a trial: writing or reading REPO.icechunk/VERSION without icechunk was a traceback, exit 1."""
    T, W = random_tables(0, 60, 40, 4, "float32")
    version = write_version(tmp_path / "v", T, W)
    args = {
        "stabilize": [
            "stabilize",
            str(version),
            "--out",
            str(tmp_path / "r.icechunk" / "v1"),
            "--scheduler",
            "threads",
        ],
        "log": ["log", str(tmp_path / "r.icechunk" / "v1")],
        "report": ["report", str(tmp_path / "r.icechunk" / "v1")],
    }[command]
    proc = run_without(["icechunk"], [*args, "--no-progress"] if command == "stabilize" else args, tmp_path)
    assert_one_line(proc, "icechunk", "pip install 'dstab[cloud]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # nothing written, not even a lock beside it


def test_export_without_pyarrow_says_so_before_any_cluster(tmp_path: Path) -> None:
    T, W = random_tables(0, 60, 40, 4, "float32")
    version = write_version(tmp_path / "v", T, W)
    proc = run_without(
        ["pyarrow", "pyarrow.parquet"], ["export", str(version), "--out", str(tmp_path / "pq")], tmp_path
    )
    assert_one_line(proc, "pyarrow", "pip install 'dstab[parquet]'")  # one line: no cluster line before it
    assert not (tmp_path / "pq").exists()
