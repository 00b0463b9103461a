"""backends.read_in_backends: every backend's node, streamed with the listings (XenStore.stream), on
both daemons and both links. It must find exactly what the plain walk and reads find, in the same
order, including listings too long for one reply (which it lists in parts afterwards): the
block-device sharing check relies on it to see every backend that publishes a device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.backends import BackendEntry, read_in_backends, walk_backends
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreError

pytestmark = pytest.mark.usefixtures("link")

Results = list[tuple[int, str | list[str] | XenstoreError]]
Follow = Callable[[Results], Sequence[tuple[int, str]]]

HOME = "/local/domain/0"
LEAF = "physical-device"


def _reference(store: XenStore, skip: str) -> list[tuple[BackendEntry, str | None]]:
    entries = [entry for entry in walk_backends(store, HOME) if entry.path != skip]
    return list(zip(entries, store.read_many([f"{e.path}/{LEAF}" for e in entries]), strict=True))


def _write(store: XenStore, nodes: dict[str, str]) -> None:
    items = list(nodes.items())
    for start in range(0, len(items), 200):
        store.write_many(dict(items[start : start + 200]))


def test_every_backend_in_walk_order_with_its_node(daemon: Daemon) -> None:
    """300 guests with one or two disks (the listings and reads spread over several connections
    on the synchronous link), one guest with 750 disks (its listing is too long for one reply),
    disks without the node, vbd3, and our own backend, which is left out."""
    nodes: dict[str, str] = {}
    for d in range(300):
        for k in range(1 + d % 2):
            be = f"{HOME}/backend/vbd/{100 + d}/{51712 + 16 * k}"
            nodes[f"{be}/{LEAF}" if d % 7 else f"{be}/state"] = f"fd:{d:x}{k}"
    for k in range(750):  # 750 names of 6 bytes: more than a 4096-byte reply
        nodes[f"{HOME}/backend/vbd/77/{51712 + k}/{LEAF}"] = f"8:{k:x}"
    nodes[f"{HOME}/backend/vbd3/5/768/{LEAF}"] = "fd:5"
    nodes[f"{HOME}/backend/vbd3/6/768/{LEAF}"] = "fd:6"
    own = f"{HOME}/backend/vbd/150/51712"
    with XenStore.connect(timeout=20) as store:
        _write(store, nodes)
        expected = _reference(store, own)
        assert len(expected) == 450 + 750 + 2 - 1
        assert ("77", f"{HOME}/backend/vbd/77/52461") in {(e.domid, e.path) for e, _v in expected}
        assert read_in_backends(store, HOME, LEAF, skip=own) == expected
        assert read_in_backends(store, "/local/domain/9", LEAF) == []  # no backend directory at all


def test_a_kind_with_more_domains_than_one_listing_holds(daemon: Daemon) -> None:
    """~900 guests: backend/vbd's own listing is longer than one 4096-byte reply."""
    nodes = {f"{HOME}/backend/vbd/{1000 + d}/51712/{LEAF}": f"fd:{d:x}" for d in range(900)}
    nodes[f"{HOME}/backend/vbd3/5/768/{LEAF}"] = "fd:5"
    with XenStore.connect(timeout=20) as store:
        _write(store, nodes)
        expected = _reference(store, "")
        assert len(expected) == 901
        assert read_in_backends(store, HOME, LEAF) == expected


class _RemovingOnFirstReplies:
    """The store, except that once the kinds' listings are in (the walk's first replies), and
    before any domain's listing is sent, `remove` is deleted through a second connection: the
    daemon then answers ENOENT to what the walk asks next of those nodes."""

    def __init__(self, store: XenStore, other: XenStore, remove: list[str]) -> None:
        self.store, self.other, self.remove = store, other, remove
        self.ls_many, self.read_many, self.ls = store.ls_many, store.read_many, store.ls

    def stream(self, requests: Sequence[tuple[int, str]], follow: Follow) -> None:
        def first_then_follow(
            results: list[tuple[int, str | list[str] | XenstoreError]],
        ) -> Sequence[tuple[int, str]]:
            if self.remove:
                self.other.rm_many(self.remove)
                self.remove = []
            return follow(results)

        self.store.stream(requests, first_then_follow)


def test_nodes_deleted_while_the_walk_runs_are_left_out_or_read_as_missing(daemon: Daemon) -> None:
    """A domain directory gone before its listing is sent: its backends are left out; a backend
    directory gone: left out; a backend whose leaf is gone before it is read: kept, value None.
    Every other backend keeps its value (the values are held per backend, not per position)."""
    nodes = {f"{HOME}/backend/vbd/{100 + d}/51712/{LEAF}": f"fd:{d:x}" for d in range(80)}
    nodes[f"{HOME}/backend/vbd/150/51728/{LEAF}"] = "fd:ff"
    gone = [
        f"{HOME}/backend/vbd/110",  # a whole domain
        f"{HOME}/backend/vbd/150/51712",  # one of a domain's two backends
        f"{HOME}/backend/vbd/120/51712/{LEAF}",  # a leaf
    ]
    with XenStore.connect(timeout=20) as store, XenStore.connect(timeout=20) as other:
        _write(store, nodes)
        before = _reference(store, "")
        found = read_in_backends(_RemovingOnFirstReplies(store, other, list(gone)), HOME, LEAF)
        assert not [path for path in gone if store.exists(path)]
    expected = [
        (entry, None if entry.domid == "120" else value)
        for entry, value in before
        if entry.domid != "110" and entry.path != f"{HOME}/backend/vbd/150/51712"
    ]
    assert len(expected) == 81 - 2
    assert found == expected
