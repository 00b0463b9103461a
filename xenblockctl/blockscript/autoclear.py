"""AUTOCLEAR off for a loop device kernel blkback holds, off libxl's critical path.

Why at all: kernel blkback drops its reference when the frontend disconnects and reconnects (a
guest reboot; xen-block-protocol.md "Frontend reconnect"), so with AUTOCLEAR on the guest's disk
would be detached under it. Why not in line: LOOP_SET_STATUS64 freezes the device's queue (an RCU
grace period, 16-39 ms whatever the load; bench/README.md "The kernel-blkback path"), and it cannot
move earlier (before blkback holds the device, AUTOCLEAR is what frees a device nobody took).

`hand_off`, in `add` once blkback holds the device:
  1. takes the per-device flock (`loop-<major>-<minor>` in the per-target lock directory);
  2. marks the backend connected with the owner record saying autoclear=1 (true until step 5);
  3. defers steps 4-7 to a process that outlives `add`'s reply, holding the locked open file
     description and an fd of the loop device throughout, so there is no instant at which `remove`
     could act unlocked, nor at which the device has only blkback's reference:
     * the script forks a child (its own session: libxl's kill at its timeout does not reach it;
       stdio on /dev/null); the parent closes its copies and returns (libxl proceeds);
     * a warm server's worker (blockscript/warm.py sets STAGE) keeps the job itself, with a dup
       of the loop fd and the lock's fd: it disarms its kill-on-hangup at once (the add's work is
       done; the client's death must not take the job with it), replies to its client, and runs
       the job after: no fork on the add's path (bench/README.md, issue 18, session 22).
The deferred job, its journal lines still going to the journal:
  4. re-reads the owner record; unless it is still the one written in step 2 (a remove or a re-add
     happened), it gives up, logged, and leaves AUTOCLEAR on;
  5. LOOP_SET_STATUS64, AUTOCLEAR off, on its own fd;
  6. rewrites the record to autoclear=0 in a transaction, only if it is unchanged;
  7. closes its loop fd and the lock (the child: by exiting).

A blkback release (frontend reconnect) before step 5 cannot detach the device: the job's fd is
an opener that counts (an fd inherited across fork() or dup()ed; kernel-devices.md §3, scenario F),
so the last close is the job's, after step 5 -- or, if the job gave up or died first, with
AUTOCLEAR still on, which is exactly what delete-on-close wants when nothing else holds the device.

`remove` (and everything that detaches by proof through it: `xenblockctl detach`, gc's stale
backends) takes the same lock around its detach and withdrawal, so its LOOP_CLR_FD (which only
arms AUTOCLEAR while blkback holds the device) can never be cancelled by step 5: that would leave
the device bound after blkback lets go. gc's own orphan-loop detach needs no lock: it only touches
devices whose AUTOCLEAR is already off, i.e. after step 5, and the job does no ioctl after it.

Killed at any instant (tests/flows/test_kill.py kills at each of faults.AUTOCLEAR_POINTS, and
test_warm_kill_all.py again through the warm server):
  * `add` before step 3: nothing deferred; AUTOCLEAR stays on (below);
  * the job before step 5 (the one degraded case; for the warm worker also a kill of the worker
    itself after step 3, which libxl cannot do: it kills the client): AUTOCLEAR stays on and the
    record says so; blkback's reference governs the device, nothing leaks, but a later frontend
    reconnect detaches the guest's disk -- exactly as with kernel_autoclear=true;
  * the job between steps 5 and 6: the device is as the in-line ioctl used to leave it, the
    record still says autoclear=1; `remove` detaches by proof (the autoclear field is not part of
    the proof), and gc sees an AUTOCLEAR-off device of ours as it always did;
  * after step 6: as before this module existed.
Every give-up is logged with its reason, in the journal the script uses.

Kept to the hotplug path's imports: posix (not os: ~1 ms of every kernel-path add in a fresh
`python -S`, bench/README.md issue 18 round 10 and class18), the lock helper and modules `add`
has already loaded; the bundle serves it from its last section (bundle.LATER_ROOTS)."""

from __future__ import annotations

import posix
import time

from xenblockctl.blockscript import faults
from xenblockctl.blockscript.locks import device_lock
from xenblockctl.errors import XenblockError
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.paths import join

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable

    from xenblockctl.blockscript.locks import target_lock
    from xenblockctl.blockscript.settings import Settings
    from xenblockctl.environment import Environment
    from xenblockctl.journal import Journal
    from xenblockctl.kernel.loop import LoopDevice
    from xenblockctl.xenstore.client import Transaction
    from xenblockctl.xenstore.identity import OwnerRecord

#: The job's whole budget for its xenstore work: it holds the device lock meanwhile, and a
#: `remove` waits for that lock at most lock_timeout (default 10 s, minimum 0.1 s).
JOB_BUDGET = 5.0

#: Set by a warm server's worker before it runs the flow (blockscript/warm.py): called with the
#: deferred job instead of forking a child; the worker runs the job after its reply. None (the
#: script, the CLI): fork. A module attribute like sharing.TABLE, since the worker is the only
#: process that sets it and each worker serves one request.
STAGE: Callable[[Callable[[], int]], None] | None = None


class _Job:
    """What the deferred job works on: the device, the backend, the record it was handed with and
    the one it writes once AUTOCLEAR is off."""

    __slots__ = ("be", "cleared", "device", "env", "journal", "record")

    def __init__(
        self, be: str, device: LoopDevice, owner: OwnerRecord, journal: Journal, env: Environment
    ) -> None:
        self.be, self.device, self.journal, self.env = be, device, journal, env
        self.record, self.cleared = owner.format(), owner.with_autoclear(False).format()


def hand_off(
    store: XenStore,
    be: str,
    device: LoopDevice,
    owner: OwnerRecord,
    *,
    mark_connected: Callable[[Transaction], None],
    settings: Settings,
    journal: Journal,
    env: Environment,
    defer: bool = True,
) -> None:
    """Steps 1-3 of the module docstring, in the `add` process. `mark_connected` writes
    hotplug-status while `owner` (autoclear=1) is the record. Returns in the parent only; if
    fork() (or the warm worker's dup) fails, or the caller cannot leave a job behind (`defer`
    False: add.run_add says who), the ioctl runs here, in line, as it did before the deferral."""
    ident = device.identity
    job = _Job(be, device, owner, journal, env)
    lock = device_lock(ident.major, ident.minor, timeout=settings.lock_timeout, lock_dir=env.lock_dir)
    with lock:
        store.run_transaction(mark_connected)
        if not defer:
            _clear(store, job)
            return
        if STAGE is not None:
            try:
                _stage(STAGE, job, lock, settings)
            except OSError as exc:  # not taken: nothing was handed over, the lock is still ours
                _in_line(store, job, "handing the job to the worker", exc)
            return
        try:
            pid = posix.fork()
        except OSError as exc:
            _in_line(store, job, "fork", exc)
            return
        if pid == 0:
            _child_main(job, settings)
        journal.info(f"AUTOCLEAR of loop{ident.minor} handed to child {pid}", CHILD=pid)
    # Leaving the block closed only our copy of the lock's file description: the child's copy
    # keeps the flock until it exits.


def _in_line(store: XenStore, job: _Job, what: str, exc: OSError) -> None:
    why = exc.strerror or exc
    job.journal.warning(f"{what} failed ({why}): turning AUTOCLEAR off in line", ERRNO=exc.errno or 0)
    _clear(store, job)


def _stage(
    stage: Callable[[Callable[[], int]], None], job: _Job, lock: target_lock, settings: Settings
) -> None:
    """Step 3 for a warm worker: the job gets a dup of the loop device's fd (add closes its device
    on return) and, once `stage` has taken it, the locked lock fd, to run after the reply. OSError
    if the dup or `stage` fails: then nothing was handed over and `lock` still holds the lock."""
    device = job.device
    fd = posix.dup(device.fd)
    job.device = type(device)(fd, device.identity, device.number, device.status, device.backing_path)
    held: list[int] = []

    def run() -> int:
        try:
            job.journal.stderr = False  # the client's stdio is gone by now
            return _run(job, settings)
        finally:
            job.device.close()  # before the lock: the device's last fd goes while remove waits
            for lock_fd in held:
                posix.close(lock_fd)

    try:
        stage(run)
    except BaseException:
        job.device.close()
        job.device = device
        raise
    held.append(lock.detach())  # the job's from here: leaving add's `with` block keeps the lock
    job.journal.info(f"AUTOCLEAR of loop{device.identity.minor} left to this worker, after its reply")


def _child_main(job: _Job, settings: Settings) -> None:
    """The forked child: never returns (posix._exit), whatever happens."""
    status = 1
    try:
        posix.setsid()  # out of libxl's process group and session: its timeout kill is for the parent
        null = posix.open("/dev/null", posix.O_RDWR)
        for fd in (0, 1, 2):
            posix.dup2(null, fd)  # libxl (and tests) wait for the script's output pipes to close
        posix.close(null)
        job.journal.stderr = False
        job.journal.bind(CHILD=posix.getpid())
        status = _run(job, settings)
    except BaseException as exc:  # a bug: logged, and still never back into the caller's flow
        job.journal.error(f"AUTOCLEAR left on: internal: {type(exc).__name__}: {exc}", CODE="internal")
    finally:
        posix._exit(status)


def _run(job: _Job, settings: Settings) -> int:
    """Steps 4-6 on a store connection of the job's own: 0 if AUTOCLEAR is off and the record says
    so, else 1, the reason logged. The caller holds the lock."""
    journal = job.journal
    try:
        faults.pause(job.env, "autoclear-started")
        store = XenStore.connect(
            timeout=settings.xenstore_timeout,
            deadline=time.monotonic() + JOB_BUDGET,
            env=job.env.variables,
            synchronous=True,
        )
        try:
            return 0 if _clear(store, job) else 1
        finally:
            store.close()
    except XenblockError as exc:
        journal.error(f"AUTOCLEAR left on: {exc.one_line()}", CODE=exc.code, ERRNO=exc.errno or 0)
    except Exception as exc:  # a bug: logged, and the caller still exits as it would
        journal.error(f"AUTOCLEAR left on: internal: {type(exc).__name__}: {exc}", CODE="internal")
    return 1


def _clear(store: XenStore, job: _Job) -> bool:
    """Steps 4-6: whether AUTOCLEAR is off and the record says so. The caller holds the lock."""
    node, name = join(job.be, identity.OWNER), f"loop{job.device.identity.minor}"
    if store.read_optional(node) != job.record:
        job.journal.warning(f"AUTOCLEAR of {name} left on: the owner record changed since the hand-off")
        return False
    faults.pause(job.env, "autoclear-checked")
    job.device.set_autoclear(False)
    faults.pause(job.env, "autoclear-cleared")

    def rewrite(tx: Transaction) -> bool:
        if tx.read_optional(node) != job.record:
            return False
        tx.write(node, job.cleared)
        return True

    if not store.run_transaction(rewrite):
        # A remove or re-add without our lock, or dom0's libxl removing a driver domain's backend
        # directory (remove then detaches by tag, under our lock); remove's proof ignores the field.
        job.journal.warning(f"{name}: AUTOCLEAR is off but the owner record changed meanwhile")
        return False
    job.journal.info(f"{name}: AUTOCLEAR off, blkback's reconnects keep the device")
    return True
