"""``import dstab`` stays cheap: the public names load on first use (PEP 562), and nothing heavy is imported
until one is used. Checked by what is in ``sys.modules``, never by timing (benchmarks/startup.py times it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dstab

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("dask.array", "zarr", "scipy", "distributed", "matplotlib", "pyarrow")


def fresh(code: str) -> str:
    """stdout of ``code`` run in a new interpreter (this one has imported everything already)."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_dstab_loads_nothing_heavy() -> None:
    loaded = json.loads(
        fresh(f"import sys, json, dstab; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    )
    assert loaded == []


def test_every_public_name_resolves_in_a_fresh_interpreter() -> None:
    code = (
        "import json, sys, dstab\n"
        "names = {n: type(getattr(dstab, n)).__name__ for n in dstab.__all__}\n"
        "print(json.dumps({'names': names, 'dir': sorted(set(dstab.__all__) - set(dir(dstab))), "
        "'array': 'dask.array' in sys.modules}))\n"
    )
    out = json.loads(fresh(code))
    assert sorted(out["names"]) == sorted(dstab.__all__) and out["dir"] == []
    assert out["array"]  # using a name does load the pipeline
    # the same objects as the defining modules': functions are functions, not the submodules of the same name
    assert out["names"]["stabilize"] == out["names"]["diagnose"] == "function"
    assert out["names"]["Version"] == "type" and out["names"]["__version__"] == "str"


def test_public_names_are_the_defining_modules_objects() -> None:
    import dstab.diagnose
    import dstab.stabilize
    from dstab.errors import UsageError
    from dstab.store import open_version

    for name in dstab.__all__:
        assert getattr(dstab, name) is not None
    assert dstab.UsageError is UsageError and dstab.open_version is open_version
    # importing a submodule that shares a public function's name leaves the function in place (as eager imports did)
    assert callable(dstab.stabilize) and dstab.stabilize.__module__ == "dstab.stabilize"
    assert callable(dstab.diagnose) and dstab.diagnose.__module__ == "dstab.diagnose"
    assert sys.modules["dstab.stabilize"].Stabilization is dstab.Stabilization


def test_submodules_are_attributes_on_first_use() -> None:
    """``dstab.report.measure_drift`` and friends work after a bare ``import dstab``, as with eager imports."""
    out = fresh(
        "import dstab\n"
        "print(dstab.report.measure_drift is dstab.measure_drift, callable(dstab.executor.compute), "
        "dstab.store.model.block_bytes() > 0, dstab.stabilize.__name__)\n"
    )
    assert out.split() == ["True", "True", "True", "stabilize"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        dstab.no_such_name  # noqa: B018


def test_startup_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--runs", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("python -c pass", "import dstab", "dstab --help"):
        assert any(line.startswith(name + " ") and "median" in line for line in proc.stdout.splitlines()), proc.stdout
    assert proc.stdout.count("target < 0.5 s: ") == 2  # PASS or FAIL: timing is not asserted here
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert len(results["import dstab"]["times_s"]) == 2 and results["import dstab"]["median_s"] > 0
    assert results["import dstab"]["heavy_modules"] == []
