"""The libxl block hotplug flows: parse the target, open it, publish its identity, hand it off."""
