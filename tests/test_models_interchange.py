"""Import, export and synth for versions of any named tables (issue 12), checked against plain numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import dstab
from dstab.cli import main
from dstab.interchange import import_version, open_parquet
from dstab.structure import Structure, symmetric, two_sided

FAST = ("--scheduler", "synchronous", "--no-progress")
# float32's unit roundoff: one rounding of a value to float32 moves it by at most U32 times its size
U32 = 2.0**-24


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def dstab_cli(cwd: Path, *args: object) -> str:
    """The installed `dstab` command in a subprocess (on the threaded scheduler, for commands that run one); its stdout."""
    exe = str(Path(sys.executable).with_name("dstab"))
    threads = [] if args[0] == "log" else ["--scheduler", "threads", "--no-progress"]
    proc = subprocess.run(
        [exe, *map(str, args), *threads], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tables_of(path: Path | str) -> dict[str, dict[str, np.ndarray]]:
    """Every table of a version on disk, read with plain zarr: {name: {"vectors": ..., "ids": ..., "counts": ...}}."""
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name, sub in group.groups():
        if name != "transform":
            out[name] = {key: np.asarray(sub[key][...]) for key in ("vectors", "ids", "counts") if key in sub}
    return out


def recorded_structure(path: Path | str) -> Structure | None:
    return Structure.from_attrs(dict(zarr.open_group(str(path), mode="r").attrs["dstab"]).get("structure"))


def read_export(directory: Path, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """ids and vectors of one exported table, read back with pyarrow alone (files in name order)."""
    parts = [pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))]
    ids = np.concatenate([t.column("id").to_numpy(zero_copy_only=False) for t in parts])
    if layout == "list":
        vectors = np.concatenate([np.stack(t.column("vector").to_numpy(zero_copy_only=False)) for t in parts])
    else:
        width = parts[0].num_columns - 1
        vectors = np.concatenate([np.column_stack([t.column(f"v{j}").to_numpy() for j in range(width)]) for t in parts])
    return ids, vectors


def hidden_litter(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*"))


def model_tables(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(size=(n, 5)).astype(np.float32) for name, n in (("users", 50), ("items", 70), ("creators", 30))
    }


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["list", "columns"])
def test_three_tables_npy_import_parquet_export_and_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
):
    X = model_tables(1)
    user_ids = np.arange(50, dtype=np.int64) * 7
    creator_ids = np.array([f"creator-{i}" for i in range(30)])
    for name, rows in X.items():
        np.save(tmp_path / f"{name}.npy", rows)
    np.save(tmp_path / "user_ids.npy", user_ids)
    np.save(tmp_path / "creator_ids.npy", creator_ids)
    code, _, err = run_cli(
        capsys, "import", "--table", f"users={tmp_path / 'users.npy'}", "--table-ids", f"users={tmp_path / 'user_ids.npy'}",
        "--items", tmp_path / "items.npy", "--table", f"creators={tmp_path / 'creators.npy'}",
        "--table-ids", f"creators={tmp_path / 'creator_ids.npy'}", "--sides", "users:items,creators",
        "--chunk-rows", 16, "--out", tmp_path / "v", *FAST,
    )  # fmt: skip
    assert code == 0, err
    expected = two_sided(["users"], ["items", "creators"])
    got = tables_of(tmp_path / "v")
    assert sorted(got) == ["creators", "items", "users"]
    for name, rows in X.items():
        np.testing.assert_array_equal(got[name]["vectors"], rows)
    np.testing.assert_array_equal(got["users"]["ids"], user_ids)
    assert got["creators"]["ids"].tolist() == creator_ids.tolist() and "ids" not in got["items"]
    assert recorded_structure(tmp_path / "v") == expected and dstab.open_version(tmp_path / "v").structure == expected
    attrs = dstab.open_version(tmp_path / "v").attrs
    assert attrs["sources"]["creators"]["ids"] == str(tmp_path / "creator_ids.npy")
    code, log, _ = run_cli(capsys, "log", tmp_path / "v")
    assert f"creators {tmp_path / 'creators.npy'} (ids from {tmp_path / 'creator_ids.npy'})" in log
    assert "recorded as two-sided (users scored against items,creators)" in log

    # export: one directory per table, read back with pyarrow alone
    code, _, err = run_cli(capsys, "export", tmp_path / "v", "--out", tmp_path / "pq", "--layout", layout, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["_dstab.json", "creators", "items", "users"]
    marker = json.loads((tmp_path / "pq" / "_dstab.json").read_text())
    assert marker["complete"] and sorted(marker["tables"]) == ["creators", "items", "users"]
    assert Structure.from_attrs(marker["structure"]) == expected
    row_numbers = np.arange(70)  # a table without ids exports its row numbers
    for name, ids in (("users", user_ids), ("items", row_numbers), ("creators", creator_ids)):
        got_ids, vectors = read_export(tmp_path / "pq" / name, layout)
        assert got_ids.tolist() == ids.tolist()
        np.testing.assert_array_equal(vectors, X[name])

    # and back in from Parquet, the structure said again
    columns = ["--vector-columns", "v*"] if layout == "columns" else []
    code, _, err = run_cli(
        capsys, "import", *(a for n in X for a in ("--table", f"{n}={tmp_path / 'pq' / n}")), *columns,
        "--sides", "users:items,creators", "--out", tmp_path / "back", *FAST,
    )  # fmt: skip
    assert code == 0, err
    back = tables_of(tmp_path / "back")
    for name, ids in (("users", user_ids), ("items", row_numbers), ("creators", creator_ids)):
        np.testing.assert_array_equal(back[name]["vectors"], X[name])
        assert back[name]["ids"].tolist() == ids.tolist()
    assert recorded_structure(tmp_path / "back") == expected


def test_one_table_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rng = np.random.default_rng(2)
    words = rng.normal(size=(200, 4))  # float64 stays float64
    vocab = np.array([f"w{i:03d}" for i in range(200)])
    np.save(tmp_path / "words.npy", words)
    np.save(tmp_path / "vocab.npy", vocab)
    code, _, err = run_cli(
        capsys, "import", "--table", f"words={tmp_path / 'words.npy'}", "--table-ids", f"words={tmp_path / 'vocab.npy'}",
        "--symmetric", "--chunk-rows", 64, "--out", tmp_path / "v", *FAST,
    )  # fmt: skip
    assert code == 0, err
    got = tables_of(tmp_path / "v")
    assert list(got) == ["words"] and got["words"]["vectors"].dtype == np.float64
    np.testing.assert_array_equal(got["words"]["vectors"], words)
    assert got["words"]["ids"].tolist() == vocab.tolist()
    assert recorded_structure(tmp_path / "v") == symmetric(["words"])
    code, log, _ = run_cli(capsys, "log", tmp_path / "v")
    assert f"imported from words {tmp_path / 'words.npy'} (ids from {tmp_path / 'vocab.npy'})" in log
    assert "items" not in log and "users" not in log

    code, _, err = run_cli(capsys, "export", tmp_path / "v", "--out", tmp_path / "pq", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["_dstab.json", "words"]
    # the Python API takes any names too
    back = import_version(
        tmp_path / "back",
        {"words": open_parquet(str(tmp_path / "pq" / "words"), label="words")},
        structure=symmetric(["words"]),
    )
    assert back.names == ("words",) and back.structure == symmetric(["words"])
    np.testing.assert_array_equal(np.asarray(back.table("words").vectors[...]), words)
    assert np.asarray(back.table("words").ids[...]).tolist() == vocab.tolist()


# ----------------------------------------------------------------------------- synth


def test_synth_symmetric_tables_stabilize_and_retrain(tmp_path: Path):
    """synth --table --symmetric, stabilize (subprocess, structure read from the version), synth --like."""
    out = dstab_cli(
        tmp_path, "synth", "v", "--table", "words=600", "--table", "tags=300", "--dim", 6, "--rank", 4, "--symmetric",
        "--chunk-rows", 128, "--counts",
    )  # fmt: skip
    assert "symmetric (words, tags)" in out
    raw = tables_of(tmp_path / "v")
    assert recorded_structure(tmp_path / "v") == symmetric(["words", "tags"])
    ids = np.concatenate([raw["words"]["ids"], raw["tags"]["ids"]])
    assert len(np.unique(ids)) == 900 and all("counts" in t for t in raw.values())  # ids unique across tables
    X = np.concatenate([raw["words"]["vectors"], raw["tags"]["vectors"]]).astype(np.float64)
    sv = np.linalg.svd(X, compute_uv=False)
    assert sv[4] < 1e-5 * sv[0]  # one shared rank-4 basis for both tables: the pooled rows have rank 4
    log = dstab_cli(tmp_path, "log", "v")
    assert "synthetic: 600 rows of words and 300 of tags, width 6, symmetric (words, tags), scores of rank 4" in log

    # stabilize: every dot product, within and across tables, kept
    out = dstab_cli(tmp_path, "stabilize", "v", "--out", "s")
    assert "rank 4 of 6" in out and "symmetric (words, tags)" in out
    stable = tables_of(tmp_path / "s")
    Y = np.concatenate([stable["words"]["vectors"], stable["tags"]["vectors"]]).astype(np.float64)
    assert Y.shape == (900, 4)
    # bound: a stabilized row is x @ M (M: 6 x 4, orthonormal columns) in float32 arithmetic; each of its k = 4
    # coordinates is a length-e (e = 6) dot product, off by at most (e + 1) U32 |x| (the sum's rounding, gamma_e,
    # and M's own rounding to float32), so a dot product of two rows moves by at most 2 sqrt(k) (e + 1) U32 |x||y|.
    # What is dropped off the 4 axes is the rows' own float32 rounding plus the axes' error (about U32 |X|_F / s_4),
    # and it enters a dot product squared.
    e, k = 6, 4
    norms = np.linalg.norm(X, axis=1)
    off = U32 * (1 + np.linalg.norm(X) / sv[3])
    tol = (2 * np.sqrt(k) * (e + 1) * U32 + off**2) * np.outer(norms, norms)
    assert np.all(np.abs(Y @ Y.T - X @ X.T) <= tol)

    # a retrain: every table times one random orthogonal matrix, the dot products the same
    out = dstab_cli(tmp_path, "synth", "r", "--like", "v", "--seed", 5)
    assert "symmetric (words, tags)" in out
    retrain = tables_of(tmp_path / "r")
    X2 = np.concatenate([retrain["words"]["vectors"], retrain["tags"]["vectors"]]).astype(np.float64)
    assert np.abs(X2 - X).max() > 0.1 * np.abs(X).max()  # the basis moved
    # bound: each row x Q (Q orthogonal to float64 precision) rounded to float32 once
    assert np.all(np.abs(X2 @ X2.T - X @ X.T) <= 2.5 * U32 * np.outer(norms, norms))
    for name in ("words", "tags"):
        np.testing.assert_array_equal(retrain[name]["ids"], raw[name]["ids"])
        np.testing.assert_array_equal(retrain[name]["counts"], raw[name]["counts"])
    assert recorded_structure(tmp_path / "r") == symmetric(["words", "tags"])
    assert "every table rotated by one random orthogonal matrix" in dstab_cli(tmp_path, "log", "r")


def test_synth_two_sided_tables_and_retrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(
        capsys, "synth", tmp_path / "v", "--table", "users=120", "--table", "items=150", "--table", "creators=40",
        "--sides", "users:items,creators", "--dim", 5, "--rank", 3, "--chunk-rows", 32, *FAST,
    )  # fmt: skip
    assert code == 0, err
    structure = two_sided(["users"], ["items", "creators"])
    assert recorded_structure(tmp_path / "v") == structure
    raw = tables_of(tmp_path / "v")
    assert len(np.unique(np.concatenate([t["ids"] for t in raw.values()]))) == 310
    W = raw["users"]["vectors"].astype(np.float64)
    C = np.concatenate([raw["items"]["vectors"], raw["creators"]["vectors"]]).astype(np.float64)
    s = np.linalg.svd(W @ C.T, compute_uv=False)
    assert s[3] < 1e-5 * s[0]  # scores of rank 3
    code, _, err = run_cli(
        capsys, "synth", tmp_path / "r", "--like", tmp_path / "v", "--seed", 2, "--churn", 0.25, *FAST
    )
    assert code == 0, err
    assert recorded_structure(tmp_path / "r") == structure
    new = tables_of(tmp_path / "r")
    # churn per table: about a quarter of each table's ids replaced by ids it never had, still unique
    for name, n in (("users", 120), ("items", 150), ("creators", 40)):
        kept = np.isin(new[name]["ids"], raw[name]["ids"])
        assert len(np.unique(new[name]["ids"])) == n and 0.45 < kept.mean() < 0.95
    # the rows that stayed score as before: candidate tables times G, users times G^-T
    # bound: each side rounded to float32 once after a basis change of condition 10 (random_basis's default)
    Wn = new["users"]["vectors"].astype(np.float64)
    for name in ("items", "creators"):
        Cn = new[name]["vectors"].astype(np.float64)
        u_new, u_old = np.nonzero(new["users"]["ids"][:, None] == raw["users"]["ids"][None, :])
        c_new, c_old = np.nonzero(new[name]["ids"][:, None] == raw[name]["ids"][None, :])
        old = W[u_old] @ raw[name]["vectors"].astype(np.float64)[c_old].T
        got = Wn[u_new] @ Cn[c_new].T
        bound = (
            2.5
            * U32
            * 10
            * np.outer(np.linalg.norm(W[u_old], axis=1), np.linalg.norm(raw[name]["vectors"][c_old], axis=1))
        )
        assert np.all(np.abs(got - old) <= bound)
    code, log, _ = run_cli(capsys, "log", tmp_path / "v")
    assert "synthetic: 120 rows of users, 150 of items and 40 of creators, width 5, two-sided" in log

    # one table: symmetric by default, recorded
    code, _, err = run_cli(capsys, "synth", tmp_path / "one", "--table", "words=70", "--dim", 3, *FAST)
    assert code == 0, err
    assert recorded_structure(tmp_path / "one") == symmetric(["words"])
    code, log, _ = run_cli(capsys, "log", tmp_path / "one")
    assert "synthetic: 70 rows of words, width 3, scores of rank 3" in log


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(3)
    np.save(tmp_path / "w.npy", rng.normal(size=(20, 4)).astype(np.float32))
    np.save(tmp_path / "w5.npy", rng.normal(size=(20, 5)).astype(np.float32))
    np.save(tmp_path / "ids.npy", np.arange(20))
    like = zarr.open_group(str(tmp_path / "like"), mode="w")
    like.create_array("words/vectors", shape=(20, 4), chunks=(8, 4), dtype=np.float32)[...] = rng.normal(size=(20, 4))
    like.create_array("words/ids", shape=(20,), chunks=(8,), dtype=np.int64)[...] = np.arange(20)
    like.create_array("tags/vectors", shape=(10, 4), chunks=(8, 4), dtype=np.float32)[...] = rng.normal(size=(10, 4))
    paths = {"W": "w.npy", "W5": "w5.npy", "IDS": "ids.npy", "V": "like"}
    return {key: str(tmp_path / name) for key, name in paths.items()}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["import", "--table", "words"], "write --table NAME=SRC"),
        (["import", "--table", "=W"], "'' cannot name a table"),
        (["import", "--table", "a/b=W"], "'a/b' cannot name a table"),
        (["import", "--table", "transform=W"], "'transform' cannot name a table"),
        (["import", "--items", "W", "--table", "items=W"], "'items' is given twice (--items and --table items="),
        (["import", "--table", "a=W", "--table", "a=W"], "'a' is given twice"),
        (["import"], "import needs at least one table"),
        (["import", "--table", "words=W", "--table-ids", "tags=IDS"], "ids are given for the table 'tags'"),
        (["import", "--table", "words=W", "--sides", "words:items"], "names the table 'items'"),
        (["import", "--table", "a=W", "--table", "b=W5"], "a has width 4 but b has width 5"),
        (["import", "--table", "a=W", "--sides", "a:b", "--symmetric"], "not allowed with argument"),
        (["synth", "--table", "words=0", "--dim", "4"], "--table words=0: a table needs at least 1 row"),
        (["synth", "--table", "words=ten", "--dim", "4"], "ROWS must be a whole number"),
        (["synth", "--table", "a=10", "--table", "b=10", "--dim", "4"], "say which score against which"),
        (["synth", "--table", "transform=10", "--dim", "4", "--symmetric"], "'transform' cannot name a table"),
        (["synth", "--table", "a=10", "--dim", "4", "--sides", "a:b"], "names the table 'b'"),
        (["synth", "--table", "a=10"], "synth needs --dim"),
        (["synth", "--items", "10", "--table", "items=5", "--dim", "2"], "'items' is given twice"),
        (["synth", "--like", "V", "--table", "a=3"], "drop --table"),
        (["synth", "--like", "V"], "has the tables tags, words: say which score against which"),
        (["synth", "--like", "V", "--sides", "words:nouns"], "names the table 'nouns'"),
        (["synth", "--like", "V", "--symmetric", "--churn", "0.1"], "tags has none"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sources: dict[str, str], argv: list[str], words: str
):
    out = tmp_path / "out"

    def placed(arg: str) -> str:  # W, W5, IDS, V (alone or after NAME=) stand for the fixture's files
        name, sep, value = arg.rpartition("=")
        return f"{name}{sep}{sources.get(value, value)}"

    args = [placed(a) for a in argv]
    args = args[:1] + (["--out", str(out)] if argv[0] == "import" else [str(out)]) + args[1:]
    before = hidden_litter(tmp_path)
    code, _, err = run_cli(capsys, *args, *FAST)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists() and hidden_litter(tmp_path) == before
