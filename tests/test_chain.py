"""Long chains: the nightly policies, report --chain against numpy, eigenspace overlap, the rows that moved most."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dstab
from dstab import measures
from dstab.chain import chain_report
from dstab.cli import main as dstab_main
from dstab.errors import UsageError
from dstab.nightly import Policy, plan
from tests.conftest import random_tables, run_cli

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]


# ----------------------------------------------------------------------------- the plan (pure)


@pytest.mark.parametrize(
    "policy, expected",
    [
        (Policy("previous"), [[], [("2026-11-01", 1.0)], [("2026-11-02", 1.0)], [("2026-11-03", 1.0)]]),
        (Policy("base"), [[], [("2026-11-01", 1.0)], [("2026-11-01", 1.0)], [("2026-11-01", 1.0)]]),
        (
            Policy("mix", 0.7),
            [
                [],
                [("2026-11-01", 1.0)],
                [("2026-11-02", 0.7), ("2026-11-01", 0.3)],
                [("2026-11-03", 0.7), ("2026-11-01", 0.3)],
            ],
        ),
        # a named base: the days up to it follow the day before
        (
            Policy("base", base="2026-11-02"),
            [[], [("2026-11-01", 1.0)], [("2026-11-02", 1.0)], [("2026-11-02", 1.0)]],
        ),
        (
            Policy("mix", 0.5, base="2026-11-02"),
            [[], [("2026-11-01", 1.0)], [("2026-11-02", 1.0)], [("2026-11-03", 0.5), ("2026-11-02", 0.5)]],
        ),
    ],
)
def test_plan_references_by_policy(policy: Policy, expected: list):
    days = plan("/src", DAYS, (), policy=policy)
    assert [[name for name, _ in d.references] for d in days] == [[name for name, _ in e] for e in expected]
    for d, e in zip(days, expected):
        np.testing.assert_allclose([w for _, w in d.references], [w for _, w in e], rtol=1e-12)
    assert [d.reference for d in days] == [None, *DAYS[:-1]]  # the day before, whatever the policy
    for d in days:
        assert not d.references or abs(sum(w for _, w in d.references) - 1.0) < 1e-12


def test_default_policy_is_mix_at_one_half():
    assert Policy() == Policy("mix", 0.5, None)


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_previous_weight_refused(weight: float):
    with pytest.raises(UsageError, match="--previous-weight must be between 0 and 1"):
        Policy("mix", weight)


def test_base_not_a_day_refused():
    with pytest.raises(UsageError, match="--base 2026-10-01 is not a day under /src/raw"):
        plan("/src", DAYS, (), policy=Policy("base", base="2026-10-01"))


# ----------------------------------------------------------------------------- measures (numpy references)


def _overlap_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Leszczynski et al.'s eigenspace overlap from the thin SVDs of the two tables."""
    ux = np.linalg.svd(x.astype(np.float64), full_matrices=False)[0]
    uy = np.linalg.svd(y.astype(np.float64), full_matrices=False)[0]
    return float(np.linalg.norm(ux.T @ uy) ** 2 / max(ux.shape[1], uy.shape[1]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(20, 300), e=st.integers(1, 12), noise=st.floats(0.0, 2.0))
def test_eigenspace_overlap_from_grams_is_the_svd_one(seed: int, n: int, e: int, noise: float):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, e))
    y = (x + noise * rng.normal(size=(n, e))) @ rng.normal(size=(e, e))  # another basis, another span
    got = measures.eigenspace_overlap(x.T @ x, y.T @ y, x.T @ y)
    expected = _overlap_numpy(x, y)
    # both from well-conditioned float64 data: the Gram route loses about eps * cond^2
    assert got == pytest.approx(expected, abs=1e-8 * max(1.0, np.linalg.cond(x) ** 2, np.linalg.cond(y) ** 2))
    assert 0.0 <= got <= 1.0


def test_eigenspace_overlap_is_invariant_to_invertible_transforms_and_one_for_the_same_span():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6))
    g = rng.normal(size=(6, 6))
    y = x @ g
    assert measures.eigenspace_overlap(x.T @ x, y.T @ y, x.T @ y) == pytest.approx(1.0, abs=1e-10)
    z = rng.normal(size=(200, 6))
    a = measures.eigenspace_overlap(x.T @ x, z.T @ z, x.T @ z)
    b = measures.eigenspace_overlap(x.T @ x, (z @ g).T @ (z @ g), x.T @ (z @ g))
    assert a == pytest.approx(b, abs=1e-10) and a < 0.2


def _version(path: Path, users: np.ndarray, items: np.ndarray, user_ids=None, item_ids=None) -> str:
    g = zarr.open_group(str(path), mode="w")
    for name, x, ids in (("users", users, user_ids), ("items", items, item_ids)):
        g.create_array(f"{name}/vectors", data=x.astype(np.float32), chunks=(64, x.shape[1]))
        if ids is not None:
            g.create_array(f"{name}/ids", data=np.asarray(ids, dtype=np.int64), chunks=(64,))
    return str(path)


@pytest.mark.parametrize("churn", [False, True])
def test_report_reference_overlap_and_moved_rows_match_numpy(tmp_path: Path, churn: bool):
    rng = np.random.default_rng(11)
    T, W = random_tables(4, 500, 300, 6)
    T2, W2 = T + 0.1 * rng.normal(size=T.shape), W + 0.1 * rng.normal(size=W.shape)
    T2[117] += 3.0  # moved most, by far
    ids_t, ids_w = np.arange(500) + 1000, np.arange(300)
    ids_t2 = ids_t.copy()
    if churn:
        ids_t2[:50] += 10_000  # 50 new items
    old = _version(tmp_path / "old", W, T, ids_w, ids_t)
    new = _version(tmp_path / "new", W2, T2, ids_w, ids_t2)
    with dask.config.set(scheduler="sync"):
        d = dstab.report.measure_drift(dstab.open_version(new), dstab.open_version(old), k=0)
    common = slice(50, 500) if churn else slice(0, 500)
    x, y = T2[common].astype(np.float32).astype(np.float64), T[common].astype(np.float32).astype(np.float64)
    assert d["items"]["eigenspace_overlap"] == pytest.approx(_overlap_numpy(x, y), abs=1e-6)
    distance = np.linalg.norm(x - y, axis=1)
    order = np.argsort(-distance)[:10]
    moved = d["items"]["moved"]
    assert [m["id"] for m in moved] == list(ids_t2[common][order])
    assert moved[0]["id"] == 1117
    np.testing.assert_allclose([m["distance"] for m in moved], distance[order], rtol=1e-6)
    cos = np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    np.testing.assert_allclose([m["cosine"] for m in moved], cos[order], rtol=1e-6)


def test_a_version_against_itself_overlap_one_nothing_moved(tmp_path: Path):
    T, W = random_tables(5, 300, 200, 6)
    v = _version(tmp_path / "v", W, T)
    with dask.config.set(scheduler="sync"):
        d = dstab.report.measure_drift(dstab.open_version(v), dstab.open_version(v), k=0)
    for name in ("users", "items"):
        assert d[name]["eigenspace_overlap"] == pytest.approx(1.0, abs=1e-9)
        assert max(m["distance"] for m in d[name]["moved"]) == 0.0


# ----------------------------------------------------------------------------- the nightly and report --chain


def _days(root: Path, n: int = 4, noise: float = 0.3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Retrains of one model: the same scores up to noise, each in its own random basis, 10% of items churned."""
    rng = np.random.default_rng(7)
    T, W = random_tables(8, 400, 250, 6)
    made = []
    for i in range(n):
        g = rng.normal(size=(6, 6)) + 3 * np.eye(6)
        t = (T + noise * rng.normal(size=T.shape)) @ g
        w = (W + noise * rng.normal(size=W.shape)) @ np.linalg.inv(g).T
        item_ids = np.arange(400) + (1000 * i if i % 2 else 0) * (np.arange(400) < 40)
        _version(root / "raw" / DAYS[i], w, t, np.arange(250), item_ids)
        made.append((w, t))
    return made


def _hold_back(root: Path, days: list[str]) -> None:
    """Move raw days out of SOURCE/raw, as if they had not arrived yet (:func:`_arrive` brings one in)."""
    (root / "held").mkdir(exist_ok=True)
    for day in days:
        shutil.move(str(root / "raw" / day), root / "held" / day)


def _arrive(root: Path, day: str) -> None:
    shutil.move(str(root / "held" / day), root / "raw" / day)


def _pooled_cosine_and_drift(a: dstab.Version, b: dstab.Version) -> tuple[float, float]:
    """Mean row cosine and relative drift over every common id of both tables (numpy)."""
    xs, ys = [], []
    for name in ("users", "items"):
        ta, tb = a.table(name), b.table(name)
        ia, ib = np.asarray(ta.ids[:]), np.asarray(tb.ids[:])
        _, pa, pb = np.intersect1d(ia, ib, return_indices=True)
        xs.append(np.asarray(ta.vectors[:], dtype=np.float64)[pa])
        ys.append(np.asarray(tb.vectors[:], dtype=np.float64)[pb])
    x, y = np.concatenate(xs), np.concatenate(ys)
    cos = np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return float(cos.mean()), float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.parametrize("policy", ["previous", "base", "mix"])
def test_nightly_policy_and_chain_report_match_numpy(tmp_path: Path, policy: str, capsys: pytest.CaptureFixture[str]):
    _days(tmp_path)
    assert dstab_main(["nightly", str(tmp_path), "--policy", policy, "--scheduler", "synchronous", "-q", "--json"]) == 0
    night = json.loads(capsys.readouterr().out)
    assert night["policy"] == policy and night["done"] == 4
    stable = [dstab.open_version(tmp_path / "stable" / d) for d in DAYS]
    last = stable[-1].attrs
    assert last["chain"]["policy"] == policy and last["chain"]["previous"].endswith(DAYS[2])
    weights = {"previous": [1.0], "base": [1.0], "mix": [0.5, 0.5]}[policy]
    assert [r["weight"] for r in last["references"]] == weights
    onto = {"previous": [DAYS[2]], "base": [DAYS[0]], "mix": [DAYS[2], DAYS[0]]}[policy]
    assert [r["url"].rsplit("/", 1)[-1] for r in last["references"]] == onto
    with dask.config.set({"dstab.pair-rows": 10_000, "scheduler": "sync"}):  # every common row in the cosines
        report = chain_report(stable[-1])
    assert [Path(s["url"]).name for s in report["steps"]] == DAYS[1:]
    assert Path(report["base"]).name == DAYS[0]
    for i, step in enumerate(report["steps"], start=1):
        cos_base, drift_base = _pooled_cosine_and_drift(stable[i], stable[0])
        cos_prev, drift_prev = _pooled_cosine_and_drift(stable[i], stable[i - 1])
        assert step["to_base"]["mean_cosine"] == pytest.approx(cos_base, abs=1e-6)
        assert step["to_base"]["drift"] == pytest.approx(drift_base, rel=1e-5)
        assert step["to_previous"]["mean_cosine"] == pytest.approx(cos_prev, abs=1e-6)
        assert step["to_previous"]["drift"] == pytest.approx(drift_prev, rel=1e-5)
        assert 0.0 < step["to_previous"]["eigenspace_overlap"] <= 1.0
    # the log walks the days in order, whatever each was aligned onto
    assert [Path(e["url"]).name for e in dstab.lineage.chain(stable[-1])] == DAYS[::-1]


def test_policies_trade_the_base_for_the_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """On retrains of one model, base keeps the last day nearer day 0 than previous does; mix lies between."""
    _days(tmp_path, noise=0.6)
    end = {}
    for policy in ("previous", "base", "mix"):
        stable = tmp_path / f"stable-{policy}"
        assert dstab_main(["nightly", str(tmp_path), "--stable", str(stable), "--policy", policy,
                           "--scheduler", "synchronous", "-q", "--json"]) == 0  # fmt: skip
        capsys.readouterr()
        end[policy] = _pooled_cosine_and_drift(
            dstab.open_version(stable / DAYS[-1]), dstab.open_version(stable / DAYS[0])
        )[0]
    assert end["base"] >= end["mix"] - 1e-9 and end["mix"] >= end["previous"] - 1e-9
    assert end["base"] > end["previous"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--previous-weight", "0"], "between 0 and 1 (exclusive)"),
        (["--previous-weight", "1.5"], "between 0 and 1 (exclusive)"),
        (["--policy", "base", "--previous-weight", "0.3"], "with --policy base drop it"),
        (["--policy", "previous", "--base", "2026-11-02"], "--policy previous has none"),
        (["--base", "2026-12-01"], "--base 2026-12-01 is not a day"),
        (["--policy", "sideways"], "invalid choice"),
    ],
)
def test_nightly_bad_policy_one_line_exit_2_nothing_written(tmp_path: Path, extra: list[str], words: str):
    _days(tmp_path, n=2)
    done = run_cli("nightly", str(tmp_path), *extra)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert not (tmp_path / "stable").exists()


@pytest.mark.slow
def test_report_chain_cli_text_json_png_and_bad_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _days(tmp_path, n=3)
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    last = str(tmp_path / "stable" / DAYS[2])
    done = run_cli("report", last, "--chain", "--scheduler", "synchronous", "--plot", str(tmp_path / "c.png"))
    assert done.returncode == 0, done.stderr
    assert "cos base" in done.stdout and DAYS[1] in done.stdout and "moved most" in done.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = run_cli("report", last, "--chain", "--json", "--scheduler", "synchronous")
    data = json.loads(done.stdout)
    assert len(data["steps"]) == 2 and data["summary"]["mean_step_cosine"] > 0
    # a base on the lineage shortens the chain; one off it is one line, exit 2
    done = run_cli("report", last, "--chain", "--base", str(tmp_path / "stable" / DAYS[1]), "--json", "--scheduler",
                "synchronous")  # fmt: skip
    assert done.returncode == 0 and len(json.loads(done.stdout)["steps"]) == 1
    done = run_cli("report", last, "--chain", "--base", str(tmp_path / "raw" / DAYS[0]))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "not on the lineage" in done.stderr
    done = run_cli("report", last, "--chain", "--reference", str(tmp_path / "stable" / DAYS[0]))
    assert done.returncode == 2 and "drop --reference" in done.stderr
    # a plot where no file can be made: one line, before any work
    done = run_cli("report", last, "--chain", "--plot", "/proc/chain.png")
    assert (
        done.returncode == 2
        and len(done.stderr.strip().splitlines()) == 1
        and "no file can be created in /proc" in done.stderr
    )
    # the first version: no steps, said so
    done = run_cli("report", str(tmp_path / "stable" / DAYS[0]), "--chain")
    assert done.returncode == 0 and "no steps" in done.stdout


def test_pruned_raw_days_keep_the_chains_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Removing the first raw day (retention) must not move the base: the chain keeps the base it recorded."""
    _days(tmp_path, n=4)
    shutil.rmtree(tmp_path / "raw" / DAYS[3])
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    _days(tmp_path, n=4)  # day 4 arrives; day 1's raw version is pruned (its stable version stays)
    shutil.rmtree(tmp_path / "raw" / DAYS[0])
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "--json"]) == 0
    captured = capsys.readouterr()
    assert "gets the base" not in captured.err
    assert json.loads(captured.out)["base"] == DAYS[0]
    day4 = dstab.open_version(tmp_path / "stable" / DAYS[3]).attrs
    assert day4["chain"]["base"].endswith(f"stable/{DAYS[0]}")
    assert [Path(r["url"]).name for r in day4["references"]] == [DAYS[2], DAYS[0]]
    # a --base given on the command line wins, and is said
    _days(tmp_path, n=4)
    shutil.rmtree(tmp_path / "raw" / DAYS[0])
    shutil.rmtree(tmp_path / "stable" / DAYS[3])
    assert dstab_main(["nightly", str(tmp_path), "--base", DAYS[1], "--scheduler", "synchronous", "--json"]) == 0
    assert f"gets the base {DAYS[1]}" in capsys.readouterr().err


def test_compounding_bases_keep_the_score_error_at_float32_rounding(tmp_path: Path, capsys):
    """Retrains of retrains (synth --like of the day before): the bases compound, the transforms' condition
    grows into the thousands, and the score error must stay at a few float32 roundings (it grew as 3e-9 x cond)."""
    from dstab.synth import synth, synth_like

    with dask.config.set(scheduler="synchronous"):
        synth(tmp_path / "raw" / DAYS[0], items=600, users=300, dim=8, seed=1)
        for i in range(1, 4):
            synth_like(
                tmp_path / "raw" / DAYS[i], dstab.open_version(tmp_path / "raw" / DAYS[i - 1]), noise=0.05, seed=i
            )
        for i, name in enumerate(["2026-11-05", "2026-11-06", "2026-11-07"]):
            synth_like(
                tmp_path / "raw" / name,
                dstab.open_version(tmp_path / "raw" / (DAYS + ["2026-11-05", "2026-11-06"])[i + 3]),
                noise=0.05,
                seed=10 + i,
            )
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    night = json.loads(capsys.readouterr().out)
    conds = []
    for day in night["days"]:
        version = dstab.open_version(day["out"])
        conds.append(
            dstab.linalg.transform_condition(np.asarray(zarr.open_group(day["out"], mode="r")["transform/items"][:]))
        )
        assert version.attrs["report"]["score_error"] < 5e-7, (day["name"], conds[-1])
    assert max(conds) > 4 * dstab.linalg.FLOAT32_PRODUCT_MAX_CONDITION  # the case that needs the float64 product


@pytest.mark.slow
def test_chain_with_a_missing_middle_version_is_refused_unless_a_base_is_named(tmp_path: Path, capsys):
    _days(tmp_path, n=4)
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    shutil.rmtree(tmp_path / "stable" / DAYS[1])
    last = str(tmp_path / "stable" / DAYS[3])
    done = run_cli("report", last, "--chain")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "stops at" in lines[0] and "--base" in lines[0]
    done = run_cli("report", last, "--chain", "--base", str(tmp_path / "stable" / DAYS[2]), "--json")
    assert done.returncode == 0 and len(json.loads(done.stdout)["steps"]) == 1


def test_a_policy_change_between_nights_is_said(tmp_path: Path, capsys):
    _days(tmp_path, n=4)
    _hold_back(tmp_path, DAYS[3:])
    assert dstab_main(["nightly", str(tmp_path), "--policy", "mix", "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    _arrive(tmp_path, DAYS[3])
    assert dstab_main(["nightly", str(tmp_path), "--policy", "previous", "--scheduler", "synchronous", "--json"]) == 0
    err = capsys.readouterr().err
    assert "changes policy here" in err and "--policy mix" in err
    log = dstab.lineage.format_chain(dstab.lineage.chain(dstab.open_version(tmp_path / "stable" / DAYS[3])))
    assert "nightly --policy previous" in log and "nightly --policy mix (0.5 x the day before)" in log


@pytest.mark.slow
def test_a_reference_replaced_afterwards_ends_the_chain_there(tmp_path: Path, capsys):
    """Overwriting a version that a later one was aligned onto: log and report --chain say so, never measure it."""
    _days(tmp_path, n=3)
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    first = tmp_path / "stable" / DAYS[0]
    dstab.stabilize(str(tmp_path / "raw" / DAYS[2])).to_zarr(first, overwrite=True)  # another version at day 1's place
    last = dstab.open_version(tmp_path / "stable" / DAYS[2])
    entries = dstab.lineage.chain(last)
    assert len(entries) == 2 and "was replaced after this version was made from it" in entries[-1]["missing"]
    done = run_cli("report", str(tmp_path / "stable" / DAYS[2]), "--chain")
    assert done.returncode == 2 and "was replaced" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_nightly_stable_inside_a_version_is_refused_naming_stable(tmp_path: Path):
    _days(tmp_path, n=2)
    inside = tmp_path / "raw" / DAYS[0] / "stable"
    done = run_cli("nightly", str(tmp_path), "--stable", str(tmp_path / "other" / "x"), "--json")
    assert done.returncode == 0, done.stderr  # a plain new directory is fine
    done = run_cli("nightly", str(tmp_path / "other"), "--stable", str(inside))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("dstab: error: --stable"), done.stderr
    assert "inside the Zarr group" in lines[0] and not inside.exists()


def test_the_base_survives_a_previous_night_and_a_replaced_base_is_said(tmp_path: Path, capsys):
    """--base once, then a --policy previous night, then the default: the base stays; overwriting it is said."""
    _days(tmp_path, n=4)
    _hold_back(tmp_path, DAYS[2:])
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    _arrive(tmp_path, DAYS[2])
    assert dstab_main(["nightly", str(tmp_path), "--base", DAYS[1], "--scheduler", "synchronous", "-q", "--json"]) == 0
    capsys.readouterr()
    _arrive(tmp_path, DAYS[3])
    assert dstab_main(["nightly", str(tmp_path), "--policy", "previous", "--scheduler", "synchronous", "--json"]) == 0
    night = json.loads(capsys.readouterr().out)
    assert night["base"] == DAYS[1]
    day4 = dstab.open_version(tmp_path / "stable" / DAYS[3]).attrs["chain"]
    assert day4["base"].endswith(f"stable/{DAYS[1]}") and day4["policy"] == "previous"
    # the base is overwritten, then a new day: said
    dstab.stabilize(str(tmp_path / "raw" / DAYS[1]), str(tmp_path / "stable" / DAYS[0])).to_zarr(
        tmp_path / "stable" / DAYS[1], overwrite=True
    )
    _version(tmp_path / "raw" / "2026-11-05", *[np.asarray(a) for a in _days(tmp_path / "again", n=1)[0]],
             np.arange(250), np.arange(400))  # fmt: skip
    assert dstab_main(["nightly", str(tmp_path), "--policy", "previous", "--scheduler", "synchronous", "--json"]) == 0
    err = capsys.readouterr().err
    assert f"the base {tmp_path / 'stable' / DAYS[1]} was replaced" in err


def test_chain_figure_labels_the_versions_and_draws_every_step():
    from dstab.plots import chain_figure

    def point(c: float, d: float) -> dict:
        return {"mean_cosine": c, "drift": d, "eigenspace_overlap": 0.99, "tables": {}}

    steps = [
        {"step": i, "url": f"/data/stable/{DAYS[i]}", "to_base": point(1 - 0.01 * i, 0.1 * i),
         "to_previous": point(0.99, 0.05), "moved": {}}
        for i in range(1, 4)
    ]  # fmt: skip
    fig = chain_figure({"steps": steps, "versions": 4, "base": f"/data/stable/{DAYS[0]}"})
    cos_ax, drift_ax = fig.axes
    labels = [t.get_text() for t in cos_ax.get_xticklabels()]
    assert [label.split("\n")[0] for label in labels] == DAYS[1:]
    to_base = cos_ax.get_lines()[0]
    np.testing.assert_allclose(to_base.get_ydata(), [0.99, 0.98, 0.97])
    np.testing.assert_allclose(drift_ax.get_lines()[0].get_ydata(), [0.1, 0.2, 0.3])
    empty = chain_figure({"steps": [], "versions": 1, "base": "/data/stable/x"})
    assert "no steps" in empty.axes[0].texts[0].get_text()


def test_a_base_named_on_its_own_night_is_kept(tmp_path: Path, capsys):
    """--base names the day stabilized tonight: that day records itself as the base, and the next night keeps it."""
    _days(tmp_path, n=4)
    _hold_back(tmp_path, DAYS[2:])
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "-q", "--json"]) == 0
    _arrive(tmp_path, DAYS[2])
    assert dstab_main(["nightly", str(tmp_path), "--base", DAYS[2], "--scheduler", "synchronous", "-q", "--json"]) == 0
    assert dstab.open_version(tmp_path / "stable" / DAYS[2]).attrs["chain"]["base"].endswith(f"stable/{DAYS[2]}")
    capsys.readouterr()
    _arrive(tmp_path, DAYS[3])
    assert dstab_main(["nightly", str(tmp_path), "--scheduler", "synchronous", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["base"] == DAYS[2] and "gets the base" not in captured.err
    day4 = dstab.open_version(tmp_path / "stable" / DAYS[3]).attrs
    # the day after the base: the day before is the base, so it is the only reference
    assert [Path(r["url"]).name for r in day4["references"]] == [DAYS[2]]
    assert day4["chain"]["base"].endswith(f"stable/{DAYS[2]}")
