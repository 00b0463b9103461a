"""Run `xenblockctl ARGS...` with every Python thread under cProfile; at exit write each thread
group's top functions (by own time) to OUT. For Xen-lane scenarios that need to know where the
engine's time goes on real Xen (issue 20); the profiler slows what it measures, so timings taken
under it are not reported.

    python3 profile_threads.py OUT ARGS...

Thread groups: the main thread, each data plane's ring thread (xbc-domD-...), and each ring's I/O
workers together (xbc-...-io_N).
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import re
import sys
import threading
from types import FrameType
from typing import Any

OUT = sys.argv[1]
_profiles: list[tuple[str, cProfile.Profile]] = []
_lock = threading.Lock()


def _start(frame: FrameType, event: str, arg: Any) -> None:
    """The first profile event of a new thread: from here on that thread's own profiler runs."""
    profile = cProfile.Profile()
    with _lock:
        _profiles.append((threading.current_thread().name, profile))
    profile.enable()


def _dump() -> None:
    groups: dict[str, list[cProfile.Profile]] = {}
    with _lock:
        for name, profile in _profiles:
            groups.setdefault(re.sub(r"_\d+$", "_*", name), []).append(profile)
    with open(OUT, "w", encoding="utf-8") as out:
        for name, profiles in groups.items():
            try:
                stats = pstats.Stats(profiles[0], stream=out)
                for more in profiles[1:]:
                    stats.add(more)
            except (TypeError, ValueError) as exc:  # a thread that never ran Python code
                out.write(f"=== {name}: no data ({exc})\n")
                continue
            seconds: float = getattr(stats, "total_tt", 0.0)
            out.write(f"=== {name} ({len(profiles)} thread(s)), {seconds:.2f} s profiled\n")
            stats.sort_stats("tottime").print_stats(18)


threading.setprofile(_start)
_main = cProfile.Profile()
_profiles.append(("main", _main))
atexit.register(_dump)
sys.argv = ["xenblockctl", *sys.argv[2:]]
_main.enable()
from xenblockctl.cli.main import main  # noqa: E402  (imported under the profiler on purpose)

sys.exit(main())
