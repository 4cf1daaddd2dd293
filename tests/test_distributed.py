"""A real dask.distributed deployment started the way users start it: `dask scheduler`, `dask worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    random_tables,
    read_tables,
    reference_stabilize,
    relative_score_error,
    write_version,
)

pytestmark = pytest.mark.slow


def exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("cluster")
    path = base / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    procs = [
        subprocess.Popen(
            [exe("dask"), "scheduler", "--scheduler-file", str(path), "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not path.exists() or not path.read_text().strip():
            assert procs[0].poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start in 60 s"
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [exe("dask"), "worker", "--scheduler-file", str(path), "--nworkers", "2", "--nthreads", "1",
                 "--memory-limit", "1GiB", "--local-directory", str(base)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )
        )  # fmt: skip
        from distributed import Client

        with Client(scheduler_file=str(path), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield path
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.parametrize("how", ["address", "scheduler-file"])
def test_stabilize_attached_to_running_scheduler(tmp_path: Path, scheduler_file: Path, how: str):
    T, W = random_tables(21, 5000, 3000, 16, "float32")
    new = write_version(tmp_path / "new", T, W, chunk_rows=400)
    ref_T, ref_W, _ = reference_stabilize(T, W)
    ref = write_version(tmp_path / "ref", ref_T.astype(np.float32), ref_W.astype(np.float32))
    target = json.loads(scheduler_file.read_text())["address"] if how == "address" else str(scheduler_file)
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe("dstab"), "stabilize", new, "--reference", ref, "--out", str(out), "--scheduler", target, "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "attached to tcp://127.0.0.1" in proc.stderr and "(2 workers)" in proc.stderr
    T_out, W_out = read_tables(str(out))
    assert relative_score_error(T, W, T_out, W_out) < 1e-5
    np.testing.assert_allclose(T_out, ref_T, atol=1e-4 * np.abs(ref_T).max())


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path):
    T, W = random_tables(22, 100, 100, 4, "float32")
    new = write_version(tmp_path / "new", T, W)
    proc = subprocess.run(
        [exe("dstab"), "stabilize", new, "--out", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:1", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in proc.stderr
    assert not (tmp_path / "o").exists()
