"""On object storage (moto's S3 server on loopback): a user's objects are never replaced, and of two runs
writing one new OUT exactly one publishes (issue 11, points 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dstab
from dstab.cli import main
from tests.conftest import random_tables
from tests.test_object_storage import s3  # noqa: F401 - the moto server fixture

pytestmark = pytest.mark.slow
FAST = ("--scheduler", "threads", "--no-progress")


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def source(s3: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("s3src")
    urls = {}
    for name, seed in (("a", 1), ("b", 2)):
        T, W = random_tables(seed, 40_000, 20_000, 16)
        np.save(tmp / f"{name}-t.npy", T)
        np.save(tmp / f"{name}-w.npy", W)
        urls[name] = f"s3://dstab-test/race-src-{name}"
        code = main(["import", "--items", str(tmp / f"{name}-t.npy"), "--users", str(tmp / f"{name}-w.npy"), "--out",
                     urls[name], "--chunk-rows", "1024", "--storage-options", json.dumps(s3), *FAST])  # fmt: skip
        assert code == 0
    return urls


def test_user_objects_at_out_are_never_replaced(s3: dict, source: dict[str, str], capsys) -> None:  # noqa: F811
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.pipe("dstab-test/userdir/thesis.txt", b"precious")
    for flags in ([], ["--overwrite"]):
        code, _, err = run(capsys, "stabilize", source["a"], "--out", "s3://dstab-test/userdir", *flags,
                           "--storage-options", json.dumps(s3), *FAST)  # fmt: skip
        assert code == 2, err
        assert "s3://dstab-test/userdir is a directory that is not a dstab output (it holds thesis.txt)" in err
        assert len(err.strip().splitlines()) == 1
        assert fs.cat("dstab-test/userdir/thesis.txt") == b"precious"
        assert fs.find("dstab-test/userdir") == ["dstab-test/userdir/thesis.txt"]


def test_two_runs_racing_for_one_new_s3_out_publish_once(s3: dict, source: dict[str, str]) -> None:  # noqa: F811
    import s3fs

    out = "s3://dstab-test/race-out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DASK_DSTAB__BLOCK_BYTES": "100000"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "dstab.cli", "stabilize", source[name], "--out", out,
                          "--storage-options", json.dumps(s3), *FAST],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]  # fmt: skip
    results = [(p.returncode, *p.communicate(timeout=300)) for p in procs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(procs, results)]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (winner,) = [r for r in results if r[0] == 0]
    (loser,) = [r for r in results if r[0] == 2]
    lines = loser[2].strip().splitlines()
    assert len(lines) == 1 and out in lines[0], loser[2]
    assert any(
        words in lines[0] for words in ("being written by another dstab run", "already holds a dstab version")
    ), lines
    assert loser[1] == ""
    published = dstab.open_version(out, s3)
    assert published.attrs["complete"] is True
    assert published.attrs["input"] in winner[1] or f"wrote {out}" in winner[1]
    # the published tables are whole and are the winner's: its score check passes against its own input
    name = "a" if published.attrs["input"].endswith("-a") else "b"
    raw = dstab.open_version(source[name], s3)
    t, t_out = np.asarray(raw.items.vectors[:500], np.float64), np.asarray(published.items.vectors[:500], np.float64)
    w, w_out = np.asarray(raw.users.vectors[:500], np.float64), np.asarray(published.users.vectors[:500], np.float64)
    assert np.linalg.norm(w_out @ t_out.T - w @ t.T) <= 1e-5 * np.linalg.norm(w @ t.T)
    fs = s3fs.S3FileSystem(**s3)
    assert not fs.exists("dstab-test/.race-out.dstab-claim")  # released by the winner


def test_user_objects_inside_an_s3_version_are_kept(s3: dict, source: dict[str, str], capsys) -> None:  # noqa: F811
    import s3fs

    out = "s3://dstab-test/with-notes"
    opts = ("--storage-options", json.dumps(s3), *FAST)
    assert run(capsys, "stabilize", source["a"], "--out", out, *opts)[0] == 0
    fs = s3fs.S3FileSystem(**s3)
    fs.pipe("dstab-test/with-notes/NOTES.txt", b"mine")
    code, _, err = run(capsys, "stabilize", source["a"], "--out", out, "--overwrite", *opts)
    assert code == 2 and "with files dstab did not write in it (NOTES.txt)" in err, err
    assert fs.cat("dstab-test/with-notes/NOTES.txt") == b"mine"
    assert dstab.open_version(out, s3).attrs["complete"] is True
