"""The bundled userspace blkback engine.

Data plane (below the xenbus state machine):

- `blkif`      the ring ABI: constants and request/response codecs for x86_64-abi and x86_32-abi
- `ring`       the shared ring: a hostile-index-proof back ring and the front ring our test frontend uses
- `requests`   validation of one copied request against the device, producing an I/O plan or a rejection
- `io`         the device target and the executor (preadv/pwritev into grant pages, flush, discard, drain)
- `dataplane`  one queue: ring + event channel + executor, run in a thread, stopped with a drain
- `transport`  grants and event channels: `local` (memfd + eventfd, any Linux), `xen` (gntdev/evtchn)
- `frontend`   a Python blkfront over the local transport, able to misbehave on purpose

The xenbus side (engine.py, xenbus.py) drives these.
"""
