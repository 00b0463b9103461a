"""NBD, the one protocol through which guests reach remote storage (issue 17).

A bottom layer beside `kernel` and `xenstore`: stdlib only, importing nothing of ours but
`errors`. `proto` holds the spec's numbers, `uri` the target syntax, `client` the handshake and a
synchronous client. Who consumes an export (the engine serving it, or kernel NBD for blkback) is
decided above this layer.
"""
