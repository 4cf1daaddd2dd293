"""Preloaded into the local cluster's worker processes: they leave Ctrl-C to the dstab process that started them.

Ctrl-C reaches the whole process group. Workers that took it died mid-task
with tracebacks, and a block write still in flight could put back the staging
the CLI had just removed; ignoring it there lets the CLI alone stop: it
cancels the compute, waits for the tasks in flight, removes what it staged
and closes the cluster.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
