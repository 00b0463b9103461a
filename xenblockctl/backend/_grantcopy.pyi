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
