"""Kernel devices through ioctls: loop devices, block device identity, device-mapper.

Standard library only (fcntl/struct/os): this layer is imported on every VM start by the hotplug
script, and it must be reviewable against the kernel UAPI headers line by line."""
