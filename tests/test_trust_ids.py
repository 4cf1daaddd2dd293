"""Duplicate ids (integers and strings), in the new version, the reference and `dstab import`, and non-Parquet sources.

Every case is bad input: exit code 2, one line on stderr naming the id and both
of its rows (or the file and what was expected), and nothing on disk: no OUT,
no hidden staging sibling ``.OUT.dstab-*``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dstab import ids as idm
from dstab.cli import main
from tests.conftest import random_tables, write_version

FAST = ("--scheduler", "synchronous", "--no-progress")
N_ITEMS, N_USERS, DIM = 300, 200, 6
STRINGS = np.dtypes.StringDType()  # how zarr-python 3 reads Zarr v3 string arrays (and how `dstab import` writes ids)


@pytest.fixture(autouse=True)
def many_blocks_and_buckets():
    """Blocks of one 128-row chunk and 16 ids per bucket, so a duplicate spans blocks and buckets."""
    with dask.config.set({"dstab.block-bytes": 1, "dstab.id-bucket-rows": 16}):
        yield


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


def assert_refused(code: int, err: str, out: Path, *fragments: str) -> None:
    """Exit 2, one ``dstab: error:`` line holding every fragment, nothing at ``out`` nor staged beside it."""
    assert code == 2, err
    assert err.startswith("dstab: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.glob(f".{out.name}*")) == []


# ----------------------------------------------------------------------------- stabilize


def string_ids(n: int) -> np.ndarray:
    return np.array([f"i{i}" for i in range(n)], dtype=STRINGS)


def with_dup(ids: np.ndarray) -> np.ndarray:
    """``ids`` with row 250 repeating row 17's id."""
    dup = ids.copy()
    dup[250] = ids[17]
    return dup


def reversed_(ids: np.ndarray) -> np.ndarray:
    return ids[::-1].copy()


T, W = random_tables(21, N_ITEMS, N_USERS, DIM)
UIDS = np.arange(N_USERS, dtype=np.int64)
NAN_ROW_3 = T.copy()
NAN_ROW_3[3, 1] = np.nan

# name: (new items, new item ids, reference item ids or None, the fragments of the message)
STABILIZE_CASES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[str, ...]]] = {
    # the duplicate pair (17, 250) reversed: rows 299 - 250 = 49 and 299 - 17 = 282
    "string ids, duplicate in new, with reference": (
        T[::-1], reversed_(with_dup(string_ids(N_ITEMS))), string_ids(N_ITEMS),
        ("items/ids of the new version has the id 'i17' at rows 49 and 282;", "ids must be unique"),
    ),
    "string ids, duplicate in the reference": (
        T[::-1], reversed_(string_ids(N_ITEMS)), with_dup(string_ids(N_ITEMS)),
        ("items/ids of the reference has the id 'i17' at rows 17 and 250;", "ids must be unique"),
    ),
    "string ids, duplicate in new, no reference": (
        T, with_dup(string_ids(N_ITEMS)), None,
        ("items/ids of the new version has the id 'i17' at rows 17 and 250;", "ids must be unique"),
    ),
    "fixed-width string ids, duplicate in new, no reference": (
        T, with_dup(string_ids(N_ITEMS)).astype("<U8"), None,
        ("items/ids of the new version has the id 'i17' at rows 17 and 250;", "ids must be unique"),
    ),
    "integer ids, duplicate in new, no reference": (
        T, with_dup(np.arange(N_ITEMS, dtype=np.int64)), None,
        ("items/ids of the new version has the id 17 at rows 17 and 250;", "ids must be unique"),
    ),
    # the same `.item()` on a str named the id of a non-finite row
    "string ids, non-finite row named by id": (
        NAN_ROW_3, string_ids(N_ITEMS), None,
        ("items/vectors row 3 (id 'i3') is not finite",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STABILIZE_CASES))
def test_stabilize_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str):
    items, item_ids, ref_ids, fragments = STABILIZE_CASES[case]
    new = write_version(tmp_path / "new", items, W, item_ids=item_ids, user_ids=UIDS)
    args = ["stabilize", new, "--out", tmp_path / "out", *FAST]
    if ref_ids is not None:
        args += ["--reference", write_version(tmp_path / "ref", T, W, item_ids=ref_ids, user_ids=UIDS)]
    code, err = run_cli(capsys, *args)
    assert_refused(code, err, tmp_path / "out", *fragments)


def test_first_duplicate_tells_colliding_ids_apart():
    # rows that share one hash: two different ids (a collision) before a real repeat
    assert idm.first_duplicate([(1, "a"), (5, "b"), (9, "a"), (12, "b")]) == ("a", 1, 9)
    assert idm.first_duplicate([(1, "a"), (5, "b")]) is None
    assert idm.rows_with_hash(np.array(["x", "y", "x"], dtype=STRINGS), int(idm.hash_ids(np.array(["x"]))[0]), 10) == [
        (10, "x"),
        (12, "x"),
    ]


# ----------------------------------------------------------------------------- import


def list_table(ids: list, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(vectors.reshape(-1))
    return pa.table({"id": pa.array(ids), "emb": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def npy_with_ids(ids: np.ndarray) -> Callable[[Path], tuple[list[object], tuple[str, ...]]]:
    def make(d: Path) -> tuple[list[object], tuple[str, ...]]:
        np.save(d / "items.npy", T)
        np.save(d / "item_ids.npy", ids)
        return ["--items", d / "items.npy", "--items-ids", d / "item_ids.npy"], (f"items/ids of {d / 'item_ids.npy'} ",)

    return make


def parquet_dir_with_dup(d: Path) -> tuple[list[object], tuple[str, ...]]:
    """Two files; the second repeats an id of the first: rows count across files, in path order."""
    ids = [f"item-{i}" for i in range(N_ITEMS)]
    ids[260] = "item-40"
    (d / "items").mkdir()
    pq.write_table(list_table(ids[:150], T[:150]), d / "items" / "part-0.parquet", row_group_size=64)
    pq.write_table(list_table(ids[150:], T[150:]), d / "items" / "part-1.parquet", row_group_size=64)
    return ["--items", d / "items"], (f"items/ids of {d / 'items'} (column 'id') ",)


def parquet_file_with_int_dup(d: Path) -> tuple[list[object], tuple[str, ...]]:
    ids = list(range(N_ITEMS))
    ids[222] = 5
    pq.write_table(list_table(ids, T), d / "items.parquet", row_group_size=100)
    return ["--items", d / "items.parquet"], (f"items/ids of {d / 'items.parquet'} (column 'id') ",)


# name: (writes the items source in a folder and returns its arguments and path fragment, the duplicate's fragment)
IMPORT_DUPLICATES = {
    "npy, string ids file": (
        npy_with_ids(with_dup(np.array([f"i{i}" for i in range(N_ITEMS)]))),
        "'i17' at rows 17 and 250;",
    ),
    "npy, integer ids file": (npy_with_ids(with_dup(np.arange(N_ITEMS) + 1000)), "1017 at rows 17 and 250;"),
    "parquet directory, string ids": (parquet_dir_with_dup, "'item-40' at rows 40 and 260;"),
    "parquet file, integer ids": (parquet_file_with_int_dup, "5 at rows 5 and 222;"),
}


@pytest.mark.parametrize("case", list(IMPORT_DUPLICATES))
def test_import_refuses_duplicate_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str):
    make, duplicate = IMPORT_DUPLICATES[case]
    items, where = make(tmp_path)
    np.save(tmp_path / "users.npy", W)
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, "import", *items, "--users", tmp_path / "users.npy", "--out", out, "--chunk-rows", "32", *FAST
    )
    assert_refused(code, err, out, *where, f"has the id {duplicate}", "ids must be unique")


def text_file(d: Path) -> Path:
    (d / "items.parquet").write_text("id,v0,v1\n1,0.5,0.25\n")
    return d / "items.parquet"


def directory_with_a_text_file(d: Path) -> Path:
    (d / "items").mkdir()
    pq.write_table(list_table(list(range(150)), T[:150]), d / "items" / "part-0.parquet")
    (d / "items" / "part-1.parquet").write_text("not parquet either\n")
    return d / "items" / "part-1.parquet"


def csv_file(d: Path) -> Path:
    (d / "items.csv").write_text("id,v0,v1\n1,0.5,0.25\n")
    return d / "items.csv"


def empty_file(d: Path) -> Path:
    (d / "items.parquet").write_bytes(b"")
    return d / "items.parquet"


def corrupt_footer(d: Path) -> Path:
    """Parquet's magic bytes at both ends, a footer that does not decode (pyarrow raises OSError, not ArrowInvalid)."""
    (d / "items.parquet").write_bytes(b"PAR1" + bytes(100) + (16).to_bytes(4, "little") + b"PAR1")
    return d / "items.parquet"


# name: (writes the bad source, returns the file the message must name; the source given is its directory
# when the file lies in `items/`)
NOT_PARQUET = {
    "text with a .parquet suffix": text_file,
    "directory holding a text *.parquet": directory_with_a_text_file,
    "csv file": csv_file,
    "empty file": empty_file,
    "magic bytes, corrupt footer": corrupt_footer,
}


@pytest.mark.parametrize("case", list(NOT_PARQUET))
def test_import_refuses_a_file_that_is_not_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str):
    bad = NOT_PARQUET[case](tmp_path)
    source = bad.parent if bad.parent.name == "items" else bad
    np.save(tmp_path / "users.npy", W)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "import", "--items", source, "--users", tmp_path / "users.npy", "--out", out, *FAST)
    assert_refused(code, err, out, f"items: {bad} is not a Parquet file (", "expected a Parquet file")
