"""dstab's knobs in dask.config (``dstab.*``): they change what the pass does on every scheduler, the
``DASK_DSTAB__*`` environment form works, and a bad value is refused in one line naming the key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest

import dstab
from dstab import config
from dstab.errors import UsageError
from dstab.stats import own_statistics, pass_statistics
from tests.conftest import random_tables, write_version

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def spread_sample(X: np.ndarray, block_rows: int, sample_rows: int) -> np.ndarray:
    """The numpy reference of the statistics' spread sample: the first ceil(S / blocks) rows of every block."""
    starts = range(0, len(X), block_rows)
    per_block = -(-sample_rows // len(starts))
    return np.concatenate([X[s : min(s + block_rows, s + per_block, len(X))] for s in starts]).astype(np.float64)


@pytest.fixture
def version(tmp_path: Path) -> tuple[dstab.Version, np.ndarray, np.ndarray]:
    T, W = random_tables(7, 1000, 300, 8, "float32")
    return dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=100)), T, W


def test_sample_rows_changes_the_sample_on_every_scheduler(version, scheduler: str) -> None:
    new, T, _ = version
    # blocks of 2 chunks (200 rows), so the sample is spread over 5 blocks
    with dask.config.set({"dstab.block-bytes": 200 * 8 * 4}):
        (default,) = dask.compute(own_statistics(new.items))
        with dask.config.set({"dstab.sample-rows": 17}):
            (changed,) = dask.compute(own_statistics(new.items))
    np.testing.assert_array_equal(default.sample, spread_sample(T, 200, 256))
    np.testing.assert_array_equal(changed.sample, spread_sample(T, 200, 17))
    assert len(changed.sample) == 5 * 4 and len(default.sample) == 5 * 52


def test_knobs_reach_the_kernels_on_every_scheduler(version, scheduler: str) -> None:
    """pair-rows, slice-bytes and join-rows are used inside the tasks: on a distributed worker (another process)
    they only take effect because the client reads them and passes them in."""
    new, T, _ = version
    with dask.config.set({"dstab.block-bytes": 200 * 8 * 4}):
        base = pass_statistics(new, (new,), ("items",))[0]["items"]
        with dask.config.set({"dstab.pair-rows": 7, "dstab.slice-bytes": 1, "dstab.join-rows": 3}):
            small = pass_statistics(new, (new,), ("items",))[0]["items"]
    assert len(base.pairs.keys) == 1000 and len(small.pairs.keys) == 7
    # the 7 pairs are the 7 rows with the smallest key hashes among all 1,000 (merged across blocks)
    np.testing.assert_array_equal(small.pairs.keys, base.pairs.keys[:7])
    np.testing.assert_array_equal(small.pairs.new, T[small.pairs.keys].astype(np.float32))
    # 256-row slices (the floor) instead of one slice per block: the same Gram, to rounding
    X = T.astype(np.float64)
    np.testing.assert_allclose(small.gram, X.T @ X, rtol=1e-10)
    np.testing.assert_allclose(base.gram, X.T @ X, rtol=1e-10)


def test_id_knobs_on_every_scheduler(tmp_path: Path, scheduler: str) -> None:
    """Matched by id: the join runs in a task, in join-rows steps, and keeps pair-rows pairs."""
    T, W = random_tables(3, 600, 200, 6, "float32")
    ids = np.arange(600, dtype=np.int64) * 3
    ref = dstab.open_version(write_version(tmp_path / "ref", T, W, item_ids=ids))
    order = np.random.default_rng(0).permutation(600)
    new = dstab.open_version(write_version(tmp_path / "new", T[order], W, item_ids=ids[order]))
    with dask.config.set({"dstab.pair-rows": 11, "dstab.join-rows": 5, "dstab.id-bucket-rows": 16}):
        stats = pass_statistics(new, (ref,), ("items",))[0]["items"]
    assert stats.matched_by == "id" and stats.n_anchor == 600 and len(stats.pairs.keys) == 11
    X = T.astype(np.float64)
    np.testing.assert_allclose(stats.cross, X.T @ X, rtol=1e-10)


def test_env_var_form_works_in_a_subprocess(tmp_path: Path) -> None:
    T, W = random_tables(1, 300, 50, 4, "float32")
    path = write_version(tmp_path / "v", T, W)
    code = (
        "import json, dask, dstab\n"
        "from dstab import config\n"
        "from dstab.stats import own_statistics\n"
        f"(s,) = dask.compute(own_statistics(dstab.open_version({path!r}).items), scheduler='synchronous')\n"
        "print(json.dumps({'rows': len(s.sample), 'lease': config.get('claim-lease'), "
        "'block': config.get('block-bytes')}))\n"
    )
    env = {
        **ENV,
        "DASK_DSTAB__SAMPLE_ROWS": "17",
        "DASK_DSTAB__CLAIM_LEASE": "2 minutes",
        "DASK_DSTAB__BLOCK_BYTES": "1MiB",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"rows": 17, "lease": 120.0, "block": 2**20}


BAD = {
    "sample-rows": [0, -3, 1.5, "many", True],
    "pair-rows": ["", "ten"],
    "block-bytes": ["banana", 0, -1],
    "id-sample-bytes": ["lots"],
    "probe-timeout": ["soon", 0, -5],
    "settle-seconds": ["never"],
}


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in BAD.items() for v in vs])
def test_a_bad_value_is_one_line_naming_key_value_and_env_var(key: str, value: object) -> None:
    with dask.config.set({f"dstab.{key}": value}), pytest.raises(UsageError) as info:
        config.get(key)  # type: ignore[call-overload]
    message = str(info.value)
    assert "\n" not in message
    for word in (f"dstab.{key}", repr(value), "DASK_DSTAB__" + key.upper().replace("-", "_")):
        assert word in message, (word, message)


def test_a_bad_env_value_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    T, W = random_tables(2, 300, 50, 4, "float32")
    path = write_version(tmp_path / "v", T, W)
    proc = subprocess.run(
        [sys.executable, "-m", "dstab.cli", "diagnose", path, "--scheduler", "synchronous", "--no-progress"],
        env={**ENV, "DASK_DSTAB__SAMPLE_ROWS": "-4"}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "dstab.sample-rows" in lines[0] and "DASK_DSTAB__SAMPLE_ROWS" in lines[0] and "-4" in lines[0], lines[0]


def test_every_knob_has_a_default_in_dask_config_and_is_documented() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    section = design[design.index("## Configuration") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    for key, default in config.DEFAULTS.items():
        assert dask.config.get(f"dstab.{key}") == default
        config.get(key)  # type: ignore[call-overload]  # every default passes its own check
        assert re.search(rf"`dstab\.{re.escape(key)}`", section), key
        assert config.env_var(key) in section, key


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DASK_DSTAB__SETTLE_SECONDS": "forever"}, "dstab.settle-seconds"),  # a knob no small run reads
        ({"DASK_DSTAB__CLAIM_LEASE": "abc"}, "dstab.claim-lease"),
        ({"DASK_DSTAB__PROBE_TIMEOUT": "abc"}, "dstab.probe-timeout"),  # was blamed on the store
        ({"DASK_DSTAB__NO_SUCH_KNOB": "3"}, "is no dstab knob"),  # a misspelt knob was ignored
    ],
)
def test_every_knob_is_checked_before_the_command_starts(tmp_path: Path, env: dict[str, str], named: str) -> None:
    """Found by a trial: knobs were checked only when read, some never on a small local run."""
    T, W = random_tables(2, 60, 50, 4, "float32")
    path = write_version(tmp_path / "v", T, W)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dstab.cli", "stabilize", path, "--out", out, "--no-progress"],
        env={**ENV, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr
    assert "local cluster" not in proc.stderr and not out.exists()
