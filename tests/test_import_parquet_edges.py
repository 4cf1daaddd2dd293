"""`dstab import` from Parquet: list columns met by --vector-columns, both vector options, null list elements."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dstab.cli import main
from tests.conftest import random_tables, write_version

FAST = ("--scheduler", "synchronous", "--no-progress")
DIM = 4


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def vector_list(rows: np.ndarray, fixed: bool) -> pa.Array:
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])
    return pa.array([list(map(float, r)) for r in rows], type=pa.list_(pa.float32()))


def table(kind: str, rows: np.ndarray) -> pa.Table:
    """``list``: id + vector; ``scalar``: id + v0..; ``both``: id + vector + v0..; ``list_only_v``: id + vector + name."""
    n = len(rows)
    cols: dict[str, object] = {"id": pa.array(np.arange(n, dtype=np.int64))}
    if kind in ("list", "both", "list_only_v"):
        cols["vector"] = vector_list(rows, fixed=True)
    if kind in ("scalar", "both"):
        cols.update({f"v{j}": rows[:, j] for j in range(rows.shape[1])})
    if kind == "list_only_v":
        cols["name"] = pa.array([f"n{i}" for i in range(n)])
    return pa.table(cols)


# the tester's report: `dstab export` (default layout) then import with --vector-columns 'v*'
def test_exported_list_layout_with_scalar_glob(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    T, W = random_tables(11, 120, 80, DIM)
    src = write_version(tmp_path / "v", T, W, chunk_rows=50)
    code, _, err = run_cli(capsys, "export", src, "--out", tmp_path / "pq", *FAST)
    assert code == 0, err
    out = tmp_path / "q9"
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "pq" / "items", "--users", tmp_path / "pq" / "users",
        "--vector-columns", "v*", "--out", out, *FAST,
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("dstab: error: items: "), err
    assert "'vector'" in err and "list column" in err and "--vector-column vector" in err
    assert nothing_written(out)
    # the advised command works
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "pq" / "items", "--users", tmp_path / "pq" / "users",
        "--vector-column", "vector", "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "items_kind, users_kind, extra, code_want, needles",
    [
        # glob matches a list column and scalar columns: the list column is skipped
        ("both", "scalar", ["--vector-columns", "v*"], 0, []),
        ("scalar", "both", ["--vector-columns", "v*"], 0, []),
        # only one side has a list column; the glob matches nothing else there
        ("list", "scalar", ["--vector-columns", "v*"], 2, ["items: ", "'vector'", "--vector-column vector"]),
        ("scalar", "list", ["--vector-columns", "v*"], 2, ["users: ", "'vector'", "--vector-column vector"]),
        # a glob matching a list column and a string column: neither is a vector column
        ("list_only_v", "scalar", ["--vector-columns", "v*"], 2, ["items: ", "'vector'", "--vector-column vector"]),
        # a named list of columns holding a list column is refused, not skipped
        (
            "both",
            "both",
            ["--vector-columns", "vector,v0,v1,v2,v3"],
            2,
            ["items: ", "'vector'", "--vector-column vector"],
        ),
        ("scalar", "scalar", ["--vector-columns", "v0,id,v1,v2"], 2, ["items: ", "'id'", "int64"]),
        # both vector options together: a usage error
        (
            "both",
            "both",
            ["--vector-column", "vector", "--vector-columns", "v*"],
            2,
            ["--vector-column", "--vector-columns", "not both"],
        ),
        ("list", "list", ["--vector-column", "vector", "--vector-columns", "v*"], 2, ["not both"]),
    ],
)
def test_vector_column_selection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], items_kind: str, users_kind: str, extra: list[str],
    code_want: int, needles: list[str],
):  # fmt: skip
    T, W = random_tables(12, 60, 40, DIM)
    pq.write_table(table(items_kind, T), tmp_path / "items.parquet")
    pq.write_table(table(users_kind, W), tmp_path / "users.parquet")
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items.parquet", "--users", tmp_path / "users.parquet", *extra, "--out", out, *FAST
    )  # fmt: skip
    assert code == code_want, err
    if code_want == 0:
        from tests.test_interchange import arrays

        got = arrays(str(out))
        np.testing.assert_array_equal(got["items/vectors"], T)
        np.testing.assert_array_equal(got["users/vectors"], W)
        return
    assert err.count("\n") == 1 and err.startswith("dstab: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert nothing_written(out)


@pytest.mark.parametrize(
    "fixed, what, row, needle",
    [
        (False, "element", 17, "column 'vector' has a null element at row 17"),
        (True, "element", 17, "column 'vector' has a null element at row 17"),
        (False, "element", 0, "column 'vector' has a null element at row 0"),
        (True, "element", 29, "column 'vector' has a null element at row 29"),
        (False, "list", 23, "column 'vector' is null at row 23"),
        (True, "list", 23, "column 'vector' is null at row 23"),
        (False, "id", 5, "column 'id' is null at row 5"),
    ],
)
def test_null_vector_values_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed: bool, what: str, row: int, needle: str
):  # fmt: skip
    T, W = random_tables(13, 30, 20, DIM)
    values: list[object] = [list(map(float, r)) for r in T]
    ids: list[object] = list(range(30))
    if what == "element":
        values[row] = [None, *values[row][1:]] if row % 2 == 0 else [*values[row][:-1], None]  # type: ignore[index]
    elif what == "list":
        values[row] = None
    else:
        ids[row] = None
    typ = pa.list_(pa.float32(), DIM) if fixed else pa.list_(pa.float32())
    # ten rows per row group: the row reported is the table's row, not the row group's
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.int64()), "vector": pa.array(values, typ)}),
        tmp_path / "items.parquet",
        row_group_size=10,
    )
    pq.write_table(table("list", W), tmp_path / "users.parquet")
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "import", "--items", tmp_path / "items.parquet", "--users", tmp_path / "users.parquet", "--out", out, *FAST
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("dstab: error: "), err
    assert needle in err and "items.parquet" in err and "upstream" in err, err
    assert nothing_written(out)
