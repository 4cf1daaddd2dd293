"""Versions in Icechunk repositories (``REPO.icechunk/VERSION``): published by one commit, on local storage and S3.

Real parts only: icechunk on tmp_path and on moto's S3 server on loopback, the
CLI in-process and as real processes (killed, or racing each other), a real
LocalCluster for the forks pickled to worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import icechunk
import numpy as np
import pytest
import zarr

import dstab
from dstab.cli import main
from dstab.errors import OutputExistsError
from dstab.store import Staging
from dstab.synth import synth, synth_like
from tests.test_object_storage import KEY, SECRET, moto_server

FAST = ("--scheduler", "threads", "--no-progress")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
BUCKET = "dstab-ice"


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two small raw versions (plain Zarr): day1 and a noisy retrain of it, day2."""
    root = tmp_path_factory.mktemp("ice")
    with dask.config.set(scheduler="threads"):
        base = synth(root / "day1", items=3000, users=1000, dim=8, seed=1, chunk_rows=512)
        synth_like(root / "day2", base, noise=0.01, seed=2)
    return {"root": str(root), "day1": str(root / "day1"), "day2": str(root / "day2")}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """moto's S3 server on loopback with a bucket; yields the fsspec storage options dstab takes."""
    import s3fs

    with moto_server() as endpoint:
        options = {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": endpoint},
        }
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert KEY not in out + err and SECRET not in out + err
    return code, out, err


def dstab_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "dstab.cli", *map(str, args)]


def repository(url: str, options: dict[str, Any] | None = None) -> icechunk.Repository:
    """The repository, opened with icechunk itself (not through dstab)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        endpoint = options["client_kwargs"]["endpoint_url"]  # type: ignore[index]
        storage = icechunk.s3_storage(
            bucket=bucket, prefix=prefix, endpoint_url=endpoint, allow_http=True, access_key_id=KEY,
            secret_access_key=SECRET, force_path_style=True, region="us-east-1",
        )  # fmt: skip
    else:
        storage = icechunk.local_filesystem_storage(url)
    return icechunk.Repository.open(storage)


def arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {k: group[f"{k}/vectors"][...] for k in ("items", "users")} | {"items_ids": group["items/ids"][...]}


def head_arrays(repo: icechunk.Repository, version: str) -> dict[str, np.ndarray]:
    return arrays(zarr.open_group(repo.readonly_session(branch="main").store, path=version, mode="r"))


def scores(version: dstab.Version) -> np.ndarray:
    u = np.asarray(version.table("users").vectors[...], dtype=np.float64)
    i = np.asarray(version.table("items").vectors[...], dtype=np.float64)
    return u @ i.T


def test_chain_in_local_repository_matches_plain_zarr(
    days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    repo_path = tmp_path / "chain.icechunk"
    plain = tmp_path / "plain"
    for out in (f"{repo_path}/day1", plain / "day1"):
        assert cli(capsys, "stabilize", days["day1"], "--out", out, *FAST)[0] == 0
    assert (
        cli(
            capsys,
            "stabilize",
            days["day2"],
            "--reference",
            f"{repo_path}/day1",
            "--out",
            f"{repo_path}/day2",
            *FAST,
        )[0]
        == 0
    )
    assert (
        cli(
            capsys,
            "stabilize",
            days["day2"],
            "--reference",
            plain / "day1",
            "--out",
            plain / "day2",
            *FAST,
        )[0]
        == 0
    )

    repo = repository(str(repo_path))
    for day in ("day1", "day2"):
        got, want = (
            head_arrays(repo, day),
            arrays(zarr.open_group(str(plain / day), mode="r")),
        )
        for name in want:
            if want[name].dtype.kind == "f":
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
            else:
                np.testing.assert_array_equal(got[name], want[name])
    # scores kept: the stabilized day2 scores as the raw day2 ones (float32 rounding)
    raw, stable = (
        scores(dstab.open_version(days["day2"])),
        scores(dstab.open_version(f"{repo_path}/day2")),
    )
    assert np.linalg.norm(stable - raw) / np.linalg.norm(raw) < 1e-5
    # and it was aligned onto day1: close to day1's coordinates, unlike the raw retrain
    d1 = head_arrays(repo, "day1")["items"]
    assert np.linalg.norm(head_arrays(repo, "day2")["items"] - d1) < 0.1 * np.linalg.norm(
        dstab.open_version(days["day2"]).table("items").vectors[...] - d1
    )

    # any reader of Zarr v3 reads it through a read-only session: xarray here
    import xarray as xr

    session = repo.readonly_session(branch="main")
    ds = xr.open_zarr(session.store, group="day2/items", consolidated=False)
    np.testing.assert_array_equal(ds["vectors"].values, head_arrays(repo, "day2")["items"])
    assert zarr.open_group(session.store, path="day2", mode="r").attrs["dstab"]["complete"] is True

    # lineage over history: the chain, each version with the snapshot that published it
    code, out, _ = cli(capsys, "log", f"{repo_path}/day2")
    assert code == 0
    commits = {s.message: s.id for s in repo.ancestry(branch="main")}
    assert f"snapshot {commits['dstab: publish day2']}" in out and f"snapshot {commits['dstab: publish day1']}" in out
    assert out.index("day2  (stabilized") < out.index("day1  (stabilized")
    code, out, _ = cli(capsys, "log", f"{repo_path}/day2", "--json")
    entries = json.loads(out)["chain"]
    assert [e["snapshots"][0]["snapshot"] for e in entries] == [
        commits["dstab: publish day2"],
        commits["dstab: publish day1"],
    ]

    # an older state by snapshot id: day2 did not exist yet when day1 was published
    code, _, err = cli(capsys, "report", f"{repo_path}@{commits['dstab: publish day1']}/day2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no group day2" in err
    assert cli(capsys, "report", f"{repo_path}@{commits['dstab: publish day1']}/day1")[0] == 0


def test_chain_on_s3_with_worker_processes(
    days: dict[str, str],
    s3: dict[str, Any],
    local_cluster: Any,
    capsys: pytest.CaptureFixture[str],
):
    """Forks pickled to two worker processes and merged back: the S3 repository holds what a plain run writes."""
    from distributed import Client

    url = f"s3://{BUCKET}/stable.icechunk"
    with Client(local_cluster):  # type: ignore[no-untyped-call]
        day1 = dstab.stabilize(dstab.open_version(days["day1"])).to_zarr(f"{url}/day1", storage_options=s3)
        ref = dstab.open_version(f"{url}/day1", s3)
        result = dstab.stabilize(dstab.open_version(days["day2"]), ref)
        day2 = result.to_zarr(f"{url}/day2", storage_options=s3)
        plain = dstab.stabilize(dstab.open_version(days["day2"]), ref).to_zarr(
            Path(days["root"]) / "plain-day2-s3", overwrite=True
        )
    assert day1.url == f"{url}/day1"
    for name in ("items", "users"):
        np.testing.assert_allclose(
            day2.table(name).vectors[...],
            plain.table(name).vectors[...],
            rtol=0,
            atol=1e-6,
        )
    repo = repository(url, s3)
    assert [s.message for s in repo.ancestry(branch="main")][:2] == [
        "dstab: publish day2",
        "dstab: publish day1",
    ]
    np.testing.assert_array_equal(
        head_arrays(repo, "day2")["items_ids"],
        dstab.open_version(days["day2"]).table("items").ids[...],
    )
    opts = json.dumps(s3)
    code, out, _ = cli(capsys, "log", f"{url}/day2", "--storage-options", opts)
    assert code == 0 and repo.lookup_branch("main") in out
    # an endpoint that answers nothing: one line naming the repository, within seconds
    dead = {**s3, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    code, _, err = cli(capsys, "report", f"{url}/day2", "--storage-options", json.dumps(dead))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stable.icechunk" in err
    # a bucket that is not there: one line naming it, nothing created
    code, _, err = cli(
        capsys,
        "stabilize",
        days["day2"],
        "--out",
        "s3://no-such-bucket/r.icechunk/day1",
        "--storage-options",
        opts,
        *FAST,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no-such-bucket" in err, err


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_killed_before_commit_leaves_the_repository_as_it_was(
    days: dict[str, str], tmp_path: Path, s3: dict[str, Any], overwrite: bool, where: str
):
    """A run killed (its whole process group, SIGKILL) after the write pass and before its commit, on local storage
    and on moto's S3: the branch head is exactly the previous snapshot, the old version identical, rerun succeeds."""
    if where == "local":
        repo_url, options, extra = str(tmp_path / "r.icechunk"), None, []
    else:
        repo_url = f"s3://{BUCKET}/kill-{tmp_path.name}-{int(overwrite)}.icechunk"
        options, extra = s3, ["--storage-options", json.dumps(s3)]
    with dask.config.set(scheduler="threads"):
        dstab.stabilize(dstab.open_version(days["day1"])).to_zarr(f"{repo_url}/day1", storage_options=options)
    repo = repository(repo_url, options)
    head, before = repo.lookup_branch("main"), head_arrays(repo, "day1")
    # with --overwrite the killed run replaces day1; without, it adds day2
    out = f"{repo_url}/day1" if overwrite else f"{repo_url}/day2"
    cmd = dstab_cmd("stabilize", days["day2"], "--out", out, *FAST, *extra, *(["--overwrite"] if overwrite else []))
    proc = subprocess.run(
        cmd,
        env={**ENV, "DSTAB_FAILPOINT": "after-write"},
        capture_output=True,
        timeout=120,
        start_new_session=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    repo = repository(repo_url, options)
    assert repo.lookup_branch("main") == head  # no commit: exactly the previous state
    for name, want in before.items():
        np.testing.assert_array_equal(head_arrays(repo, "day1")[name], want)
    assert sorted(zarr.open_group(repo.readonly_session(branch="main").store, mode="r").group_keys()) == ["day1"]
    # the same command again succeeds (no --overwrite needed where the first had none)
    assert main(cmd[3:]) == 0
    assert dstab.open_version(out, options).attrs["input"] == str(Path(days["day2"]).resolve())


def test_overwrite_is_one_snapshot_and_readers_keep_the_old_version(
    days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    url = f"{tmp_path}/r.icechunk/day1"
    assert cli(capsys, "stabilize", days["day1"], "--out", url, *FAST)[0] == 0
    repo = repository(f"{tmp_path}/r.icechunk")
    reader = repo.readonly_session(branch="main")  # opened before the overwrite
    old = arrays(zarr.open_group(reader.store, path="day1", mode="r"))
    old_head = repo.lookup_branch("main")
    assert cli(capsys, "stabilize", days["day2"], "--out", url, "--overwrite", *FAST)[0] == 0
    # the reader still sees the old version, whole
    for name, want in arrays(zarr.open_group(reader.store, path="day1", mode="r")).items():
        np.testing.assert_array_equal(want, old[name])
    # the replacement is one commit on top of the old head; at every snapshot day1 is absent or complete, never partial
    history = list(repo.ancestry(branch="main"))
    assert history[0].parent_id == old_head and history[0].message == "dstab: publish day1"
    for snap in history:
        root = zarr.open_group(repo.readonly_session(snapshot_id=snap.id).store, mode="r") if snap.parent_id else None
        if root is not None and "day1" in root:
            assert root["day1"].attrs["dstab"]["complete"] is True
            assert root["day1/items/vectors"].nchunks_initialized == root["day1/items/vectors"].nchunks
    new = head_arrays(repo, "day1")
    assert not np.allclose(new["items"], old["items"])
    np.testing.assert_allclose(new["items"], dstab.open_version(url).table("items").vectors[...])


def test_a_writer_that_lost_the_race_does_not_publish(days: dict[str, str], tmp_path: Path):
    """Two writers of one new version, both past the checks: the second's commit conflicts (rebase) and is refused."""
    url = f"{tmp_path}/r.icechunk/day1"
    day1 = dstab.open_version(days["day1"])
    with dask.config.set(scheduler="threads"):
        a, b = dstab.stabilize(day1), dstab.stabilize(dstab.open_version(days["day2"]))
        staged = [Staging(url, inputs=[], overwrite=False) for _ in range(2)]
        for staging, result in zip(staged, (a, b)):  # both staged before either publishes
            staging.write_small("transform/items", result.transforms["items"])
        staged[0].publish({"kind": "stabilized"})
        with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
            staged[1].publish({"kind": "stabilized"})
    repo = repository(f"{tmp_path}/r.icechunk")
    assert next(s.message for s in repo.ancestry(branch="main")) == "dstab: publish day1"
    np.testing.assert_array_equal(
        zarr.open_group(repo.readonly_session(branch="main").store, path="day1", mode="r")["transform/items"][...],
        a.transforms["items"],
    )


def race(cmds: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=180) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_writers_of_one_version(days: dict[str, str], tmp_path: Path, s3: dict[str, Any], where: str):
    """Two processes started together, no --overwrite: one publishes, the other says so on one line (exit 2)."""
    repo_url = f"{tmp_path}/r.icechunk" if where == "local" else f"s3://{BUCKET}/race-{tmp_path.name}.icechunk"
    extra = ["--storage-options", json.dumps(s3)] if where == "s3" else []
    same = race([dstab_cmd("stabilize", days[d], "--out", f"{repo_url}/v", *FAST, *extra) for d in ("day1", "day2")])
    assert sorted(p.returncode for p in same) == [0, 2], [p.stderr for p in same]
    loser = next(p for p in same if p.returncode == 2)
    assert len(loser.stderr.strip().splitlines()) == 1, loser.stderr
    assert "appeared while this run was writing it" in loser.stderr or "already holds a dstab version" in loser.stderr
    winner = next(p for p in same if p.returncode == 0)
    published = dstab.open_version(f"{repo_url}/v", s3 if where == "s3" else None)
    assert published.attrs["complete"] is True and published.attrs["input"].endswith(
        "day1" if "day1" in winner.args[4] else "day2"
    )
    assert [s.message for s in repository(repo_url, s3).ancestry(branch="main")][:2] == [
        "dstab: publish v",
        "dstab: create repository",
    ]


def test_two_writers_of_two_versions_in_one_repository(days: dict[str, str], s3: dict[str, Any]):
    """Two processes started together into one new S3 repository, different versions: both publish (rebased)."""
    repo_url = f"s3://{BUCKET}/two.icechunk"
    extra = ["--storage-options", json.dumps(s3)]
    both = race([dstab_cmd("stabilize", days[d], "--out", f"{repo_url}/{d}", *FAST, *extra) for d in ("day1", "day2")])
    assert [p.returncode for p in both] == [0, 0], [p.stderr for p in both]
    for day in ("day1", "day2"):
        version = dstab.open_version(f"{repo_url}/{day}", s3)
        assert version.attrs["complete"] is True and version.attrs["input"].endswith(day)
    messages = [s.message for s in repository(repo_url, s3).ancestry(branch="main")]
    assert sorted(messages[:2]) == ["dstab: publish day1", "dstab: publish day2"]


def test_refused_outputs_change_nothing(days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    repo_path = tmp_path / "r.icechunk"
    assert cli(capsys, "stabilize", days["day1"], "--out", f"{repo_path}/day1", *FAST)[0] == 0
    repo = repository(str(repo_path))
    session = repo.writable_session("main")
    zarr.open_group(session.store, path="notes", mode="w").attrs["owner"] = "someone else"
    session.commit("a group that is not dstab's")
    head = repo.lookup_branch("main")
    for flags in ([], ["--overwrite"]):
        code, _, err = cli(
            capsys,
            "stabilize",
            days["day2"],
            "--out",
            f"{repo_path}/notes",
            *FAST,
            *flags,
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and "not write" in err, err
        # nor inside a version
        code, _, err = cli(
            capsys,
            "stabilize",
            days["day2"],
            "--out",
            f"{repo_path}/day1/inner",
            *FAST,
            *flags,
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and "inside day1" in err, err
    # the input is the output
    code, _, err = cli(
        capsys,
        "stabilize",
        f"{repo_path}/day1",
        "--out",
        f"{repo_path}/day1",
        "--overwrite",
        *FAST,
    )
    assert code == 2 and "never writes over its inputs" in err
    assert repository(str(repo_path)).lookup_branch("main") == head
    assert (
        zarr.open_group(repo.readonly_session(branch="main").store, path="notes", mode="r").attrs["owner"]
        == "someone else"
    )

    # a directory named .icechunk that is not a repository is never written into
    foreign = tmp_path / "mine.icechunk"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "stabilize", days["day1"], "--out", f"{foreign}/day1", *FAST)
    assert code == 2 and "not an Icechunk repository" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    # schemes icechunk has no storage for here, and a repository with no version named
    for url in ("gs://bucket/r.icechunk/day1", "memory://r.icechunk/day1"):
        code, _, err = cli(capsys, "stabilize", days["day1"], "--out", url, *FAST)
        assert code == 2 and len(err.strip().splitlines()) == 1 and url in err and "s3://" in err, err
    code, _, err = cli(capsys, "report", str(repo_path))
    assert code == 2 and f"{repo_path}/VERSION" in err
