"""Versions on an S3-compatible server (moto's server mode, on loopback) through fsspec URLs and storage options."""

from __future__ import annotations

import contextlib
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

    with moto_server() as endpoint:
        options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("dstab-test")
        yield options


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's S3 server on a free loopback port, up and answering; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
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
        for name, arr in (
            ("items", t.astype(np.float32)),
            ("users", w.astype(np.float32)),
            ("item_ids", i),
            ("user_ids", u),
        ):
            np.save(tmp_path / f"{day}-{name}.npy", arr)
        for where in (f"s3://dstab-test/{day}", tmp_path / day):
            code, _, err = run_cli(
                capsys, "import", "--items", tmp_path / f"{day}-items.npy", "--items-ids", tmp_path / f"{day}-item_ids.npy",
                "--users", tmp_path / f"{day}-users.npy", "--users-ids", tmp_path / f"{day}-user_ids.npy",
                "--out", where, "--chunk-rows", "512", "--storage-options", opts, *FAST,
            )  # fmt: skip
            assert code == 0, err
    for root in ("s3://dstab-test", str(tmp_path)):
        assert (
            run_cli(
                capsys, "stabilize", f"{root}/day1", "--out", f"{root}/day1-stable", "--storage-options", opts, *FAST
            )[0]
            == 0
        )
        code, out, err = run_cli(
            capsys, "stabilize", f"{root}/day2", "--reference", f"{root}/day1-stable", "--out", f"{root}/day2-stable",
            "--storage-options", opts, *FAST,
        )  # fmt: skip
        assert code == 0 and "matched by id" in out, err
    remote = dstab.open_version("s3://dstab-test/day2-stable", s3)
    local = dstab.open_version(tmp_path / "day2-stable")
    for side in ("items", "users"):
        np.testing.assert_array_equal(
            np.asarray(remote.table(side).vectors[...]), np.asarray(local.table(side).vectors[...])
        )
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
    rerun = subprocess.run(
        cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr  # the abandoned output is replaced without --overwrite
    assert KEY not in rerun.stdout + rerun.stderr and SECRET not in rerun.stdout + rerun.stderr
    assert dstab.open_version(out, s3).attrs["complete"] is True
    code, _, err = run_cli(capsys, "stabilize", src, "--out", out, "--storage-options", opts, *FAST)
    assert (
        code == 2 and "already holds a dstab version; pass --overwrite" in err
    )  # a complete version is never replaced without --overwrite


# ----------------------------------------------------------------------------- stores that cannot answer
# (issue 11, point 6) Each failure is one line on stderr naming the URL, the cause and the fix, exit code 2,
# within 30 s, before any cluster starts, with nothing written and nothing of --storage-options shown.

BOUND_S = 30.0  # a bound the user can live with, not a benchmark
UNROUTABLE = "http://192.0.2.1:9000"  # TEST-NET-1 (RFC 5737): routed nowhere (or refused by a local gateway)


def _blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback port that drops connection attempts: a listener whose accept queue is full and never drained."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(64):
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:  # timed out: SYNs are now dropped
            probe.close()
            return server, fillers
        fillers.append(probe)
    raise RuntimeError("could not fill a loopback listener's accept queue")


@pytest.fixture(scope="module")
def dead_ends() -> Iterator[dict[str, str]]:
    """Endpoints on loopback that fail in three ways: nothing listens, connections hang, requests go unanswered."""
    closed = free_port()
    hole, fillers = _blackhole()
    silent = socket.socket()  # the kernel accepts connections, nobody ever reads or answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        yield {
            "refused": f"http://127.0.0.1:{closed}",
            "blackhole": f"http://127.0.0.1:{hole.getsockname()[1]}",
            "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
        }
    finally:
        for s in (hole, silent, *fillers):
            s.close()


@pytest.fixture(scope="module")
def s3_auth() -> Iterator[dict]:
    """A second moto server that checks credentials (moto accepts any by default): a user allowed s3:*, one allowed nothing."""
    import boto3
    import s3fs

    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}  # the IAM calls below; every later request is checked
    with moto_server(env) as endpoint:
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        keys = {}
        for user, policy in (("writer", {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}), ("nobody", None)):
            iam.create_user(UserName=user)
            if policy:
                iam.put_user_policy(
                    UserName=user,
                    PolicyName="all",
                    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
                )
            access = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"key": access["AccessKeyId"], "secret": access["SecretAccessKey"], "endpoint_url": endpoint}
        s3fs.S3FileSystem(**keys["writer"], skip_instance_cache=True).mkdir("dstab-auth")
        yield keys


@pytest.fixture(scope="module")
def local_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "v1"
    assert (
        main(
            [
                "synth",
                str(path),
                "--items",
                "300",
                "--users",
                "200",
                "--dim",
                "4",
                "--scheduler",
                "synchronous",
                "--no-progress",
            ]
        )
        == 0
    )
    return path


def _snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


# case: (storage options, bucket of the URL, words the line must hold (any one of a tuple), roles)
ROLES = ("report", "stabilize-new", "stabilize-out")
CASES = {
    "connection-refused": (
        lambda s3, dead, auth: {"endpoint_url": dead["refused"], "key": KEY, "secret": SECRET},
        "dstab-test",
        ["connection refused", "check endpoint_url in --storage-options"],
        ROLES,
    ),
    "missing-credentials": (
        lambda s3, dead, auth: {"endpoint_url": s3["client_kwargs"]["endpoint_url"]},
        "dstab-test",
        ["no credentials", '"key" and "secret" in --storage-options'],
        ROLES,
    ),
    "unroutable-endpoint": (
        lambda s3, dead, auth: {"endpoint_url": UNROUTABLE, "key": KEY, "secret": SECRET},
        "dstab-test",
        [("connection refused", "no answer", "unreachable", "cannot connect"), "check endpoint_url"],
        ROLES,
    ),
    "missing-bucket": (
        lambda s3, dead, auth: s3,
        "no-such-bucket-dstab",
        ["the bucket 'no-such-bucket-dstab' does not exist", "check the bucket name"],
        ROLES,
    ),
    "unknown-access-key": (
        lambda s3, dead, auth: {**auth["writer"], "key": "AKIADSTABUNKNOWN0000", "secret": SECRET},
        "dstab-auth",
        ["InvalidAccessKeyId", "check the key and secret"],
        ROLES,
    ),
    "wrong-secret": (
        lambda s3, dead, auth: {**auth["writer"], "secret": SECRET},
        "dstab-auth",
        ["SignatureDoesNotMatch", "check the key and secret"],
        ROLES,
    ),
    "access-denied": (
        lambda s3, dead, auth: auth["nobody"],
        "dstab-auth",
        ["access denied", "what the credentials may do"],
        ROLES,
    ),
    # the two that used to hang for minutes: bounded by short probe timeouts, so only one input and the output
    "connect-timeout": (
        lambda s3, dead, auth: {"endpoint_url": dead["blackhole"], "key": KEY, "secret": SECRET},
        "dstab-test",
        ["no answer from the endpoint", "connect timeout"],
        ("report", "stabilize-out"),
    ),
    "read-timeout": (
        lambda s3, dead, auth: {"endpoint_url": dead["silent"], "key": KEY, "secret": SECRET},
        "dstab-test",
        ["did not answer", "read timeout"],
        ("report", "stabilize-out"),
    ),
}


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """No AWS credentials from anywhere: environment, files, or the EC2 metadata endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))  # fmt: skip
    return env


@pytest.mark.parametrize(
    ("case", "role"), [(case, role) for case, (*_, roles) in CASES.items() for role in roles]
)  # fmt: skip
def test_store_failures_are_one_line_within_30_s(
    case: str, role: str, s3: dict, dead_ends: dict, s3_auth: dict, local_version: Path, tmp_path: Path
) -> None:
    import s3fs

    make_options, bucket, words, _ = CASES[case]
    options = make_options(s3, dead_ends, s3_auth)
    url = f"s3://{bucket}/stores-{case}"
    work = tmp_path / "work"
    work.mkdir()
    # no --scheduler: a check that came after the cluster started would add its line to stderr
    args = {
        "report": ["report", url],
        "stabilize-new": ["stabilize", url, "--out", str(work / "out")],
        "stabilize-out": ["stabilize", str(local_version), "--out", url],
    }[role]
    before = _snapshot(local_version)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dstab.cli", *args, "--no-progress", "--storage-options", json.dumps(options)],
        env=_cli_env(tmp_path), cwd=work, capture_output=True, text=True, timeout=2 * BOUND_S, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    line = done.stderr.strip()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(line.splitlines()) == 1 and line.startswith("dstab: error: "), done.stderr[-3000:]
    assert elapsed < BOUND_S, f"{elapsed:.1f} s: {line}"
    assert url in line, line
    for word in words:
        alternatives = word if isinstance(word, tuple) else (word,)
        assert any(w in line for w in alternatives), line
    shown = done.stdout + done.stderr
    for value in (KEY, SECRET, options.get("key"), options.get("secret"), options.get("endpoint_url")):
        assert not value or value not in shown, line  # nothing of --storage-options is ever shown
    # nothing written: no local output, the input untouched, nothing created on the store
    assert list(work.iterdir()) == []
    assert _snapshot(local_version) == before
    if case == "missing-bucket":
        assert not s3fs.S3FileSystem(**s3, skip_instance_cache=True).exists(bucket)
    if bucket == "dstab-auth":
        assert s3fs.S3FileSystem(**s3_auth["writer"], skip_instance_cache=True).ls("dstab-auth") == []


def test_probe_defaults_lie_under_the_users_options_and_reach_no_one_else() -> None:
    from dstab.store.remote import S3_PROBE_CONFIG, probe_options

    user = {"key": KEY, "secret": SECRET, "config_kwargs": {"read_timeout": 60, "retries": {"mode": "adaptive"}}}
    merged = probe_options("s3://b/v", user)
    assert merged["config_kwargs"] == {
        "connect_timeout": 3,
        "read_timeout": 60,
        "retries": {"total_max_attempts": 3, "mode": "adaptive"},
    }
    assert user == {
        "key": KEY,
        "secret": SECRET,
        "config_kwargs": {"read_timeout": 60, "retries": {"mode": "adaptive"}},
    }
    assert S3_PROBE_CONFIG["retries"] == {
        "total_max_attempts": 3,
        "mode": "standard",
    }  # botocore rewrites the dict it gets
    assert probe_options("s3://b/v", {"config_kwargs": {"retries": {"max_attempts": 9}}})["config_kwargs"][
        "retries"
    ] == {"max_attempts": 9, "mode": "standard"}
    assert probe_options("gs://b/v", {"token": "anon"}) == {"token": "anon"}  # s3fs's settings only go to s3fs
    assert probe_options("memory://b/v", None) == {}


def test_storage_options_reach_zarr_as_given(s3: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's timeouts stay the probe's: the group (and the workers' reads) get the user's options unchanged."""
    import zarr

    seen = []
    real_open = zarr.open

    def spy(*args, **kwargs):
        seen.append(kwargs.get("storage_options"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(zarr, "open", spy)
    given = json.loads(json.dumps(s3))
    group = zarr.open_group("s3://dstab-test/given", mode="w", storage_options=s3)
    for side in ("items", "users"):
        group.create_array(f"{side}/vectors", shape=(10, 3), chunks=(5, 3), dtype="f4")[...] = 1.0
    version = dstab.open_version("s3://dstab-test/given", given)
    assert seen == [s3] and "config_kwargs" not in seen[0]
    assert version.storage_options == s3
    assert "config_kwargs" not in version.items.vectors.store.fs.storage_options


def test_any_store_answers_within_the_probe_deadline(dead_ends: dict, tmp_path: Path) -> None:
    """Stores other than s3fs get no timeouts from dstab: the probe's wall-clock deadline bounds them (http here)."""
    url = dead_ends["silent"] + "/v"
    env = {**_cli_env(tmp_path), "DASK_DSTAB__PROBE_TIMEOUT": "2"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dstab.cli", "report", url, "--no-progress"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=2 * BOUND_S, check=False)  # fmt: skip
    assert time.monotonic() - started < BOUND_S
    assert done.returncode == 2
    assert (
        done.stderr
        == f"dstab: error: cannot open version {url}: no answer from the store within 2 s; check the URL and "
        "--storage-options; if the store is merely slow, raise DASK_DSTAB__PROBE_TIMEOUT\n"
    )
