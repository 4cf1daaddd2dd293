"""Arrays in, a scikit-learn-style estimator, lazy transforms: every input kind against the same data on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab.errors import DstabError, InputError, UsageError, VersionNotFoundError
from dstab.estimator import LEARNED, NotFittedError

from conftest import random_basis, random_tables, reference_stabilize, write_version

EPS32 = float(np.finfo(np.float32).eps)
CLOSE = 1e-6  # the brief's bar between input kinds (relative to the largest entry)


def retrain(T: np.ndarray, W: np.ndarray, seed: int, noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """The same scores in another basis, plus a little noise: what a retrain looks like."""
    rng = np.random.default_rng(seed)
    G = random_basis(rng, T.shape[1], 10.0)
    T2 = T.astype(np.float64) @ G + noise * rng.normal(size=T.shape)
    W2 = W.astype(np.float64) @ np.linalg.inv(G).T + noise * rng.normal(size=W.shape)
    return T2.astype(np.float32), W2.astype(np.float32)


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Day 1 stabilized (the reference) and day 2 raw, as numpy and as versions on disk (plain zarr)."""
    root = tmp_path_factory.mktemp("days")
    T1, W1 = random_tables(0, 700, 500, 12)
    first = dstab.stabilize({"items": T1, "users": W1})
    I_prev, U_prev = first.items.compute(), first.users.compute()
    I_today, U_today = retrain(T1, W1, seed=1)
    return {
        "I_prev": I_prev, "U_prev": U_prev, "I_today": I_today, "U_today": U_today,
        "day1": write_version(root / "day1-stable", I_prev, U_prev, chunk_rows=100),
        "day2": write_version(root / "day2", I_today, U_today, chunk_rows=100),
    }  # fmt: skip


def as_kind(kind: str, tables: dict[str, np.ndarray], path: str) -> Any:
    """The tables of the version at ``path`` (whose arrays are ``tables``) in the input kind under test."""
    group = zarr.open_group(path, mode="r")
    if kind == "numpy":
        return dict(tables)
    if kind == "dask":
        return {name: da.from_array(x, chunks=(90, -1)) for name, x in tables.items()}
    if kind == "zarr":
        return {name: group[f"{name}/vectors"] for name in tables}
    if kind == "array-path":
        return {name: f"{path}/{name}/vectors" for name in tables}
    if kind == "group-path":
        return {name: f"{path}/{name}" for name in tables}
    assert kind == "version-path"
    return path


KINDS = ["numpy", "dask", "zarr", "array-path", "group-path", "version-path"]


def computed(x: Any) -> np.ndarray:
    return x.compute() if isinstance(x, da.Array) else x


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = CLOSE) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b).max())


def assert_scores_kept(I_raw: np.ndarray, U_raw: np.ndarray, I_out: np.ndarray, U_out: np.ndarray) -> None:
    """Every user-item dot product kept to float32 accuracy.

    Each stabilized row is a float32 product over e terms, so it carries a rounding error of about
    sqrt(e) eps32 times its own length; a score, the dot product of two such rows, then moves by about
    2 sqrt(e) eps32 |u_out| |t_out|. The bound is twice that (measured: at most 0.42 of it over five seeds).
    """
    S = U_raw.astype(np.float64) @ I_raw.astype(np.float64).T
    S_out = U_out.astype(np.float64) @ I_out.astype(np.float64).T
    norms = np.linalg.norm(U_out, axis=1)[:, None] * np.linalg.norm(I_out, axis=1)[None, :]
    bound = 4 * np.sqrt(U_raw.shape[1]) * EPS32 * norms
    worst = float(np.max(np.abs(S_out - S) / bound))
    assert worst <= 1.0, f"a score moved {worst:.2f} times the float32 bound"


# ----------------------------------------------------------------------------- every kind, every scheduler


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_gives_what_the_version_on_disk_gives(days: dict[str, Any], kind: str, scheduler: str) -> None:
    on_disk = dstab.stabilize(dstab.open_version(days["day2"]), dstab.open_version(days["day1"]))
    want = {name: on_disk.stabilized(name).compute() for name in ("items", "users")}
    today = {"items": days["I_today"], "users": days["U_today"]}
    prev = {"items": days["I_prev"], "users": days["U_prev"]}

    est = dstab.Stabilizer()
    got = est.fit_transform(as_kind(kind, today, days["day2"]), reference=as_kind(kind, prev, days["day1"]))

    assert est.rank_ == on_disk.rank == 12 and est.structure_ == on_disk.structure
    np.testing.assert_allclose(est.singular_values_, on_disk.singular_values, rtol=1e-9)
    for name in ("items", "users"):
        assert_close(est.transforms_[name], on_disk.transforms[name])
        # numpy in, numpy out; anything else lazy
        assert isinstance(got[name], np.ndarray if kind == "numpy" else da.Array), type(got[name])
        assert_close(computed(got[name]), want[name])
        # transform of the same rows (any kind) gives the same table
        again = est.transform(as_kind(kind, today, days["day2"]) if kind != "version-path" else today)[name]
        assert_close(computed(again), want[name])
    assert_scores_kept(days["I_today"], days["U_today"], computed(got["items"]), computed(got["users"]))
    # and it is the alignment the Householder reference finds
    RT, RW, _ = reference_stabilize(days["I_today"], days["U_today"], ref=(days["I_prev"], days["U_prev"]))
    assert_close(computed(got["items"]), RT, 1e-4)
    assert_close(computed(got["users"]), RW, 1e-4)
    assert est.report_["drift_after"] < 0.1 * est.report_["drift_before"]
    # a stored raw reference earns a note; in-memory tables carry no record of what made them, so none
    assert any("never stabilized" in note for note in est.report_["notes"]) == (kind == "version-path")


def test_stabilize_takes_the_same_inputs(days: dict[str, Any]) -> None:
    on_disk = dstab.stabilize(days["day2"], days["day1"])  # paths, as the version
    for kind in ("numpy", "dask", "zarr", "group-path"):
        today = as_kind(kind, {"items": days["I_today"], "users": days["U_today"]}, days["day2"])
        prev = as_kind(kind, {"items": days["I_prev"], "users": days["U_prev"]}, days["day1"])
        result = dstab.stabilize(today, prev)
        for name in ("items", "users"):
            assert_close(result.transforms[name], on_disk.transforms[name])


# ----------------------------------------------------------------------------- laziness


def exploding(shape: tuple[int, int], chunks: int = 50) -> da.Array:
    """A Dask array that raises if anything computes it."""

    def boom(rows: int) -> np.ndarray:
        raise RuntimeError("the input was computed")

    starts = range(0, shape[0], chunks)
    parts = [
        da.from_delayed(
            dask.delayed(boom)(min(chunks, shape[0] - s)), shape=(min(chunks, shape[0] - s), shape[1]), dtype=np.float32
        )
        for s in starts
    ]
    return da.concatenate(parts)


def test_dask_in_lazy_out_nothing_computed(days: dict[str, Any]) -> None:
    est = dstab.Stabilizer().fit({"items": days["I_today"], "users": days["U_today"]})
    bad = exploding((300, 12))
    for out in (
        est.transform({"users": bad})["users"],
        est.transform(bad, table="users"),
        est.stabilization_.transform("users", bad),
    ):
        assert isinstance(out, da.Array)
        assert out.shape == (300, est.transforms_["users"].shape[1]) and out.dtype == np.float32
        assert out.chunks[0] == bad.chunks[0]  # the caller's row chunks kept
        with pytest.raises(RuntimeError, match="the input was computed"):
            out.compute()
    # a good lazy input computes to the numpy answer
    lazy = est.transform({"users": da.from_array(days["U_today"], chunks=(64, 6))})["users"]
    assert_close(lazy.compute(), est.transform({"users": days["U_today"]})["users"])


def test_zarr_in_is_read_when_computed_not_before(tmp_path: Path, days: dict[str, Any]) -> None:
    est = dstab.Stabilizer().fit({"items": days["I_today"], "users": days["U_today"]})
    arr = zarr.open_array(str(tmp_path / "rows"), mode="w", shape=(200, 12), chunks=(64, 12), dtype="float32")
    arr[...] = days["U_today"][:200]
    with dask.config.set({"dstab.block-bytes": 2 * 64 * 12 * 4}):  # blocks of two storage chunks
        out = est.transform(arr, table="users")
    assert isinstance(out, da.Array) and out.chunks[0] == (128, 72)
    arr[...] = days["U_today"][200:400]  # changed after transform, before compute: the new rows come out
    assert_close(out.compute(), est.transform(days["U_today"][200:400], table="users"))


def test_fit_transform_of_dask_builds_on_the_callers_array(days: dict[str, Any]) -> None:
    users = da.from_array(days["U_today"], chunks=(128, -1))
    got = dstab.Stabilizer().fit_transform({"items": days["I_today"], "users": users})
    assert isinstance(got["users"], da.Array) and isinstance(got["items"], np.ndarray)
    assert users.name in got["users"].dask.layers  # the output's graph reads the caller's array, nothing materialised
    assert got["users"].chunks[0] == users.chunks[0]


# ----------------------------------------------------------------------------- the estimator's contract


def test_fit_returns_self_and_learned_attributes_end_in_underscore(days: dict[str, Any]) -> None:
    est = dstab.Stabilizer(rank=8)
    for name in LEARNED:
        assert not hasattr(est, name)
    with pytest.raises(NotFittedError, match=r"fit\(") as info:
        est.transform({"users": days["U_today"]})
    assert isinstance(info.value, (ValueError)) and isinstance(info.value, AttributeError)
    assert isinstance(info.value, DstabError) and "\n" not in str(info.value)
    with pytest.raises(NotFittedError, match="transforms_"):
        est.transforms_  # noqa: B018
    with pytest.raises(NotFittedError, match=r"call fit\(new, reference\) before to_zarr"):
        est.to_zarr("never-written")
    before = dict(vars(est))

    assert est.fit({"items": days["I_today"], "users": days["U_today"]}) is est
    learned = {k for k in vars(est) if k.endswith("_") and not k.startswith("_")}
    assert learned == set(LEARNED)
    assert {k: v for k, v in vars(est).items() if k in before} == before  # fit changed no parameter
    assert est.rank_ == 8 and est.transforms_["users"].shape == (12, 8) and est.n_features_in_ == 12
    assert isinstance(est.stabilization_, dstab.Stabilization) and est.report_ is est.stabilization_.report
    assert len(est.singular_values_) == 12


def test_get_params_set_params_round_trip() -> None:
    est = dstab.Stabilizer(rank=5, sides="users:items", anchor="items", anchor_min_count=3.0, method="gram")
    params = est.get_params()
    assert params == {
        "rank": 5, "rtol": None, "sides": "users:items", "symmetric": False, "anchor": "items",
        "anchor_min_count": 3.0, "anchor_weights": "uniform", "method": "gram", "reference_weights": None,
        "in_memory": "auto",
    }  # fmt: skip
    twin = dstab.Stabilizer(**params)
    assert twin.get_params() == params and twin is not est
    assert twin.set_params(rank="auto", rtol=1e-4) is twin
    assert twin.get_params() == {**params, "rank": "auto", "rtol": 1e-4}
    assert repr(dstab.Stabilizer(rank=5)) == "Stabilizer(rank=5)" and repr(dstab.Stabilizer()) == "Stabilizer()"
    with pytest.raises(UsageError, match="no parameter 'rnak'.*rank, rtol"):
        twin.set_params(rnak=3)
    # nothing is checked in __init__ (scikit-learn's rule); fit checks, naming the option
    odd = dstab.Stabilizer(method="fastest")
    with pytest.raises(UsageError, match="method must be one of"):
        odd.fit({"words": np.ones((5, 3), np.float32)})


def test_to_zarr_writes_what_fit_transform_gives(tmp_path: Path, days: dict[str, Any]) -> None:
    est = dstab.Stabilizer()
    got = est.fit_transform(
        {"items": days["I_today"], "users": days["U_today"]},
        reference={"items": days["I_prev"], "users": days["U_prev"]},
    )
    written = est.to_zarr(tmp_path / "out")
    for name in ("items", "users"):
        assert_close(written.table(name).vectors[...], got[name])
        np.testing.assert_allclose(written.transforms[name], est.transforms_[name])
    assert written.attrs["report"]["score_error"] < 1e-5


# ----------------------------------------------------------------------------- structures and ids


def test_symmetric_one_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    words = ((rng.normal(size=(800, 10)) + 0.2) @ random_basis(rng, 10, 5.0)).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "words"), mode="w")
    group.create_array("words/vectors", shape=words.shape, chunks=(128, 10), dtype="float32")[...] = words
    on_disk = dstab.stabilize(str(tmp_path / "words"))

    est = dstab.Stabilizer().fit({"words": words})
    assert est.structure_.kind == "symmetric" and est.structure_ == on_disk.structure
    assert_close(est.transforms_["words"], on_disk.transforms["words"])
    out = est.transform(words)  # one table: no table= needed
    assert isinstance(out, np.ndarray)
    assert_close(out, on_disk.stabilized("words").compute())
    # every dot product of every row with every other kept: the map is orthogonal
    G, G_out = words.astype(np.float64) @ words.T.astype(np.float64), out.astype(np.float64) @ out.T.astype(np.float64)
    norms = np.linalg.norm(words, axis=1)  # an orthogonal map keeps every row's length
    bound = 4 * np.sqrt(10) * EPS32 * np.outer(norms, norms)
    assert np.max(np.abs(G_out - G) / bound) <= 1.0
    np.testing.assert_allclose(est.transforms_["words"].T @ est.transforms_["words"], np.eye(10), atol=1e-12)


def test_two_sided_with_sides(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tables = {name: ((rng.normal(size=(n, 8)) + 0.3) @ random_basis(rng, 8, 4.0)).astype(np.float32)
              for name, n in (("users", 300), ("items", 400), ("creators", 60))}  # fmt: skip
    group = zarr.open_group(str(tmp_path / "tower"), mode="w")
    for name, x in tables.items():
        group.create_array(f"{name}/vectors", shape=x.shape, chunks=(64, 8), dtype="float32")[...] = x
    on_disk = dstab.stabilize(str(tmp_path / "tower"), sides="users:items,creators")

    with pytest.raises(UsageError, match="--sides"):  # several tables and no structure: say which
        dstab.Stabilizer().fit(tables)
    est = dstab.Stabilizer(sides="users:items,creators").fit(
        {k: da.from_array(v, chunks=(100, -1)) for k, v in tables.items()}
    )
    assert est.structure_ == on_disk.structure
    np.testing.assert_array_equal(est.transforms_["items"], est.transforms_["creators"])  # one transform per side
    out = {
        k: v.compute()
        for k, v in est.transform({k: da.from_array(v, chunks=(100, -1)) for k, v in tables.items()}).items()
    }
    for name in tables:
        assert_close(est.transforms_[name], on_disk.transforms[name])
        assert_close(out[name], on_disk.stabilized(name).compute())
    for candidate in ("items", "creators"):
        assert_scores_kept(tables[candidate], tables["users"], out[candidate], out["users"])


def test_ids_in_memory_match_the_ids_on_disk(tmp_path: Path, days: dict[str, Any]) -> None:
    """Rows reordered and churned, matched by ids given as keywords: the same fit as the version with ids."""
    rng = np.random.default_rng(6)
    n_items, n_users = len(days["I_today"]), len(days["U_today"])
    prev_ids = {"items": np.arange(n_items, dtype=np.int64), "users": np.arange(n_users, dtype=np.int64) + 10_000}
    order = {"items": rng.permutation(n_items), "users": rng.permutation(n_users)}
    today = {"items": days["I_today"][order["items"]], "users": days["U_today"][order["users"]]}
    ids = {name: prev_ids[name][order[name]] for name in today}
    ids["items"][:50] += 1_000_000  # churn: 50 new items
    write_version(tmp_path / "day2", today["items"], today["users"], item_ids=ids["items"], user_ids=ids["users"])
    write_version(
        tmp_path / "day1", days["I_prev"], days["U_prev"], item_ids=prev_ids["items"], user_ids=prev_ids["users"]
    )
    on_disk = dstab.stabilize(str(tmp_path / "day2"), str(tmp_path / "day1"))
    assert on_disk.report["matching"]["items"]["by"] == "id"

    est = dstab.Stabilizer().fit(
        today, {"items": days["I_prev"], "users": days["U_prev"]}, ids=ids, reference_ids=prev_ids
    )
    assert est.report_["matching"] == on_disk.report["matching"]
    for name in today:
        assert_close(est.transforms_[name], on_disk.transforms[name])
    # a table group brings its own ids; giving them again as well is refused
    groups = {name: str(tmp_path / "day2" / name) for name in today}
    with pytest.raises(
        UsageError, match="ids given for the new table 'items', whose table group already has items/ids"
    ):
        dstab.Stabilizer().fit(groups, str(tmp_path / "day1"), ids=ids)


# ----------------------------------------------------------------------------- bad input: one line naming it


def one_line(error: type[Exception], *needles: str) -> Callable[[Callable[[], Any]], None]:
    def check(call: Callable[[], Any]) -> None:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert isinstance(info.value, DstabError) and "\n" not in message, message
        for needle in needles:
            assert needle in message, (needle, message)

    return check


def test_bad_input_is_one_line_naming_it(tmp_path: Path, days: dict[str, Any]) -> None:
    U, I = days["U_today"], days["I_today"]  # noqa: E741 - users and items, as in the README

    def fit(*a: Any, **k: Any) -> Any:
        return dstab.Stabilizer().fit(*a, **k)

    one_line(InputError, "the new version was given as a list", "mapping {table_name: X}")(lambda: fit([U, I]))
    one_line(InputError, "the new table 'users' was given as a list", "numpy, Dask or Zarr array")(
        lambda: fit({"users": U.tolist(), "items": I})
    )
    one_line(InputError, "the new table 'users' is an array of shape (500,)", "2-D")(
        lambda: fit({"users": U[:, 0], "items": I})
    )
    one_line(InputError, "the reference table 'items' is an array of shape (12,)")(
        lambda: fit({"users": U, "items": I}, {"users": U, "items": I[0]})
    )
    one_line(InputError, "users/vectors has width 12 but items/vectors has width 11")(
        lambda: fit({"users": U, "items": I[:, :11]})
    )
    one_line(InputError, "users/ids has 3 ids for 500 vector rows")(
        lambda: fit({"users": U, "items": I}, ids={"users": np.arange(3)})
    )
    one_line(InputError, "ids given for the table 'creators'")(
        lambda: fit({"users": U, "items": I}, ids={"creators": np.arange(3)})
    )
    missing = str(tmp_path / "nowhere")
    one_line(VersionNotFoundError, "the new version", missing, "does not exist")(lambda: fit(missing))
    one_line(VersionNotFoundError, "the reference table 'users'", f"{missing}/users", "does not exist")(
        lambda: fit({"users": U, "items": I}, {"users": f"{missing}/users", "items": I})
    )
    one_line(InputError, "is a version (a group of tables), not a table")(
        lambda: fit({"users": days["day2"], "items": I})
    )
    one_line(UsageError, "ids=", "in-memory tables")(lambda: fit(days["day2"], ids={"users": np.arange(500)}))
    one_line(UsageError, "reference_ids=", "no reference")(
        lambda: fit({"users": U, "items": I}, reference_ids={"users": np.arange(500)})
    )

    est = dstab.Stabilizer().fit({"users": U, "items": I})
    one_line(InputError, "no table 'creators'", "its tables are")(lambda: est.transform({"creators": U}))
    one_line(InputError, "no table 'creators'")(lambda: est.transform(U, table="creators"))
    one_line(UsageError, "table=NAME")(lambda: est.transform(U))
    one_line(UsageError, "drop table=")(lambda: est.transform({"users": U}, table="users"))
    one_line(InputError, "users rows must have shape (n, 12)")(lambda: est.transform({"users": U[:, :5]}))
    one_line(InputError, "users rows must have shape (n, 12)")(
        lambda: est.transform({"users": da.from_array(U[:, :5])})
    )
    one_line(InputError, "the rows given for 'users' was given as a list")(lambda: est.transform({"users": [1.0, 2.0]}))
    one_line(VersionNotFoundError, "the rows given for 'users'", "does not exist")(
        lambda: est.transform({"users": missing})
    )


# ----------------------------------------------------------------------------- property: any chunking, any input kind


@settings(max_examples=25, deadline=None)
@given(
    n_items=st.integers(2, 90),
    n_users=st.integers(2, 60),
    dim=st.integers(1, 9),
    chunk=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_dask_input_in_any_chunking_gives_the_numpy_result(
    n_items: int, n_users: int, dim: int, chunk: int, seed: int, dtype: str
) -> None:
    """Lazy in, lazy out, the same numbers as numpy in, whatever the row chunks; every score kept, dtype kept."""
    rng = np.random.default_rng(seed)
    T = (rng.normal(size=(n_items, dim)) + 0.3).astype(dtype)
    W = (rng.normal(size=(n_users, dim)) - 0.2).astype(dtype)
    eager = dstab.Stabilizer().fit({"items": T, "users": W})
    lazy_in = {"items": da.from_array(T, chunks=(chunk, dim)), "users": da.from_array(W, chunks=(chunk, dim))}
    lazy = dstab.Stabilizer().fit(lazy_in)
    out = lazy.transform(lazy_in)
    assert all(isinstance(x, da.Array) for x in out.values())
    got = {k: v.compute() for k, v in out.items()}
    want = eager.transform({"items": T, "users": W})
    eps = float(np.finfo(dtype).eps)
    for name in ("items", "users"):
        assert got[name].dtype == np.dtype(dtype)
        # two fits of the same rows in other blocks: the same transform up to float64 summation order
        scale = max(1.0, float(np.abs(want[name]).max()))
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e3 * dim * eps * scale)
    # every score kept (error bound of a product of rank-revealing float factors)
    scores = T.astype(np.float64) @ W.astype(np.float64).T
    kept = got["items"].astype(np.float64) @ got["users"].astype(np.float64).T
    bound = 50 * dim * eps * np.linalg.norm(T, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :]
    kappa = np.linalg.cond(np.vstack([T, W]).astype(np.float64)) if min(n_items, n_users) >= dim else 1.0
    assert np.all(np.abs(kept - scores) <= bound * max(1.0, kappa) + 1e-12)
