#!/usr/bin/env bash
# Our xenstore client over the kernel's /dev/xen/xenbus instead of xenstored's Unix socket: the only
# path in a driver domain or with xenstored in a stub domain. The client pipelines requests (read_many,
# write_many, batched watches), which the C xenstored socket and the embedded daemon are tested for;
# here the kernel's xenbus device is the peer. Then the block script runs through it for a real attach.
# xenci-timeout: 240
. "$XENCI_SCENARIOS/lib.sh"

[ -c /dev/xen/xenbus ] || skip "no /dev/xen/xenbus in this dom0"
need_script

say "client calls over /dev/xen/xenbus"
XENSTORED_PATH=/dev/xen/xenbus python3 - <<'PY' || fail "client over /dev/xen/xenbus failed"
import threading

from xenblockctl.xenstore.client import XenStore

base = "/local/domain/0/data/xenci-xenbus"
with XenStore.connect(timeout=10) as store:
    assert store.home() == "/local/domain/0", store.home()
    items = {f"{base}/k{i:03d}": f"value-{i}" * 8 for i in range(200)}
    store.write_many(items)
    single = [store.read_optional(k) for k in list(items)[:3]]
    print("single reads:", single)
    values = store.read_many(list(items))
    wrong = [(i, want, got) for i, (want, got) in enumerate(zip(items.values(), values)) if want != got]
    for i, want, got in wrong[:5]:
        print(f"read_many[{i}]: want {want!r}, got {got!r}")
    assert not wrong, f"read_many over xenbus: {len(wrong)} of {len(values)} values wrong"
    listing = store.read_dir(base)
    assert listing == {k.rsplit("/", 1)[1]: v for k, v in items.items()}, "read_dir differs"

    def body(tx):
        tx.write(f"{base}/tx", "saw " + tx.read(f"{base}/k000"))

    store.run_transaction(body)
    assert store.read(f"{base}/tx") == "saw " + items[f"{base}/k000"]
    # A watch fires through the device too (from another connection's write).
    store.watch(f"{base}/w", "tok")
    store.drain_watches()
    with XenStore.connect(timeout=10) as other:
        other.write(f"{base}/w", "ping")
    event = store.wait_watch(timeout=10)
    assert event is not None and event[0] == f"{base}/w", event
    store.write_many({}, remove=[base])
    assert store.read_optional(f"{base}/k000") is None
print("xenbus client ok")
PY

say "the block script through /dev/xen/xenbus (libxl still uses the socket)"
wrapper=$XENCI_WORK/block-via-xenbus
cat > "$wrapper" <<SH
#!/bin/sh
XENSTORED_PATH=/dev/xen/xenbus exec "$script" "\$@"
SH
chmod 0755 "$wrapper"
img=$XENCI_WORK/disk.img
make_image "$img"
attach_rw_cycle xvdb "$img" "$wrapper" xenbus_rw
rm -f "$img"
