"""A guest's blkfront *xenbus* side over the local transport: the handshake a Linux blkfront
does, driven from Python, so tests and `xenblockctl sandbox` can connect, reboot (reconnect) and
detach a disk served by the engine without Xen. The ring itself is backend/frontend.py."""

from __future__ import annotations

import contextlib
import time

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import Abi
from xenblockctl.backend.frontend import LocalFrontend, multi_queue_nodes
from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join


class GuestError(XenblockError):
    code = "guest-handshake"


class XenbusFrontend:
    def __init__(
        self,
        store: XenStore,
        *,
        frontend_path: str,
        backend_path: str,
        domid: int,
        transport_socket: str,
        abi: Abi = blkif.X86_64,
        ring_page_order: int = 0,
        persistent: bool = False,
        data_pages: int = 64,
        extra_nodes: dict[str, str] | None = None,
        queues: int = 1,
    ) -> None:
        self.store = store
        self.frontend_path = frontend_path
        self.backend_path = backend_path
        self.domid = domid
        self.transport_socket = transport_socket
        self.abi = abi
        self.ring_page_order = ring_page_order
        #: write feature-persistent = 1 (Linux blkfront's default); `persistent_negotiated` says
        #: whether the backend offered it too, read once it is Connected, as blkfront does
        self.persistent = persistent
        self.persistent_negotiated = False
        self.data_pages = data_pages
        #: written with (and over) the ring's nodes at connect: hostile values for tests
        self.extra_nodes = dict(extra_nodes or {})
        #: queues wanted; as Linux blkfront, min(this, the backend's multi-queue-max-queues)
        self.queues = queues
        #: every queue's ring while connected (`ring` is queue 0's)
        self.rings: list[LocalFrontend] = []
        self.ring: LocalFrontend | None = None
        self._token = f"xbc-guest-{domid}-{id(self)}"
        store.watch(join(backend_path, "state"), self._token)

    def backend_state(self) -> int | None:
        text = self.store.read_optional(join(self.backend_path, "state"))
        return uint_or_none(text, maximum=8)

    def wait_backend(self, states: tuple[int, ...], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            state = self.backend_state()
            if state in states:
                return state
            error = self.store.read_optional(
                join("/local/domain/0/error", self.backend_path.split("/local/domain/0/", 1)[-1], "error")
            )
            if error:
                raise GuestError(f"backend reported: {error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"backend state {state}, wanted {states}")
            self.store.wait_watch(min(left, 0.2))
            self.store.drain_watches()

    def connect(self, timeout: float = 20.0) -> LocalFrontend:
        """InitWait -> publish ring -> Initialised -> wait Connected -> Connected."""
        self.wait_backend((2,), timeout)
        offered = uint_or_none(
            self.store.read_optional(join(self.backend_path, "multi-queue-max-queues")), maximum=1 << 16
        )
        count = max(1, min(self.queues, offered or 1))
        rings: list[LocalFrontend] = []
        try:
            for _ in range(count):
                rings.append(
                    LocalFrontend(
                        self.transport_socket,
                        self.domid,
                        abi=self.abi,
                        ring_page_order=self.ring_page_order,
                        persistent=self.persistent,
                        data_pages=self.data_pages,
                    )
                )
            nodes = multi_queue_nodes(rings) | self.extra_nodes

            def body(tx: Transaction) -> None:
                for name, value in nodes.items():
                    tx.write(join(self.frontend_path, name), value)
                tx.write(join(self.frontend_path, "state"), "3")

            self.store.run_transaction(body)
            self.wait_backend((4,), timeout)
            persistent = self.store.read_optional(join(self.backend_path, "feature-persistent"))
            self.persistent_negotiated = self.persistent and persistent == "1"
            self.store.write(join(self.frontend_path, "state"), "4")
        except BaseException:
            for ring in rings:
                ring.close()
            raise
        self.rings = rings
        self.ring = rings[0]
        return rings[0]

    def disconnect(self, timeout: float = 20.0) -> None:
        """Closing -> backend drains -> close the ring -> Closed."""
        self.store.write(join(self.frontend_path, "state"), "5")
        self.wait_backend((5, 6), timeout)
        self._close_rings()
        self.store.write(join(self.frontend_path, "state"), "6")
        self.wait_backend((6,), timeout)

    def reboot(self, timeout: float = 20.0) -> LocalFrontend:
        """What a guest reboot looks like to the backend: close, then Initialising, then connect."""
        self.disconnect(timeout)
        self.store.write(join(self.frontend_path, "state"), "1")
        return self.connect(timeout)

    def _close_rings(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.ring = None

    def close(self) -> None:
        self._close_rings()
        with contextlib.suppress(XenblockError):
            self.store.unwatch(join(self.backend_path, "state"), self._token)
