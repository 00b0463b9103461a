"""Watches: which registered (path, token) pairs an event on a node reaches, and with what path.

C daemon 4.17 semantics (`fire_watches`, `get_watch_path`):
- a change of node N (write, mkdir, set_perms, the root of an rm) reaches every watch on N or on
  an ancestor of N (*non-exact* match); the event carries N, not the watched path;
- nodes removed *below* the root of an rm reach only watches registered exactly on them (*exact*
  match), so a watch on /a/b/c fires when /a is removed only if /a/b/c existed;
- special `@` events (`@introduceDomain`, `@releaseDomain`) are exact;
- a watch registered with a relative path gets relative event paths (the home prefix stripped).
"""

from __future__ import annotations

from dataclasses import dataclass

from xenblockctl.xenstore.server.paths import is_child


@dataclass(frozen=True, slots=True)
class Watch:
    node: str
    token: bytes
    #: The connection's home when the watch was registered with a relative path.
    relative_to: str | None = None

    def matches(self, name: str, exact: bool) -> bool:
        if exact:
            return name == self.node
        return is_child(name, self.node)

    def event_path(self, name: str) -> str:
        if self.relative_to is None:
            return name
        rest = name[len(self.relative_to) :]
        return rest[1:] if rest.startswith("/") else rest

    def event_payload(self, name: str) -> bytes:
        return self.event_path(name).encode("latin-1") + b"\0" + self.token + b"\0"
