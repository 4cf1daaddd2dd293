"""The README, pasted top to bottom: every command from "Command line" on runs, in order, on small sizes.

The code blocks are taken from README.md as they are. Only sizes are made
smaller, `source .venv/bin/activate` activates the environment running these
tests, `pipelines/` points into this checkout, and commands without
`--scheduler` run on the threaded scheduler (through DASK_SCHEDULER_ADDRESS)
so that the suite does not start a local cluster per line, and the example
cluster listens on loopback only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dstab

REPO = Path(__file__).resolve().parent.parent
SMALLER = {
    "--items 1000000 --users 500000": "--items 3000 --users 2000",
    "--items 200000 --users 100000": "--items 2000 --users 1000",
    "words=300000": "words=3000",
    "users=200000 --table items=300000 --table creators=20000": "users=2000 --table items=3000 --table creators=200",
    "user=50000 --table item=80000": "user=500 --table item=800",
}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block from "## Command line" to "## Version layout"."""
    text = (REPO / "README.md").read_text()
    start, end = text.index("\n## Command line\n"), text.index("\n## Version layout\n")
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", text[start:end], re.S)]


def adapt(code: str) -> str:
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    code = code.replace("source .venv/bin/activate", f"source {Path(sys.prefix) / 'bin' / 'activate'}")
    # the cluster of the example, on loopback and a free port (tests reach no other address)
    code = code.replace("dask scheduler --scheduler-file", "dask scheduler --host 127.0.0.1 --port 0 --scheduler-file")
    code = code.replace("dask worker --scheduler-file", "dask worker --host 127.0.0.1 --scheduler-file")
    return code.replace("python pipelines/", f"python {REPO / 'pipelines'}/")


def test_the_readme_blocks_are_found() -> None:
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks].count("python") == 1
    text = "\n".join(code for _, code in blocks)
    for command in ("synth", "stabilize", "report", "apply", "log", "export", "import", "diagnose"):
        assert f"dstab {command} " in text, command
    assert all(big in text for big in SMALLER)  # the substitutions still match the README


@pytest.mark.slow
def test_readme_runs_top_to_bottom(tmp_path: Path) -> None:
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        pytest.fail("the tests must run in a virtual environment, as the README sets up")
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": "threads", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    for number, (lang, code) in enumerate(readme_blocks()):
        code = adapt(code)
        if lang == "bash":
            script = tmp_path / f"block{number}.sh"
            # every line must succeed, as when pasted one by one; the activation carries over
            script.write_text(f"set -euo pipefail\nsource {Path(sys.prefix) / 'bin' / 'activate'}\n{code}")
            command = ["bash", str(script)]
        else:
            script = tmp_path / f"block{number}.py"
            script.write_text(code)
            command = [sys.executable, str(script)]
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=400)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the cluster block's scheduler and workers, if any remain
            except ProcessLookupError:
                pass
        assert proc.returncode == 0, f"README block {number} failed:\n{code}\n--- stdout\n{out}\n--- stderr\n{err}"
        if "&\n" not in code:  # (killing the example cluster makes Dask's own shutdown noise)
            assert "Traceback" not in err, err
    # what the README promises is there
    for name in ("day1-stable", "day2-stable", "day3-stable", "day4", "day5", "day6", "day2-on-cluster"):
        assert dstab.open_version(tmp_path / name).url
    assert dstab.open_table(tmp_path / "day3-users-stable").n_rows == dstab.open_version(tmp_path / "day3").users.n_rows
    for png in ("spectra.png", "report.png", "collapse.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "nightly" / "stable").iterdir()) == ["2026-11-01", "2026-11-02"]
