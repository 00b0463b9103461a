"""The embedded xenstored: the real xenstore wire protocol on unix sockets, stdlib only.

For machines without Xen (developers, CI): the same clients (libxenstore's `xenstore-*` tools,
pyxs, our client layer) work against it unchanged, with the Xen 4.17 C daemon's semantics for
paths, permissions, watches, transactions (generation-based EAGAIN) and quotas.

Modules, bottom up: wire (framing, type numbers, error names), paths, permissions, store (the
committed tree), quota, transactions, watches, domains, connection (per-client state and output
queue), view (one request's staged writes), handlers (one function per message type), core (the
socket-free protocol engine), daemon (the selectors event loop). Run it with
`xenblockctl xenstored --socket PATH`.
"""
