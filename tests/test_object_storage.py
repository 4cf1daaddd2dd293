"""Versions on an S3-compatible server (moto's server mode, on loopback) through fsspec URLs and storage options."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dstab
from dstab.cli import main
from dstab.errors import IncompleteVersionError
from tests.conftest import random_basis, random_tables

pytestmark = pytest.mark.slow

KEY, SECRET = "dstab-test-key-id", "dstab-test-SECRET-never-shown"
FAST = ("--scheduler", "threads", "--no-progress")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 and a bucket; yields the fsspec storage options."""
    import s3fs  # the test extra installs it (and moto[server])

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("dstab-test")
        yield options
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert KEY not in out + err and SECRET not in out + err  # credentials are never printed
    return code, out, err


def test_stabilize_report_apply_on_s3(s3: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import s3fs

    opts = json.dumps(s3)
    rng = np.random.default_rng(0)
    T, W = random_tables(0, 3000, 2000, 8)
    ids, uids = np.arange(3000, dtype=np.int64), np.arange(2000, dtype=np.int64) + 10**6
    basis = random_basis(rng, 8, 5.0)
    p, q = rng.permutation(3000), rng.permutation(2000)
    days = {"day1": (T, W, ids, uids), "day2": ((T @ basis)[p], (W @ np.linalg.inv(basis).T)[q], ids[p], uids[q])}
    for day, (t, w, i, u) in days.items():
        for name, arr in (("items", t.astype(np.float32)), ("users", w.astype(np.float32)), ("item_ids", i), ("user_ids", u)):
            np.save(tmp_path / f"{day}-{name}.npy", arr)
        for where in (f"s3://dstab-test/{day}", tmp_path / day):
            code, _, err = run_cli(
                capsys, "import", "--items", tmp_path / f"{day}-items.npy", "--items-ids", tmp_path / f"{day}-item_ids.npy",
                "--users", tmp_path / f"{day}-users.npy", "--users-ids", tmp_path / f"{day}-user_ids.npy",
                "--out", where, "--chunk-rows", "512", "--storage-options", opts, *FAST,
            )  # fmt: skip
            assert code == 0, err
    for root in ("s3://dstab-test", str(tmp_path)):
        assert run_cli(capsys, "stabilize", f"{root}/day1", "--out", f"{root}/day1-stable", "--storage-options", opts, *FAST)[0] == 0
        code, out, err = run_cli(
            capsys, "stabilize", f"{root}/day2", "--reference", f"{root}/day1-stable", "--out", f"{root}/day2-stable",
            "--storage-options", opts, *FAST,
        )  # fmt: skip
        assert code == 0 and "matched by id" in out, err
    remote = dstab.open_version("s3://dstab-test/day2-stable", s3)
    local = dstab.open_version(tmp_path / "day2-stable")
    for side in ("items", "users"):
        np.testing.assert_array_equal(np.asarray(remote.table(side).vectors[...]), np.asarray(local.table(side).vectors[...]))
    code, out, err = run_cli(capsys, "report", "s3://dstab-test/day2-stable", "--reference", "s3://dstab-test/day1-stable",
                             "--json", "--storage-options", opts, *FAST)  # fmt: skip
    assert code == 0 and json.loads(out)["drift_vs_reference"]["total"] < 1e-4, err
    # apply, with a table on S3
    fs = s3fs.S3FileSystem(**s3)
    extra = (W[:100] @ np.linalg.inv(basis).T).astype(np.float32)
    import zarr

    group = zarr.open_group("s3://dstab-test/extra", mode="w", storage_options=s3)
    group.create_array("vectors", shape=extra.shape, chunks=(50, 8), dtype=extra.dtype)[...] = extra
    code, _, err = run_cli(capsys, "apply", "s3://dstab-test/day2-stable", "--users", "s3://dstab-test/extra",
                           "--out", "s3://dstab-test/extra-stable", "--storage-options", opts, *FAST)  # fmt: skip
    assert code == 0, err
    mapped = zarr.open_group("s3://dstab-test/extra-stable", mode="r", storage_options=s3)["vectors"][...]
    np.testing.assert_allclose(mapped, remote.transform("users", extra), atol=1e-6 * np.abs(mapped).max())
    # nothing stored anywhere holds the credentials
    for path in fs.find("dstab-test"):
        if path.endswith("zarr.json"):
            text = fs.cat(path).decode()
            assert KEY not in text and SECRET not in text and "endpoint" not in text, path


def test_completion_marker_decides_visibility_on_s3(s3: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    opts = json.dumps(s3)
    T, W = random_tables(1, 2000, 1000, 6)
    np.save(tmp_path / "t.npy", T)
    np.save(tmp_path / "w.npy", W)
    src = "s3://dstab-test/marker-src"
    assert run_cli(capsys, "import", "--items", tmp_path / "t.npy", "--users", tmp_path / "w.npy", "--out", src,
                   "--chunk-rows", "256", "--storage-options", opts, *FAST)[0] == 0  # fmt: skip
    out = "s3://dstab-test/marker-out"
    cmd = [sys.executable, "-m", "dstab.cli", "stabilize", src, "--out", out, "--storage-options", opts, *FAST]
    env = {**os.environ, "DSTAB_FAILPOINT": "after-write", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -9  # killed after every block was written, before the marker
    with pytest.raises(IncompleteVersionError):
        dstab.open_version(out, s3)
    code, _, err = run_cli(capsys, "report", out, "--storage-options", opts)
    assert code == 2 and "incomplete" in err
    rerun = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr  # the abandoned output is replaced without --overwrite
    assert KEY not in rerun.stdout + rerun.stderr and SECRET not in rerun.stdout + rerun.stderr
    assert dstab.open_version(out, s3).attrs["complete"] is True
    code, _, err = run_cli(capsys, "stabilize", src, "--out", out, "--storage-options", opts, *FAST)
    assert code == 2 and "already exists" in err  # a complete version is never replaced without --overwrite
