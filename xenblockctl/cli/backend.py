"""`xenblockctl backend`: run the bundled userspace blkback engine in the foreground."""

from __future__ import annotations

import dataclasses
import resource
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

import click

from xenblockctl.journal import Journal

if TYPE_CHECKING:
    from xenblockctl.backend.xenbus import EngineConfig


def raise_fd_limit(journal: Journal) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and log what we got; returns the soft limit.

    Every disk holds a bounded number of fds (about 9 on the local transport: registry connection,
    grant table, event channel pair and its bound copy, data plane wake pipe, the device), so the
    limit, not the code, caps how many disks one engine serves. systemd starts services with a
    soft limit of 1024 whatever LimitNOFILE= raises the hard one to; the hard limit is the
    administrator's choice, so take all of it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            journal.warning(f"cannot raise the open-file limit from {soft} to {hard}: {exc}")
    journal.info(f"open-file limit {soft} (hard {hard})")
    return soft


def _ring_groups_refused(config: EngineConfig) -> str | None:
    """Why this configuration cannot run ring groups (a group is a native loop), or None."""
    from xenblockctl.backend.ringgroup import available

    if not (config.native and config.native_loop):
        return "the native passes are off"
    if not config.blocking_wakeup:
        return "--poll-wakeup"
    if not available():
        return "the native fast path is not built"
    return None


@click.command()
@click.option(
    "--kind",
    type=click.Choice(["vbd", "vbd3"]),
    default="vbd",
    show_default=True,
    help="Backend type to serve: vbd (no kernel blkback loaded) or vbd3 (libxl backendtype=tap).",
)
@click.option(
    "--transport",
    "transport_spec",
    default="xen",
    show_default=True,
    metavar="xen|local:SOCKET",
    help="Grant/event-channel transport: real /dev/xen/{gntdev,evtchn}, or the local no-Xen transport.",
)
@click.option(
    "--xenstore",
    "xenstore_path",
    default=None,
    metavar="PATH",
    help="xenstored socket (default: as libxenstore).",
)
@click.option(
    "--allow-unverified",
    is_flag=True,
    help="Serve devices published with neither physical-device-luid nor diskseq (stock block script). "
    "Not recommended.",
)
@click.option(
    "--persistent-grants/--no-persistent-grants",
    default=True,
    show_default=True,
    help="Offer feature-persistent: keep the guest's data pages mapped across requests.",
)
@click.option(
    "--max-persistent-grants",
    type=click.IntRange(1, 65536),
    default=None,
    metavar="N",
    help="Persistent mappings kept per ring before the least recently used idle one goes "
    "(default 1056, like Linux blkback).",
)
@click.option(
    "--native/--no-native",
    default=True,
    show_default=True,
    help="Serve simple cached reads and writes with the native fast paths where they are built "
    "(persistent grants; grant copy without them); --no-native: everything on the pure-Python path.",
)
@click.option(
    "--blocking-wakeup/--poll-wakeup",
    default=True,
    show_default=True,
    help="The ring thread sleeps in one blocking read of its event channel (a stop interrupts it "
    "through a loopback channel); --poll-wakeup: poll() on the channel and a stop pipe, then a read.",
)
@click.option(
    "--native-loop/--no-native-loop",
    default=True,
    show_default=True,
    help="With the blocking wake-up and a native pass (grant copy for frontends without persistent "
    "grants, e.g. pvgrub; the fast path for persistent grants), the ring thread waits, serves and "
    "answers in one native loop; --no-native-loop: a Python turn per wake-up.",
)
@click.option(
    "--direct-writes/--no-direct-writes",
    default=False,
    show_default=True,
    help="Write guest data to block devices with O_DIRECT (a second fd per queue, checked to be "
    "the same device) instead of through the page cache.",
)
@click.option(
    "--direct-writes-on-pool",
    is_flag=True,
    default=False,
    help="With --direct-writes: run them on the I/O worker threads (several in the device at once) "
    "unless alone on their ring, instead of on the ring thread.",
)
@click.option(
    "--direct-reads",
    is_flag=True,
    default=False,
    help="With --direct-writes: read guest data through the same O_DIRECT fd too, instead of through "
    "the page cache (which direct writes keep emptying).",
)
@click.option(
    "--loop-file/--no-loop-file",
    default=True,
    show_default=True,
    help="Serve a loop device's guest I/O on its backing file (checked to be the file the loop is bound "
    "to), through the page cache kernel blkback's loop worker uses; --no-loop-file: on the loop device.",
)
@click.option(
    "--max-queues",
    type=click.IntRange(1, 16),
    default=None,
    metavar="N",
    help="multi-queue-max-queues offered to frontends: rings per disk (default: the CPUs the engine "
    "may run on, at most 16).",
)
@click.option(
    "--ring-groups/--no-ring-groups",
    default=None,
    help="Ring groups: one native loop on each CPU the engine may run on (one per worker process with "
    "--workers) serves many rings in rounds, yields its CPU while it polls for a refill, runs with a "
    "short scheduler slice and sleeps only when all are idle. Default: rings are served in groups "
    "while the engine serves more of them than it has CPUs, each on its own thread otherwise (with "
    "--workers: on their own threads). --ring-groups: always in groups; --no-ring-groups: never. "
    "A throttled buffered write delays the group's other rings (see the man page).",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=0,
    show_default=True,
    metavar="N",
    help="Serve the queues in N worker processes (each its own interpreter, so queues use N CPUs); "
    "0: on threads of the engine process.",
)
@click.option(
    "--takeover",
    is_flag=True,
    help="Take over from the engine running now (an upgrade without systemd): it drains its rings and "
    "hands its devices over; guests see a pause, not an error.",
)
@click.option(
    "--handover-socket",
    default=None,
    metavar="PATH",
    help="Where this engine listens for a successor's --takeover, and where --takeover finds the running "
    "one (default with --transport xen: /run/xenblockctl/engine-KIND.handover; local: none).",
)
def backend(
    *,
    takeover: bool,
    handover_socket: str | None,
    kind: str,
    transport_spec: str,
    xenstore_path: str | None,
    allow_unverified: bool,
    persistent_grants: bool,
    max_persistent_grants: int | None,
    native: bool,
    blocking_wakeup: bool,
    native_loop: bool,
    ring_groups: bool | None,
    direct_writes: bool,
    direct_writes_on_pool: bool,
    direct_reads: bool,
    loop_file: bool,
    max_queues: int | None,
    workers: int,
) -> None:
    """Serve every backend/KIND/*/* of this domain: verify each device's diskseq against
    physical-device-luid and diskseq, hold it across frontend reconnects, drain I/O before letting go."""
    from xenblockctl.backend.engine import Engine
    from xenblockctl.backend.fastpath import describe
    from xenblockctl.backend.grantcopy import describe as describe_copy
    from xenblockctl.backend.handover import (
        FdStore,
        HandoverError,
        HandoverServer,
        Send,
        default_handover_path,
        parked_record_path,
        take_over,
    )
    from xenblockctl.backend.ringgroup import RingGroups
    from xenblockctl.backend.transport.base import Transport
    from xenblockctl.backend.xenbus import EngineConfig
    from xenblockctl.errors import XenblockError
    from xenblockctl.xenstore.client import XenStore

    journal = Journal("xenblockctl-engine")
    raise_fd_limit(journal)
    if handover_socket is None and transport_spec == "xen":
        handover_socket = default_handover_path(kind)
    if takeover and handover_socket is None:
        raise click.UsageError("--takeover needs --handover-socket with a local transport")
    # first: the fds a previous engine parked (LISTEN_FDS) are ours to verify or close
    fd_store = FdStore.from_environ(journal, parked_record_path(handover_socket) if handover_socket else None)
    transport: Transport
    if transport_spec.startswith("local:"):
        from xenblockctl.backend.transport.local import LocalTransport

        transport = LocalTransport(transport_spec.removeprefix("local:"), journal=journal)
    elif transport_spec == "xen":
        from xenblockctl.backend.transport.xen import XenTransport

        transport = XenTransport()
    else:
        raise click.BadParameter(f"unknown transport {transport_spec!r}", param_hint="--transport")
    store = XenStore.connect(xenstore_path)
    config = EngineConfig(
        transport, require_luid=not allow_unverified, persistent_grants=persistent_grants, fd_store=fd_store
    )
    if max_persistent_grants is not None:
        config = dataclasses.replace(config, max_persistent_grants=max_persistent_grants)
    if max_queues is not None:
        config = dataclasses.replace(config, max_queues=max_queues)
    if not native:
        config = dataclasses.replace(config, native=False)
    if not blocking_wakeup:
        config = dataclasses.replace(config, blocking_wakeup=False)
    if not native_loop:
        config = dataclasses.replace(config, native_loop=False)
    if direct_writes_on_pool and not direct_writes:
        raise click.UsageError("--direct-writes-on-pool needs --direct-writes")
    if direct_reads and not direct_writes:
        raise click.UsageError("--direct-reads needs --direct-writes")
    if direct_writes:
        config = dataclasses.replace(
            config, direct_writes=True, direct_writes_on_pool=direct_writes_on_pool, direct_reads=direct_reads
        )
    if not loop_file:
        config = dataclasses.replace(config, loop_file=False)
    journal.info(f"ring pass: {describe(native)}; {describe_copy(native)}")
    how = "buffered"
    if direct_writes:
        how = "O_DIRECT (--direct-writes)" + (", on the I/O pool" if direct_writes_on_pool else "")
        how += ", reads O_DIRECT too (--direct-reads)" if direct_reads else ""
    journal.info(f"writes to block devices: {how}")
    journal.info(f"loop devices: I/O on {'the backing file' if loop_file else 'the device (--no-loop-file)'}")
    if ring_groups is not False:
        # a group is a native loop: without one the rings keep their own threads (said, not silent)
        why_not = _ring_groups_refused(config)
        if why_not is not None:
            if ring_groups:
                journal.warning(f"--ring-groups ignored ({why_not}): each ring on its own thread")
            else:
                journal.info(f"rings: each on its own thread (no ring groups: {why_not})")
            ring_groups = False
    pool = None
    if workers:
        from xenblockctl.backend.workers import WorkerPool

        # a worker's rings share its one process: each on a thread of its own unless --ring-groups
        pool = WorkerPool(workers, transport, journal, ring_groups=bool(ring_groups))
        config = dataclasses.replace(config, worker_pool=pool)
        if ring_groups:
            journal.info(
                "rings: one ring group per worker process (its native loop serves its rings; worker i's"
                " on the i-th CPU it may run on, yielding it while it polls)"
            )
    groups: RingGroups | None = None
    if ring_groups is not False and not workers:
        # one native loop per CPU for all of this process's rings (issue 20, many busy disks); by
        # default only past a ring per CPU: below that a ring thread each is as fast (ringgroup.py)
        groups = RingGroups.per_cpu(always=bool(ring_groups))
        config = dataclasses.replace(config, ring_groups=groups)
        on = ",".join(str(g.cpu) for g in groups.groups)
        when = "always" if ring_groups else f"once more than {groups.solo_up_to} rings are served"
        journal.info(
            f"rings: {len(groups.groups)} ring groups (one native loop on each of CPUs {on} serves the rings,"
            f" {when}; it yields its CPU while it polls)"
        )
    engine = Engine(store, config, kind=kind, journal=journal)
    if takeover and handover_socket is not None:  # (checked above: --takeover has a socket)
        # only now, with everything else ready: the guests' pause runs from here to our first rescan
        try:
            handed = take_over(handover_socket, journal)
            if handed.transport is not None:
                transport.adopt_state(handed.transport, handed.transport_fds)
                handed.transport_fds = []
        except XenblockError as exc:
            journal.error(exc.one_line(), CODE=exc.code)
            transport.close()
            store.close()
            raise
        fd_store.adopt(handed.devices)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        engine.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server: HandoverServer | None = None
    if handover_socket is not None:

        def hand_over(send: Send) -> None:
            # after every ring is drained: the devices, and what keeps the rings valid (local:
            # the registry, i.e. the frontends' grant tables and event channels)
            engine.handover = lambda held: send(held, transport.export_state())
            engine.stop()

        try:
            server = HandoverServer(handover_socket, journal, hand_over)
        except HandoverError as exc:  # serving matters more than a later upgrade: go on without it
            journal.error(f"{exc.one_line()}; no --takeover of this engine", CODE=exc.code)
    ready = threading.Event()
    waiter = threading.Thread(target=lambda: ready.wait() and print("engine ready", flush=True), daemon=True)
    waiter.start()
    try:
        engine.run(ready)
    finally:
        if pool is not None:
            pool.close()  # after every device was torn down: the workers drain what is left and exit
        for group in groups.groups if groups is not None else ():
            try:
                group.close()  # every device torn down: no ring left in it
            except RuntimeError as exc:  # one whose I/O never drained: its thread stays, a daemon
                journal.error(str(exc), CODE="internal")
        if server is not None:
            server.close()
        transport.close()
        store.close()
    sys.stdout.flush()
