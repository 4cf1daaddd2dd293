"""Run a command and report its wall time and the peak resident memory of its whole process tree.

    python benchmarks/treemem.py [--interval 0.05] -- dstab stabilize NEW --out OUT

Resident memory is summed over the command and every descendant (Dask worker
processes included) at each sample; the peak of that sum is printed, with the
peak of the largest single process, as one JSON line on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(sum, max) of resident bytes over ``root`` and its descendants."""
    total = largest = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak_total = peak_single = 0
    while child.poll() is None:
        total, single = tree_rss(root)
        peak_total, peak_single = max(peak_total, total), max(peak_single, single)
        time.sleep(args.interval)
    wall = time.perf_counter() - started
    record = {
        "command": " ".join(command),
        "returncode": child.returncode,
        "wall_s": round(wall, 2),
        "peak_tree_rss_mib": round(peak_total / 2**20, 1),
        "peak_single_rss_mib": round(peak_single / 2**20, 1),
    }
    print(json.dumps(record), file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
