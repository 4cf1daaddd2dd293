"""Small jobs run in this process; new tables that fit in memory are read once.

The in-memory write must give exactly what the out-of-core one gives (the same
kernels on the same blocks), on every scheduler; it must not read the new
tables again (shown by moving them away between the passes); and the decision
is a pure rule of the table size and the free memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import dstab
from dstab.errors import UsageError
from dstab.residency import AUTO_SHARE, Memory, check_in_memory, decide, free_memory

from conftest import read_tables, run_cli, write_version

GIB = 2**30


def _pair(tmp_path: Path, n_items: int = 700, n_users: int = 500, dim: int = 8) -> tuple[str, str]:
    """A raw version and a noisy retrain of it stabilized as the reference; small chunks, so many blocks."""
    rng = np.random.default_rng(3)
    T = rng.normal(size=(n_items, dim)).astype(np.float32)
    W = rng.normal(size=(n_users, dim)).astype(np.float32)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    old = write_version(tmp_path / "old", T, W, chunk_rows=64)
    dstab.stabilize(old).to_zarr(tmp_path / "ref")
    noise = 0.01 * rng.normal(size=T.shape).astype(np.float32)
    new = write_version(tmp_path / "new", (T + noise) @ basis, W @ basis, chunk_rows=64)
    return new, str(tmp_path / "ref")


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("in_memory", "table_gib", "free_gib", "kept"),
    [
        (False, 1, 100, False),
        ("auto", 1, 2, True),  # exactly half the free memory
        ("auto", 1.01, 2, False),
        ("auto", 0, 2, False),  # nothing to keep
        (True, 1.9, 2, True),  # forced: whenever it fits
    ],
)
def test_decide(in_memory: object, table_gib: float, free_gib: float, kept: bool) -> None:
    assert AUTO_SHARE == 0.5
    assert decide(in_memory, int(table_gib * GIB), Memory(int(free_gib * GIB), "here")) is kept  # type: ignore[arg-type]


def test_decide_refuses_forced_keep_that_would_spill() -> None:
    with pytest.raises(UsageError, match=r"take 3\.00 GiB but the workers can hold only 2\.00 GiB.*--in-memory no"):
        decide(True, 3 * GIB, Memory(2 * GIB, "the workers"))


def test_a_refusal_on_the_local_cluster_names_a_limit_that_holds_the_tables() -> None:
    """The trial's 1 worker at 512MiB was told '0 B' and no limit: the suggested one must make the rule keep them."""
    memory = Memory(0, "the cluster's 2 workers", workers=2, per_worker_overhead=400 * 2**20, spill_fraction=0.6)
    with pytest.raises(UsageError, match=r"--memory-limit (\d+)MiB would hold them on 2 workers") as refused:
        decide(True, 3 * GIB, memory)
    limit = int(refused.value.args[0].rsplit("--memory-limit ", 1)[1].split("MiB")[0]) * 2**20
    # that limit, with the same overhead per worker, leaves room for the tables below the spill threshold
    assert 2 * (0.6 * limit - 400 * 2**20) >= 3 * GIB
    attached = Memory(0, "the cluster's 1 worker", more="give the cluster more workers or more memory per worker")
    with pytest.raises(UsageError, match=r"1 worker can hold only 0 B.*more workers or more memory per worker") as e:
        decide(True, GIB, attached)
    assert "--memory-limit" not in str(e.value)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, "AUTO"])
def test_in_memory_values(bad: object) -> None:
    with pytest.raises(UsageError, match="in_memory must be 'auto', True or False"):
        check_in_memory(bad)


def test_free_memory_in_this_process_leaves_every_thread_its_blocks() -> None:
    import psutil

    small, large = free_memory(2**20), free_memory(2**28)
    assert small.free <= psutil.virtual_memory().total
    assert small.free - large.free >= (2**28 - 2**20) * 4  # four blocks in flight per thread, at least one thread


# ----------------------------------------------------------------------------- the same output, read once


def test_in_memory_writes_what_out_of_core_writes(tmp_path: Path, scheduler: str) -> None:
    new, ref = _pair(tmp_path)
    dstab.stabilize(new, ref, in_memory=False).to_zarr(tmp_path / "twice")
    kept = dstab.stabilize(new, ref, in_memory=True)
    assert kept.report["in_memory"] is True
    kept.to_zarr(tmp_path / "once")
    for a, b in zip(read_tables(str(tmp_path / "twice")), read_tables(str(tmp_path / "once"))):
        np.testing.assert_array_equal(a, b)
    once = dstab.open_version(tmp_path / "once")
    assert once.attrs["params"] == dstab.open_version(tmp_path / "twice").attrs["params"]


def test_in_memory_write_does_not_read_the_new_tables_again(tmp_path: Path, scheduler: str) -> None:
    new, ref = _pair(tmp_path)
    result = dstab.stabilize(new, ref, in_memory=True)
    moved = tmp_path / "moved-away"
    os.rename(new, moved)  # our own copy: the write pass must not need it
    try:
        result.to_zarr(tmp_path / "once")
    finally:
        os.rename(moved, new)
    assert not result._kept  # written: let go
    for a, b in zip(read_tables(new), read_tables(str(tmp_path / "once"))):
        assert np.abs(b).min(axis=1).max() > 0 and a.shape == b.shape
    # the control: out of core, the write pass reads the new tables again, and finds them gone (zarr reads a
    # missing chunk as its fill value, so the rows come out as zeros)
    out_of_core = dstab.stabilize(new, ref, in_memory=False)
    os.rename(new, moved)
    try:
        out_of_core.to_zarr(tmp_path / "twice")
    finally:
        os.rename(moved, new)
    items, _ = read_tables(str(tmp_path / "twice"))
    assert not items.any()


def test_in_memory_with_churn_and_the_qr_pass(tmp_path: Path) -> None:
    """Matched by id, and a float64 table (Householder QR in the pass): the kept blocks feed every pass."""
    rng = np.random.default_rng(5)
    T, W = rng.normal(size=(600, 6)), rng.normal(size=(400, 6))
    ids_t, ids_w = np.arange(600, dtype=np.int64), np.arange(400, dtype=np.int64)
    old = write_version(tmp_path / "old", T, W, item_ids=ids_t, user_ids=ids_w, chunk_rows=50)
    dstab.stabilize(old).to_zarr(tmp_path / "ref")
    order = rng.permutation(600)[:550]
    new = write_version(tmp_path / "new", T[order], W, item_ids=ids_t[order], user_ids=ids_w, chunk_rows=50)
    results = [dstab.stabilize(new, tmp_path / "ref", in_memory=flag) for flag in (False, True)]
    assert [r.report["in_memory"] for r in results] == [False, True]
    assert results[1].report["matching"]["items"]["by"] == "id"
    for name in ("items", "users"):
        np.testing.assert_array_equal(results[0].transforms[name], results[1].transforms[name])


def test_auto_keeps_small_tables_and_in_memory_arrays_are_never_copied(tmp_path: Path) -> None:
    new, ref = _pair(tmp_path)
    assert dstab.stabilize(new, ref).report["in_memory"] is True  # a few KiB: auto keeps them
    T, W = read_tables(new)
    assert dstab.stabilize({"items": T, "users": W}, ref, in_memory=True).report["in_memory"] is False


# ----------------------------------------------------------------------------- the CLI


def test_small_job_runs_in_this_process(tmp_path: Path) -> None:
    new, ref = _pair(tmp_path)
    done = run_cli("stabilize", new, "--reference", ref, "--out", str(tmp_path / "out"), "--json", "-v")
    assert done.returncode == 0, done.stderr
    assert "running in this process (threads)" in done.stderr
    assert "in memory: the new tables (37.50 kiB) are read once and kept in this process" in done.stderr
    assert "local cluster of" not in done.stderr
    assert json.loads(done.stdout)["in_memory"] is True


def test_cluster_options_or_a_larger_job_start_a_cluster(tmp_path: Path) -> None:
    new, ref = _pair(tmp_path)
    asked = run_cli(
        "stabilize", new, "--reference", ref, "--out", str(tmp_path / "a"), "--workers", "1", "--dashboard-address",
        ":0", "--in-memory", "no", "--json", "--no-progress",
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    assert "local cluster of 1 worker" in asked.stderr and "in this process" not in asked.stderr
    assert json.loads(asked.stdout)["in_memory"] is False
    env = {**os.environ, "DASK_DSTAB__IN_PROCESS_BYTES": "1KiB"}  # the job is larger than that
    import subprocess
    import sys

    larger = subprocess.run(
        [sys.executable, "-m", "dstab.cli", "stabilize", new, "--reference", ref, "--out", str(tmp_path / "b"),
         "--dashboard-address", ":0", "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert larger.returncode == 0, larger.stderr
    assert "local cluster of" in larger.stderr
    for a, b in zip(read_tables(str(tmp_path / "a")), read_tables(str(tmp_path / "b"))):
        np.testing.assert_array_equal(a, b)


def test_forced_in_memory_that_cannot_fit_is_refused_before_writing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(300_000, 64)).astype(np.float32)  # 73 MiB: one block, two with the users
    new = write_version(tmp_path / "new", big, big[:1000], chunk_rows=131_072)
    done = run_cli(
        "stabilize", new, "--out", str(tmp_path / "out"), "--workers", "1", "--memory-limit", "512MiB",
        "--dashboard-address", ":0", "--in-memory", "yes", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 or "in memory: the new tables take" in done.stderr.splitlines()[-1]
    assert "--in-memory no" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_in_memory_value_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli("stabilize", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--in-memory", "maybe")
    assert done.returncode == 2
    assert "expected auto, yes or no" in done.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
