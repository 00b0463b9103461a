"""One result of a `doctor` check: what it found, how bad, how to fix it.

Severity: `error` = attaching disks cannot work until fixed (doctor exits non-zero); `warning` =
something stale or risky that `gc` or an admin should clean up; `info`/`ok` = for the record;
`skipped` = the check could not run here, and the message says why (never left out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK = "ok"
INFO = "info"
SKIPPED = "skipped"
WARNING = "warning"
ERROR = "error"
SEVERITY_ORDER = {OK: 0, INFO: 1, SKIPPED: 1, WARNING: 2, ERROR: 3}


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    message: str
    fix: str | None = None
    items: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "items": list(self.items),
        }
