"""Named pause points for kill and race tests: the one pause mechanism. Inert unless the
environment's XENBLOCKCTL_PAUSE_AT names the point.

With XENBLOCKCTL_PAUSE_AT=<point> and XENBLOCKCTL_PAUSE_FILE=<path>, the process writes the point
name to <path> when it gets there and then stops itself (SIGSTOP). A test can then SIGKILL it at
that exact step (which libxl does for real after 40 s), or change the world and SIGCONT it (a
rename between a dm lookup and the open): the process carries on from the point.

Before the point name it writes its pid to <path>.pid: the points inside the AUTOCLEAR job
(blockscript/autoclear.py) stop a process the harness did not start, which it must find to kill."""

from __future__ import annotations

import posix

from xenblockctl.environment import Environment

#: The points, in flow order; tests iterate over these.
ADD_POINTS = ("add-start", "add-target-open", "add-published", "add-consumer-ready", "add-done")
REMOVE_POINTS = ("remove-start", "remove-detached", "remove-done")
#: Race tests only (not killed at): the per-target lock held, the sharing check not yet made.
RACE_POINTS = ("add-locked",)
#: Inside dm work (blockscript/dmtargets.py): after resolving a name, after DM_DEV_CREATE, after
#: DM_TABLE_LOAD.
DM_POINTS = ("add-dm-resolved", "add-dm-created", "add-dm-loaded")
#: Inside the kernel-NBD make (blockscript/claim.py): connected over netlink, not yet opened: the
#: one window in which an NBD device outlives a killed script.
NBD_POINTS = ("add-nbd-connected",)
#: Inside the job `add` defers on the kernel-blkback path (blockscript/autoclear.py: a forked
#: child, or a warm worker after its reply), in order: started (holding the device lock), the
#: owner record checked (before the ioctl), AUTOCLEAR off (before the record says so).
AUTOCLEAR_POINTS = ("autoclear-started", "autoclear-checked", "autoclear-cleared")
#: Inside a warm server's worker (blockscript/warm.py): the request read, kill-on-hangup not yet
#: armed (a client killed here must not make the worker act).
WARM_POINTS = ("warm-received",)


def pause(env: Environment, point: str) -> None:
    if env.pause_at != point:
        return
    if env.pause_file:
        with open(env.pause_file + ".pid", "w") as f:
            f.write(str(posix.getpid()))
        with open(env.pause_file, "w") as f:
            f.write(point)
    import signal  # only when a test asked for this point: kept off every VM start's imports

    posix.kill(posix.getpid(), signal.SIGSTOP)
