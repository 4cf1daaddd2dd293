"""--plot FILE on report and diagnose: a .png name, outside the inputs, never over a file dstab did not draw."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import dask
import matplotlib.image
import pytest

from dstab.cli import main
from dstab.plots import is_dstab_plot, png_text
from dstab.synth import synth

FAST = ("--scheduler", "synchronous", "--no-progress")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plots")
    with dask.config.set(scheduler="synchronous"):
        synth(str(root / "acopy"), items=200, users=100, dim=4, chunk_rows=64)
        synth(str(root / "bcopy"), items=200, users=100, dim=4, chunk_rows=64)
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def command(kind: str, root: Path) -> list[object]:
    if kind == "diagnose":
        return ["diagnose", root / "acopy"]
    return ["report", root / "acopy", "--reference", root / "bcopy"]


def no_work_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal has to come before any statistics pass: make one fail loudly."""

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("the statistics pass started before --plot was checked")

    # where the handlers look them up when they run (they import them inside themselves); dstab.diagnose by module,
    # since the package's dstab.diagnose is the function
    diagnose_module = importlib.import_module("dstab.diagnose")
    monkeypatch.setattr(diagnose_module, "diagnose", boom)
    monkeypatch.setattr(diagnose_module, "open_version_or_table", boom)
    monkeypatch.setattr("dstab.report.describe", boom)
    monkeypatch.setattr("dstab.store.open_version", boom)


KINDS = ("diagnose", "report")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"my own picture\n", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        "someone-elses-png",
    ],
)
def test_a_file_dstab_did_not_draw_is_kept(
    versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str,
    content: bytes | str,
):  # fmt: skip
    target = tmp_path / "user.png"
    if content == "someone-elses-png":
        matplotlib.image.imsave(target, [[0.0, 1.0], [1.0, 0.0]])  # a real PNG, not dstab's
        assert png_text(target) is not None and not is_dstab_plot(target)
    else:
        target.write_bytes(content)
    before = target.read_bytes()
    no_work_done(monkeypatch)
    code, out, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
    assert code == 2 and out == ""
    assert err.startswith("dstab: error: ") and err.count("\n") == 1 and "not a plot dstab drew" in err
    assert target.read_bytes() == before


@pytest.mark.parametrize("kind", KINDS)
def test_dstabs_own_earlier_plot_is_replaced(
    versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
):
    target = tmp_path / "p.png"
    for run in range(2):  # the first run draws it, the second replaces it
        if run:
            os.utime(target, ns=(0, 0))  # so the replacement shows
        code, out, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
        assert code == 0, err
        assert f"plot: {target}" in out
        assert is_dstab_plot(target) and png_text(target)["Software"].startswith("dstab ")
        assert matplotlib.image.imread(target).shape[0] > 100
    assert target.stat().st_mtime_ns > 0


@pytest.mark.parametrize(
    "kind, where",
    [
        ("diagnose", "acopy/items/diag.png"),
        ("diagnose", "acopy/diag.png"),
        ("report", "acopy/users/r.png"),
        ("report", "bcopy/r.png"),  # inside --reference
    ],
)
def test_a_plot_inside_an_input_is_refused(
    versions: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str, where: str
):
    target = versions / where
    no_work_done(monkeypatch)
    code, out, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "lies inside the input" in err
    assert not target.exists()


def test_a_plot_inside_base_is_refused(
    versions: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    target = versions / "bcopy" / "b.png"
    no_work_done(monkeypatch)
    code, _, err = run_cli(capsys, "report", versions / "acopy", "--base", versions / "bcopy", "--plot", target, *FAST)
    assert code == 2 and "lies inside the input" in err and not target.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["x.txt", "acopy/zarr.json", "mine", "plot.pdf", "png", "x.png.bak"])
def test_a_name_without_png_suffix_is_refused_before_any_work(
    versions: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str, name: str
):
    target = versions / name
    existed = target.exists()
    no_work_done(monkeypatch)
    code, out, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
    assert code == 2 and out == ""
    assert err == f"dstab: error: --plot needs a .png file name, got {target}\n"
    assert target.exists() == existed and not Path(f"{target}.png").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_named_png_is_refused(
    versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
):
    target = tmp_path / "dir.png"
    target.mkdir()
    no_work_done(monkeypatch)
    code, _, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
    assert code == 2 and "is a directory" in err and target.is_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_a_plot_inside_another_version_is_refused(
    versions: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
):
    """Found by a second trial: a PNG drawn into a version that is not an input made it a foreign file there."""
    other = versions / "other"
    if not other.exists():  # the versions are shared by the parametrised cases
        synth(other, items=30, users=20, dim=4, seed=5)
    target = other / "p.png"
    no_work_done(monkeypatch)
    code, out, err = run_cli(capsys, *command(kind, versions), "--plot", target, *FAST)
    assert code == 2 and err.count("\n") == 1 and "lies inside the Zarr group" in err and not target.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["afile/x.png", "afile/sub/x.png"])
def test_a_plot_under_a_file_is_refused_naming_the_file(
    versions: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    name: str,
):
    """Found by the recheck trial: a --plot under a file was told to create a directory that cannot be made."""
    (tmp_path / "afile").write_text("precious")
    no_work_done(monkeypatch)
    code, out, err = run_cli(capsys, *command(kind, versions), "--plot", tmp_path / name, *FAST)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"lies under {tmp_path / 'afile'}, which is a file" in err
    assert (tmp_path / "afile").read_text() == "precious"
