"""Dimension collapse (diagnose, the two-field model) and drift measures, against plain numpy."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import matplotlib.image
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab import spectrum
from dstab.cli import main
from dstab.report import measure_drift
from pipelines import collapse_model as collapse
from tests.conftest import random_basis, random_tables, read_tables, write_version
from tests.test_churn import churn

FAST = ("--scheduler", "synchronous", "--no-progress")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def numpy_metrics(sv: np.ndarray, dim: int, rtol: float) -> dict:
    """The measures written out directly from their definitions."""
    p = sv / sv.sum()
    p = p[p > 0]
    return {
        "numerical_rank": int((sv > rtol * sv.max()).sum()),
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "stable_rank": float(np.sum(sv**2) / sv.max() ** 2),
        "information_abundance": float(sv.sum() / sv.max()),
        "collapsed": bool(np.exp(-np.sum(p * np.log(p))) < 0.25 * dim),
    }


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=40))
def test_spectrum_metrics_match_their_definitions(values: list[float]):
    sv = np.array(sorted(values, reverse=True))
    got = spectrum.spectrum_metrics(sv, len(sv), 1e-4)
    want = numpy_metrics(sv, len(sv), 1e-4)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert 1.0 <= got["effective_rank"] <= len(sv) + 1e-9 and got["stable_rank"] <= got["information_abundance"] + 1e-9


def test_diagnose_version_and_table_against_numpy(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rng = np.random.default_rng(0)
    T, _ = random_tables(1, 600, 400, 16)
    W = (rng.normal(size=(400, 2)) @ rng.normal(size=(2, 16))).astype(np.float32)  # collapsed to rank 2
    path = write_version(tmp_path / "v", T, W, chunk_rows=64)
    code, out, err = run_cli(capsys, "diagnose", path, "--json", "--rtol", "1e-5", *FAST)
    assert code == 0, err
    got = json.loads(out)
    # the two-table layout keeps its keys; the structure and every table (under "tables") come with them
    assert set(got) == {"items", "users", "interaction", "structure", "tables"}
    assert got["structure"] == {"kind": "two-sided", "query": ["users"], "candidate": ["items"]}
    assert got["tables"] == {"items": got["items"], "users": got["users"]}
    for name, X in (("items", T), ("users", W), ("interaction", W.astype(np.float64) @ T.astype(np.float64).T)):
        sv = np.linalg.svd(X.astype(np.float64), compute_uv=False)[:16]
        np.testing.assert_allclose(got[name]["singular_values"], sv, rtol=1e-6, atol=1e-6 * sv[0])  # noise floor aside
        want = numpy_metrics(np.clip(sv, 0, None), 16, 1e-5)
        for key in ("numerical_rank", "collapsed"):
            assert got[name][key] == want[key], (name, key)
        assert got[name]["effective_rank"] == pytest.approx(want["effective_rank"], rel=1e-3)
        assert set(got[name]) >= {
            "singular_values",
            "numerical_rank",
            "effective_rank",
            "stable_rank",
            "information_abundance",
            "dim",
            "collapsed",
        }
    assert got["users"]["numerical_rank"] == 2 and got["users"]["collapsed"] and not got["items"]["collapsed"]
    code, text, _ = run_cli(capsys, "diagnose", path, "--plot", tmp_path / "d.png", *FAST)
    assert code == 0 and "COLLAPSED" in text and "collapsed = effective rank below 25% of the width" in text
    image = matplotlib.image.imread(tmp_path / "d.png")
    assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0
    # a single table
    group = zarr.open_group(str(tmp_path / "t"), mode="w")
    group.create_array("vectors", shape=W.shape, chunks=(100, 16), dtype=W.dtype)[...] = W
    code, out, _ = run_cli(capsys, "diagnose", tmp_path / "t", "--json", *FAST)
    assert code == 0 and json.loads(out)["table"]["numerical_rank"] == 2
    code, _, err = run_cli(capsys, "diagnose", tmp_path / "nothing", *FAST)
    assert code == 2 and "no version or table at" in err


@pytest.mark.parametrize("batch", [None, 64], ids=["full-batch", "sgd"])
def test_two_field_theorem(batch: int | None):
    """With lambda > 0, field A's rank falls to at most n_B once converged; with lambda = 0 it stays full."""
    data = collapse.make_dataset(120, 3, seed=1)
    steps = 1500 if batch is None else 3000
    lr = 10.0 if batch is None else 5.0
    ranks = {}
    for lam in (1e-2, 0.0):
        model = collapse.train(data, d=8, lam=lam, steps=steps, lr=lr, batch=batch, seed=2)
        sv = np.linalg.svd(model.v_a, compute_uv=False)
        ranks[lam] = int((sv > 1e-6 * sv[0]).sum())
        # the stationarity condition of the note: lambda V_A = -G V_B (checked where it holds)
        if lam > 0 and batch is None:
            g = (1 / (1 + np.exp(-(model.v_a @ model.v_b.T))) - data.labels) * data.counts / data.counts.sum()
            np.testing.assert_allclose(lam * model.v_a, -g @ model.v_b, atol=1e-6)
    assert ranks[1e-2] <= 3 and ranks[0.0] == 8


def test_two_field_model_versions_stabilize(tmp_path: Path):
    data = collapse.make_dataset(200, 2, seed=3)
    a = collapse.train(data, d=8, lam=1e-2, steps=800, seed=1).write_version(tmp_path / "a")
    b = collapse.train(data, d=8, lam=1e-2, steps=800, seed=2).write_version(tmp_path / "b")
    assert a.users.n_rows == 200 and a.items.n_rows == 2
    first = dstab.stabilize(a).to_zarr(tmp_path / "a-stable")
    result = dstab.stabilize(b, first)
    assert result.rank == 2 and result.report["drift_after"] < 1e-3 < result.report["drift_before"]


def test_collapse_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from pipelines import collapse_demo

    assert (
        collapse_demo.main(
            ["--n-a", "300", "--steps", "1500", "--dir", str(tmp_path), "--plot", str(tmp_path / "s.png")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "collapsed: lambda = 0.001;" in out
    assert "lambda = 0.001: rank of V_A 2; lambda = 0: rank of V_A 16" in out
    assert out.count("stabilized the seed-2 retrain onto seed 1: width 16 -> 2 (rank 2)") == 2
    assert matplotlib.image.imread(tmp_path / "s.png").shape[0] > 100


# ----------------------------------------------------------------------------- drift measures


def churned_pair(tmp_path: Path, seed: int = 7):
    rng = np.random.default_rng(seed)
    T, W = random_tables(seed, 1500, 900, 8)
    ids, uids = np.arange(1500, dtype=np.int64), np.arange(900, dtype=np.int64) + 5000
    a = write_version(tmp_path / "a", T, W, item_ids=ids, user_ids=uids, chunk_rows=100)
    basis = random_basis(rng, 8, 3.0)
    T2, ids2 = churn(rng, T, ids, basis, noise=0.05)
    W2, uids2 = churn(rng, W, uids, np.linalg.inv(basis).T, noise=0.05)
    b = write_version(tmp_path / "b", T2, W2, item_ids=ids2, user_ids=uids2, chunk_rows=100)
    return dstab.open_version(b), dstab.open_version(a), (T, W, ids, uids), (T2, W2, ids2, uids2)


def numpy_overlap(
    X: np.ndarray, keys: np.ndarray, Y: np.ndarray, ref_keys: np.ndarray, queries: np.ndarray, k: int
) -> float:
    """Neighbour overlap@k in memory: cosine top-k of each query in both tables (itself excluded), compared by key."""

    def topk(M: np.ndarray, mkeys: np.ndarray, q: np.ndarray) -> set:
        U = M.astype(np.float64) / np.linalg.norm(M.astype(np.float64), axis=1, keepdims=True)
        row = int(np.flatnonzero(mkeys == q)[0])
        sims = U @ U[row]
        order = [i for i in np.argsort(-sims, kind="stable") if mkeys[i] != q][:k]
        return set(mkeys[order].tolist())

    return float(np.mean([len(topk(X, keys, q) & topk(Y, ref_keys, q)) / k for q in queries]))


def test_drift_measures_against_numpy(tmp_path: Path, scheduler: str):
    new, ref, (T, W, ids, uids), (T2, W2, ids2, uids2) = churned_pair(tmp_path)
    # many blocks and slices, so that the out-of-core merges do the work (on every scheduler: read on the client)
    with dask.config.set({"dstab.block-bytes": 3200, "dstab.neighbour-slice-rows": 37}):
        assert len(new.items.row_chunks()) == 15
        d = measure_drift(new, ref, k=10, queries=60)
    where = {v: i for i, v in enumerate(ids.tolist())}
    common = np.array([i for i, v in enumerate(ids2.tolist()) if v in where])
    X, Y = T2[common].astype(np.float64), T[[where[v] for v in ids2[common]]].astype(np.float64)
    assert d["items"]["frobenius"] == pytest.approx(np.linalg.norm(X - Y) / np.linalg.norm(Y), rel=1e-6)
    # the pairs are a hash sample of common ids: recompute their cosines and neighbours from the keys
    pairs = dstab.stats.pass_statistics(new, (ref,), ("items", "users"))[0]["items"].pairs
    assert len(pairs.keys) == min(1024, len(common)) and set(pairs.keys.tolist()) <= set(ids2[common].tolist())
    rows_new = np.array([int(np.flatnonzero(ids2 == k)[0]) for k in pairs.keys])
    rows_ref = np.array([where[k] for k in pairs.keys.tolist()])
    x, y = T2[rows_new].astype(np.float64), T[rows_ref].astype(np.float64)
    cos = np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert d["items"]["mean_cosine"] == pytest.approx(cos.mean(), rel=1e-6)
    expected = numpy_overlap(T2, ids2, T, ids, pairs.keys[:60], 10)
    assert d["items"]["neighbour_overlap"] == pytest.approx(expected, abs=1e-12) and d["items"]["queries"] == 60
    # score error over the sampled users x items
    up = dstab.stats.pass_statistics(new, (ref,), ("items", "users"))[0]["users"].pairs
    s_new = up.new.astype(np.float64) @ pairs.new.astype(np.float64).T
    s_ref = up.ref.astype(np.float64) @ pairs.ref.astype(np.float64).T
    assert d["score_error"] == pytest.approx(np.linalg.norm(s_new - s_ref) / np.linalg.norm(s_ref), rel=1e-9)


def test_stabilize_report_drift_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(9, 800, 500, 6)
    ref = dstab.stabilize(dstab.open_version(write_version(tmp_path / "a", T, W))).to_zarr(tmp_path / "a-stable")
    rng = np.random.default_rng(9)
    basis = random_basis(rng, 6, 5.0)
    T2 = (T + 0.05 * rng.normal(size=T.shape) * T.std(0)) @ basis
    new = write_version(tmp_path / "b", T2.astype(np.float32), (W @ np.linalg.inv(basis).T).astype(np.float32))
    code, out, err = run_cli(
        capsys, "stabilize", new, "--reference", ref.url, "--out", tmp_path / "b-stable", "--neighbours", "5", *FAST
    )
    assert code == 0, err
    assert "items: drift" in out and "mean row cosine" in out and "neighbour overlap@5" in out
    report = dstab.open_version(tmp_path / "b-stable").attrs["report"]
    X, Y = read_tables(str(tmp_path / "b-stable"))[0].astype(np.float64), read_tables(ref.url)[0].astype(np.float64)  # type: ignore[arg-type]
    # per-dimension drift from the statistics equals the one measured on the written tables (items + users summed)
    Xu, Yu = read_tables(str(tmp_path / "b-stable"))[1].astype(np.float64), read_tables(ref.url)[1].astype(np.float64)  # type: ignore[arg-type]
    both = np.sqrt(
        (np.linalg.norm(X - Y, axis=0) ** 2 + np.linalg.norm(Xu - Yu, axis=0) ** 2)
        / (np.linalg.norm(Y, axis=0) ** 2 + np.linalg.norm(Yu, axis=0) ** 2)
    )
    np.testing.assert_allclose(report["drift_per_dim"]["after"], both, rtol=1e-3)
    d = report["drift"]["items"]
    assert d["cosine_before"] < 0.9 < d["cosine_after"] and d["neighbour_overlap_after"] > d["neighbour_overlap_before"]
    code, text, _ = run_cli(
        capsys, "report", tmp_path / "b-stable", "--reference", ref.url, "--plot", tmp_path / "r.png", *FAST
    )
    assert code == 0 and "neighbour overlap@10" in text
    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.ndim == 3 and image.shape[1] > 1000 and np.ptp(image) > 0


def test_plot_into_a_missing_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(12, 50, 40, 4)
    path = write_version(tmp_path / "v", T, W)
    for command in ("diagnose", "report"):
        code, _, err = run_cli(capsys, command, path, "--plot", tmp_path / "missing" / "p.png", *FAST)
        assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
