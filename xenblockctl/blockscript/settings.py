"""Block script settings: the [hotplug] options of config.py, typed.

Nothing here parses or bounds a value: names, defaults, bounds and the parser are config.OPTIONS'
(tests/unit/test_settings.py checks that the fields are exactly the [hotplug] options). The
hotplug path does not pay for a config parser on every VM start: `config.load` stats the files
and imports tomllib only when one exists."""

from __future__ import annotations

from xenblockctl import config
from xenblockctl.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Mapping

SECTION = "hotplug"


def _seconds(name: str) -> float:
    value = config.BY_KEY[f"{SECTION}.{name}"].default
    assert isinstance(value, float), name
    return value


def _flag(name: str) -> bool:
    value = config.BY_KEY[f"{SECTION}.{name}"].default
    assert isinstance(value, bool), name
    return value


class Settings(NamedTuple):
    #: How long `add` holds the device waiting for its consumer. libxl SIGKILLs us at 40 s.
    handoff_timeout: float = _seconds("handoff_timeout")
    #: Per-request xenstore deadline.
    xenstore_timeout: float = _seconds("xenstore_timeout")
    #: How long to wait for another attach of the same target to publish its claim.
    lock_timeout: float = _seconds("lock_timeout")
    #: Keep AUTOCLEAR on loop devices consumed by kernel blkback. Off by default: blkback drops its
    #: reference when the frontend reconnects (guest reboot), which would detach the disk under it.
    kernel_autoclear: bool = _flag("kernel_autoclear")
    #: Ask for O_DIRECT loop I/O (falls back to buffered when the kernel refuses).
    direct_io: bool = _flag("direct_io")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Raises config.SettingError (`bad-setting`) for a bad variable, ConfigError
        (`bad-config`) for a bad file."""
        values = config.load(env, section=SECTION)
        return cls._make(values[f"{SECTION}.{name}"].value for name in cls._fields)
