"""Named pause points for kill tests. Inert unless XENBLOCKCTL_PAUSE_AT names the point.

With XENBLOCKCTL_PAUSE_AT=<point> and XENBLOCKCTL_PAUSE_FILE=<path>, the process writes the point
name to <path> when it gets there and then sleeps until it is killed: a test can SIGKILL the
block script at an exact step, which libxl does for real after 40 s."""

from __future__ import annotations

import os
import time

#: The points, in flow order; tests iterate over these.
ADD_POINTS = ("add-start", "add-target-open", "add-published", "add-consumer-ready", "add-done")
REMOVE_POINTS = ("remove-start", "remove-detached", "remove-done")


def pause(point: str) -> None:
    if os.environ.get("XENBLOCKCTL_PAUSE_AT") != point:
        return
    marker = os.environ.get("XENBLOCKCTL_PAUSE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    while True:
        time.sleep(3600)
