"""Several references: the rotation onto their weighted combination, each matched by id on its own.

Checked against a plain numpy reference of the weighted Procrustes target, with
references holding different id sets (one matched by position, one by id with
churn and reordering), the optimality condition of the weighted target, scores
kept, one read of each reference, the lineage, and every bad request as one
line with exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab.errors import InputError, UsageError
from tests.conftest import random_tables, reference_stabilize, relative_score_error, run_cli, write_version


def _weighted_numpy(
    T: np.ndarray,
    W: np.ndarray,
    refs: list[tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]],
    weights: list[float],
) -> tuple[np.ndarray, np.ndarray]:
    """The balanced tables rotated onto ``sum_j w_j R_j``: each reference over its own row pairs (all in float64).

    ``refs[j] = (ref items, ref users, {side: (rows here, rows there)})``. The
    rotation maximises ``sum_j w_j tr(Q^T X[a_j]^T R_j[b_j])``: the polar factor
    of the weighted cross matrix.
    """
    X_T, X_W, _ = reference_stabilize(T, W)  # balanced, any basis: the result does not depend on it
    cross = np.zeros((X_T.shape[1], refs[0][0].shape[1]))
    for (ref_T, ref_W, pairs), w in zip(refs, weights):
        for side, X, Y in (("items", X_T, ref_T), ("users", X_W, ref_W)):
            a, b = pairs[side]
            cross += w * X[a].T @ Y[b].astype(np.float64)
    P, _, Qt = np.linalg.svd(cross)
    omega = P @ Qt
    return X_T @ omega, X_W @ omega


def _by_id(ids_here: np.ndarray, ids_there: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (here, there) of the ids both hold."""
    common, a, b = np.intersect1d(ids_here, ids_there, return_indices=True)
    return a, b


@pytest.fixture()
def chain(tmp_path: Path) -> dict[str, object]:
    """Today's raw tables, and two stabilized references: one with today's ids in order, one with churn."""
    rng = np.random.default_rng(5)
    T, W = random_tables(3, 700, 300, 8)
    item_ids, user_ids = np.arange(700, dtype=np.int64) * 3, np.arange(300, dtype=np.int64) + 10_000
    # reference A: a noisy earlier retrain, same ids, same order (matched by position)
    TA, WA = random_tables(4, 700, 300, 8)
    A_T, A_W, _ = reference_stabilize(T + 0.3 * TA, W + 0.3 * WA)
    # reference B: another retrain, 20% of its ids different, rows shuffled (matched by id)
    TB, WB = random_tables(6, 700, 300, 8)
    B_T, B_W, _ = reference_stabilize(T + 0.5 * TB, W + 0.5 * WB)
    b_item_ids, b_user_ids = item_ids.copy(), user_ids.copy()
    b_item_ids[rng.choice(700, 140, replace=False)] += 1  # ids 3k+1: not among today's
    b_user_ids[rng.choice(300, 60, replace=False)] += 5_000
    pi, pu = rng.permutation(700), rng.permutation(300)
    B_T, B_W, b_item_ids, b_user_ids = B_T[pi], B_W[pu], b_item_ids[pi], b_user_ids[pu]
    new = write_version(tmp_path / "new", T, W, item_ids=item_ids, user_ids=user_ids)
    ref_a = write_version(
        tmp_path / "a", A_T.astype(np.float32), A_W.astype(np.float32), item_ids=item_ids, user_ids=user_ids
    )
    ref_b = write_version(
        tmp_path / "b", B_T.astype(np.float32), B_W.astype(np.float32), item_ids=b_item_ids, user_ids=b_user_ids
    )
    refs = [
        (A_T.astype(np.float32), A_W.astype(np.float32), {"items": _by_id(item_ids, item_ids), "users": _by_id(user_ids, user_ids)}),
        (B_T.astype(np.float32), B_W.astype(np.float32), {"items": _by_id(item_ids, b_item_ids), "users": _by_id(user_ids, b_user_ids)}),
    ]  # fmt: skip
    return {"T": T, "W": W, "new": new, "a": ref_a, "b": ref_b, "refs": refs, "tmp": tmp_path}


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.8, 0.2], [0.1, 0.9]])
def test_several_references_match_numpy_weighted_target(chain: dict, weights: list[float]):
    T, W = chain["T"], chain["W"]
    result = dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=weights)
    T_out, W_out = result.items.compute(), result.users.compute()
    exp_T, exp_W = _weighted_numpy(T, W, chain["refs"], weights)
    # float32 rows through a float64 transform: agreement to float32 rounding of the scale
    tol = 1e-4 * np.abs(exp_T).max()
    np.testing.assert_allclose(T_out, exp_T, rtol=0, atol=tol)
    np.testing.assert_allclose(W_out, exp_W, rtol=0, atol=1e-4 * np.abs(exp_W).max())
    assert relative_score_error(T, W, T_out, W_out) < 1e-5
    matching = [r["matching"] for r in result.report["references"]]
    assert matching[0]["items"]["by"] == "position" and matching[1]["items"]["by"] == "id"
    assert matching[1]["items"]["common"] == 560 and matching[1]["users"]["common"] == 240


def test_weighted_target_is_optimal(chain: dict):
    """Procrustes optimality: the weighted cross matrix of the output against the references is symmetric PSD."""
    weights = [0.3, 0.7]
    result = dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=weights)
    Y = {"items": result.items.compute().astype(np.float64), "users": result.users.compute().astype(np.float64)}
    M = np.zeros((8, 8))
    for (ref_T, ref_W, pairs), w in zip(chain["refs"], weights):
        for side, R in (("items", ref_T), ("users", ref_W)):
            a, b = pairs[side]
            M += w * Y[side][a].T @ R[b].astype(np.float64)
    np.testing.assert_allclose(M, M.T, atol=1e-4 * np.abs(M).max())
    assert np.linalg.eigvalsh((M + M.T) / 2).min() > -1e-4 * np.abs(M).max()


def test_one_reference_weighted_one_is_the_single_reference_result(chain: dict):
    one = dstab.stabilize(chain["new"], chain["b"])
    listed = dstab.stabilize(chain["new"], [chain["b"]], reference_weights=[1.0])
    for name in ("items", "users"):
        np.testing.assert_array_equal(one.transforms[name], listed.transforms[name])


def test_weights_pull_towards_their_reference(chain: dict):
    """More weight on a reference brings the output closer to it (drift after, from the report, per reference)."""
    drifts = []
    for w in (0.1, 0.5, 0.9):
        r = dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=[w, 1 - w]).report
        drifts.append([ref["drift_after"] for ref in r["references"]])
    to_a = [d[0] for d in drifts]
    to_b = [d[1] for d in drifts]
    assert to_a[0] > to_a[1] > to_a[2] and to_b[0] < to_b[1] < to_b[2]


def test_each_reference_read_once(chain: dict):
    """The pass has one task per block of each reference, whatever the number of references."""
    from dstab.stats import side_statistics
    from dstab.store import RowBlock

    new, a, b = (dstab.open_version(chain[k]) for k in ("new", "a", "b"))
    graph = dict(
        side_statistics(
            new.items,
            references=(a.items, b.items),
            matches=("position", "id"),
            plan=dstab.stats.IdPlan(n_buckets=1, sample=True),
        ).__dask_graph__()
    )
    args = [arg for task in graph.values() for arg in getattr(task, "args", ())]
    args += [inner for arg in args if isinstance(arg, tuple) for inner in arg]
    for version in (new, a, b):
        where = str(version.items.vectors.store_path)
        spans = sorted((x.start, x.stop) for x in args if isinstance(x, RowBlock) and str(x.array.store_path) == where)
        assert spans and spans[0][0] == 0 and spans[-1][1] == version.items.n_rows
        assert all(p[1] == q[0] for p, q in zip(spans, spans[1:])), "every row read exactly once"


def test_lineage_records_references_and_weights(chain: dict):
    out = chain["tmp"] / "out"
    dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=[0.25, 0.75]).to_zarr(out)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)["dstab"]
    assert [r["weight"] for r in attrs["references"]] == [0.25, 0.75]
    assert [Path(r["url"]).name for r in attrs["references"]] == ["a", "b"]
    assert attrs["params"]["reference_weights"] == [0.25, 0.75]
    (entry, *_) = dstab.lineage.chain(dstab.open_version(out))
    assert "0.25 x" in dstab.lineage.origin_words(entry) and "0.75 x" in dstab.lineage.origin_words(entry)


@pytest.mark.parametrize(
    "weights, words",
    [
        ([0.5, 0.6], "sum to 1.1; they must sum to 1"),
        ([1.5, -0.5], "weight 2 is -0.5; every weight must be above 0"),
        ([1.0, 0.0], "weight 2 is 0"),
        ([1.0], "1 weight for 2 references"),
        ([float("nan"), 0.5], "weight 1 is nan; every weight must be a finite number"),
        ([float("inf"), 0.5], "weight 1 is inf; every weight must be a finite number"),
        ([0.333, 0.6671], "sum to 1.0001; they must sum to 1 (e.g. 0.333,0.667)"),
    ],
)
def test_bad_weights_refused(chain: dict, weights: list[float], words: str):
    with pytest.raises(UsageError, match=re.escape(words)):
        dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=weights)


def test_reference_listed_twice_refused(chain: dict):
    same = str(Path(chain["a"]).parent / "." / "a")
    with pytest.raises(UsageError, match="reference 2 .* is reference 1 again"):
        dstab.stabilize(chain["new"], [chain["a"], same])


def test_reference_with_other_tables_refused(chain: dict, tmp_path: Path):
    T, W = random_tables(9, 700, 300, 8)
    other = zarr.open_group(str(tmp_path / "other"), mode="w")
    other.create_array("items/vectors", data=T)
    other.create_array("creators/vectors", data=W)
    with pytest.raises(InputError, match="has the tables"):
        dstab.stabilize(chain["new"], [chain["a"], str(tmp_path / "other")])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--reference-weights", "0.7,0.7"], "sum to 1.4"),
        (["--reference-weights", "1.2,-0.2"], "weight 2 is -0.2"),
        (["--reference-weights", "0.5,0.5,0"], "3 weights for 2 references"),
        (["--reference-weights", "half,half"], "comma-separated numbers"),
        (["--reference-weights", "-0.5,1.5"], "weight 1 is -0.5; every weight must be above 0"),
        (["--reference", "{a}"], "is reference 1 again"),
        (["--reference", "{other}"], "has the tables"),
    ],
)
def test_cli_bad_references_one_line_exit_2_nothing_written(chain: dict, tmp_path: Path, extra, words):
    T, W = random_tables(9, 50, 30, 8)
    other = zarr.open_group(str(tmp_path / "other"), mode="w")
    other.create_array("items/vectors", data=T)
    other.create_array("creators/vectors", data=W)
    extra = [e.format(a=chain["a"], other=tmp_path / "other") for e in extra]
    out = tmp_path / "out"
    args = ["stabilize", chain["new"], "--reference", chain["a"], "--reference", chain["b"], *extra, "--out", str(out)]
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert "local cluster" not in done.stderr  # refused before any cluster starts
    assert not out.exists()


@pytest.mark.slow
def test_cli_two_references_json(chain: dict, tmp_path: Path):
    out = tmp_path / "out"
    done = run_cli(
        "--json", "stabilize", chain["new"], "--reference", chain["a"], "--reference", chain["b"],
        "--reference-weights", "0.6,0.4", "--out", str(out), "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [r["weight"] for r in data["references"]] == [0.6, 0.4]
    assert data["references"][1]["matching"]["items"]["by"] == "id"
    assert data["score_error"] < 1e-5


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_refs=st.integers(2, 3),
    raw_weights=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
    keep=st.floats(0.5, 1.0),
)
def test_property_weighted_target_optimal_and_scores_kept(seed, n_refs, raw_weights, keep):
    """Random references (each a noisy rotated copy, its own random subset of ids, reordered) and weights: the
    output keeps every score and is the Procrustes optimum of the weighted target (symmetric PSD cross matrix)."""
    rng = np.random.default_rng(seed)
    n_items, n_users, e = 120, 80, 5
    T, W = random_tables(int(rng.integers(1 << 30)), n_items, n_users, e, "float64")
    weights = np.array(raw_weights[:n_refs]) / np.sum(raw_weights[:n_refs])
    X_T, X_W, _ = reference_stabilize(T, W)
    refs, ref_ids = [], []
    for _ in range(n_refs):
        q, _ = np.linalg.qr(rng.normal(size=(e, e)))
        ids = {
            side: rng.permutation(n)[: max(e, int(keep * n))] for side, n in (("items", n_items), ("users", n_users))
        }
        R_T = (X_T @ q + 0.2 * rng.normal(size=X_T.shape))[ids["items"]]
        R_W = (X_W @ q + 0.2 * rng.normal(size=X_W.shape))[ids["users"]]
        refs.append({"items": R_T, "users": R_W})
        ref_ids.append(ids)
    new = {"items": T, "users": W}
    # in-memory references with their ids: each a version of its own
    versions = [
        dstab.store.coerce.as_version(r, ids={s: ids[s].astype(np.int64) for s in r}, label=f"reference {j + 1}")
        for j, (r, ids) in enumerate(zip(refs, ref_ids))
    ]
    result = dstab.stabilize(
        new, versions, reference_weights=list(weights), ids={"items": np.arange(n_items), "users": np.arange(n_users)}
    )
    Y = {"items": result.transform("items", T), "users": result.transform("users", W)}
    assert relative_score_error(T, W, Y["items"], Y["users"]) < 1e-10  # float64 throughout
    M = np.zeros((e, e))
    for r, ids, w in zip(refs, ref_ids, weights):
        for side in ("items", "users"):
            M += w * Y[side][ids[side]].T @ r[side]
    scale = np.abs(M).max()
    np.testing.assert_allclose(M, M.T, atol=1e-8 * scale)
    assert np.linalg.eigvalsh((M + M.T) / 2).min() > -1e-8 * scale


def test_estimator_takes_a_list_of_references_and_weights(chain: dict):
    est = dstab.Stabilizer(reference_weights=[0.8, 0.2]).fit(chain["new"], [chain["a"], chain["b"]])
    direct = dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=[0.8, 0.2])
    for name in ("items", "users"):
        np.testing.assert_array_equal(est.transforms_[name], direct.transforms[name])
    assert [r["weight"] for r in est.report_["references"]] == [0.8, 0.2]


def test_suggested_weights_sum_to_one(chain: dict, tmp_path: Path):
    third = dstab.stabilize(chain["new"]).to_zarr(tmp_path / "c")
    with pytest.raises(UsageError, match=r"sum to 0\.999; they must sum to 1 \(e\.g\. 0\.3333,0\.3333,0\.3334\)"):
        dstab.stabilize(chain["new"], [chain["a"], chain["b"], third], reference_weights=[0.333, 0.333, 0.333])


def test_same_icechunk_version_through_main_refused(chain: dict, tmp_path: Path):
    repo = tmp_path / "chain.icechunk"
    dstab.stabilize(chain["a"]).to_zarr(f"{repo}/day1")
    with pytest.raises(UsageError, match="is reference 1 again"):
        dstab.stabilize(chain["new"], [f"{repo}/day1", f"{tmp_path}/chain.icechunk@main/day1"])


def test_report_text_names_every_reference(chain: dict, tmp_path: Path):
    out = dstab.stabilize(chain["new"], [chain["a"], chain["b"]], reference_weights=[0.6, 0.4]).to_zarr(tmp_path / "o")
    text = dstab.report.format_report(dstab.report.describe(out))
    assert "drift onto reference 1" in text and "weight 0.6" in text and "drift onto reference 2" in text
    assert "0.6 x" in text and "0.4 x" in text  # the lineage line
