"""Bad structures of tables, refused by the CLI: exit 2, one line naming the table(s) and the fix, nothing written.

Every case runs the real console script in a subprocess, without ``--scheduler``:
a check that came after the local cluster started would print the cluster's
line too (two lines on stderr) and take the cluster's start-up time. The cases
are independent, so they run two at a time (the machine's cores) from one
module fixture, and each test reads its own result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

import dstab

# A refusal reads metadata only; this leaves room for a loaded machine, and is far below a run's time.
SECONDS = 20.0


def write_raw(path: Path, widths: dict[str, int], seed: int = 0) -> str:
    """A raw version of named tables (rows with a non-zero mean), written with plain zarr."""
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w")
    for i, (name, width) in enumerate(widths.items()):
        rows = ((rng.normal(size=(40 + 10 * i, width)) + 0.3) @ rng.normal(size=(width, width))).astype(np.float32)
        group.create_array(f"{name}/vectors", shape=rows.shape, chunks=(16, width), dtype=rows.dtype)[...] = rows
    return str(path)


THREE = {"users": 6, "items": 6, "creators": 6}

# id: (input, reference or None, extra flags, words stderr must hold: the table(s) and the fix)
CASES: dict[str, tuple[str, str | None, list[str], list[str]]] = {
    "widths-differ-on-one-side": (
        "widths",
        None,
        ["--sides", "users:items,creators"],
        ["creators/vectors", "width 5", "same model"],
    ),
    "side-names-missing-table": (
        "three",
        None,
        ["--sides", "users:items,nosuch"],
        ["'nosuch'", "users", "items", "creators", "name tables that exist"],
    ),
    "table-on-both-sides": (
        "three",
        None,
        ["--sides", "users,items:items,creators"],
        ["'items'", "both sides", "one side", "--symmetric"],
    ),
    "table-left-out": (
        "three",
        None,
        ["--sides", "users:items"],
        ["'creators'", "leaves out", "every table must be on a side"],
    ),
    "reference-other-tables": (
        "other",
        "tworef",
        ["--sides", "users:items,sellers"],
        ["sellers", "creators", "same tables"],
    ),
    "reference-other-structure": (
        "three",
        "symref",
        ["--sides", "users:items,creators"],
        ["symmetric", "two-sided", "--symmetric"],
    ),
    "several-tables-no-structure": ("three", None, [], ["users", "items", "creators", "--sides", "--symmetric"]),
    "sides-and-symmetric": (
        "three",
        None,
        ["--sides", "users:items,creators", "--symmetric"],
        ["--sides", "--symmetric"],
    ),
    "sides-one-name": ("three", None, ["--sides", "users"], ["--sides users", "colon", "e.g. --sides"]),
    "sides-two-colons": ("three", None, ["--sides", "a:b:c"], ["--sides a:b:c", "colon", "e.g. --sides"]),
    "sides-empty-query": ("three", None, ["--sides", ":items"], ["--sides :items", "table names", "e.g."]),
    "anchor-no-such-table": (
        "three",
        "tworef",
        ["--anchor", "nosuchtable"],
        ["nosuchtable", "users", "items", "creators", "'all'"],
    ),
}


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    out_dir: Path  # the directory holding --out, empty before the run


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("models-bad")
    write_raw(root / "three", THREE)
    write_raw(root / "widths", {"users": 6, "items": 6, "creators": 5})
    write_raw(root / "other", {"users": 6, "items": 6, "sellers": 6})
    # references written by dstab from the same tables: one symmetric, one two-sided
    dstab.stabilize(dstab.open_version(root / "three"), symmetric=True).to_zarr(root / "symref")
    dstab.stabilize(dstab.open_version(root / "three"), sides="users:items,creators").to_zarr(root / "tworef")
    exe = str(Path(sys.executable).with_name("dstab"))
    env = {
        k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"
    }  # no in-process scheduler: a late check shows

    def run(case: str) -> Outcome:
        new, reference, flags, _ = CASES[case]
        out_dir = root / f"case-{case}"
        out_dir.mkdir()
        argv = [
            exe,
            "stabilize",
            str(root / new),
            "--out",
            str(out_dir / "out"),
            "--dashboard-address",
            ":0",
            "--no-progress",
        ]
        argv += ["--reference", str(root / reference)] if reference else []
        started = time.perf_counter()
        proc = subprocess.run(argv + flags, check=False, capture_output=True, text=True, env=env, timeout=120)
        return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started, out_dir)

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_naming_the_tables_and_the_fix(outcomes: dict[str, Outcome], case: str):
    o = outcomes[case]
    words = CASES[case][3]
    assert o.code == 2, (o.code, o.stdout, o.stderr)
    lines = o.stderr.splitlines()
    assert len(lines) == 1 and o.stderr.endswith("\n"), o.stderr
    assert lines[0].startswith("dstab") and "error:" in lines[0], lines[0]
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{case}: {missing} not in: {lines[0]}"
    assert o.stdout == ""
    assert list(o.out_dir.iterdir()) == [], f"{case} wrote {[p.name for p in o.out_dir.iterdir()]}"
    assert o.seconds < SECONDS, f"{case} took {o.seconds:.1f} s to refuse"
