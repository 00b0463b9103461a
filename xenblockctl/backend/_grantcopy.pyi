# Types of the optional C extension built from _grantcopy.c (see backend/grantcopy.py).
from collections.abc import Callable

SEGMENT_SIZE: int
MODE_STOP: int
MODE_NOWAIT: int
MODE_BLOCK: int
MODE_BLOCK_ALIGNED: int

def check(
    slot: bytes,
    offset: int,
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    /,
) -> tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None: ...
def serve(
    data: bytes,
    start: int,
    count: int,
    id_offset: int,
    sectors: int,
    size_bytes: int,
    logical_block_size: int,
    read_only: bool,
    fd: int,
    write_fd: int,
    read_mode: int,
    write_mode: int,
    host_page: int,
    bounce: memoryview,
    domid: int,
    copy_fd: int,
    copier: Callable[[memoryview], object] | None,
    /,
) -> tuple[list[tuple[int, int, int]], int]: ...

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
    fd: int,
    write_fd: int,
    read_mode: int,
    write_mode: int,
    host_page: int,
    bounce: memoryview,
    domid: int,
    copy_fd: int,
    copier: Callable[[memoryview], object] | None,
    /,
) -> tuple[int, int, int, int, bool, bytes | None, int, int, int, int, int]: ...
