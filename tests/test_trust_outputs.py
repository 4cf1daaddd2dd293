"""What dstab writes, and what it refuses to touch (issue 11, points 1-3, 5, 7-9, 11, 14).

Every case asserts the exit code, the one line on stderr, and what is on disk
afterwards: a user's data untouched, no hidden staging directory left.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

import dstab
from dstab.cli import main
from dstab.synth import counts_for_ids, synth, synth_like
from tests.conftest import random_tables, write_version

FAST = ("--scheduler", "synchronous", "--no-progress")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def dstab_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "dstab.cli", *map(str, args)]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("dstab: local cluster")]
    assert len(lines) == 1, err
    assert lines[0].startswith("dstab: error: "), err
    assert "Traceback" not in err
    return lines[0]


def hidden_litter(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".dstab-" in p.name)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("days")
    with dask_sync():
        day1 = synth(root / "day1", items=3000, users=1500, dim=8, seed=1, chunk_rows=256)
        synth_like(root / "day2", day1, noise=0.01, seed=2)
        dstab.stabilize(day1).to_zarr(root / "day1-stable")
    return {name: str(root / name) for name in ("day1", "day2", "day1-stable")}


def dask_sync():
    import dask

    return dask.config.set(scheduler="synchronous")


# ----------------------------------------------------------------------------- 1. --overwrite never deletes a user's data


def user_dir(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.txt").write_text("precious")
    return path


def user_zarr(path: Path) -> Path:
    T, W = random_tables(3, 20, 10, 4)
    write_version(path, T, W)  # a raw version from training: not dstab's to replace
    return path


def user_file(path: Path) -> Path:
    path.write_text("precious")
    return path


def writing_command(command: str, out: Path, days: dict[str, str], tmp_path: Path) -> list[object]:
    """The arguments of a command that writes ``out`` (its .npy inputs made in ``tmp_path`` for import)."""
    np.save(tmp_path / "items.npy", np.ones((5, 3), np.float32))
    np.save(tmp_path / "users.npy", np.ones((4, 3), np.float32))
    return {
        "stabilize": ["stabilize", days["day2"], "--out", out],
        "apply": ["apply", days["day1-stable"], "--users", f"{days['day1']}/users", "--out", out],
        "import": ["import", "--items", tmp_path / "items.npy", "--users", tmp_path / "users.npy", "--out", out],
        "export": ["export", days["day1-stable"], "--out", out],
        "synth": ["synth", out, "--items", 10, "--users", 10, "--dim", 2],
        "synth-like": ["synth", out, "--like", days["day1"]],
    }[command]


@pytest.mark.parametrize("make", [user_dir, user_zarr, user_file], ids=["directory", "raw-zarr-version", "file"])
@pytest.mark.parametrize(
    "command",
    ["stabilize", "apply", "import", "export", "synth", "synth-like"],
)
def test_overwrite_only_replaces_dstab_outputs(
    days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], make, command: str
) -> None:
    out = make(tmp_path / "out")
    before = tree(out) if out.is_dir() else {"": out.read_bytes()}
    args = writing_command(command, out, days, tmp_path)
    for flags in ([], ["--overwrite"]):
        code, _, err = run(capsys, *args, *flags, *FAST)
        line = one_line(err)
        assert code == 2, err
        assert str(out) in line and "not" in line and ("dstab" in line), line
        after = tree(out) if out.is_dir() else {"": out.read_bytes()}
        assert after == before  # nothing touched
        assert hidden_litter(tmp_path) == []


@pytest.mark.parametrize("command", ["stabilize", "apply", "import", "export", "synth", "synth-like"])
def test_an_out_under_a_file_is_one_line(
    days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """OUT's parent is a file (found by the new-user trial: a NotADirectoryError traceback and exit 1)."""
    blocker = user_file(tmp_path / "afile")
    out = blocker / "sub" / "out"
    args = writing_command(command, out, days, tmp_path)
    code, _, err = run(capsys, *args, *FAST)
    line = one_line(err)
    assert code == 2, err
    assert str(out) in line and str(blocker) in line and "is a file" in line, line
    assert blocker.read_text() == "precious" and hidden_litter(tmp_path) == []


def test_overwrite_replaces_a_dstab_version_and_an_export(days: dict[str, str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "stable"
    assert run(capsys, "stabilize", days["day2"], "--out", out, *FAST)[0] == 0
    code, _, err = run(capsys, "stabilize", days["day2"], "--out", out, *FAST)
    assert code == 2 and "already holds a dstab version; pass --overwrite" in one_line(err)
    assert (
        run(capsys, "stabilize", days["day2"], "--reference", days["day1-stable"], "--out", out, "--overwrite", *FAST)[
            0
        ]
        == 0
    )
    assert dstab.open_version(out).attrs["reference"] == str(Path(days["day1-stable"]).resolve())
    export = tmp_path / "parquet"
    assert run(capsys, "export", out, "--out", export, *FAST)[0] == 0
    assert run(capsys, "export", out, "--out", export, "--overwrite", *FAST)[0] == 0
    # an empty directory holds nothing to lose: it is taken without --overwrite
    (tmp_path / "empty").mkdir()
    assert run(capsys, "stabilize", days["day2"], "--out", tmp_path / "empty", *FAST)[0] == 0
    assert hidden_litter(tmp_path) == []


@pytest.mark.parametrize("inside", ["NOTES.txt", "extra/d.bin", "items/mine.parquet", "items/vectors/c/mine"])
@pytest.mark.parametrize("command", ["stabilize", "export"])
def test_overwrite_keeps_user_files_inside_a_dstab_output(
    days: dict[str, str], tmp_path: Path, capsys, inside: str, command: str
) -> None:
    out = tmp_path / "out"
    args = (
        ["stabilize", days["day2"], "--out", out]
        if command == "stabilize"
        else ["export", days["day1-stable"], "--out", out]
    )
    assert run(capsys, *args, *FAST)[0] == 0
    (out / inside).parent.mkdir(parents=True, exist_ok=True)
    (out / inside).write_text("mine")
    before = tree(out)
    code, _, err = run(capsys, *args, "--overwrite", *FAST)
    assert code == 2, err
    assert f"with files dstab did not write in it ({inside})" in one_line(err)
    assert tree(out) == before and hidden_litter(tmp_path) == []
    (out / inside).unlink()
    assert run(capsys, *args, "--overwrite", *FAST)[0] == 0  # its own output alone is replaced


# ----------------------------------------------------------------------------- 2. two runs, one new OUT


def test_two_runs_racing_for_one_new_out_publish_once(tmp_path: Path) -> None:
    with dask_sync():
        a = synth(tmp_path / "a", items=60_000, users=30_000, dim=16, seed=1, chunk_rows=2048)
        synth_like(tmp_path / "b", a, noise=0.01, seed=2)
    out = tmp_path / "x"
    env = {**ENV, "DASK_DSTAB__BLOCK_BYTES": "200000"}  # many small blocks: both runs are still writing when one ends
    procs = [
        subprocess.Popen(dstab_cmd("stabilize", src, "--out", out, "--scheduler", "threads", "--no-progress"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for src in (tmp_path / "a", tmp_path / "b")
    ]  # fmt: skip
    results = [(p.returncode, *p.communicate(timeout=240)) for p in procs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(procs, results)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (winner,) = [r for r in results if r[0] == 0]
    (loser,) = [r for r in results if r[0] == 2]
    line = one_line(loser[2])
    assert str(out) in line and ("appeared while this run was writing it" in line or "already holds" in line), line
    assert loser[1] == ""  # the loser printed no "wrote ..." line
    # what is at OUT is the winner's, whole
    published = dstab.open_version(out)
    assert f"wrote {out}" in winner[1]
    winner_input = str(tmp_path / ("a" if published.attrs["input"].endswith("/a") else "b"))
    assert published.attrs["input"] == winner_input
    assert hidden_litter(tmp_path) == []


# ----------------------------------------------------------------------------- 3. disk full, read-only output


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[bool]:
    """A real small or read-only file system at ``path`` (needs root); yields False where mounting is not allowed."""
    path.mkdir(exist_ok=True)
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _limit_file_size() -> None:  # pragma: no cover - runs in the child
    # where no file system can be mounted: writes past 256 KiB fail (EFBIG), as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["threads", "local-cluster"])
def test_disk_full_leaves_nothing_and_says_so(tmp_path: Path, scheduler: str) -> None:
    with dask_sync():
        synth(tmp_path / "new", items=100_000, users=20_000, dim=16, seed=1, chunk_rows=4096)
    disk = tmp_path / "disk"
    where = ["--scheduler", "threads"] if scheduler == "threads" else ["--workers", "2"]
    env = {**ENV, "DASK_DSTAB__BLOCK_BYTES": "300000"}
    with mounted_tmpfs(disk, "size=2m") as mounted:
        for attempt in range(3):  # a write still in flight after the failure used to leave staging about half the time
            proc = subprocess.run(
                dstab_cmd("stabilize", tmp_path / "new", "--out", disk / "out", "--no-progress", *where),
                env=env, capture_output=True, text=True, timeout=240,
                preexec_fn=None if mounted else _limit_file_size,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            line = one_line(proc.stderr)
            assert str(disk / "out") in line and ("no space left" in line or "size this process may write" in line), (
                line
            )
            time.sleep(0.5)  # nothing may reappear after the run has ended
            assert sorted(p.name for p in disk.iterdir()) == [], attempt


@pytest.mark.slow
def test_read_only_output_directory(tmp_path: Path, days: dict[str, str]) -> None:
    ro = tmp_path / "ro"
    with mounted_tmpfs(ro, "ro,size=1m") as mounted:
        preexec = None
        if not mounted:  # root may write anywhere: drop to nobody over a directory it may not write
            ro.chmod(0o555)
            tmp_path.chmod(0o755)

            def preexec() -> None:  # pragma: no cover - runs in the child
                os.setgid(65534)
                os.setuid(65534)

        proc = subprocess.run(
            dstab_cmd("stabilize", days["day2"], "--out", ro / "out", *FAST), env=ENV, capture_output=True, text=True,
            timeout=120, preexec_fn=preexec,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        line = one_line(proc.stderr)
        assert str(ro / "out") in line and ("read-only" in line or "permission" in line), line
        assert sorted(p.name for p in ro.iterdir()) == []


# ----------------------------------------------------------------------------- 5, 7, 8. refused before any cluster starts


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--anchor-min-count", "20", "--reference", "REF"], ["items/counts is missing", "--anchor-min-count"]),
        (["--anchor-weights", "counts", "--reference", "REF", "--anchor", "users"], ["users/counts is missing"]),
        (["--workers", "2", "--scheduler", "threads"], ["--workers", "--scheduler threads", "drop it"]),
        (["--memory-limit", "1GiB", "--scheduler", "synchronous"], ["--memory-limit", "drop it"]),
        (["--dashboard-address", ":0", "--scheduler", "threads"], ["--dashboard-address", "drop it"]),
        (["--workers", "2", "--memory-limit", "1GiB", "--scheduler", "threads"], ["--workers and --memory-limit", "drop them"]),
        (["--memory-limit", "10MB"], ["--memory-limit 10MB", "MiB per worker", "pass --memory-limit"]),
        (["--memory-limit", "banana"], ["--memory-limit", "banana"]),
        (["--workers", "0"], ["--workers", "at least 1"]),
        (["--rank", "99"], ["99"]),
        (["--neighbours", "5"], ["--neighbours", "--reference"]),
        (["--neighbours", "1500", "--reference", "REF"], ["--neighbours 1500", "choose K below 1,500"]),
        (["--rank", "3", "--rtol", "1e-3"], ["--rtol", "--rank 3", "drop one"]),
        (["--anchor-min-count", "3"], ["--anchor-min-count", "without --reference"]),
        (["--scheduler", "banana"], ["cannot reach the Dask scheduler at banana"]),
        (["--scheduler", "EMPTYJSON"], ["not a scheduler file"]),
        (["--rank", "0"], ["--rank", "see dstab stabilize --help"]),
    ],
    ids=["min-count-no-counts", "weights-no-counts", "workers-threads", "memory-synchronous", "dashboard-threads",
         "workers-memory-threads", "memory-too-small",
         "memory-banana", "workers-zero", "rank-too-large", "neighbours-no-reference", "neighbours-too-many",
         "rtol-with-rank", "anchor-without-reference", "scheduler-banana", "scheduler-file-empty", "one-line-usage"],
)  # fmt: skip
def test_usage_errors_answer_before_any_cluster(
    days: dict[str, str], tmp_path: Path, extra: list[str], words: list[str]
) -> None:
    (tmp_path / "empty.json").write_text("{}")
    places = {"REF": days["day1-stable"], "EMPTYJSON": str(tmp_path / "empty.json")}
    args = [places.get(a, a) for a in extra]
    proc = subprocess.run(
        dstab_cmd("stabilize", days["day2"], "--out", tmp_path / "out", *args),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, argparse's usage errors included
    text = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in text, text
    assert "dstab: local cluster of" not in proc.stderr  # no cluster was started
    assert not (tmp_path / "out").exists() and hidden_litter(tmp_path) == []


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["synth", "OUT", "--items", "10", "--users", "10", "--dim", "4", "--seed", "-1"], {}, ["--seed must be 0 or more"]),
        (["synth", "OUT", "--like", "DAY1", "--churn", "1.5"], {}, ["--churn must be in [0, 1)"]),
        (["stabilize", "DAY2", "--out", "OUT", "--dashboard-address", "banana"], {}, ["--dashboard-address banana"]),
        (["stabilize", "DAY2", "--out", "OUT", "--scheduler", "threads"], {"DASK_DSTAB__BLOCK_BYTES": "banana"},
         ["DASK_DSTAB__BLOCK_BYTES", "banana"]),
    ],
    ids=["synth-seed", "synth-churn", "dashboard-banana", "block-bytes-banana"],
)  # fmt: skip
def test_bad_settings_are_one_line(
    days: dict[str, str], tmp_path: Path, args: list[str], env: dict, words: list[str]
) -> None:
    places = {"OUT": str(tmp_path / "out"), "DAY1": days["day1"], "DAY2": days["day2"]}
    proc = subprocess.run(dstab_cmd(*[places.get(a, a) for a in args]), env={**ENV, **env}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert all(word in line for word in words), line
    assert not (tmp_path / "out").exists() and hidden_litter(tmp_path) == []


def test_a_raw_reference_is_said(days: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "stabilize", days["day2"], "--reference", days["day1"], "--out", tmp_path / "o", *FAST)
    assert code == 0, err
    assert f"note: the reference ({days['day1']}) was never stabilized" in out


@pytest.mark.slow
def test_task_that_kills_its_worker_is_one_line(days: dict[str, str], tmp_path: Path) -> None:
    """A block that needs more than the workers may hold: KilledWorker becomes one line naming the limit."""
    with dask_sync():
        synth(tmp_path / "big", items=400_000, users=1000, dim=64, seed=1, chunk_rows=400_000)  # one 100 MiB chunk
    proc = subprocess.run(
        dstab_cmd("stabilize", tmp_path / "big", "--out", tmp_path / "out", "--workers", "1", "--memory-limit", "800MiB",
                  "--no-progress"),
        # the nanny kills a worker at 30% of its limit (240 MiB): an idle worker fits, one holding the block does not
        env={**ENV, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
             "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "0.3"},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "killed its worker" in line and "--memory-limit 800MiB" in line, line
    assert not (tmp_path / "out").exists() and hidden_litter(tmp_path) == []


# ----------------------------------------------------------------------------- 9. only one side has ids


def test_position_matching_with_ids_on_one_side_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    T, W = random_tables(1, 200, 100, 4)
    with_ids = write_version(tmp_path / "ids", T, W, item_ids=np.arange(200), user_ids=np.arange(100))
    without = write_version(tmp_path / "plain", T * 1.01, W)
    ref = dstab.stabilize(dstab.open_version(with_ids)).to_zarr(tmp_path / "ref")
    code, out, err = run(capsys, "stabilize", without, "--reference", ref.url, "--out", tmp_path / "out", *FAST)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2, out
    assert "items: only the reference has items/ids, so rows are matched by position" in notes[0]
    assert "users:" in notes[1]
    # both with ids: no note
    code, out, _ = run(capsys, "stabilize", with_ids, "--reference", ref.url, "--out", tmp_path / "out2", *FAST)
    assert code == 0 and "note:" not in out


# ----------------------------------------------------------------------------- 11. a closed pipe


def test_closed_pipe_is_not_an_error(days: dict[str, str]) -> None:
    proc = subprocess.run(
        # `true` has exited before dstab writes a byte: every write meets a closed pipe, as with `| head -1`
        f"{sys.executable} -m dstab.cli log {days['day1-stable']} | true; "
        f"{sys.executable} -m dstab.cli report {days['day1-stable']} --json | true; "
        f"{sys.executable} -m dstab.cli log {days['day1-stable']} | head -1",
        shell=True, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- 14. synth --counts


def test_synth_counts_follow_ids_through_retrains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "synth",
        tmp_path / "d1",
        "--items",
        500,
        "--users",
        300,
        "--dim",
        4,
        "--counts",
        "--chunk-rows",
        64,
        *FAST,
    )
    assert code == 0, err
    assert run(capsys, "synth", tmp_path / "d2", "--like", tmp_path / "d1", "--churn", 0.2, "--seed", 2, *FAST)[0] == 0
    for day in ("d1", "d2"):
        g = zarr.open_group(str(tmp_path / day), mode="r")
        for side in ("items", "users"):
            ids, counts = g[f"{side}/ids"][...], g[f"{side}/counts"][...]
            assert np.array_equal(counts, counts_for_ids(ids))
            assert counts.min() >= 1 and counts.max() <= 1000
            assert 0.2 < np.mean(counts < 20) < 0.7  # a long tail of rare rows, for --anchor-min-count
    code, _, err = run(capsys, "synth", tmp_path / "d3", "--like", tmp_path / "d1", "--counts", *FAST)
    assert code == 2 and "--counts" in one_line(err)
