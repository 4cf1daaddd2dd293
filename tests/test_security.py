"""Nothing is ever unpickled, attributes are data, and nothing is written outside OUT."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from dstab.cli import main
from tests.conftest import random_tables, write_version

FAST = ("--scheduler", "synchronous", "--no-progress")


class Payload:
    """Unpickling this writes a marker file: the proof that something was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pickled_v2_version(path: Path, marker: Path, member: str) -> None:
    """A Zarr v2 version whose ``member`` is an object array stored with the pickle codec (a booby trap)."""
    T, W = random_tables(0, 20, 10, 3)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    for side, data in (("items", T), ("users", W)):
        group.create_array(f"{side}/vectors", shape=data.shape, chunks=data.shape, dtype=data.dtype)[...] = data
    target = path / member
    if target.exists():
        import shutil

        shutil.rmtree(target)
    target.mkdir(parents=True)
    n = 20 if member.startswith("items") else 10
    shape = [n, 3] if member.endswith("vectors") else [n]
    meta = {
        "zarr_format": 2, "shape": shape, "chunks": shape, "dtype": "|O", "compressor": None, "fill_value": None,
        "filters": [{"id": "pickle", "protocol": 5}], "order": "C",
    }  # fmt: skip
    (target / ".zarray").write_text(json.dumps(meta))
    evil = np.empty(shape, dtype=object)
    evil.flat[0] = Payload(str(marker))
    (target / ("0.0" if len(shape) == 2 else "0")).write_bytes(pickle.dumps(evil, protocol=5))


@pytest.mark.parametrize("member", ["items/ids", "users/vectors"])
@pytest.mark.parametrize("command", ["stabilize", "report", "diagnose", "export", "log"])
def test_pickled_arrays_are_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], member: str, command: str
):
    marker = tmp_path / "marker"
    pickled_v2_version(tmp_path / "v", marker, member)
    args: list[object] = [command, tmp_path / "v"]
    if command in ("stabilize", "export"):
        args += ["--out", tmp_path / "out"]
    if command != "log":
        args += list(FAST)
    code, _, err = run(capsys, *args)
    assert code == 2 and "object arrays are never read" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_attributes_are_data_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(1, 40, 30, 3)
    path = write_version(tmp_path / "v", T, W)
    group = zarr.open_group(path, mode="r+")
    # attributes that look like code or paths are just strings to dstab
    group.attrs["dstab"] = {
        "complete": True, "kind": "stabilized", "reference": str(tmp_path / "elsewhere" / "__import__('os')"),
        "input": "$(touch pwned)", "report": {"rank": "not a number", "drift_after": None}, "created": {"nested": [1, 2]},
    }  # fmt: skip
    code, out, _ = run(capsys, "log", path)
    assert code == 0 and "chain ends here" in out
    code, out, err = run(capsys, "stabilize", path, "--out", tmp_path / "out", *FAST)
    assert code == 0, err
    group.attrs["dstab"] = ["not", "a", "mapping"]
    assert run(capsys, "report", path, *FAST)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v"]  # nothing was run, nothing else written


@pytest.mark.parametrize("command", ["stabilize", "apply", "export", "import", "synth"])
def test_nothing_is_written_outside_out(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str):
    T, W = random_tables(2, 50, 40, 4)
    work = tmp_path / "work"
    work.mkdir()
    src = write_version(work / "src", T, W, item_ids=np.array([f"../../escape-{i}" for i in range(50)]))
    stable = work / "stable"
    assert run(capsys, "stabilize", src, "--out", stable, *FAST)[0] == 0
    np.save(work / "t.npy", T)
    np.save(work / "w.npy", W)
    table = zarr.open_group(str(work / "table"), mode="w")
    table.create_array("vectors", shape=W.shape, chunks=(20, 4), dtype=W.dtype)[...] = W
    before = {p for p in tmp_path.rglob("*")}
    out = work / "sub" / ".." / "result"  # resolves to work/result
    args = {
        "stabilize": ["stabilize", src, "--reference", stable, "--out", out],
        "apply": ["apply", stable, "--users", work / "table", "--out", out],
        "export": ["export", stable, "--out", out],
        "import": ["import", "--items", work / "t.npy", "--users", work / "w.npy", "--out", out],
        "synth": ["synth", out, "--items", "30", "--users", "20", "--dim", "3"],
    }[command]
    code, _, err = run(capsys, *args, *FAST)
    assert code == 0, err
    created = {p for p in tmp_path.rglob("*")} - before
    result = (work / "result").resolve()
    outside = sorted(
        str(p) for p in created if p.resolve() != result and result not in p.resolve().parents and p != work / "sub"
    )
    assert outside == [], outside
