"""Catalogues whose ids change between versions: the rotation is fitted on the ids both hold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab import ids as idm
from dstab.cli import main
from tests.conftest import (
    random_basis,
    random_tables,
    read_tables,
    reference_stabilize,
    relative_score_error,
    write_version,
)

FAST = ("--scheduler", "synchronous", "--no-progress")


def churn(
    rng: np.random.Generator,
    T: np.ndarray,
    ids: np.ndarray,
    basis: np.ndarray,
    *,
    drop: float = 0.1,
    add: float = 0.1,
    new_ids: np.ndarray | None = None,
    noise: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """A retrained table: ``drop`` of the rows gone, ``add`` new rows, order shuffled, basis changed."""
    n = len(T)
    keep = np.sort(rng.choice(n, size=n - int(drop * n), replace=False))
    fresh = rng.normal(size=(int(add * n), T.shape[1])) * T.std(axis=0) + T.mean(axis=0)
    rows = np.vstack([T[keep] + noise * rng.normal(size=(len(keep), T.shape[1])) * T.std(axis=0), fresh])
    if new_ids is None:
        new_ids = np.arange(ids.max() + 1, ids.max() + 1 + len(fresh)).astype(ids.dtype)
    out_ids = np.concatenate([ids[keep], new_ids[: len(fresh)]])
    order = rng.permutation(len(rows))
    return (rows @ basis)[order].astype(T.dtype), out_ids[order]


def common_pairs(new_ids: np.ndarray, ref_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (new, reference) of the ids both hold, by a plain dict."""
    where = {v: i for i, v in enumerate(ref_ids.tolist())}
    a = [i for i, v in enumerate(new_ids.tolist()) if v in where]
    return np.array(a, dtype=int), np.array([where[new_ids[i]] for i in a], dtype=int)


def assert_matches(out: dstab.Version, expected: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    T_out, W_out = read_tables(out.url)  # type: ignore[arg-type]
    for got, want in ((T_out, expected[0]), (W_out, expected[1])):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def day_pair(tmp_path: Path, seed: int, *, string_ids: bool = False, chunk_rows: int = 128):
    """A stabilized day 1 and a churned, shuffled retrain of it on both sides."""
    rng = np.random.default_rng(seed)
    T1, W1 = random_tables(seed, 900, 600, 8, "float32")
    item_ids, user_ids = np.arange(900, dtype=np.int64) * 7, np.arange(600, dtype=np.int64) * 3
    if string_ids:
        item_ids, user_ids = np.array([f"item-{i}" for i in item_ids]), np.array([f"u{i}" for i in user_ids])
    day1 = write_version(tmp_path / "day1", T1, W1, item_ids=item_ids, user_ids=user_ids, chunk_rows=chunk_rows)
    ref = dstab.stabilize(dstab.open_version(day1)).to_zarr(tmp_path / "day1-stable")
    basis = random_basis(rng, 8, 10.0)
    fresh_items = np.array([f"item-new-{i}" for i in range(90)]) if string_ids else None
    fresh_users = np.array([f"u-new-{i}" for i in range(60)]) if string_ids else None
    T2, ids2 = churn(rng, T1, item_ids, basis, new_ids=fresh_items)
    W2, uids2 = churn(rng, W1, user_ids, np.linalg.inv(basis).T, new_ids=fresh_users)
    day2 = write_version(tmp_path / "day2", T2, W2, item_ids=ids2, user_ids=uids2, chunk_rows=chunk_rows)
    return dstab.open_version(day2), ref, (T2, W2, ids2, uids2)


@pytest.mark.parametrize("string_ids", [False, True], ids=["int64", "string"])
def test_churn_matches_numpy_fitted_on_the_intersection(tmp_path: Path, string_ids: bool, scheduler: str):
    new, ref, (T2, W2, ids2, uids2) = day_pair(tmp_path, 1, string_ids=string_ids)
    result = dstab.stabilize(new, ref)
    out = result.to_zarr(tmp_path / "day2-stable")
    ref_T, ref_W = read_tables(ref.url)  # type: ignore[arg-type]
    ref_ids = zarr.open_group(ref.url)["items/ids"][...]
    ref_uids = zarr.open_group(ref.url)["users/ids"][...]
    pairs = {"items": common_pairs(ids2, ref_ids), "users": common_pairs(uids2, ref_uids)}
    assert len(pairs["items"][0]) == 810 and len(pairs["users"][0]) == 540
    assert_matches(out, reference_stabilize(T2, W2, (ref_T, ref_W), pairs=pairs))
    # every row kept, in the new version's order, with its id
    np.testing.assert_array_equal(zarr.open_group(out.url)["items/ids"][...], ids2)
    np.testing.assert_array_equal(zarr.open_group(out.url)["users/ids"][...], uids2)
    assert relative_score_error(T2, W2, *read_tables(out.url)) < 1e-5  # type: ignore[arg-type]
    m = result.report["matching"]["items"]
    assert (m["by"], m["common"], m["added"], m["removed"], m["sample_fraction"]) == ("id", 810, 90, 90, 1.0)
    assert result.report["drift_after"] < 0.2 * result.report["drift_before"]


def test_shuffled_rows_only(tmp_path: Path):
    T, W = random_tables(4, 700, 500, 8)
    ids, uids = np.arange(700, dtype=np.int64), np.arange(500, dtype=np.int64)
    ref = dstab.stabilize(dstab.open_version(write_version(tmp_path / "a", T, W, item_ids=ids, user_ids=uids)))
    ref = ref.to_zarr(tmp_path / "a-stable")
    rng = np.random.default_rng(4)
    p, q = rng.permutation(700), rng.permutation(500)
    basis = random_basis(rng, 8, 5.0)
    new = write_version(
        tmp_path / "b", (T @ basis)[p], (W @ np.linalg.inv(basis).T)[q], item_ids=ids[p], user_ids=uids[q]
    )
    result = dstab.stabilize(dstab.open_version(new), ref)
    out = result.to_zarr(tmp_path / "b-stable")
    ref_T, ref_W = read_tables(ref.url)  # type: ignore[arg-type]
    T_out, W_out = read_tables(out.url)  # type: ignore[arg-type]
    # a pure reordering and basis change: every row lands back on its reference row
    np.testing.assert_allclose(T_out, ref_T[p], atol=1e-4 * np.abs(ref_T).max())
    np.testing.assert_allclose(W_out, ref_W[q], atol=1e-4 * np.abs(ref_W).max())
    assert result.report["matching"]["items"]["by"] == "id" and result.report["drift_after"] < 1e-4


def test_identical_ids_use_the_positional_path(tmp_path: Path):
    T, W = random_tables(5, 300, 200, 6)
    ids = np.arange(300, dtype=np.int64)
    a = write_version(tmp_path / "a", T, W, item_ids=ids)
    b = write_version(tmp_path / "b", T * 2, W / 2, item_ids=ids.astype(np.int32))  # another int width: same ids
    result = dstab.stabilize(dstab.open_version(b), dstab.open_version(a))
    assert result.report["matching"]["items"]["by"] == "position"
    assert result.report["matching"]["users"]["by"] == "position"


def test_sampled_join_is_close_to_the_exact_one_and_deterministic(tmp_path: Path):
    new, ref, _ = day_pair(tmp_path, 2)
    exact = dstab.stabilize(new, ref)
    row_bytes = new.dim * 4
    sampled = dstab.stabilize(new, ref, id_sample_bytes=300 * row_bytes)  # a third of the rows
    again = dstab.stabilize(new, ref, id_sample_bytes=300 * row_bytes)
    m = sampled.report["matching"]["items"]
    assert 0.3 < m["sample_fraction"] < 0.4 and 200 < m["anchor_rows"] < 350
    np.testing.assert_array_equal(sampled.transforms["items"], again.transforms["items"])
    # scores are exact whatever the sample; the rotation is nearly the exact one
    np.testing.assert_allclose(
        sampled.transforms["items"] @ sampled.transforms["users"].T,
        exact.transforms["items"] @ exact.transforms["users"].T,
        atol=1e-9,
    )
    drift_exact = dstab.report.measure_drift(exact.to_zarr(tmp_path / "e"), ref, k=0)["total"]
    drift_sampled = dstab.report.measure_drift(sampled.to_zarr(tmp_path / "s"), ref, k=0)["total"]
    assert drift_exact <= drift_sampled < 1.05 * drift_exact


def test_min_count_and_weights_match_numpy(tmp_path: Path):
    rng = np.random.default_rng(8)
    T, W = random_tables(8, 500, 400, 6)
    ids, uids = np.arange(500, dtype=np.int64), np.arange(400, dtype=np.int64)
    ref = dstab.stabilize(dstab.open_version(write_version(tmp_path / "a", T, W, item_ids=ids, user_ids=uids)))
    ref = ref.to_zarr(tmp_path / "a-stable")
    basis = random_basis(rng, 6, 5.0)
    T2, ids2 = churn(rng, T, ids, basis, noise=0.2)
    W2, uids2 = churn(rng, W, uids, np.linalg.inv(basis).T, noise=0.2)
    counts = rng.integers(0, 50, size=len(T2)).astype(np.int64)
    ucounts = rng.integers(0, 50, size=len(W2)).astype(np.int64)
    new = dstab.open_version(
        write_version(tmp_path / "b", T2, W2, item_ids=ids2, user_ids=uids2, item_counts=counts, user_counts=ucounts)
    )
    ref_T, ref_W = read_tables(ref.url)  # type: ignore[arg-type]
    pairs = {"items": common_pairs(ids2, ids), "users": common_pairs(uids2, uids)}
    for min_count, weighting in ((20, "uniform"), (0, "counts"), (10, "counts")):
        result = dstab.stabilize(new, ref, anchor_min_count=min_count, anchor_weights=weighting)
        w = {}
        for side, c in (("items", counts), ("users", ucounts)):
            ci = c[pairs[side][0]].astype(float)
            w[side] = np.where(ci >= min_count, ci if weighting == "counts" else 1.0, 0.0)
        expected = reference_stabilize(T2, W2, (ref_T, ref_W), pairs=pairs, weights=w)
        got_T = result.transform("items", T2)
        np.testing.assert_allclose(got_T, expected[0], atol=2e-4 * np.abs(expected[0]).max())
        assert result.report["matching"]["items"]["anchor_rows"] == int(np.count_nonzero(w["items"]))
    # the output keeps the counts for tomorrow
    out = dstab.stabilize(new, ref, anchor_min_count=20).to_zarr(tmp_path / "b-stable")
    np.testing.assert_array_equal(zarr.open_group(out.url)["items/counts"][...], counts)


# ----------------------------------------------------------------------------- hashing


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=30, unique=True))
def test_string_hash_ignores_the_storage_width(values: list[str]):
    narrow = np.array(values)
    wide = np.array(values, dtype="<U40")
    np.testing.assert_array_equal(idm.hash_ids(narrow), idm.hash_ids(wide))
    np.testing.assert_array_equal(idm.hash_ids(narrow), idm.hash_ids(np.array(values, dtype=np.dtypes.StringDType())))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50, unique=True))
def test_integer_hash_is_width_free_and_spreads(values: list[int]):
    a = np.array(values, dtype=np.int64)
    h = idm.hash_ids(a)
    assert len(np.unique(h)) == len(a)
    small = a[(a >= -(2**31)) & (a < 2**31)]
    np.testing.assert_array_equal(idm.hash_ids(small.astype(np.int32)), idm.hash_ids(small))


def test_buckets_and_summary_find_repeats_and_common_ids():
    a = idm.hash_ids(np.array([1, 2, 3, 4, 5, 3], dtype=np.int64))
    b = idm.hash_ids(np.array([4, 5, 6, 7], dtype=np.int64))
    parts_a, parts_b = idm.buckets_of(a, 4), idm.buckets_of(b, 4)
    assert sum(len(p) for p in parts_a) == 6
    summaries = [idm.bucket_summary([parts_a[k]], [parts_b[k]]) for k in range(4)]
    total = summaries[0]
    for s in summaries[1:]:
        total = idm.merge_summaries(total, s)
    assert total.repeat_new == int(idm.hash_ids(np.array([3]))[0]) and total.repeat_ref is None
    unique = idm.bucket_summary([np.sort(idm.hash_ids(np.array([1, 2, 4, 5])))], [np.sort(b)])
    assert unique.n_common == 2


# ----------------------------------------------------------------------------- bad input, through the CLI


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_churn_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(9, 400, 300, 8)
    ids, uids = np.arange(400, dtype=np.int64) + 1000, np.arange(300, dtype=np.int64)
    ref = write_version(tmp_path / "ref", T, W, item_ids=ids, user_ids=uids)
    out = tmp_path / "out"

    def stabilize(new: str, *extra: str) -> tuple[int, str]:
        code, _, err = run_cli(capsys, "stabilize", new, "--reference", ref, "--out", out, *extra, *FAST)
        assert not out.exists() and err.count("\n") == 1
        return code, err

    dup = ids[::-1].copy()
    dup[7] = dup[300]
    code, err = stabilize(write_version(tmp_path / "dup", T, W, item_ids=dup, user_ids=uids))
    assert code == 2 and f"items/ids of the new version has the id {dup[7]} at rows 7 and 300" in err
    strings = np.array([f"i{i}" for i in ids])
    code, err = stabilize(write_version(tmp_path / "str", T, W, item_ids=strings, user_ids=uids))
    assert code == 2 and "items/ids of the new version are strings" in err and "are integers (int64)" in err
    code, err = stabilize(write_version(tmp_path / "none", T, W, item_ids=ids + 10_000, user_ids=uids))
    assert code == 2 and "none of the new version's 400 ids appears among the reference's 400 ids" in err
    code, err = stabilize(
        write_version(tmp_path / "few", T, W, item_ids=ids, user_ids=uids),
        "--anchor",
        "items",
        "--anchor-min-count",
        "5",
    )
    assert code == 2 and "items/counts is missing" in err
    counts = np.zeros(400, dtype=np.int64)
    counts[:5] = 9
    few = write_version(tmp_path / "few2", T[::-1], W, item_ids=ids[::-1], user_ids=uids, item_counts=counts)
    code, err = stabilize(few, "--anchor", "items", "--anchor-min-count", "5")
    assert code == 2 and "only 5 anchor rows (items 5 with count >= 5" in err and "rotation of width 8" in err
    counts[3] = -1
    bad = write_version(tmp_path / "bad", T, W, item_ids=ids, user_ids=uids, item_counts=counts)
    code, err = stabilize(bad, "--anchor", "items", "--anchor-min-count", "1")
    assert code == 2 and "items/counts row 3 (id 1003) is -1; counts must be finite and >= 0" in err


def test_duplicate_in_the_reference_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(10, 300, 200, 6)
    ids = np.arange(300, dtype=np.int64)
    dup = ids.copy()
    dup[250] = 17
    ref = write_version(tmp_path / "ref", T, W, item_ids=dup)
    new = write_version(tmp_path / "new", T, W, item_ids=ids[::-1].copy())
    code, _, err = run_cli(capsys, "stabilize", new, "--reference", ref, "--out", tmp_path / "o", *FAST)
    assert code == 2 and "items/ids of the reference has the id 17 at rows 17 and 250" in err


def test_duplicates_are_refused_without_a_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(11, 300, 200, 6)
    uids = np.array([f"user-{i % 150}" for i in range(200)])
    new = write_version(tmp_path / "new", T, W, user_ids=uids)
    code, _, err = run_cli(capsys, "stabilize", new, "--out", tmp_path / "o", *FAST)
    found = re.search(r"users/ids of the new version has the id 'user-(\d+)' at rows (\d+) and (\d+);", err)
    assert code == 2 and found, err
    which, first, second = (int(g) for g in found.groups())
    assert first == which and second == which + 150  # one real duplicate, named with both its rows


def test_synth_churn_replaces_and_reorders_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert (
        run_cli(
            capsys,
            "synth",
            tmp_path / "a",
            "--items",
            "3000",
            "--users",
            "1000",
            "--dim",
            "6",
            "--chunk-rows",
            "256",
            *FAST,
        )[0]
        == 0
    )
    code, _, err = run_cli(
        capsys, "synth", tmp_path / "b", "--like", tmp_path / "a", "--churn", "0.2", "--seed", "3", *FAST
    )
    assert code == 0, err
    a, b = zarr.open_group(str(tmp_path / "a")), zarr.open_group(str(tmp_path / "b"))
    for side, n in (("items", 3000), ("users", 1000)):
        old, new = a[f"{side}/ids"][...], b[f"{side}/ids"][...]
        assert len(np.unique(new)) == n  # still unique
        kept = np.isin(new, old).mean()
        assert 0.75 < kept < 0.85 and not np.array_equal(new[np.isin(new, old)], old[np.isin(old, new)])
    code, out, _ = run_cli(capsys, "stabilize", tmp_path / "a", "--out", tmp_path / "a-stable", *FAST)
    code, out, err = run_cli(
        capsys, "stabilize", tmp_path / "b", "--reference", tmp_path / "a-stable", "--out", tmp_path / "b-stable", *FAST
    )
    assert code == 0, err
    assert re.search(r"items: matched by id: 2,\d{3} common, \d{3} added, \d{3} removed", out)
    code, _, err = run_cli(
        capsys, "synth", tmp_path / "c", "--items", "10", "--users", "10", "--dim", "2", "--churn", "0.1", *FAST
    )
    assert code == 2 and "--churn apply to --like retrains only" in err
