"""The block-device sharing check reads every other backend's physical-device: in pipelined
batches, so its round trips do not grow one per backend (bench/README.md, issue 18: the
128-backend block-device add)."""

from __future__ import annotations

import os

from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript import sharing
from xenblockctl.xenstore.client import XenStore

BACKENDS = 130
TARGET = os.makedev(7, 77)


def test_block_device_claims_cost_a_few_round_trips_for_many_backends(libxl: Libxl) -> None:
    for i in range(BACKENDS):
        be = libxl.create_backend(100 + i // 16, 51712 + 16 * (i % 16), f"/srv/existing-{i}.img", "w")
        # two of them publish the target: both must still be found
        physical = "7:4d" if i in (5, 129) else f"fd:{i:x}"
        libxl.store.write_many({be.node("physical-device"): physical})
    own = libxl.create_backend(7, 51712, "/dev/loop77", "w")
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        exchanges = 0
        exchange = store._link.exchange  # type: ignore[union-attr]

        def counting(*args: object, **kwargs: object) -> object:
            nonlocal exchanges
            exchanges += 1
            return exchange(*args, **kwargs)  # type: ignore[arg-type]

        store._link.exchange = counting  # type: ignore[union-attr,method-assign]
        home = store.home()
        claims = list(sharing.backend_claims(store, home, store.absolute(own.relative), devt=TARGET))
    assert len({c.where.split(" ")[0] for c in claims}) == 2, claims
    assert all(c.devt == TARGET for c in claims)
    # walking: one ls of backend/vbd + one per frontend domain (9); reading: ceil(130 / 64) = 3
    # batches; the two matches' records. Before batching this was ~150 (one READ per backend).
    assert exchanges <= 9 + 3 + 2 * 4, exchanges
