"""Saved transforms (`dstab apply`), lineage (`dstab log`) and drift accumulated over a chain (`report --base`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import dstab
from dstab.cli import main
from tests.conftest import random_basis, random_tables, read_tables, write_version
from tests.test_churn import churn, common_pairs

FAST = ("--scheduler", "synchronous", "--no-progress")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_table(path: Path, vectors: np.ndarray, ids: np.ndarray | None = None, chunk_rows: int = 64) -> str:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("vectors", shape=vectors.shape, chunks=(chunk_rows, vectors.shape[1]), dtype=vectors.dtype)[
        ...
    ] = vectors
    if ids is not None:
        with warnings.catch_warnings():  # fixed-width strings have no Zarr v3 spec yet; written as users do
            warnings.simplefilter("ignore")
            ida = group.create_array("ids", shape=ids.shape, chunks=(chunk_rows,), dtype=ids.dtype)
        ida[...] = ids
    return str(path)


def test_apply_maps_extra_rows_so_they_score_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheduler: str
):
    rng = np.random.default_rng(3)
    T, W = random_tables(3, 500, 400, 8)
    ref = dstab.stabilize(dstab.open_version(write_version(tmp_path / "day1", T, W))).to_zarr(tmp_path / "day1-stable")
    basis = random_basis(rng, 8, 10.0)
    raw = write_version(tmp_path / "day2", T @ basis, W @ np.linalg.inv(basis).T)
    result = dstab.stabilize(dstab.open_version(raw), ref)
    stable = result.to_zarr(tmp_path / "day2-stable")
    # users embedded online by the day-2 model, after the retrain
    extra = (rng.normal(size=(300, 8)) @ np.linalg.inv(basis).T).astype(np.float32)
    extra_ids = np.array([f"online-{i}" for i in range(300)])
    table = write_table(tmp_path / "extra", extra, extra_ids)
    code, out, err = run_cli(capsys, "apply", stable.url, "--users", table, "--out", tmp_path / "extra-stable", *FAST)
    assert code == 0, err
    mapped = zarr.open_group(str(tmp_path / "extra-stable"))
    np.testing.assert_array_equal(mapped["ids"][...], extra_ids)
    got = mapped["vectors"][...]
    assert got.dtype == np.float32 and got.shape == (300, result.dim_out)
    T2_raw = (T @ basis).astype(np.float64)
    T2_stable = read_tables(stable.url)[0].astype(np.float64)  # type: ignore[arg-type]
    raw_scores = extra.astype(np.float64) @ T2_raw.T
    np.testing.assert_allclose(got.astype(np.float64) @ T2_stable.T, raw_scores, atol=1e-5 * np.abs(raw_scores).max())
    # the same from numpy, through the written version and the result object
    np.testing.assert_allclose(stable.transform("users", extra), got, atol=1e-6 * np.abs(got).max())
    np.testing.assert_allclose(result.transform("users", extra), got, atol=1e-6 * np.abs(got).max())
    # the raw users of the version itself land on its stabilized users
    code, _, _ = run_cli(
        capsys,
        "apply",
        stable.url,
        "--users",
        write_table(tmp_path / "own", (W @ np.linalg.inv(basis).T).astype(np.float32)),
        "--out",
        tmp_path / "own-stable",
        *FAST,
    )
    assert code == 0
    np.testing.assert_allclose(
        zarr.open_group(str(tmp_path / "own-stable"))["vectors"][...],
        read_tables(stable.url)[1],
        atol=1e-5,  # type: ignore[arg-type]
    )


def test_apply_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(4, 300, 200, 6)
    raw = write_version(tmp_path / "raw", T, W)
    stable = dstab.stabilize(dstab.open_version(raw)).to_zarr(tmp_path / "stable")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "apply", raw, "--items", write_table(tmp_path / "t", T[:10]), "--out", out, *FAST)
    assert code == 2 and "has no transform/items: only versions written by `dstab stabilize`" in err
    code, _, err = run_cli(
        capsys, "apply", stable.url, "--items", write_table(tmp_path / "w", T[:10, :5]), "--out", out, *FAST
    )
    assert code == 2 and "has width 5 but" in err and "maps items rows of width 6" in err
    bad = T[:100].copy()
    bad[77, 2] = np.nan
    code, _, err = run_cli(
        capsys, "apply", stable.url, "--items", write_table(tmp_path / "nan", bad, chunk_rows=32), "--out", out, *FAST
    )
    assert code == 2 and "vectors row 77 is not finite" in err
    code, _, err = run_cli(capsys, "apply", stable.url, "--items", tmp_path / "t", "--out", tmp_path / "t", *FAST)
    assert code == 2 and "never writes over its inputs" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan", "raw", "stable", "t", "w"]


def test_chain_of_five_versions_log_and_accumulated_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rng = np.random.default_rng(5)
    T, W = random_tables(5, 800, 500, 8)
    ids, uids = np.arange(800, dtype=np.int64), np.arange(500, dtype=np.int64) + 10_000
    days = []
    for day in range(1, 6):
        if day > 1:
            basis = random_basis(rng, 8, 10.0)
            T, ids = churn(rng, T, ids, basis, noise=0.02)
            W, uids = churn(rng, W, uids, np.linalg.inv(basis).T, noise=0.02)
        raw = write_version(tmp_path / f"day{day}", T, W, item_ids=ids, user_ids=uids)
        args = ["stabilize", raw, "--out", tmp_path / f"day{day}-stable", *FAST]
        if day > 1:
            args += ["--reference", tmp_path / f"day{day - 1}-stable"]
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        days.append(str(tmp_path / f"day{day}-stable"))

    code, out, _ = run_cli(capsys, "log", days[-1], "--json")
    entries = json.loads(out)["chain"]
    assert code == 0 and [e["url"] for e in entries] == days[::-1]
    assert [e["input"] for e in entries] == [str(tmp_path / f"day{d}") for d in range(5, 0, -1)]
    assert entries[-1]["reference"] is None and all(e["reference"] == u for e, u in zip(entries, days[-2::-1]))
    code, text, _ = run_cli(capsys, "log", days[-1])
    assert code == 0 and "  1. " in text and "  5. " in text and "first of the chain" in text

    code, out, _ = run_cli(capsys, "report", days[-1], "--base", days[0], "--json", *FAST)
    report = json.loads(out)
    # the accumulated drift against a plain numpy computation over the ids both hold
    first, last = zarr.open_group(days[0]), zarr.open_group(days[-1])
    num = den = 0.0
    for side in ("items", "users"):
        a, b = common_pairs(last[f"{side}/ids"][...], first[f"{side}/ids"][...])
        X, Y = last[f"{side}/vectors"][...].astype(np.float64)[a], first[f"{side}/vectors"][...].astype(np.float64)[b]
        num, den = num + ((X - Y) ** 2).sum(), den + (Y**2).sum()
    assert report["drift_vs_base"]["total"] == pytest.approx(np.sqrt(num / den), rel=1e-6)
    steps = report["chain_to_base"]["steps"]
    assert report["chain_to_base"]["base_in_chain"] and len(steps) == 4
    assert [s["url"] for s in steps] == days[:0:-1]
    code, text, _ = run_cli(capsys, "report", days[-1], "--base", days[0], *FAST)
    assert code == 0 and "accumulated drift since" in text and "over 4 steps" in text
    # a missing link ends the chain with a reason
    import shutil

    shutil.rmtree(days[1])
    code, text, _ = run_cli(capsys, "log", days[-1])
    assert code == 0 and f"chain ends here: reference {days[1]} cannot be opened" in text
