"""Start-up time of ``import dstab`` and ``dstab --help``, each in fresh processes, against a bare interpreter.

    python benchmarks/startup.py [--runs 15] [--target 0.5] [--json FILE] [--strict]

Each run starts a new interpreter (nothing cached in the process; the OS's file
cache is warm after the first). The three commands are interleaved, run by run,
so that a slow spell of a shared machine hits all of them alike. Prints the
median and every run's wall time, the ratio to ``python -c pass``, the modules
too heavy for start-up that each command loaded, and the target check: PASS when
the median is under ``--target`` seconds. ``--strict`` exits 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What start-up must not load: each costs from 0.1 s (zarr) to 1.4 s (scipy.stats) here.
HEAVY = ("dask.array", "zarr", "scipy", "distributed", "matplotlib", "pyarrow", "xarray", "pandas")


def help_command() -> list[str]:
    """The installed console script beside this interpreter, else the module (same code path)."""
    script = Path(sys.executable).with_name("dstab")
    return [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "dstab.cli", "--help"]


def commands() -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import dstab": [sys.executable, "-c", "import dstab"],
        "dstab --help": help_command(),
    }


def time_once(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return elapsed


def heavy_modules(code: str) -> list[str]:
    """The heavy modules loaded after running ``code`` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    return proc.stdout.split() if proc.returncode == 0 else [f"(probe failed: {proc.stderr.strip()[-200:]})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh processes per command (default 15)")
    parser.add_argument("--target", type=float, default=0.5, help="seconds the median must stay under (default 0.5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a command misses the target")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    cmds = commands()
    for argv_ in cmds.values():  # one untimed run each: the file cache and .pyc files are warm for every timed run
        time_once(argv_)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, argv_ in cmds.items():
            times[name].append(time_once(argv_))
    base = statistics.median(times["python -c pass"])
    loaded = {
        "import dstab": heavy_modules("import dstab"),
        "dstab --help": heavy_modules(
            "import contextlib, io\nfrom dstab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])"
        ),
    }
    print(f"startup: {args.runs} fresh processes per command, interleaved; Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    results = []
    failed = False
    for name, runs in times.items():
        median = statistics.median(runs)
        row: dict[str, object] = {
            "name": name, "command": cmds[name], "median_s": median, "times_s": runs, "x_python": median / base
        }  # fmt: skip
        line = f"{name:<16} median {median:.3f} s  x{median / base:.2f} python -c pass  runs " + " ".join(
            f"{t:.3f}" for t in runs
        )
        if name != "python -c pass":
            ok = median < args.target
            failed |= not ok
            row.update(target_s=args.target, passed=ok, heavy_modules=loaded[name])
            line += f"\n{'':<16} target < {args.target} s: {'PASS' if ok else 'FAIL'}"
            line += f"; heavy modules loaded: {', '.join(loaded[name]) or 'none'}"
        print(line)
        results.append(row)
    if args.json:
        args.json.write_text(
            json.dumps({"runs": args.runs, "target_s": args.target, "results": results}, indent=2) + "\n"
        )
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
