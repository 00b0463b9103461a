"""The CPUs the admin gives the engine: its affinity mask (taskset, systemd's CPUAffinity=), lowest
first, at most MAX_QUEUES of them. One rule for its two uses, so they cannot drift apart: how many
queues a disk is offered by default (xenbus.default_max_queues; Linux blkback offers one per online
CPU) and where ring groups run, one group on each (ringgroup.RingGroups.per_cpu), so each
queue of a busy disk can have a group of its own. A worker process inherits the engine's mask."""

from __future__ import annotations

import os

#: The most queues the engine ever offers (`multi-queue-max-queues`), whatever the CPU count: each
#: queue costs a ring thread, its I/O workers, a ring mapping and a grant cache. Also the most ring
#: groups it makes (one per CPU of engine_cpus()).
MAX_QUEUES = 16


def engine_cpus() -> list[int]:
    """The CPUs of this process's affinity mask, lowest first, at most MAX_QUEUES (never empty)."""
    return sorted(os.sched_getaffinity(0))[:MAX_QUEUES]


__all__ = ["MAX_QUEUES", "engine_cpus"]
