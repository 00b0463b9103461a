"""Block script settings: defaults < config files < XENBLOCKCTL_* environment variables.

The hotplug path must not pay for a config parser on every VM start: `config.overlay` stats the
files and parses (imports tomllib) only when one exists, and hands their values back under the
environment names parsed here, so both sources follow exactly the same rules."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from xenblockctl import config
from xenblockctl.errors import XenblockError


class SettingsError(XenblockError):
    code = "bad-setting"


class Settings(NamedTuple):
    #: How long `add` holds the device waiting for its consumer. libxl SIGKILLs us at 40 s.
    handoff_timeout: float = 30.0
    #: Per-request xenstore deadline.
    xenstore_timeout: float = 10.0
    #: How long to wait for another attach of the same target to publish its claim.
    lock_timeout: float = 10.0
    #: Keep AUTOCLEAR on loop devices consumed by kernel blkback. Off by default: blkback drops its
    #: reference when the frontend reconnects (guest reboot), which would detach the disk under it.
    kernel_autoclear: bool = False
    #: Ask for O_DIRECT loop I/O (falls back to buffered when the kernel refuses).
    direct_io: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        env = config.overlay(env)  # raises ConfigError (bad-config) for a malformed file
        d = cls._field_defaults
        return cls(
            handoff_timeout=_seconds(env, "XENBLOCKCTL_HANDOFF_TIMEOUT", d["handoff_timeout"], 0.1, 35.0),
            xenstore_timeout=_seconds(env, "XENBLOCKCTL_XENSTORE_TIMEOUT", d["xenstore_timeout"], 0.1, 38.0),
            lock_timeout=_seconds(env, "XENBLOCKCTL_LOCK_TIMEOUT", d["lock_timeout"], 0.1, 38.0),
            kernel_autoclear=_flag(env, "XENBLOCKCTL_KERNEL_AUTOCLEAR", d["kernel_autoclear"]),
            direct_io=_flag(env, "XENBLOCKCTL_DIRECT_IO", d["direct_io"]),
        )


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise SettingsError(f"{name}={text[:20]!r} is not a number of seconds") from exc
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} outside {low}..{high} s (libxl kills hotplug scripts at 40 s)")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name)
    if text is None or text == "":
        return default
    if text.lower() in ("1", "yes", "true", "on"):
        return True
    if text.lower() in ("0", "no", "false", "off"):
        return False
    raise SettingsError(f"{name}={text[:20]!r} is not a boolean")


def environ() -> Mapping[str, str]:
    return os.environ
