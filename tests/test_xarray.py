"""Zarr that others can read: every array dstab writes opens in xarray, axes named, ids as coordinates.

Each table of a version opens as one Dataset (``vectors`` on ``(row, dim)``,
``ids`` a coordinate on ``row``, ``counts`` beside them), the saved transforms
as another; string ids are Zarr v3's variable-length UTF-8 ``string`` (not
fixed-width unicode, which has no Zarr v3 specification). Versions written
before, with fixed-width ids and no dimension names, still open and serve as
inputs and references. pytest turns warnings into errors, so each open here is
also checked to warn of nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import zarr

import dstab
from dstab import ids as idm
from dstab.cli import main
from tests.conftest import reference_stabilize, write_version

THREADS = ("--scheduler", "threads", "--no-progress")
STRING = "string"  # the Zarr v3 data type of variable-length UTF-8 strings


def open_table_dataset(out: Path | str, group: str | None) -> xr.Dataset:
    # exactly as a user would: dstab consolidates what it publishes, so xarray neither falls back nor warns
    # (pytest turns a warning into a failure here)
    return xr.open_zarr(str(out), group=group)


def assert_table_opens(out: Path | str, group: str | None, *, with_counts: bool) -> xr.Dataset:
    """The table at ``group`` opens as a Dataset equal to what zarr reads, ``ids`` a coordinate on ``row``."""
    prefix = f"{group}/" if group else ""
    root = zarr.open_group(str(out), mode="r")
    ds = open_table_dataset(out, group)
    vectors = root[f"{prefix}vectors"]
    assert vectors.metadata.dimension_names == ("row", "dim")
    assert ds["vectors"].dims == ("row", "dim")
    np.testing.assert_array_equal(ds["vectors"].values, vectors[...])
    assert "ids" in ds.coords and "ids" not in ds.data_vars
    assert ds["ids"].dims == ("row",) and ds["vectors"].coords["ids"].dims == ("row",)
    ids = root[f"{prefix}ids"]
    assert ids.metadata.dimension_names == ("row",)
    np.testing.assert_array_equal(ds["ids"].values, ids[...])
    assert ("counts" in ds.data_vars) == with_counts
    if with_counts:
        counts = root[f"{prefix}counts"]
        assert counts.metadata.dimension_names == ("row",) and ds["counts"].dims == ("row",)
        np.testing.assert_array_equal(ds["counts"].values, counts[...])
    assert "coordinates" not in ds["vectors"].attrs  # decoded by xarray, not left as a plain attribute
    return ds


def test_synth_stabilize_apply_open_in_xarray(tmp_path: Path):
    raw, out, applied = tmp_path / "raw", tmp_path / "stable", tmp_path / "applied"
    args = ("--items", 700, "--users", 500, "--dim", 6, "--chunk-rows", 128, "--counts")
    assert main([str(a) for a in ("synth", raw, *args, *THREADS)]) == 0
    assert main([str(a) for a in ("stabilize", raw, "--out", out, *THREADS)]) == 0

    for version in (raw, out):
        for name, n in (("items", 700), ("users", 500)):
            ds = assert_table_opens(version, name, with_counts=True)
            assert ds.sizes == {"row": n, "dim": 6}
    # the ids label the rows: a row picked by id in xarray is the row zarr holds at that position
    ds = open_table_dataset(out, "items")
    picked = ds.set_index(row="ids").sel(row=ds["ids"].values[517])["vectors"].values
    np.testing.assert_array_equal(picked, zarr.open_group(str(out), mode="r")["items/vectors"][517])

    transform = xr.open_zarr(str(out), group="transform")
    version = dstab.open_version(out)
    root = zarr.open_group(str(out), mode="r")
    for name in ("items", "users"):
        assert transform[name].dims == ("dim_in", "dim_out")
        assert root[f"transform/{name}"].metadata.dimension_names == ("dim_in", "dim_out")
        np.testing.assert_array_equal(transform[name].values, version.saved_transform(name))
    assert transform["singular_values"].dims == ("component",)
    assert root["transform/singular_values"].metadata.dimension_names == ("component",)
    np.testing.assert_array_equal(transform["singular_values"].values, root["transform/singular_values"][...])

    # `dstab apply` writes a loose table: vectors and ids at the group's top
    loose = tmp_path / "loose"
    rows = root["items/vectors"].shape[0]
    raw_items = zarr.open_group(str(raw), mode="r")["items"]
    table = zarr.open_group(str(loose), mode="w")
    table.create_array("vectors", data=raw_items["vectors"][...], chunks=(128, 6), dimension_names=("row", "dim"))
    table.create_array("ids", data=raw_items["ids"][...], chunks=(128,), dimension_names=("row",))
    assert main([str(a) for a in ("apply", out, "--items", loose, "--out", applied, *THREADS)]) == 0
    ds = assert_table_opens(applied, None, with_counts=False)
    assert ds.sizes == {"row": rows, "dim": 6}
    np.testing.assert_allclose(ds["vectors"].values, root["items/vectors"][...], rtol=1e-5, atol=1e-5)


def test_string_ids_are_variable_length_utf8(tmp_path: Path):
    """Fixed-width ``<U`` ids in, Zarr v3 ``string`` ids out, read back as str by zarr and xarray."""
    rng = np.random.default_rng(3)
    n_items, n_users, dim = 400, 300, 5
    item_ids = np.array([f"item-{i}-é" * (1 + i % 3) for i in range(n_items)])  # varied lengths, non-ASCII
    user_ids = np.array([f"u{i}" for i in range(n_users)])
    assert item_ids.dtype.kind == "U" and user_ids.dtype.kind == "U"
    files = {}
    for name, value in (
        ("items", rng.normal(size=(n_items, dim)).astype(np.float32)),
        ("users", rng.normal(size=(n_users, dim)).astype(np.float32)),
        ("items-ids", item_ids),
        ("users-ids", user_ids),
    ):
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], value)
    imported, out = tmp_path / "imported", tmp_path / "stable"
    assert main([str(a) for a in (
        "import", "--items", files["items"], "--users", files["users"], "--items-ids", files["items-ids"],
        "--users-ids", files["users-ids"], "--out", imported, "--chunk-rows", 64, *THREADS,
    )]) == 0  # fmt: skip
    assert main([str(a) for a in ("stabilize", imported, "--out", out, *THREADS)]) == 0
    for version in (imported, out):
        for name, expected in (("items", item_ids), ("users", user_ids)):
            ids = zarr.open_array(str(version), path=f"{name}/ids", mode="r")
            assert ids.metadata.to_dict()["data_type"] == STRING
            assert ids.metadata.dimension_names == ("row",)
            assert ids[...].tolist() == expected.tolist()
            ds = assert_table_opens(version, name, with_counts=False)
            assert ds["ids"].values.tolist() == expected.tolist()
            assert all(type(value) is str for value in ds["ids"].values.tolist())


def test_old_fixed_width_version_is_still_an_input_and_a_reference(tmp_path: Path):
    """A version written before (fixed-width ``<U`` ids, no dimension names) stabilizes and anchors as before.

    The reference is the stabilized old version, in numpy, written with plain
    zarr as older dstab did; the new version is the same model in another
    basis, rows reordered, its ids variable-length strings. Stabilized onto the
    reference, each new row must come back as the reference row of its id.
    """
    rng = np.random.default_rng(11)
    n_items, n_users, dim = 600, 400, 6
    T = rng.normal(size=(n_items, dim)) @ np.diag(np.linspace(3.0, 0.5, dim))
    W = rng.normal(size=(n_users, dim))
    ref_T, ref_W, _ = reference_stabilize(T, W)
    item_ids = np.array([f"i{i:04d}" for i in range(n_items)])  # <U5
    user_ids = np.array([f"user{i}" for i in range(n_users)])  # <U7
    old = write_version(
        tmp_path / "old", ref_T.astype(np.float32), ref_W.astype(np.float32), item_ids=item_ids, user_ids=user_ids
    )
    old_ids = zarr.open_array(old, path="items/ids", mode="r")
    assert old_ids.metadata.dimension_names is None and old_ids.dtype.kind == "U"  # as versions before were

    # as an input: ids come out as variable-length strings, the same ids
    again = dstab.stabilize(dstab.open_version(old)).to_zarr(tmp_path / "again")
    for name, expected in (("items", item_ids), ("users", user_ids)):
        ids = zarr.open_array(again.url, path=f"{name}/ids", mode="r")
        assert ids.metadata.to_dict()["data_type"] == STRING
        assert ids[...].tolist() == expected.tolist()
        assert_table_opens(again.url, name, with_counts=False)

    # as a reference: a new basis, rows reordered, ids of numpy's StringDType
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0] @ np.diag(np.linspace(0.5, 2.0, dim))
    order_T, order_W = rng.permutation(n_items), rng.permutation(n_users)
    new = dstab.from_tables(
        {
            "items": (T @ basis)[order_T].astype(np.float32),
            "users": (W @ np.linalg.inv(basis).T)[order_W].astype(np.float32),
        },
        ids={
            "items": item_ids[order_T].astype(np.dtypes.StringDType()),
            "users": user_ids[order_W].astype(np.dtypes.StringDType()),
        },
        chunk_rows=128,
    )
    fit = dstab.stabilize(new, dstab.open_version(old))
    result = fit.to_zarr(tmp_path / "stable")
    for name, ref_rows, order, ids in (("items", ref_T, order_T, item_ids), ("users", ref_W, order_W, user_ids)):
        table = result.table(name)
        assert table.ids[...].tolist() == ids[order].tolist()
        got = np.asarray(table.vectors[...], dtype=np.float64)
        np.testing.assert_allclose(got, ref_rows[order], atol=1e-3 * np.abs(ref_rows).max())
        assert zarr.open_array(result.url, path=f"{name}/ids", mode="r").metadata.to_dict()["data_type"] == STRING
    assert fit.report["matching"]["items"]["anchor_rows"] == n_items  # every id matched across the two dtypes


def test_id_hashes_do_not_depend_on_the_stored_string_dtype(tmp_path: Path):
    """The same ids hash alike read from a Zarr v3 ``string`` array, a fixed-width ``<U`` array, or numpy of any width."""
    values = ["a", "ab", "", "é", "ü-long-id-0001", "x" * 40]
    group = zarr.open_group(str(tmp_path / "ids"), mode="w")
    group.create_array(
        "ids", shape=(len(values),), chunks=(4,), dtype=np.dtypes.StringDType(), dimension_names=("row",)
    )
    group["ids"][...] = np.array(values, dtype=np.dtypes.StringDType())
    stored = group["ids"]
    assert stored.metadata.to_dict()["data_type"] == STRING and stored[...].dtype == np.dtypes.StringDType()
    expected = idm.hash_ids(np.array(values, dtype="<U40"))
    for ids in (
        stored[...],
        np.array(values),
        np.array(values, dtype="<U64"),
        np.array(values, dtype=object).astype("T"),
    ):
        np.testing.assert_array_equal(idm.hash_ids(ids), expected)
    assert len(set(expected.tolist())) == len(values)
