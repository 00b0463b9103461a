# Types of the optional C extension built from _fastpass.c (see backend/fastpath.py).
from collections.abc import Callable
from typing import overload

MODE_STOP: int
MODE_NOWAIT: int
MODE_BLOCK: int
MODE_BLOCK_ALIGNED: int
MODE_GATED: int
WG_HOLD_UNTIL: int
WG_HOLD_NS: int
WG_SLEPT: int
WG_CLOSED: int
WG_LEFT_DIRTY: int
WG_LEFT_HELD: int
#: a group's CPU that idled (as any group in this process saw it) this lately has no CPU-bound
#: neighbour: its poll takes no gap for one's sign (ring_loop.h)
IDLE_WINDOW_NS: int
WG_DIRTY_PERMILLE: int
WG_LAST: int
WG_SIZE: int
DIRTY_GATE_PERMILLE: int

def dirty_permille() -> int: ...

class Pages(dict[int, memoryview]):
    """The grant cache's page views, indexed for the C pass (exports held on looked-up pages)."""

    @property
    def indexed(self) -> int: ...

def check(
    slot: bytes,
    offset: int,
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    max_indirect_segments: int,
    entries: dict[int, memoryview],
    /,
) -> tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None: ...
@overload
def serve(
    data: bytes,
    start: int,
    count: int,
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    max_indirect_segments: int,
    fd: int,
    write_fd: int,
    read_mode: int,
    write_mode: int,
    host_page: int,
    entries: dict[int, memoryview],
    /,
) -> tuple[list[tuple[int, int, int]], int, bytes]: ...
@overload
def serve(
    data: bytes,
    start: int,
    count: int,
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    max_indirect_segments: int,
    fd: int,
    write_fd: int,
    read_mode: int,
    write_mode: int,
    host_page: int,
    entries: dict[int, memoryview],
    cut: int,
    /,
) -> tuple[list[tuple[int, int, int]], int, bytes, bool]: ...
def respond(
    answers: list[tuple[int, int, int]],
    ring: memoryview,
    pvt: int,
    ring_size: int,
    id_offset: int,
    /,
) -> int: ...

EXIT_SLOT: int
EXIT_CHECK: int
EXIT_WOKEN: int
EXIT_BUDGET: int
EXIT_OSERROR: int
WAIT_EVTCHN: int
WAIT_EVENTFD: int

def loop(
    ring: memoryview,
    ring_size: int,
    req_cons: int,
    rsp_prod_pvt: int,
    rsp_pushed: int,
    pending: bool,
    batch: int,
    budget: int,
    stop: bytearray,
    stats: object,
    owner: object,
    waiter: tuple[int, int, int, int, int],
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    max_indirect_segments: int,
    fd: int,
    write_fd: int,
    read_mode: int,
    write_mode: int,
    host_page: int,
    entries: dict[int, memoryview],
    note_used: Callable[[memoryview], object],
    cut: int,
    poll_ns: int = 0,
    /,
) -> tuple[int, int, int, int, bool, bytes | None, int, int, int, int, int]: ...
