"""The Python API end to end on real Zarr stores, on every scheduler, against the numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

import dstab
from dstab.stats import side_statistics
from dstab.store import RowBlock

from conftest import (
    random_basis,
    random_tables,
    read_tables,
    reference_stabilize,
    relative_score_error,
    write_version,
)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_scores_kept_balanced_and_dtype_kept(tmp_path: Path, dtype: str, tol: float):
    T, W = random_tables(0, 1000, 700, 16, dtype)
    new = dstab.open_version(write_version(tmp_path / "new", T, W, chunk_rows=90))
    out = dstab.stabilize(new).to_zarr(tmp_path / "out")
    T_out, W_out = read_tables(str(tmp_path / "out"))
    assert T_out.dtype == np.dtype(dtype) and W_out.dtype == np.dtype(dtype)
    assert out.items.dtype == np.dtype(dtype)
    assert relative_score_error(T, W, T_out, W_out) < tol
    gt, gw = T_out.astype(np.float64).T @ T_out, W_out.astype(np.float64).T @ W_out
    sv = out.attrs["report"]["singular_values"][:16]
    # balanced: both sides' Grams are the same diagonal, diag(σ)
    for g in (gt, gw):
        np.testing.assert_allclose(g, np.diag(sv), rtol=0, atol=tol * 10 * sv[0])
    # and the result is the one the Householder reference gives
    RT, RW, _ = reference_stabilize(T, W, rtol=1e-6)
    np.testing.assert_allclose(T_out, RT, rtol=0, atol=tol * 10 * np.abs(RT).max())
    np.testing.assert_allclose(W_out, RW, rtol=0, atol=tol * 10 * np.abs(RW).max())


def test_same_output_for_any_reparametrisation(tmp_path: Path):
    T, W = random_tables(1, 900, 500, 12, "float32")
    base = dstab.stabilize(dstab.open_version(write_version(tmp_path / "a", T, W)))
    T_a, W_a = base.items.compute(), base.users.compute()
    rng = np.random.default_rng(2)
    for i, condition in enumerate((1.0, 10.0, 100.0)):
        G = random_basis(rng, 12, condition)
        T2 = (T.astype(np.float64) @ G).astype(np.float32)
        W2 = (W.astype(np.float64) @ np.linalg.inv(G).T).astype(np.float32)
        res = dstab.stabilize(dstab.open_version(write_version(tmp_path / f"g{i}", T2, W2, chunk_rows=77)))
        T_b, W_b = res.items.compute(), res.users.compute()
        assert np.abs(T_b - T_a).max() <= 1e-4 * np.abs(T_a).max()
        assert np.abs(W_b - W_a).max() <= 1e-4 * np.abs(W_a).max()


def test_deterministic_signs_and_repeatable(tmp_path: Path):
    T, W = random_tables(3, 800, 600, 10, "float32")
    path = write_version(tmp_path / "v", T, W)
    first = dstab.stabilize(dstab.open_version(path)).items.compute()
    second = dstab.stabilize(dstab.open_version(path)).items.compute()
    np.testing.assert_array_equal(first, second)
    assert (first.astype(np.float64).sum(axis=0) > 0).all()


def test_rank_two_table_in_dim_32(tmp_path: Path):
    T, W = random_tables(4, 2000, 1500, 32, "float32", rank=2)
    out = dstab.stabilize(dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=300))).to_zarr(
        tmp_path / "o"
    )
    T_out, W_out = read_tables(str(tmp_path / "o"))
    assert T_out.shape == (2000, 2) and W_out.shape == (1500, 2)
    assert out.attrs["report"]["rank"] == 2
    assert relative_score_error(T, W, T_out, W_out) < 1e-5


@pytest.mark.parametrize("k_new,k_ref", [(8, 12), (12, 8)])
def test_reference_of_another_width(tmp_path: Path, k_new: int, k_ref: int):
    T, W = random_tables(5, 700, 500, k_new, "float64")
    rng = np.random.default_rng(6)
    ref_T, ref_W = rng.normal(size=(700, k_ref)), rng.normal(size=(500, k_ref))
    new = dstab.open_version(write_version(tmp_path / "new", T, W))
    ref = dstab.open_version(write_version(tmp_path / "ref", ref_T, ref_W))
    result = dstab.stabilize(new, ref)
    result.to_zarr(tmp_path / "out")
    T_out, W_out = read_tables(str(tmp_path / "out"))
    assert T_out.shape[1] == max(k_new, k_ref)
    assert relative_score_error(T, W, T_out, W_out) < 1e-10
    RT, RW, _ = reference_stabilize(T, W, (ref_T, ref_W), rtol=1e-9)
    np.testing.assert_allclose(T_out, RT, atol=1e-8 * np.abs(RT).max())
    np.testing.assert_allclose(W_out, RW, atol=1e-8 * np.abs(RW).max())
    # drift predicted from statistics equals drift measured on the written tables
    pad = np.zeros((700, max(k_new, k_ref)))
    pad[:, :k_ref] = ref_T
    measured = np.linalg.norm(T_out - pad) / np.linalg.norm(ref_T)
    assert result.report["drift"]["items"]["after"] == pytest.approx(measured, rel=1e-6)


def test_retrain_is_aligned_back_onto_the_reference(tmp_path: Path):
    T, W = random_tables(7, 1500, 1000, 16, "float32")
    s0 = dstab.stabilize(dstab.open_version(write_version(tmp_path / "v0", T, W))).to_zarr(tmp_path / "s0")
    G = random_basis(np.random.default_rng(8), 16, 30.0)
    T1 = (T.astype(np.float64) @ G).astype(np.float32)
    W1 = (W.astype(np.float64) @ np.linalg.inv(G).T).astype(np.float32)
    result = dstab.stabilize(dstab.open_version(write_version(tmp_path / "v1", T1, W1)), s0)
    assert result.report["drift_before"] > 0.1
    assert result.report["drift_after"] < 1e-4
    out = result.to_zarr(tmp_path / "s1")
    a, b = read_tables(str(tmp_path / "s0")), read_tables(str(tmp_path / "s1"))
    assert np.linalg.norm(b[0] - a[0]) / np.linalg.norm(a[0]) < 1e-4
    assert out.attrs["reference"] == str(tmp_path / "s0")
    assert out.attrs["report"]["score_error"] < 1e-5


def test_zarr_round_trip_layout_and_transforms(tmp_path: Path):
    T, W = random_tables(9, 500, 300, 8, "float32")
    ids_t = np.arange(500, dtype=np.int64) * 3
    ids_w = np.array([f"user-{i}" for i in range(300)])
    new = dstab.open_version(write_version(tmp_path / "v", T, W, item_ids=ids_t, user_ids=ids_w, chunk_rows=64))
    out = dstab.stabilize(new).to_zarr(tmp_path / "o")
    g = zarr.open_group(str(tmp_path / "o"), mode="r")
    assert g["items/vectors"].chunks == (64, 8)
    np.testing.assert_array_equal(g["items/ids"][...], ids_t)
    np.testing.assert_array_equal(g["users/ids"][...], ids_w)
    attrs = g.attrs["dstab"]
    assert attrs["complete"] is True and attrs["kind"] == "stabilized"
    json.dumps(attrs)
    # the stored transforms reproduce the stored tables from the raw ones
    np.testing.assert_allclose(
        T.astype(np.float64) @ g["transform/items"][...], g["items/vectors"][...], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        W.astype(np.float64) @ g["transform/users"][...], g["users/vectors"][...], rtol=1e-5, atol=1e-5
    )
    # the output is itself a valid version: stabilizing it again changes nothing
    again = dstab.stabilize(out, out).items.compute()
    np.testing.assert_allclose(again, g["items/vectors"][...], atol=1e-5 * np.abs(again).max())


def test_same_result_on_every_scheduler(tmp_path: Path, scheduler: str):
    T, W = random_tables(10, 3000, 2000, 16, "float32")
    new = dstab.open_version(write_version(tmp_path / "new", T, W, chunk_rows=250))
    ref_T, ref_W, _ = reference_stabilize(T, W)
    ref = dstab.open_version(write_version(tmp_path / "ref", ref_T.astype(np.float32), ref_W.astype(np.float32)))
    result = dstab.stabilize(new, ref)
    result.to_zarr(tmp_path / "out")
    T_out, W_out = read_tables(str(tmp_path / "out"))
    assert relative_score_error(T, W, T_out, W_out) < 1e-5
    np.testing.assert_allclose(T_out, ref_T, atol=1e-4 * np.abs(ref_T).max())
    assert result.report["drift_after"] < 1e-4
    with dask.config.set(scheduler="synchronous"):
        expected = dstab.stabilize(new, ref).items.compute()
    np.testing.assert_allclose(T_out, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_statistics_graph_reads_each_chunk_once(tmp_path: Path):
    T, W = random_tables(11, 2000, 100, 8, "float32")
    new = dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=100))
    table = new.items
    assert table.block_rows() % 100 == 0  # a task's block is whole storage chunks
    graph = side_statistics(table, references=(table,), matches=("position",)).__dask_graph__()
    n_blocks = len(table.row_chunks())
    # one task per block (it reads its own rows of both tables), one that picks its
    # statistics out of what it returns, n - 1 merges, and two that pick the
    # reference's statistics out of the merged ones and list them: O(blocks)
    assert len(graph) == 3 * n_blocks + 1
    args = [arg for task in dict(graph).values() for arg in getattr(task, "args", ())]
    args += [inner for arg in args if isinstance(arg, tuple) for inner in arg]  # the reference blocks come as a tuple
    sources = [arg for arg in args if isinstance(arg, RowBlock)]
    spans = sorted((b.start, b.stop) for b in sources if b.array.path == table.vectors.path)
    # every row read exactly once per table, by exactly one task
    assert len(spans) == 2 * n_blocks
    assert spans[::2] == spans[1::2] and spans[0][0] == 0 and spans[-1][1] == table.n_rows
    assert all(a[1] == b[0] for a, b in zip(spans[::2], spans[2::2]))


def test_many_small_chunks_are_grouped_into_blocks(tmp_path: Path):
    T, W = random_tables(16, 30_000, 100, 4, "float32")
    new = dstab.open_version(write_version(tmp_path / "v", T, W, chunk_rows=100))
    assert len(new.items.row_chunks()) == 1  # 300 chunks of 1.6 KB make one 480 KB block, not 300 tasks
    out = dstab.stabilize(new).to_zarr(tmp_path / "o")
    assert zarr.open_group(out.url)["items/vectors"].chunks == (100, 4)  # the storage chunks are kept


def test_no_client_is_created(tmp_path: Path):
    from distributed import default_client

    T, W = random_tables(12, 300, 200, 6, "float32")
    dstab.stabilize(dstab.open_version(write_version(tmp_path / "v", T, W))).to_zarr(tmp_path / "o")
    with pytest.raises(ValueError):
        default_client()


def test_from_arrays_and_transform_of_extra_rows():
    T, W = random_tables(13, 400, 300, 8, "float32")
    result = dstab.stabilize(dstab.from_arrays(T, W, chunk_rows=64))
    extra = W[:5]
    np.testing.assert_allclose(result.transform("users", extra), result.users.compute()[:5], rtol=1e-6, atol=1e-6)
    assert "rank 8" in repr(result)


def test_fsspec_url_store():
    """A non-local fsspec URL: written in place, complete flag last, refused when it exists."""
    T, W = random_tables(14, 1000, 800, 8, "float32")
    g = zarr.open_group("memory://dstab-test/new", mode="w")
    g.create_array("items/vectors", data=T, chunks=(100, 8))
    g.create_array("users/vectors", data=W, chunks=(100, 8))
    with dask.config.set(scheduler="threads"):  # the memory filesystem lives in this process
        new = dstab.open_version("memory://dstab-test/new")
        out = dstab.stabilize(new).to_zarr("memory://dstab-test/out")
        assert out.attrs["complete"] is True and out.url == "memory://dstab-test/out"
        o = zarr.open_group("memory://dstab-test/out", mode="r")
        assert relative_score_error(T, W, o["items/vectors"][...], o["users/vectors"][...]) < 1e-5
        with pytest.raises(dstab.OutputExistsError):
            dstab.stabilize(new).to_zarr("memory://dstab-test/out")
        with pytest.raises(dstab.UsageError, match="never writes over its inputs"):
            dstab.stabilize(new).to_zarr("memory://dstab-test/new/inside")


def _explode(block: np.ndarray) -> np.ndarray:
    if block.shape[0] and block[0, 0] == 12345.0:
        raise RuntimeError("disk on fire")
    return block


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_failed_write_leaves_nothing(tmp_path: Path, where: str):
    T, W = random_tables(15, 1000, 800, 8, "float32")
    base = dstab.stabilize(dstab.from_arrays(T, W, chunk_rows=100))
    T_bad = T.copy()
    T_bad[700, 0] = 12345.0
    # the statistics pass succeeds on the real data; the write pass reads a table whose block 7 fails
    failing = dask.array.from_array(T_bad, chunks=(100, 8)).map_blocks(_explode, dtype=T.dtype)
    base.new = dstab.from_arrays(failing, W, chunk_rows=100)
    out = str(tmp_path / "out") if where == "local" else "memory://dstab-test/failed"
    with dask.config.set(scheduler="threads"), pytest.raises(RuntimeError, match="disk on fire"):
        base.to_zarr(out)
    if where == "local":
        assert list(tmp_path.iterdir()) == []
    else:
        with pytest.raises(dstab.VersionNotFoundError):
            dstab.open_version(out)
