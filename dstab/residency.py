"""Whether the new tables stay in memory between the two passes, or are read again.

Out of core, the statistics pass reads the new tables and the write pass reads
them again. When they fit in the memory of the workers (or of this process, on
a local scheduler), the blocks the statistics pass reads are kept there
(persisted) and the write pass transforms them where they lie: the new tables
are read once. Kept only where they fit without spilling: :func:`decide` is the
pure rule, :func:`free_memory` what the active scheduler can hold, and
:func:`keep_blocks` the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask

from .errors import UsageError
from .store import load

if TYPE_CHECKING:
    from .store import Version

log = logging.getLogger("dstab")

InMemory = bool | Literal["auto"]

# auto keeps the new tables when they take at most this share of the memory
# free for them: the blocks land on whichever worker read them, so one worker
# may hold more than its share, and other work may start on a shared cluster.
AUTO_SHARE = 0.5
# what one worker (or thread) holds while it works, besides kept blocks: the
# block being read, its float64 slices, the transformed block, the reference's
# block (see cli/cluster.py: BLOCKS_IN_FLIGHT)
BLOCKS_IN_FLIGHT = 4


@dataclass(frozen=True)
class Memory:
    """What the active scheduler can hold without spilling, and where, in words."""

    free: int  # bytes free for kept blocks, after every worker's working set
    where: str
    # what a user can change to make room, in words: the local cluster's options, or the attached cluster itself
    more: str = "give the workers more memory (--memory-limit, more --workers)"
    # a local cluster this process started: its workers, and what each holds beside kept blocks (its working set
    # and what it uses now) over the share of its limit it fills before spilling; 0 workers: not one
    workers: int = 0
    per_worker_overhead: int = 0
    spill_fraction: float = 1.0

    def limit_for(self, table_bytes: int) -> int:
        """The per-worker memory limit that holds an even share of ``table_bytes`` without spilling (local clusters)."""
        need = (table_bytes / max(self.workers, 1) + self.per_worker_overhead) / self.spill_fraction
        # 5% and a round 64 MiB up: a fresh worker's own use differs from run to run by tens of MiB
        return -(-int(1.05 * need) // 2**26) * 2**26


def check_in_memory(value: object) -> InMemory:
    """``in_memory`` as given: ``"auto"``, ``True`` or ``False``."""
    if value is True or value is False:  # not 1 or 0: a count is a mistake here
        return value
    if isinstance(value, str) and value == "auto":
        return "auto"
    raise UsageError(f"in_memory must be 'auto', True or False, got {value!r}")


def decide(in_memory: InMemory, table_bytes: int, memory: Memory) -> bool:
    """Keep the new tables in memory? ``auto``: when they take at most :data:`AUTO_SHARE` of the free memory.

    ``True`` keeps them whenever they fit at all, and refuses (one line, the
    sizes and the fix) when they would not: kept blocks that do not fit would
    spill to disk, which costs more than reading them again.
    """
    from dask.utils import format_bytes

    if in_memory is False or table_bytes == 0:
        return False
    if in_memory == "auto":
        return table_bytes <= AUTO_SHARE * memory.free
    if table_bytes > memory.free:
        raise UsageError(
            f"in memory: the new tables take {format_bytes(table_bytes)} but {memory.where} can hold only "
            f"{format_bytes(max(memory.free, 0))} without spilling; {memory.more}, or read the tables twice "
            "(--in-memory no)"
            + (
                f"; --memory-limit {-(-memory.limit_for(table_bytes) // 2**20)}MiB would hold them on "
                f"{memory.workers} worker{'s' if memory.workers != 1 else ''}"
                if memory.workers
                else ""
            )
        )
    return True


def _spill_fraction() -> float:
    """The share of a worker's memory limit at which distributed starts spilling (its config, as this process sees it)."""
    for key in ("distributed.worker.memory.target", "distributed.worker.memory.spill"):
        value = dask.config.get(key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
            return float(value)
    return 0.8


def free_memory(block_bytes: int) -> Memory:
    """The memory the active scheduler can hold blocks in without spilling.

    On a ``distributed`` cluster: each worker's memory limit up to where it
    would spill, less what it holds now and its working set, summed. In this
    process (a local scheduler): the machine's available memory less every
    thread's working set.
    """
    import psutil

    from .executor import active_client

    working = BLOCKS_IN_FLIGHT * block_bytes
    client = active_client()
    if client is None:
        import os

        threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
        available = psutil.virtual_memory().available
        return Memory(free=available - threads * working, where="this process", more="free memory on this machine")
    workers = client.scheduler_info()["workers"].values()
    fraction = _spill_fraction()
    total = psutil.virtual_memory().total
    free, most_used = 0, 0
    for info in workers:
        limit = info.get("memory_limit") or total // max(1, len(workers))
        used = int((info.get("metrics") or {}).get("memory", 0))
        free += max(0, int(fraction * limit) - used - working)
        most_used = max(most_used, used)
    n = len(workers)
    where = f"the cluster's {n} worker{'s' if n != 1 else ''}"
    if getattr(client, "cluster", None) is None:  # attached by address: sized where it was started
        return Memory(free, where, more="give the cluster more workers or more memory per worker")
    return Memory(
        free, where, more="give the workers more memory (--memory-limit, more --workers)", workers=n,
        per_worker_overhead=working + most_used, spill_fraction=fraction,
    )  # fmt: skip


class Kept:
    """The new tables' blocks kept in memory between the passes: one Delayed per block, by table.

    On a ``distributed`` cluster they are persisted: read in the workers and
    held where they were read. On a local scheduler they are read by the first
    compute that uses them (the statistics pass, which asks :meth:`to_read` and
    hands their values to :meth:`hold`), so that reading them is not a stage of
    its own.
    """

    def __init__(self, blocks: dict[str, list[Any]], *, unread: bool) -> None:
        self._blocks, self._unread = blocks, unread

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def __repr__(self) -> str:
        return f"<Kept {', '.join(f'{n}: {len(b)} blocks' for n, b in self._blocks.items()) or 'nothing'}>"

    def get(self, name: str) -> list[Any] | None:
        """The blocks of table ``name``, or None when it is not kept."""
        return self._blocks.get(name)

    def to_read(self) -> list[Any]:
        """The reads still to run (a local scheduler), for the compute that will :meth:`hold` their values."""
        return [d for blocks in self._blocks.values() for d in blocks] if self._unread else []

    def hold(self, values: list[Any] | tuple[Any, ...]) -> None:
        """Keep the values :meth:`to_read`'s reads gave, in the same order."""
        if not self._unread:
            return
        it = iter(values)
        # each under a random key: no 64 MiB block is hashed to name it
        self._blocks = {name: [dask.delayed(next(it)) for _ in blocks] for name, blocks in self._blocks.items()}
        self._unread = False

    def release(self) -> None:
        """Let the blocks go (the write pass has written them, or will not)."""
        self._blocks = {}


NOTHING_KEPT = Kept({}, unread=False)


def keep_blocks(version: Version, names: tuple[str, ...]) -> Kept:
    """Every block of the tables ``names`` of ``version``, read once and held where it was read.

    On a ``distributed`` cluster the reads start now (persisted) and this returns
    at once; the statistics pass's tasks then run where their block lies. On a
    local scheduler the reads run with the statistics pass (see :class:`Kept`).
    """
    from .executor import active_client

    reads = {
        name: [dask.delayed(load, pure=True)(b) for b in version.table(name).blocks(version.table(name).row_chunks())]
        for name in names
    }
    if active_client() is None:
        return Kept(reads, unread=True)
    persisted = iter(dask.persist(*[d for blocks in reads.values() for d in blocks]))
    return Kept({name: [next(persisted) for _ in blocks] for name, blocks in reads.items()}, unread=False)
