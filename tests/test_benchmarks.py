"""Smoke runs of the benchmark scripts (CI runs only these --quick sizes) and the performance invariants
that a unit test can check without timing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from threadpoolctl import threadpool_info

import dstab
from dstab.executor import compute

from conftest import random_tables, write_version

ROOT = Path(__file__).resolve().parent.parent


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_blas_is_pinned_to_one_thread_inside_local_tasks(scheduler: str):
    with dask.config.set(scheduler=scheduler):
        (threads,) = compute(dask.delayed(_blas_threads)())
    assert threads and all(n == 1 for n in threads)
    assert dstab.executor.active_client() is None


def test_blas_is_pinned_to_one_thread_in_distributed_workers(local_cluster):
    from distributed import Client

    with Client(local_cluster) as client:
        (threads,) = compute(dask.delayed(_blas_threads)())
        assert dstab.executor.active_client() is client
    assert threads and all(n == 1 for n in threads)


def test_each_task_holds_one_block_of_each_input(tmp_path: Path):
    """No task reads more than its own rows of the new table and of the reference."""
    from dstab.stats import side_statistics
    from dstab.store import RowBlock

    T, W = random_tables(3, 5000, 100, 8, "float32")
    new = dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=100))
    graph = dict(side_statistics(new.items, references=(new.items,), matches=("position",)).__dask_graph__())
    block_bytes = new.items.block_rows() * new.items.dim * new.items.dtype.itemsize
    for task in graph.values():
        sources = [a for a in getattr(task, "args", ()) if isinstance(a, RowBlock)]
        assert len(sources) <= 2
        assert all((s.stop - s.start) * 8 * 4 <= block_bytes for s in sources)


@pytest.mark.slow
def test_compare_quick_smoke(tmp_path: Path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = ("io-floor", "dstab", "io-floor-in-memory", "dstab-in-memory", "numpy", "naive-dask", "naive-dask-cluster")
    for name in names:
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), proc.stdout
    assert "spark" in proc.stdout  # run, or skipped with the reason
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert results["dstab"]["median_s"] > 0 and len(results["io-floor"]["times_s"]) == 1
    for name in names:  # each repeat's ratio to the same repeat's floor
        r = results[name]
        assert r["x_floor_per_repeat"] == [t / f for t, f in zip(r["times_s"], results["io-floor"]["times_s"])]


def test_small_jobs_smoke(tmp_path: Path):
    """Every command end to end on a small version; the figures themselves are the benchmark's, not a test's."""
    out = tmp_path / "small.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "small_jobs.py"), "--runs", "1", "--items", "600", "--users", "400",
         "--dim", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert set(figures["medians_s"]) >= {"stabilize --reference", "report --chain", "nightly", "import", "export"}
    assert all(len(t) == 1 and t[0] > 0 for t in figures["times_s"].values())
    assert ("PASS" if figures["pass"] else "FAIL") in proc.stdout


@pytest.mark.slow
def test_scaling_quick_smoke(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert [p["rows"] for p in result["rows_sweep"]] == [30_000, 90_000]
    assert [p["workers"] for p in result["workers_sweep"]] == [1, 2]
    assert all(p["peak_rss_bytes"] > 0 and p["spilled_bytes"] >= 0 for p in result["rows_sweep"])
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "scaling.png")
    assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0
    assert "speed-up from 1 to 2 workers" in proc.stdout


@pytest.mark.slow
def test_churn_smoke(tmp_path: Path):
    out = tmp_path / "churn.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "churn.py"), "--items", "30000", "--users", "5000", "--repeat", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ratio by-id / positional: fit" in proc.stdout
    result = json.loads(out.read_text())
    assert result["matching"]["by"] == "id" and result["matching"]["common"] + result["matching"]["added"] == 30_000
    assert result["drift_sampled"] == pytest.approx(result["drift_exact"])  # 30k rows: the sample is every common id


@pytest.mark.slow
def test_neighbours_smoke(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "neighbours.py"), "--items", "20000", "--users", "4000", "--repeat", "1",
         "--queries", "200", "--json", str(tmp_path / "n.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "neighbour overlap@10 costs" in proc.stdout
    result = json.loads((tmp_path / "n.json").read_text())["result"]
    assert 0.0 <= result["items"]["neighbour_overlap"] <= 1.0 and result["items"]["queries"] == 200


@pytest.mark.slow
def test_nightly_memory_smoke(tmp_path: Path):
    """Two nightly runs on tiny days: each version checked; the memory bound is claimed at full size only."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nightly_memory.py"), "--runs", "2", "--items", "20000", "--users",
         "5000", "--dim", "8", "--workers", "1", "--max-ratio", "2", "--json", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads((tmp_path / "m.json").read_text())
    assert [r["run"] for r in result["series"]] == [1, 2] and result["bootstrap"]["run"] == 0
    assert all(r["score_error"] < 1e-5 and r["peak_tree_rss_mib"] > 0 for r in result["series"])


@pytest.mark.slow
def test_models_smoke(tmp_path: Path):
    """One table against two, each against its floor: both cases run, are real stabilizations, and are compared."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--rows", "30000", "--dim", "8", "--repeat", "1",
         "--workers", "1", "--dir", str(tmp_path / "data"), "--json", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "one-table ratio / two-table ratio:" in proc.stdout
    result = json.loads((tmp_path / "m.json").read_text())
    two, one = result["cases"]["two-table"], result["cases"]["one-table"]
    assert two["tables"] == {"items": 20_000, "users": 10_000} and one["tables"] == {"emb": 30_000}
    for case in (two, one):
        assert len(case["ratios"]) == 1 and case["ratios"][0] == pytest.approx(case["dstab_s"][0] / case["floor_s"][0])
        assert case["score_error"] < 1e-5  # float32 outputs keep every score to a few eps32
    assert result["one_over_two"] == pytest.approx(one["median_ratio"] / two["median_ratio"])
    assert not (tmp_path / "data" / "out").exists()  # each timed output is removed after its run


@pytest.mark.slow
def test_chain_smoke(tmp_path: Path):
    """The long-chain benchmark on synthetic retrains: three nightly policies measured by report --chain, each the
    exact in-memory reference's figures; JSON and PNG written. The real retrains need the bench extra + recbole."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chain.py"), "--quick", "--dir", str(tmp_path / "data"),
         "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "PASS" in proc.stdout
    result = json.loads((tmp_path / "c.json").read_text())
    for policy in ("previous", "base", "mix"):
        ours, exact = result["dstab"][policy], result["exact"][policy]
        assert len(ours["curves"]["cos_base"]) == 5 and len(ours["curves"]["cos_prev"]) == 5
        # report --chain's cosines over every common row against numpy's (float32 outputs: to 1e-5)
        np.testing.assert_allclose(ours["curves"]["cos_base"], exact["cos_base"], atol=1e-5)
        np.testing.assert_allclose(ours["curves"]["cos_prev"], exact["cos_prev"], atol=1e-5)
        np.testing.assert_allclose(ours["curves"]["drift_base"], exact["drift_base"], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the days really were stabilized under each policy: the mix days record both references
    mix_day = zarr.open_group(str(tmp_path / "data" / "stable-mix" / "2026-11-05"), mode="r")
    assert [r["weight"] for r in mix_day.attrs["dstab"]["references"]] == [0.5, 0.5]
