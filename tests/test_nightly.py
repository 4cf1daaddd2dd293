"""`dstab nightly`: the plan, local directories, S3 (moto on loopback), an Icechunk repository, and the quality gates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import dstab
from dstab import nightly
from dstab.cli import main
from dstab.errors import VersionNotFoundError
from dstab.synth import synth, synth_like

from conftest import read_tables, relative_score_error

FAST = ["--scheduler", "threads", "--no-progress"]
DAYS = ("2026-11-01", "2026-11-02", "2026-11-03")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_days(raw: Path, noise: dict[str, float] | None = None) -> dstab.Version:
    """Three raw days: a synthetic version and retrains of it (noise-free unless ``noise[day]``)."""
    base = synth(raw / DAYS[0], items=1200, users=900, dim=8, seed=3, chunk_rows=400)
    for seed, day in enumerate(DAYS[1:], start=1):
        synth_like(raw / day, base, noise=(noise or {}).get(day, 0.0), seed=seed)
    return base


def stable_entries(directory: Path) -> list[str]:
    """Everything in a stable directory, hidden staging included."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ----------------------------------------------------------------------------- the plan: pure functions


def test_plan_is_the_days_in_order_each_onto_the_one_before():
    names = nightly.day_names(
        [("2026-11-02", True), (".2026-11-03.dstab-tmp-x", True), ("notes.txt", False), ("2026-11-01", True)]
    )
    assert names == ["2026-11-01", "2026-11-02"]
    days = nightly.plan("s3://b/p/", names, {"2026-11-01"})
    assert [(d.name, d.done, d.reference) for d in days] == [
        ("2026-11-01", True, None),
        ("2026-11-02", False, "2026-11-01"),
    ]
    assert days[1].raw == "s3://b/p/raw/2026-11-02" and days[1].stable == "s3://b/p/stable/2026-11-02"
    days = nightly.plan("/data", names, (), stable="s3://b/stable.icechunk")
    assert days[0].raw == "/data/raw/2026-11-01" and days[0].stable == "s3://b/stable.icechunk/2026-11-01"


def test_gates_name_the_first_measure_crossed():
    gates = nightly.Gates(max_score_error=1e-5, max_drift=0.1)
    assert gates.crossed({"score_error": 1e-6, "drift_after": 0.05}) is None
    assert gates.crossed({"score_error": 1e-6, "drift_after": None}) is None  # the first day: no drift to gate
    assert gates.crossed({"score_error": 2e-5, "drift_after": 0.5}) == ("score error", "--max-score-error", 2e-5, 1e-5)
    assert gates.crossed({"score_error": 1e-6, "drift_after": 0.5}) == ("drift after", "--max-drift", 0.5, 0.1)
    measure, _, value, _ = gates.crossed({"score_error": math.nan, "drift_after": 0.0})
    assert measure == "score error" and math.isnan(value)  # not a number crosses
    assert nightly.Gates().crossed({"score_error": 1.0, "drift_after": 9.0}) is None


# ----------------------------------------------------------------------------- a local directory


def test_nightly_local_in_order_skips_done_then_takes_a_new_day(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    base = make_days(tmp_path / "raw")
    code, out, err = run(capsys, "nightly", tmp_path, *FAST)
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith("  ")] == list(DAYS)
    T0, W0 = read_tables(str(tmp_path / "raw" / DAYS[0]))
    first = read_tables(str(tmp_path / "stable" / DAYS[0]))[0]
    for day in DAYS:
        T, W = read_tables(str(tmp_path / "stable" / day))
        assert relative_score_error(T0, W0, T, W) < 1e-5
        assert np.linalg.norm(T - first) / np.linalg.norm(first) < 1e-4  # noise-free retrains land on day 1
    assert dstab.open_version(tmp_path / "stable" / DAYS[2]).attrs["reference"].endswith(DAYS[1])
    # the second night: every day skipped, one JSON object saying so
    code, out, err = run(capsys, "nightly", tmp_path, "--json", *FAST)
    data = json.loads(out)
    assert code == 0 and (data["ok"], data["done"], data["skipped"], data["failed"]) == (True, 0, 3, 0)
    assert err.count("already stabilized, skipped") == 3
    # a new day: only it is stabilized, onto the last one
    synth_like(tmp_path / "raw" / "2026-11-04", base, noise=0.0, seed=9)
    code, out, err = run(capsys, "nightly", tmp_path, "--json", *FAST)
    data = json.loads(out)
    assert code == 0 and (data["done"], data["skipped"]) == (1, 3)
    new = data["days"][-1]
    assert new["name"] == "2026-11-04" and new["status"] == "done" and new["rank"] == 8
    assert new["drift_after"] < 1e-4 < new["drift_before"] and new["score_error"] < 1e-5
    assert new["out"] == str(tmp_path / "stable" / "2026-11-04")
    assert stable_entries(tmp_path / "stable") == [*DAYS, "2026-11-04"]


def test_nightly_verbose_shows_the_plan_and_quiet_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_days(tmp_path / "raw")
    code, out, err = run(capsys, "-v", "nightly", tmp_path, "--scheduler", "threads", "--no-progress")
    assert code == 0 and "nightly: 3 days under" in err and f"todo {tmp_path / 'raw' / DAYS[1]}" in err
    assert f"{DAYS[1]}: stabilizing (onto 1 x {DAYS[0]})" in err
    assert f"{DAYS[2]}: stabilizing (onto 0.5 x {DAYS[1]} + 0.5 x {DAYS[0]})" in err  # the default policy: mix
    code, out, err = run(capsys, "nightly", tmp_path, "-q", "--scheduler", "threads")
    assert code == 0 and err == "" and out == ""


def test_nightly_to_another_stable_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_days(tmp_path / "raw")
    code, _, err = run(capsys, "nightly", tmp_path, "--stable", tmp_path / "elsewhere", *FAST)
    assert code == 0, err
    assert stable_entries(tmp_path / "elsewhere") == list(DAYS) and not (tmp_path / "stable").exists()


def test_nightly_into_an_icechunk_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """--out-repo REPO.icechunk: each day a version group of the repository, published by open_version / Staging as any other."""
    pytest.importorskip("icechunk")
    make_days(tmp_path / "raw", noise={DAYS[2]: 0.5})
    repo = tmp_path / "stable.icechunk"
    code, _, err = run(capsys, "nightly", tmp_path, "--out-repo", repo, "--max-drift", "0.05", *FAST)
    assert code == 3 and f"{DAYS[2]}: drift after" in err
    for day in DAYS[:2]:
        assert dstab.open_version(f"{repo}/{day}").attrs["kind"] == "stabilized"
    with pytest.raises(VersionNotFoundError):
        dstab.open_version(f"{repo}/{DAYS[2]}")
    # the next night finds the two days done in the repository
    code, out, err = run(capsys, "nightly", tmp_path, "--out-repo", repo, "--json", *FAST)
    data = json.loads(out)
    assert code == 0 and (data["done"], data["skipped"]) == (1, 2), err
    assert dstab.open_version(f"{repo}/{DAYS[2]}").attrs["reference"].endswith(DAYS[1])


# ----------------------------------------------------------------------------- quality gates


def test_max_drift_gate_stops_the_night_and_publishes_nothing_of_that_day(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    make_days(tmp_path / "raw", noise={DAYS[2]: 0.5})  # day 3: a retrain far from day 2
    code, out, err = run(capsys, "nightly", tmp_path, "--max-drift", "0.05", *FAST)
    assert code == 3
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith(f"dstab: error: {DAYS[2]}: drift after ")
        and "--max-drift 0.05" in line
        and "not published" in line
    )
    value = float(line.split("drift after ")[1].split()[0])
    assert value > 0.05
    # the days before it stay published; nothing of day 3 (no version, no staging)
    assert stable_entries(tmp_path / "stable") == list(DAYS[:2])
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith("  ")] == list(DAYS[:2])
    # --json: the one object says which day, which measure, its value and the gate
    code, out, err = run(capsys, "nightly", tmp_path, "--max-drift", "0.05", "--json", *FAST)
    data = json.loads(out)
    assert code == 3 and data["ok"] is False and data["exit_code"] == 3
    assert (data["done"], data["skipped"], data["failed"]) == (0, 2, 1)
    failed = data["days"][-1]
    assert failed["name"] == DAYS[2] and failed["status"] == "failed"
    assert failed["gate"]["flag"] == "--max-drift" and failed["gate"]["value"] == pytest.approx(value, rel=1e-3)
    assert stable_entries(tmp_path / "stable") == list(DAYS[:2])
    # a looser gate lets it through
    code, _, err = run(capsys, "nightly", tmp_path, "--max-drift", "10", *FAST)
    assert code == 0, err
    assert stable_entries(tmp_path / "stable") == list(DAYS)


def test_max_score_error_gate_zero_fails_the_first_day(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_days(tmp_path / "raw")
    code, out, err = run(capsys, "nightly", tmp_path, "--max-score-error", "0", "--json", *FAST)
    data = json.loads(out)
    assert code == 3 and data["failed"] == 1 and data["days"][0]["gate"]["flag"] == "--max-score-error"
    assert data["days"][0]["name"] == DAYS[0] and data["days"][0]["gate"]["value"] > 0
    assert f"dstab: error: {DAYS[0]}: score error " in err and "--max-score-error 0" in err
    assert stable_entries(tmp_path / "stable") == []  # created as the parent of the staging, and left empty
    # a realistic gate passes every day
    code, out, err = run(capsys, "nightly", tmp_path, "--max-score-error", "1e-5", "--json", *FAST)
    assert code == 0 and json.loads(out)["done"] == 3, err


def test_nightly_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run(capsys, "nightly", tmp_path / "nothing", *FAST)
    assert code == 2 and "raw does not exist" in err and err.count("\n") == 1
    code, _, err = run(capsys, "nightly", tmp_path, "--max-drift", "lots", *FAST)
    assert code == 2 and "--max-drift" in err
    # a corrupt day in the middle: exit 2 naming it; the day before stays published, the JSON says which day failed
    import zarr

    make_days(tmp_path / "raw")
    zarr.open_group(str(tmp_path / "raw" / DAYS[1]), mode="r+")["items/vectors"][5, 2] = np.nan
    code, out, err = run(capsys, "nightly", tmp_path, "--json", *FAST)
    data = json.loads(out)
    assert code == 2 and "items/vectors row 5" in err and data["exit_code"] == 2
    assert [(d["name"], d["status"]) for d in data["days"]] == [(DAYS[0], "done"), (DAYS[1], "failed")]
    assert "row 5" in data["days"][1]["error"]
    assert stable_entries(tmp_path / "stable") == [DAYS[0]]


# ----------------------------------------------------------------------------- S3 (moto's server on loopback)


@pytest.mark.slow
def test_nightly_on_s3(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    s3fs = pytest.importorskip("s3fs")
    from test_object_storage import KEY, SECRET, moto_server

    make_days(tmp_path / "raw", noise={DAYS[2]: 0.5})
    with moto_server() as endpoint:
        options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("nightly-test")
        fs.put(str(tmp_path / "raw"), "nightly-test/night/raw", recursive=True)
        source, opts = "s3://nightly-test/night", json.dumps(options)
        code, out, err = run(
            capsys, "nightly", source, "--storage-options", opts, "--max-drift", "0.05", "--json", *FAST
        )
        assert KEY not in out + err and SECRET not in out + err
        data = json.loads(out)
        assert code == 3 and (data["done"], data["failed"]) == (2, 1), err
        fs.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("nightly-test/night/stable")) == list(
            DAYS[:2]
        )  # no day 3, no claim
        for day in DAYS[:2]:
            remote = dstab.open_version(f"{source}/stable/{day}", options)
            local = read_tables(str(tmp_path / "raw" / day))
            written = (np.asarray(remote.table("items").vectors[...]), np.asarray(remote.table("users").vectors[...]))
            assert relative_score_error(*local, *written) < 1e-5
        # the next night, without the gate: days 1 and 2 skipped, day 3 stabilized onto day 2
        code, out, err = run(capsys, "nightly", source, "--storage-options", opts, "--json", *FAST)
        data = json.loads(out)
        assert code == 0 and (data["done"], data["skipped"], data["failed"]) == (1, 2, 0), err
        assert (
            dstab.open_version(f"{source}/stable/{DAYS[2]}", options).attrs["reference"].endswith(f"stable/{DAYS[1]}")
        )
        code, out, _ = run(capsys, "nightly", source, "--storage-options", opts, "--json", *FAST)
        assert code == 0 and json.loads(out)["skipped"] == 3
        # no raw days there: one line naming the place
        code, _, err = run(capsys, "nightly", "s3://nightly-test/elsewhere", "--storage-options", opts, *FAST)
        assert code == 2 and "s3://nightly-test/elsewhere/raw does not exist" in err


# ----------------------------------------------------------------------------- found by a new user's trial


def test_day_names_that_are_not_dates_are_refused_not_ordered_by_guess():
    with pytest.raises(dstab.InputError, match=r"raw/2026-11-9 is not named by a date.*YYYY-MM-DD"):
        nightly.day_names([("2026-11-10", True), ("2026-11-9", True)], "raw")
    with pytest.raises(dstab.InputError, match=r"raw/latest is not named by a date"):
        nightly.day_names([("2026-11-10", True), ("latest", True)], "raw")
    assert nightly.day_names([("2026-11-10T06", True), ("2026-11-09_eu", True)]) == ["2026-11-09_eu", "2026-11-10T06"]
    assert nightly.day_names([("2026-11-02.zarr", True), ("2026-11-01.zarr", True)]) == [
        "2026-11-01.zarr",
        "2026-11-02.zarr",
    ]
    with pytest.raises(dstab.InputError, match=r"raw/2026-13-45 is not named by a date"):
        nightly.day_names([("2026-13-45", True)], "raw")


def test_late_days_are_those_before_a_day_done():
    days = nightly.plan("/d", ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"], ())
    assert [d.name for d in nightly.late_days(days, {"2026-11-01", "2026-11-03"})] == ["2026-11-02"]
    assert nightly.late_days(days, ()) == [] and nightly.late_days(days, {"2026-11-04"})[0].name == "2026-11-01"


def test_a_version_at_stable_that_is_not_the_stabilized_day_is_refused(tmp_path: Path, capsys) -> None:
    """A raw day at STABLE/<day> (or --stable pointing at raw) used to count as done: nothing was stabilized."""
    make_days(tmp_path / "src" / "raw")
    code, out, err = run(capsys, "nightly", tmp_path / "src", "--stable", tmp_path / "src" / "raw", "--json", *FAST)
    assert code == 2 and "where the raw days are" in json.loads(out)["error"]
    elsewhere = tmp_path / "elsewhere"
    synth(elsewhere / DAYS[0], items=50, users=40, dim=8, seed=9)  # a version, but not this day stabilized
    code, out, err = run(capsys, "nightly", tmp_path / "src", "--stable", elsewhere, "--json", *FAST)
    answer = json.loads(out)
    assert code == 2 and "holds a synthetic version, not the stabilized" in answer["error"]
    assert len(err.strip().splitlines()) == 1 and stable_entries(elsewhere) == [DAYS[0]]


def test_a_folder_of_the_users_at_stable_is_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    make_days(tmp_path / "src" / "raw")
    mine = tmp_path / "src" / "stable" / DAYS[0]
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    code, out, err = run(capsys, "nightly", tmp_path / "src", "--json", *FAST)
    answer = json.loads(out)
    assert code == 2 and "not a dstab output" in answer["error"] and "statistics pass" not in err
    assert (mine / "notes.txt").read_text() == "mine" and stable_entries(mine.parent) == [DAYS[0]]


def test_an_empty_night_says_so(tmp_path: Path, capsys) -> None:
    (tmp_path / "src" / "raw").mkdir(parents=True)
    code, out, err = run(capsys, "nightly", tmp_path / "src", *FAST)
    assert code == 0 and "no days under" in err


def test_a_moved_source_keeps_its_days_done(tmp_path: Path, capsys) -> None:
    """Found by a second trial: lineage records absolute paths, so a moved SOURCE made every day look foreign."""
    make_days(tmp_path / "src" / "raw")
    assert run(capsys, "nightly", tmp_path / "src", *FAST)[0] == 0
    (tmp_path / "src").rename(tmp_path / "moved")
    code, out, err = run(capsys, "nightly", tmp_path / "moved", "--json", *FAST)
    assert code == 0 and json.loads(out)["skipped"] == len(DAYS), err


def test_stable_places_refused_before_any_work(tmp_path: Path, capsys) -> None:
    make_days(tmp_path / "src" / "raw")
    (tmp_path / "afile").write_text("mine")
    code, out, err = run(capsys, "nightly", tmp_path / "src", "--stable", tmp_path / "afile", *FAST)
    assert code == 2 and "is a file" in err and (tmp_path / "afile").read_text() == "mine"
    mine = tmp_path / "src" / "stable" / DAYS[-1]  # the LAST day: found before the first is stabilized
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    code, out, err = run(capsys, "nightly", tmp_path / "src", *FAST)
    assert code == 2 and "not a dstab output" in err and stable_entries(mine.parent) == [DAYS[-1]]
    code, out, err = run(capsys, "nightly", tmp_path / "src", "--max-drift", "inf", *FAST)
    assert code == 2 and "finite number" in err
