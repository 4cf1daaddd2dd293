"""Failpoints: named places where a test can make dstab die as a killed job would.

Set ``DSTAB_FAILPOINT=NAME`` and the process group is sent SIGKILL when the
run reaches ``NAME``. Used by the fault tests to kill real runs at exact
moments (some, like the instant between the two renames of a publish, cannot
be hit by timing); a no-op otherwise.
"""

from __future__ import annotations

import os
import signal

FAILPOINTS = ("during-statistics", "after-statistics", "after-write", "publish-swap")


def failpoint(name: str) -> None:
    if os.environ.get("DSTAB_FAILPOINT") != name:
        return
    os.killpg(os.getpgid(0), signal.SIGKILL)
