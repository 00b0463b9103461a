"""The click command line. One module per command; the group loads a command's module only when
that command runs, so `xenblockctl --help` and the hotplug path stay cheap."""
