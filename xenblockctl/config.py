"""Configuration: defaults < /etc/xenblockctl/xenblockctl.conf < conf.d/*.conf < XENBLOCKCTL_* env.

The one source of every option's name, default, bounds and parser: the block script's `Settings`
(blockscript/settings.py) is built from the [hotplug] options here, the admin commands read
`load()`, and tests/lint checks xenblockctl.conf(5) against `Option.describe()`. The hotplug path
pays two stat() calls when no file exists and imports tomllib only when one does.

File format (TOML, documented in xenblockctl.conf(5)):

    [hotplug]
    handoff_timeout = 30.0
    [attach]
    wait = 10

Drop-ins in `conf.d/` next to the main file are read in name order; later files win. Unknown
sections or keys are errors: a misspelt key that is silently ignored is worse than a refusal.
A bad value in a file is `bad-config`; a bad `XENBLOCKCTL_*` variable is `bad-setting`."""

from __future__ import annotations

import posix

from xenblockctl import pathsteps
from xenblockctl.errors import XenblockError
from xenblockctl.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_PATH = "/etc/xenblockctl/xenblockctl.conf"
#: Points at another main file (its conf.d/ is then the one next to it). Tests and packagers use it.
PATH_ENV = "XENBLOCKCTL_CONFIG"
DROPIN_DIR = "conf.d"

#: LIBXL_HOTPLUG_TIMEOUT (libxl_internal.h): libxl SIGKILLs a hotplug script after 40 s.
LIBXL_HOTPLUG_TIMEOUT = 40.0
#: The block script's own deadline, measured from just before it connects to xenstore: 2 s before
#: libxl's, for the interpreter start-up and imports that happen before the clock starts. Every
#: xenstore request, wait and backoff of the script ends by then (hotplug.py).
SCRIPT_DEADLINE = LIBXL_HOTPLUG_TIMEOUT - 2.0
#: What the hand-off leaves of the script's deadline: it starts after the target is opened, locked
#: and published, and a failed hand-off still has to withdraw and write `hotplug-error`. A request
#: after SCRIPT_DEADLINE fails, so a hand-off allowed to run up to it leaves libxl no error at all.
HANDOFF_RESERVE = 3.0
#: Upper bound of every xenstore or lock wait: no single one may outlast the script's deadline.
WAIT_MAX = SCRIPT_DEADLINE


class ConfigError(XenblockError):
    """A configuration file is unreadable, not TOML, or has an unknown option or a bad value."""

    code = "bad-config"


class SettingError(ConfigError):
    """A `XENBLOCKCTL_*` environment variable holds a value its option does not accept."""

    code = "bad-setting"


def _seconds_text(text: str) -> float | None:
    """A number of seconds as float(), minus what float() takes that no one means as a setting:
    non-ASCII digits ('٣'), surrounding blanks, '1_0'. nan and inf fail every range check."""
    if not text.isascii() or text != text.strip() or "_" in text or len(text) > 24:
        return None
    try:
        return float(text)
    except ValueError:
        return None


class Option(NamedTuple):
    section: str
    name: str
    kind: str  # "seconds" | "bool" | "path" | "choice"
    default: float | bool | str
    env: str
    doc: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    def parse_text(self, text: str, where: str, error: type[ConfigError] = ConfigError) -> float | bool | str:
        """An environment-style string -> typed value: the one parser of every option, whether the
        text came from the environment (error=SettingError) or a file (via `from_toml`)."""
        if self.kind == "seconds":
            value = _seconds_text(text)
            if value is None:
                raise error(f"{where}: {text[:20]!r} is not a number of seconds")
            return self.check_seconds(value, where, error)
        if self.kind == "bool":
            lowered = text.lower()
            if lowered in ("1", "yes", "true", "on"):
                return True
            if lowered in ("0", "no", "false", "off"):
                return False
            raise error(f"{where}: {text[:20]!r} is not a boolean")
        if self.kind == "choice" and text not in self.choices:
            raise error(f"{where}: {text[:20]!r} is not one of {', '.join(self.choices)}")
        return text

    def check_seconds(self, value: float, where: str, error: type[ConfigError] = ConfigError) -> float:
        if not self.low <= value <= self.high:
            raise error(f"{where}: {value} outside {self.low:g}..{self.high:g} s")
        return value

    def from_toml(self, value: object, where: str) -> str:
        """A TOML value -> the environment-style string it stands for (checked first, so a bad file
        fails where it is read)."""
        if self.kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: expected a number of seconds, got {type(value).__name__}")
            # Range first: repr() of a number outside every range may use an exponent ('1e+20').
            text = repr(self.check_seconds(float(value), where))
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {type(value).__name__}")
            text = "1" if value else "0"
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
            text = value
        self.parse_text(text, where)
        return text

    def describe(self) -> str:
        """The parenthesis after the option's name in xenblockctl.conf(5) (tests/lint checks it)."""
        if self.kind == "seconds":
            assert isinstance(self.default, float)
            what = f"seconds, {self.low:g}-{self.high:g}, default {self.default:g}"
        elif self.kind == "bool":
            what = f"boolean, default {'true' if self.default else 'false'}"
        elif self.kind == "choice":
            names = [f"`{c}`" for c in self.choices]
            what = f"{', '.join(names[:-1])} or {names[-1]}, default `{self.default}`"
        else:
            what = f"{self.kind}, default `{self.default}`"
        return f"{what}; `{self.env}`"


#: Every option. The [hotplug] ones are the fields of blockscript/settings.py's `Settings`.
OPTIONS: tuple[Option, ...] = (
    Option(
        "hotplug",
        "handoff_timeout",
        "seconds",
        30.0,
        "XENBLOCKCTL_HANDOFF_TIMEOUT",
        "how long `add` holds the device waiting for a backend to open it (libxl kills at 40 s)",
        0.1,
        SCRIPT_DEADLINE - HANDOFF_RESERVE,
    ),
    Option(
        "hotplug",
        "xenstore_timeout",
        "seconds",
        10.0,
        "XENBLOCKCTL_XENSTORE_TIMEOUT",
        "deadline of each xenstore request",
        0.1,
        WAIT_MAX,
    ),
    Option(
        "hotplug",
        "lock_timeout",
        "seconds",
        10.0,
        "XENBLOCKCTL_LOCK_TIMEOUT",
        "how long an attach waits for another attach of the same target",
        0.1,
        WAIT_MAX,
    ),
    Option(
        "hotplug",
        "kernel_autoclear",
        "bool",
        False,
        "XENBLOCKCTL_KERNEL_AUTOCLEAR",
        "keep AUTOCLEAR on loop devices handed to kernel blkback (a guest reboot then detaches them)",
    ),
    Option(
        "hotplug",
        "direct_io",
        "bool",
        False,
        "XENBLOCKCTL_DIRECT_IO",
        "ask for O_DIRECT loop I/O (falls back to buffered when refused)",
    ),
    Option(
        "attach",
        "wait",
        "seconds",
        10.0,
        "XENBLOCKCTL_ATTACH_WAIT",
        "default --wait of `attach`: how long to wait for the frontend to connect (0: do not wait)",
        0.0,
        3600.0,
    ),
    Option(
        "attach",
        "backend",
        "choice",
        "auto",
        "XENBLOCKCTL_ATTACH_BACKEND",
        "who serves disks `attach` creates: kernel blkback, the engine, or auto (kernel if loaded)",
        choices=("auto", "kernel", "engine"),
    ),
    Option(
        "attach",
        "script",
        "path",
        "/etc/xen/scripts/block-xenblockctl",
        "XENBLOCKCTL_SCRIPT",
        "the `script` node `attach` writes (what libxl runs for remove when it destroys the domain)",
    ),
    Option(
        "detach",
        "wait",
        "seconds",
        10.0,
        "XENBLOCKCTL_DETACH_WAIT",
        "default --wait of `detach`: how long the backend gets to reach Closed",
        0.0,
        3600.0,
    ),
    Option(
        "udev",
        "enabled",
        "bool",
        False,
        "XENBLOCKCTL_UDEV",
        "let the udev rules run the block script (only where neither libxl nor xl devd runs it)",
    ),
)
BY_KEY: dict[str, Option] = {opt.key: opt for opt in OPTIONS}
BY_ENV: dict[str, Option] = {opt.env: opt for opt in OPTIONS}


class Value(NamedTuple):
    option: Option
    value: float | bool | str
    source: str  # "default" | a file path | "env NAME"


def paths(env: Mapping[str, str]) -> tuple[str, str]:
    """(main file, drop-in directory)."""
    main = env.get(PATH_ENV) or DEFAULT_PATH
    # os.path.join(os.path.dirname(main), DROPIN_DIR) without os (the hotplug path never imports it)
    directory, slash, _name = main.rpartition("/")
    return main, f"{directory}{slash}{DROPIN_DIR}"


def config_files(env: Mapping[str, str]) -> list[str]:
    """Existing config files in the order they apply. Cheap: a stat and, if present, a listdir."""
    main, dropins = paths(env)
    files = [main] if pathsteps.is_file(main) else []
    try:
        names = sorted(posix.listdir(dropins))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError as exc:
        raise ConfigError.from_oserror(exc, f"cannot list {dropins}") from exc
    files += [f"{dropins}/{n}" for n in names if n.endswith(".conf") and not n.startswith(".")]
    return files


def read_file(path: str) -> dict[str, str]:
    """One file -> {ENV_NAME: text}. tomllib is imported here only, so only when a file exists."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError.from_oserror(exc, f"cannot read {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    out: dict[str, str] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for name, value in table.items():
            option = BY_KEY.get(f"{section}.{name}")
            if option is None:
                raise ConfigError(f"{path}: unknown option {section}.{name} (see xenblockctl.conf(5))")
            out[option.env] = option.from_toml(value, f"{path}: {option.key}")
    return out


def file_values(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{ENV_NAME: (text, file)} from every config file, later files winning."""
    merged: dict[str, tuple[str, str]] = {}
    for path in config_files(env):
        for name, text in read_file(path).items():
            merged[name] = (text, path)
    return merged


def load(env: Mapping[str, str] | None = None, *, section: str | None = None) -> dict[str, Value]:
    """Effective value and source of every option (or of one section's), keyed `section.name`.

    An empty variable counts as unset. Any bad file is refused even when `section` is given: a
    file we cannot read as a whole is not half-applied."""
    if env is None:  # a caller without an environment object; the hotplug path passes its own
        import os  # only here: the hotplug path passes its environment and never imports os

        env = os.environ
    files = file_values(env)
    result: dict[str, Value] = {}
    for option in OPTIONS:
        if section is not None and option.section != section:
            continue
        text = env.get(option.env)
        if text:
            value = option.parse_text(text, f"{option.env}={text[:20]}", SettingError)
            result[option.key] = Value(option, value, f"env {option.env}")
        elif option.env in files:
            text, path = files[option.env]
            result[option.key] = Value(option, option.parse_text(text, f"{path}: {option.key}"), path)
        else:
            result[option.key] = Value(option, option.default, "default")
    return result
