"""xenblockctl: the block-device half of a Xen toolstack.

Layers import downward only (tests/lint/test_layers.py enforces it):

    cli/                      click commands, one module per command
    blockscript/  backend/    libxl add/remove flows; the userspace blkback engine (siblings)
    xenstore/     kernel/     xenstore client + embedded daemon; ioctl codecs and devices
    errors                    the coded exception every layer raises
"""

__version__ = "0.1.0"
