"""`dstab import` from .npy and Parquet (files, partitioned directories, fsspec URLs) and `dstab export` to Parquet."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

import dstab
from dstab.cli import main
from tests.conftest import random_tables, write_version

FAST = ("--scheduler", "synchronous", "--no-progress")


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def arrays(path: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {k: g[k][...] for k in ("items/vectors", "items/ids", "users/vectors", "users/ids") if k in g}


def list_table(ids: np.ndarray | list, vectors: np.ndarray, **extra: object) -> pa.Table:
    flat = pa.array(vectors.reshape(-1))
    return pa.table({"id": pa.array(ids), "emb": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]), **extra})


def test_npy_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(1, 1000, 700, 8)
    np.save(tmp_path / "items.npy", T)
    np.save(tmp_path / "users.npy", W)
    np.save(tmp_path / "item_ids.npy", np.arange(1000, dtype=np.int64) * 3)
    np.save(tmp_path / "user_ids.npy", np.array([f"user-{i}" for i in range(700)]))
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items.npy", "--items-ids", tmp_path / "item_ids.npy",
        "--users", tmp_path / "users.npy", "--users-ids", tmp_path / "user_ids.npy",
        "--out", tmp_path / "v", "--chunk-rows", "128", *FAST,
    )  # fmt: skip
    assert code == 0, err
    got = arrays(str(tmp_path / "v"))
    np.testing.assert_array_equal(got["items/vectors"], T)
    np.testing.assert_array_equal(got["users/vectors"], W)
    np.testing.assert_array_equal(got["items/ids"], np.arange(1000) * 3)
    assert got["users/ids"].tolist() == [f"user-{i}" for i in range(700)]
    v = dstab.open_version(tmp_path / "v")
    assert v.items.chunk_rows == 128 and v.attrs["kind"] == "imported"
    assert dstab.stabilize(v).rank == 8


def test_parquet_partitioned_directory_and_scalar_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(2, 900, 500, 6)
    item_ids = np.arange(900, dtype=np.int64) + 10
    # items: a Hive-partitioned directory with a list column, several row groups per file
    pq.write_to_dataset(
        list_table(item_ids, T, day=pa.array(["2026-11-2" + str(i % 3) for i in range(900)])),
        tmp_path / "items", partition_cols=["day"], row_group_size=100,
    )  # fmt: skip
    # users: one file, string ids, six scalar columns
    user_ids = [f"u{i}" for i in range(500)]
    pq.write_table(pa.table({"uid": user_ids, **{f"f{j}": W[:, j] for j in range(6)}}), tmp_path / "users.parquet")
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items", "--users", tmp_path / "users.parquet",
        "--vector-columns", "f*", "--id-column", "uid", "--out", tmp_path / "v", *FAST,
    )  # fmt: skip
    assert code == 2 and "items: " in err and "no column 'uid'" in err  # one --id-column serves both sides
    pq.write_table(pa.table({"id": user_ids, **{f"f{j}": W[:, j] for j in range(6)}}), tmp_path / "users.parquet")
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items", "--users", tmp_path / "users.parquet",
        "--vector-column", "emb", "--out", tmp_path / "v", *FAST,
    )  # fmt: skip
    assert code == 2 and "users: " in err and "no column 'emb'" in err
    # the list column is found on its own; scalar columns by glob for the users file
    code, _, err = run_cli(
        capsys,
        "import",
        "--items",
        tmp_path / "items",
        "--users",
        tmp_path / "users.parquet",
        "--out",
        tmp_path / "v",
        *FAST,
    )
    assert code == 2 and "users: " in err and "has 0 list columns" in err
    items_only = dstab.interchange.open_parquet(str(tmp_path / "items"))
    users_cols = dstab.interchange.open_parquet(str(tmp_path / "users.parquet"), vector_columns="f*", label="users")
    assert users_cols.vector_columns == [f"f{j}" for j in range(6)] and items_only.vector_column == "emb"
    version = dstab.interchange.import_version(tmp_path / "v", items_only, users_cols, chunk_rows=64)
    got = arrays(version.url)  # type: ignore[arg-type]
    # partitions come back grouped by directory: compare by id
    order = np.argsort(got["items/ids"])
    np.testing.assert_array_equal(got["items/ids"][order], item_ids)
    np.testing.assert_array_equal(got["items/vectors"][order], T)
    assert got["users/ids"].tolist() == user_ids
    np.testing.assert_array_equal(got["users/vectors"], W)


@pytest.mark.parametrize("layout", ["list", "columns"])
def test_export_import_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str):
    T, W = random_tables(3, 1200, 300, 5, "float64")
    src = write_version(
        tmp_path / "v", T, W, item_ids=np.arange(1200, dtype=np.int64)[::-1].copy(), user_ids=np.array([f"u{i}" for i in range(300)]),
        chunk_rows=100,
    )  # fmt: skip
    code, _, err = run_cli(capsys, "export", src, "--out", tmp_path / "pq", "--layout", layout, *FAST)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "pq" / "items").iterdir())
    assert files[0] == "part-00000.parquet" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    schema = pq.read_schema(tmp_path / "pq" / "items" / files[0])
    assert schema.names[0] == "id" and (schema.names[1:] == ["vector"] if layout == "list" else len(schema.names) == 6)
    cols = [] if layout == "list" else ["--vector-columns", "v*"]
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "pq" / "items", "--users", tmp_path / "pq" / "users", *cols,
        "--out", tmp_path / "back", "--chunk-rows", "100", *FAST,
    )  # fmt: skip
    assert code == 0, err
    a, b = arrays(src), arrays(str(tmp_path / "back"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert b["items/vectors"].dtype == np.float64
    code, _, err = run_cli(capsys, "export", src, "--out", tmp_path / "pq", *FAST)
    assert code == 2 and "already holds a dstab Parquet export; pass --overwrite" in err


def test_fsspec_parquet_source_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    fs = fsspec.filesystem("memory")
    T, W = random_tables(4, 400, 300, 4)
    for side, X in (("items", T), ("users", W)):
        for part in range(2):
            rows = slice(part * len(X) // 2, (part + 1) * len(X) // 2)
            with fs.open(f"/src-{tmp_path.name}/{side}/part-{part}.parquet", "wb") as f:
                pq.write_table(list_table(np.arange(len(X))[rows], X[rows]), f)
    base = f"memory://src-{tmp_path.name}"
    code, _, err = run_cli(
        capsys, "import", "--items", f"{base}/items", "--users", f"{base}/users", "--out", f"{base}/v", *FAST
    )
    assert code == 0, err
    got = dstab.open_version(f"{base}/v")
    np.testing.assert_array_equal(np.asarray(got.items.vectors[...]), T)
    code, _, err = run_cli(capsys, "export", f"{base}/v", "--out", f"{base}/export", *FAST)
    assert code == 0, err
    assert fs.exists(f"/src-{tmp_path.name}/export/_SUCCESS")
    back = pq.read_table(fs.open(f"/src-{tmp_path.name}/export/users/part-00000.parquet", "rb"))
    np.testing.assert_array_equal(np.stack(back.column("vector").to_pylist()), W.astype(np.float32))


def test_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(5, 200, 100, 4)
    np.save(tmp_path / "users.npy", W)
    out = tmp_path / "out"

    def run(items: Path, *extra: object) -> str:
        code, _, err = run_cli(
            capsys, "import", "--items", items, "--users", tmp_path / "users.npy", "--out", out, *extra, *FAST
        )
        assert code == 2 and not out.exists() and err.count("\n") == 1, err
        return err

    np.save(tmp_path / "obj.npy", np.array([object()] * 3), allow_pickle=True)
    assert "not a plain .npy array" in run(tmp_path / "obj.npy")
    np.save(tmp_path / "int.npy", np.ones((5, 4), dtype=np.int32))
    assert "holds int32 values; vectors must be float32 or float64" in run(tmp_path / "int.npy")
    np.save(tmp_path / "items.npy", T)
    np.save(tmp_path / "short_ids.npy", np.arange(10))
    assert "has shape (10,) for 200 vector rows" in run(
        tmp_path / "items.npy", "--items-ids", tmp_path / "short_ids.npy"
    )
    vectors = pa.array([list(map(float, r)) for r in T[:3]] + [[1.0, 2.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "vec": vectors}), tmp_path / "ragged.parquet")
    np.save(tmp_path / "users4.npy", W[:, :4])
    err = run(tmp_path / "ragged.parquet")
    assert "the vector at row 3 has 2 values, not 4" in err
    pq.write_table(pa.table({"id": [1, None, 3], "vec": vectors[:3]}), tmp_path / "null.parquet")
    assert "column 'id' is null at row 1" in run(tmp_path / "null.parquet")
    assert "no column 'key'" in run(tmp_path / "null.parquet", "--id-column", "key")
    assert "nothing at" in run(tmp_path / "missing.parquet")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_import_refuses_non_finite_vectors(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: float, fmt: str):
    """NaN or Inf in an imported table: one line naming the table and the row, exit 2, nothing written (the trial
    found NaN tables imported, refused only later by stabilize)."""
    rng = np.random.default_rng(0)
    items, users = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
    users[37, 2] = bad
    if fmt == "npy":
        np.save(tmp_path / "items.npy", items)
        np.save(tmp_path / "users.npy", users)
        sources = ["--items", tmp_path / "items.npy", "--users", tmp_path / "users.npy"]
    else:
        pq.write_table(list_table(np.arange(30), items), tmp_path / "items.parquet")
        pq.write_table(list_table(np.arange(50), users), tmp_path / "users.parquet")
        sources = ["--items", tmp_path / "items.parquet", "--users", tmp_path / "users.parquet"]
    code, _, err = run_cli(capsys, "import", *sources, "--out", tmp_path / "out", "--chunk-rows", 16, *FAST)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("dstab: error: users: ") and "row 37 is not finite" in line, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".dstab-" in p.name]
