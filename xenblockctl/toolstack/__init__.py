"""What libxl does for block devices, for hosts and commands without libxl: write the vbd
directories, run the block script flows in-process, wait for the handshake, inspect and clean up.
Above kernel/, xenstore/ and blockscript/; below cli/ and sandbox (no click here)."""
