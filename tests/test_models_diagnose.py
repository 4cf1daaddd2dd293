"""`dstab diagnose` for any embedding model: named tables, two-sided or symmetric, against plain numpy spectra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import zarr

import dstab
from dstab.cli import main
from dstab.diagnose import diagnose
from dstab.plots import PNG_SIGNATURE, is_dstab_plot, plot_diagnosis, plot_report
from dstab.store.model import from_tables

FAST = ("--scheduler", "synchronous", "--no-progress")
DIM = 16
RTOL = 1e-4  # numerical rank threshold of these tests: far above the float32/Gram noise floor, far below the signal
EPS64 = float(np.finfo(np.float64).eps)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_tables(path: Path, tables: dict[str, np.ndarray], chunk_rows: int = 64) -> Path:
    """A raw version of named tables, written with plain zarr."""
    group = zarr.open_group(str(path), mode="w")
    for name, X in tables.items():
        group.create_array(f"{name}/vectors", shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype)[...] = X
    return path


def sv(X: np.ndarray) -> np.ndarray:
    """The reference: singular values by a float64 SVD, the first DIM of them (descending)."""
    return np.linalg.svd(np.asarray(X, dtype=np.float64), compute_uv=False)[:DIM]


def effective_rank(s: np.ndarray) -> float:
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def sv_tolerance(rows: int, top: float) -> float:
    """How far dstab's singular values may be from the SVD's.

    dstab takes them from float64 Grams (summed over ``rows`` rows), or from the
    core of two Gram factors: rounding the Gram moves its eigenvalues by at most
    about ``rows * dim * eps64 * top²``, and a singular value by the square root
    of that near zero (smaller ones are where the bound bites), so
    ``sqrt(rows * dim * eps64) * top``, with a factor 4 for the SVD's own rounding and the core's products.
    """
    return 4.0 * np.sqrt(rows * DIM * EPS64) * top


def check_measures(got: dict, want_sv: np.ndarray, rows: int, name: str) -> None:
    """``got`` (one spectrum's measures) against the numpy reference spectrum, within the bounds above."""
    atol = sv_tolerance(rows, want_sv[0])
    np.testing.assert_allclose(got["singular_values"], want_sv, rtol=0, atol=atol, err_msg=name)
    # the reference must not sit within the tolerance of the threshold, or the rank is not decided by the data
    assert np.all(np.abs(want_sv - RTOL * want_sv[0]) > 2 * atol), name
    assert got["numerical_rank"] == int(np.count_nonzero(want_sv > RTOL * want_sv[0])), name
    # effective rank: each p_i = σ_i/Σσ moves by at most dp = 2 DIM atol / Σσ, and the entropy by at most
    # Σ dp (1 + |log p_i|) over the nonzero p (p below dp count with log dp)
    want = effective_rank(want_sv)
    p = want_sv / want_sv.sum()
    dp = 2 * DIM * atol / want_sv.sum()
    dh = float(np.sum(dp * (1 + np.abs(np.log(np.maximum(p, dp))))))
    assert abs(got["effective_rank"] - want) <= want * np.expm1(dh) + 1e-12, name
    assert got["collapsed"] == (want < 0.25 * DIM), name
    assert got["dim"] == DIM and got["rtol"] == RTOL


# ----------------------------------------------------------------------------- a two-sided model of three tables


@pytest.fixture(scope="module")
def two_sided(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """users scored against items and creators; creators collapsed to rank 2."""
    rng = np.random.default_rng(12)
    decay = np.exp(-np.arange(DIM) / 6.0)  # a trained-looking spectrum: not collapsed
    tables = {
        "items": (rng.normal(size=(260, DIM)) * decay).astype(np.float32),
        "users": (rng.normal(size=(330, DIM)) * decay[::-1]).astype(np.float32),
        "creators": (rng.normal(size=(90, 2)) @ rng.normal(size=(2, DIM))).astype(np.float32),
    }
    return write_tables(tmp_path_factory.mktemp("models") / "three", tables), tables


def test_two_sided_three_tables_against_numpy(two_sided, capsys: pytest.CaptureFixture[str]):
    path, tables = two_sided
    version = dstab.open_version(path)
    candidates = np.vstack([tables["items"], tables["creators"]]).astype(np.float64)
    scores = tables["users"].astype(np.float64) @ candidates.T  # every score of the model
    rows = sum(len(X) for X in tables.values())
    code, out, err = run_cli(
        capsys, "diagnose", path, "--sides", "users:items,creators", "--json", "--rtol", RTOL, *FAST
    )
    assert code == 0, err
    got_cli = json.loads(out)
    got_api = diagnose(version, sides="users:items,creators", rtol=RTOL)
    for got in (got_cli, got_api):
        assert got["structure"] == {"kind": "two-sided", "query": ["users"], "candidate": ["items", "creators"]}
        assert list(got["tables"]) == ["items", "users", "creators"] and "pooled" not in got
        for name, X in tables.items():
            check_measures(got[name], sv(X), rows, name)
            assert got["tables"][name] == got[name]
        check_measures(got["interaction"], sv(scores), rows, "interaction")
    assert got_cli["creators"]["collapsed"] and got_cli["creators"]["numerical_rank"] == 2
    assert not got_cli["items"]["collapsed"] and not got_cli["users"]["collapsed"]

    # as text: the structure, one line per table and the interaction, the collapsed table flagged
    code, text, _ = run_cli(capsys, "diagnose", path, "--sides", "users:items,creators", "--rtol", RTOL, *FAST)
    lines = text.splitlines()
    assert code == 0 and "two-sided (users scored against items,creators)" in lines[0]
    assert [line.split()[0] for line in lines if "numerical rank" in line] == [
        "items",
        "users",
        "creators",
        "interaction",
    ]
    assert [line.split()[0] for line in lines if line.endswith("COLLAPSED")] == ["creators"]


def test_no_structure_measures_each_table_alone(two_sided, capsys: pytest.CaptureFixture[str]):
    """Three tables, nothing recorded, no flag: each table is diagnosed, no interaction, and the text says why."""
    path, tables = two_sided
    code, out, err = run_cli(capsys, "diagnose", path, "--json", "--rtol", RTOL, *FAST)
    assert code == 0, err
    got = json.loads(out)
    assert got["structure"] is None and "interaction" not in got and "pooled" not in got
    for name, X in tables.items():
        check_measures(got[name], sv(X), len(X), name)
    code, text, err = run_cli(capsys, "diagnose", path, *FAST)
    assert code == 0 and err == ""
    assert "no interaction is measured" in text and "--sides QUERY:CANDIDATE or --symmetric" in text


def test_recorded_structure_is_used(two_sided, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A stabilized version records its structure: diagnose reads it, and its interaction is the raw one's, kept."""
    path, tables = two_sided
    with dask_synchronous():
        stable = dstab.stabilize(dstab.open_version(path), sides="users:items,creators").to_zarr(tmp_path / "stable")
    got = diagnose(stable, rtol=RTOL)
    assert got["structure"] == {"kind": "two-sided", "query": ["users"], "candidate": ["items", "creators"]}
    raw = sv(tables["users"].astype(np.float64) @ np.vstack([tables["items"], tables["creators"]]).astype(np.float64).T)
    k = stable.dim  # the rank step dropped nothing the scores have: the stabilized core is the raw one's top k
    assert k == DIM
    # the stabilized tables are stored in float32 again: each entry rounds by eps32/2, which moves the scores by at
    # most eps32 sqrt(dim) ||X|| ||Y|| = eps32 sqrt(dim) σ_max (the stabilized sides are balanced); a factor 4 of margin
    atol = (
        sv_tolerance(sum(len(X) for X in tables.values()), raw[0])
        + 4 * np.sqrt(DIM) * float(np.finfo(np.float32).eps) * raw[0]
    )
    np.testing.assert_allclose(got["interaction"]["singular_values"], raw[:k], rtol=0, atol=atol)
    # an explicit flag still wins over the recorded structure
    assert diagnose(stable, symmetric=True, rtol=RTOL)["structure"]["kind"] == "symmetric"


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sides", "users:items"], "leaves out the table 'creators'"),
        (["--sides", "users:items,nope"], "names the table 'nope'"),
        (["--sides", "users"], "write the query tables, a colon"),
        (["--sides", "users:items,creators", "--symmetric"], "not allowed with argument"),
    ],
)
def test_bad_structure_flags_are_one_line_before_any_work(
    two_sided, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], words: str
):
    path, _ = two_sided

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("a cluster or the statistics pass started before the structure was checked")

    # where cmd_diagnose looks them up when it runs (dstab.diagnose by module: the package's dstab.diagnose is the function)
    monkeypatch.setattr("dstab.cli.commands.scheduler_from_args", boom)
    monkeypatch.setattr(sys.modules["dstab.diagnose"], "diagnose", boom)
    code, out, err = run_cli(capsys, "diagnose", path, *flags, *FAST)
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_a_loose_table_still_works(two_sided, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _, tables = two_sided
    X = tables["creators"]
    group = zarr.open_group(str(tmp_path / "t"), mode="w")
    group.create_array("vectors", shape=X.shape, chunks=(32, DIM), dtype=X.dtype)[...] = X
    code, out, err = run_cli(capsys, "diagnose", tmp_path / "t", "--json", "--rtol", RTOL, *FAST)
    assert code == 0, err
    got = json.loads(out)
    check_measures(got["table"], sv(X), len(X), "table")
    assert got["structure"] is None and "interaction" not in got
    assert run_cli(capsys, "diagnose", tmp_path / "t", "--symmetric", *FAST)[0] == 0
    code, _, err = run_cli(capsys, "diagnose", tmp_path / "t", "--sides", "a:b", *FAST)
    assert code == 2 and "is a single table" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- a symmetric model of four fields


@pytest.fixture(scope="module")
def symmetric(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Four fields of one factorization machine; "lang" has 3 distinct rows, repeated: rank 3 of 16, collapsed."""
    rng = np.random.default_rng(5)
    decay = np.exp(-np.arange(DIM) / 8.0)
    distinct = rng.normal(size=(3, DIM)).astype(np.float32)
    tables = {
        "words": (rng.normal(size=(300, DIM)) * decay).astype(np.float32),
        "docs": (rng.normal(size=(200, DIM)) * decay).astype(np.float32),
        "authors": (rng.normal(size=(80, DIM))).astype(np.float32),
        "lang": distinct[rng.integers(0, 3, size=150)],
    }
    return write_tables(tmp_path_factory.mktemp("models") / "fm", tables), tables


def test_symmetric_four_fields_against_numpy(symmetric, capsys: pytest.CaptureFixture[str]):
    path, tables = symmetric
    pooled = np.vstack(list(tables.values()))
    rows = len(pooled)
    code, out, err = run_cli(capsys, "diagnose", path, "--symmetric", "--json", "--rtol", RTOL, *FAST)
    assert code == 0, err
    got_cli = json.loads(out)
    got_api = diagnose(dstab.open_version(path), symmetric=True, rtol=RTOL)
    for got in (got_cli, got_api):
        assert got["structure"] == {"kind": "symmetric", "tables": ["authors", "docs", "lang", "words"]}
        assert "interaction" not in got
        check_measures(got["pooled"], sv(pooled), rows, "pooled")
        for name, X in tables.items():
            check_measures(got[name], sv(X), rows, name)
    lang = got_cli["lang"]
    assert lang["numerical_rank"] == 3 and lang["effective_rank"] <= 3 + 1e-9 and lang["collapsed"]
    assert [n for n, m in got_cli["tables"].items() if m["collapsed"]] == ["lang"] and not got_cli["pooled"][
        "collapsed"
    ]
    code, text, _ = run_cli(capsys, "diagnose", path, "--symmetric", "--rtol", RTOL, *FAST)
    assert code == 0 and text.splitlines()[0].endswith("symmetric (authors, docs, lang, words)")
    assert [line.split()[0] for line in text.splitlines() if line.endswith("COLLAPSED")] == ["lang"]
    assert "collapsed fields: lang" in text and "pooled" in text


def test_one_table_version_is_symmetric_by_default():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(120, DIM)) * np.exp(-np.arange(DIM) / 4.0)).astype(np.float32)
    got = diagnose(from_tables({"words": X}, chunk_rows=50), rtol=RTOL)
    assert got["structure"] == {"kind": "symmetric", "tables": ["words"]}
    check_measures(got["words"], sv(X), len(X), "words")
    assert (
        got["pooled"]["singular_values"] == got["words"]["singular_values"]
    )  # one table: the pooled rows are its rows


# ----------------------------------------------------------------------------- plots


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE and is_dstab_plot(path)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0


def test_diagnosis_plots(two_sided, symmetric, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for label, (path, _), flags in (
        ("three", two_sided, ["--sides", "users:items,creators"]),
        ("fm", symmetric, ["--symmetric"]),
        ("alone", two_sided, []),
    ):
        target = tmp_path / f"{label}.png"
        code, out, err = run_cli(capsys, "diagnose", path, *flags, "--plot", target, *FAST)
        assert code == 0 and f"plot: {target}" in out, err
        assert_png(target)


def fake_report(names: list[str], *, kind: str, reference: bool) -> dict:
    """A stabilize report as the plots read it: spectra, drift and drift per dimension keyed by table name."""
    rng = np.random.default_rng(len(names))
    spectra = {n: sorted(rng.uniform(0.01, 10, size=DIM).tolist(), reverse=True) for n in names}
    report = {"url": f"{len(names)} tables", "structure": {"kind": kind}, "rank": DIM - 2, "score_error": 1e-7,
              "singular_values": sorted(rng.uniform(0.1, 100, size=DIM).tolist(), reverse=True), "side_spectra": spectra}  # fmt: skip
    if reference:
        report["drift"] = {n: {"before": float(rng.uniform(0.1, 1)), "after": float(rng.uniform(1e-4, 1e-2)),
                               "cosine_before": 0.3, "cosine_after": 0.99} for n in names}  # fmt: skip
        report["drift"][names[0]]["after"] = None  # a measure that could not be taken is skipped, not a crash
        report["drift_per_dim"] = {
            "before": rng.uniform(0.1, 1, DIM - 2).tolist(),
            "after": [None] + rng.uniform(1e-4, 1e-2, DIM - 3).tolist(),
        }
    return report


@pytest.mark.parametrize("n_tables", [1, 2, 5])
@pytest.mark.parametrize("reference", [True, False], ids=["drift", "no-reference"])
def test_report_plot_draws_for_any_number_of_tables(tmp_path: Path, n_tables: int, reference: bool):
    names = ["items", "users", "creators", "a rather long table name of some model", "tags"][:n_tables]
    for kind in ("two-sided", "symmetric"):
        target = tmp_path / f"{kind}.png"
        plot_report(fake_report(names, kind=kind, reference=reference), target)
        assert_png(target)


def test_report_plot_of_a_real_five_table_run(symmetric, tmp_path: Path):
    """A symmetric model of five tables, stabilized onto yesterday's: its report, drawn; the diagnosis too."""
    _, tables = symmetric
    rng = np.random.default_rng(8)
    five = dict(tables, extra=rng.normal(size=(60, DIM)).astype(np.float32))
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))  # today's retrain: yesterday's rotated, plus noise
    today = {n: (X @ q + 1e-3 * rng.normal(size=X.shape)).astype(np.float32) for n, X in five.items()}
    with dask_synchronous():
        ref = dstab.stabilize(from_tables(five, chunk_rows=64), symmetric=True).to_zarr(tmp_path / "ref")
        result = dstab.stabilize(from_tables(today, chunk_rows=64), ref, symmetric=True)
        diagnosis = diagnose(from_tables(today, chunk_rows=64), symmetric=True)
    assert set(result.report["side_spectra"]) == set(five) and set(result.report["drift"]) == set(five)
    plot_report(result.report, tmp_path / "report.png")
    assert_png(tmp_path / "report.png")
    plot_diagnosis(diagnosis, tmp_path / "diagnosis.png")
    assert_png(tmp_path / "diagnosis.png")


def dask_synchronous():
    import dask

    return dask.config.set(scheduler="synchronous")
