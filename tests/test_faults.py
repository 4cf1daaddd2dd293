"""Faults inflicted for real: `dstab stabilize` killed (whole process group) at several points, workers killed.

Each killed run must leave no version at OUT that opens as complete; the same
command run again must succeed without --overwrite (where the first had none),
give the same result as an undisturbed run, and leave no hidden staging
directories behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

import dstab
from dstab.errors import DstabError
from dstab.synth import synth, synth_like

pytestmark = pytest.mark.slow

# Small tables, many blocks: every pass is many tasks, so a kill lands mid-pass.
ENV = {**os.environ, "DASK_DSTAB__BLOCK_BYTES": "400000", "PYTHONWARNINGS": "ignore"}


def dstab_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "dstab.cli", *map(str, args)]


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("faults")
    with dstab_scheduler():
        base = synth(root / "day1", items=120_000, users=40_000, dim=16, seed=1, chunk_rows=4096)
        ref = dstab.stabilize(base).to_zarr(root / "day1-stable")
        synth_like(root / "day2", base, noise=0.01, churn=0.1, seed=2)
    return {"root": str(root), "new": str(root / "day2"), "ref": ref.url}  # type: ignore[dict-item]


def dstab_scheduler():
    import dask

    return dask.config.set(scheduler="threads")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (the CLI, its cluster's nannies and workers) and wait for all of it."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    psutil.wait_procs(members, timeout=60)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def staging_litter(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.dstab-"))


def assert_not_complete(out: Path) -> None:
    try:
        dstab.open_version(out)
    except DstabError:
        return
    raise AssertionError(f"{out} opens as a complete version after the kill")


def tables(path: Path | str) -> list[np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return [g["items/vectors"][...], g["users/vectors"][...], g["items/ids"][...]]


@pytest.fixture(scope="module")
def undisturbed(versions: dict[str, str]) -> list[np.ndarray]:
    out = Path(versions["root"]) / "undisturbed"
    proc = subprocess.run(
        dstab_cmd("stabilize", versions["new"], "--reference", versions["ref"], "--out", out, "--workers", "2",
                  "--no-progress", "--dashboard-address", ":0"),
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tables(out)


@pytest.mark.parametrize("where", ["during-statistics", "after-statistics", "mid-write", "after-write", "publish-swap"])
def test_killed_run_leaves_nothing_and_reruns(
    versions: dict[str, str], undisturbed: list[np.ndarray], tmp_path: Path, where: str
):
    out = tmp_path / "day2-stable"
    cmd = dstab_cmd("stabilize", versions["new"], "--reference", versions["ref"], "--out", out, "--workers", "2",
                    "--no-progress", "--dashboard-address", ":0")  # fmt: skip
    if where == "publish-swap":
        # the kill lands while an older version at OUT is being replaced (--overwrite)
        assert subprocess.run(cmd, env=ENV, capture_output=True, timeout=300).returncode == 0
        cmd.append("--overwrite")
    env = dict(ENV)
    if where != "mid-write":
        env["DSTAB_FAILPOINT"] = where
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink, start_new_session=True)
    if where == "mid-write":
        # wait until the write pass has written some chunks, then kill
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            written = [
                c for d in tmp_path.glob(".day2-stable.dstab-tmp-*") for c in (d / "items" / "vectors" / "c").glob("*")
            ]
            if len(written) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed mid-write"
    else:
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, log.read_text()
    kill_group(proc)
    if where == "publish-swap":
        assert not out.exists()  # killed between the two renames: the old version is aside
        assert staging_litter(out)
        # a reader puts the old version back (the dead run's publish never happened): whole, as it was
        for got, want in zip(tables(dstab.open_version(out).url), undisturbed):  # type: ignore[arg-type]
            np.testing.assert_array_equal(got, want)
    else:
        assert_not_complete(out)
    if where in ("mid-write", "after-write", "publish-swap"):
        assert staging_litter(out)  # the dead run's staging is there to be cleaned
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert staging_litter(out) == []
    for got, want in zip(tables(out), undisturbed):
        np.testing.assert_array_equal(got, want)


def test_worker_killed_mid_run_gives_the_same_result(
    versions: dict[str, str], undisturbed: list[np.ndarray], tmp_path: Path
):
    import dask
    from distributed import Client, LocalCluster

    new, ref = dstab.open_version(versions["new"]), dstab.open_version(versions["ref"])
    out = tmp_path / "out"
    with (
        dask.config.set({"dstab.block-bytes": 400_000}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        victims = list(client.run(os.getpid).values())
        errors: list[BaseException] = []

        def job() -> None:
            try:
                dstab.stabilize(new, ref).to_zarr(out)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        runner = threading.Thread(target=job)
        runner.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any((d / "items" / "vectors" / "c").glob("*") for d in tmp_path.glob(".out.dstab-tmp-*")):
                break
            time.sleep(0.01)
        assert runner.is_alive(), "the run ended before a worker could be killed"
        os.kill(victims[0], signal.SIGKILL)  # a worker dies mid-write; its nanny starts a new one
        runner.join(timeout=300)
        assert not errors, errors
        assert client.run(os.getpid).values() and victims[0] not in client.run(os.getpid).values()
    for got, want in zip(tables(out), undisturbed):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("when", ["early", "mid-write"])
def test_ctrl_c_stops_the_run_in_one_line_and_leaves_nothing(versions: dict[str, str], tmp_path: Path, when: str):
    """Ctrl-C reaches the whole process group: the workers ignore it, the CLI cancels, waits, cleans up, says one line.

    Before: the worker processes died with tracebacks, and a block write still in
    flight put back staging the CLI had removed (a 104 MB hidden directory left).
    """
    out = tmp_path / "day2-stable"
    cmd = dstab_cmd("stabilize", versions["new"], "--reference", versions["ref"], "--out", out, "--workers", "2",
                    "--no-progress", "--dashboard-address", ":0")  # fmt: skip
    log = tmp_path / "interrupted.log"
    with open(log, "wb") as sink:
        # Ctrl-C as at a terminal: a suite started in the background (`cmd &` in a script) runs with SIGINT
        # ignored, which its children inherit and Python keeps; the test is of dstab, not of how it was started
        proc = subprocess.Popen(
            cmd, env=ENV, stdout=sink, stderr=sink, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if when == "early" and "local cluster" in log.read_text():
            time.sleep(0.3)
            break
        written = [
            c for d in tmp_path.glob(".day2-stable.dstab-tmp-*") for c in (d / "items" / "vectors" / "c").glob("*")
        ]
        if when == "mid-write" and len(written) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(os.getpgid(proc.pid), signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    time.sleep(1.0)  # anything still writing would show now
    text = log.read_text()
    assert "Traceback" not in text and text.strip().endswith("dstab: interrupted"), text
    assert not out.exists() and staging_litter(out) == []
    kill_group(proc)  # nothing of the run's group is left behind either way
