"""Settings and configuration: one parser, one set of bounds, coded errors (host lane, no root).

The block script's `Settings` and the admin's `config.load()` once parsed the same options with
two sets of rules that disagreed (handoff_timeout 36: accepted and documented, yet every add
failed). These tests pin the single source: Settings' fields are the [hotplug] options, and both
readers accept and refuse exactly the same values."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenblockctl import config
from xenblockctl.blockscript.settings import Settings
from xenblockctl.environment import LOCK_DIR, XEN_BACKEND_BUS, Environment
from xenblockctl.errors import XenblockError

HOTPLUG = [o for o in config.OPTIONS if o.section == "hotplug"]
SECONDS = [o for o in HOTPLUG if o.kind == "seconds"]
FLAGS = [o for o in HOTPLUG if o.kind == "bool"]


@pytest.fixture
def no_files(tmp_path: Path) -> dict[str, str]:
    """Variables that point the config file at one that does not exist (never the host's /etc)."""
    return {config.PATH_ENV: str(tmp_path / "etc" / "xenblockctl.conf")}


def _code(exc: pytest.ExceptionInfo[XenblockError]) -> str:
    return exc.value.code


def test_settings_fields_are_the_hotplug_options_with_their_defaults() -> None:
    assert Settings._fields == tuple(o.name for o in HOTPLUG)
    assert Settings() == tuple(o.default for o in HOTPLUG)


def test_without_files_or_variables_the_defaults_apply(no_files: dict[str, str]) -> None:
    assert Settings.from_env(no_files) == Settings()


@pytest.mark.parametrize("option", SECONDS, ids=lambda o: o.name)
def test_seconds_bounds_are_inclusive_and_coded_outside(
    option: config.Option, no_files: dict[str, str]
) -> None:
    for text in (f"{option.low:g}", f"{option.high:g}"):
        settings = Settings.from_env({**no_files, option.env: text})
        assert getattr(settings, option.name) == float(text)
    for text in (f"{option.low / 2:g}", f"{option.high + 0.5:g}", "0"):
        with pytest.raises(config.SettingError) as exc:
            Settings.from_env({**no_files, option.env: text})
        assert _code(exc) == "bad-setting"
        assert f"outside {option.low:g}..{option.high:g} s" in exc.value.message


@pytest.mark.parametrize(
    "text", ["forever", "٣", " 5", "5 ", "1_0", "nan", "inf", "-inf", "-1", "0x10", "1" * 30]
)
def test_seconds_that_are_not_a_plain_number_are_refused(text: str, no_files: dict[str, str]) -> None:
    with pytest.raises(config.SettingError) as exc:
        Settings.from_env({**no_files, "XENBLOCKCTL_LOCK_TIMEOUT": text})
    assert _code(exc) == "bad-setting"
    assert exc.value.message.startswith(f"XENBLOCKCTL_LOCK_TIMEOUT={text[:20]}: ")


@pytest.mark.parametrize("option", FLAGS, ids=lambda o: o.name)
def test_flags(option: config.Option, no_files: dict[str, str]) -> None:
    for text, value in [
        ("1", True),
        ("yes", True),
        ("TRUE", True),
        ("on", True),
        ("0", False),
        ("off", False),
    ]:
        assert getattr(Settings.from_env({**no_files, option.env: text}), option.name) is value
    with pytest.raises(config.SettingError):
        Settings.from_env({**no_files, option.env: "maybe"})


def test_an_empty_variable_counts_as_unset(no_files: dict[str, str]) -> None:
    assert Settings.from_env({**no_files, **{o.env: "" for o in HOTPLUG}}) == Settings()


def test_handoff_timeout_bound_leaves_time_to_report_before_libxl_kills() -> None:
    """libxl SIGKILLs the script at 40 s (LIBXL_HOTPLUG_TIMEOUT); the script's own deadline is 2 s
    earlier (start-up), and a failed hand-off must still withdraw and write hotplug-error before
    that deadline, after the open/lock/publish steps that precede it."""
    option = config.BY_KEY["hotplug.handoff_timeout"]
    assert config.LIBXL_HOTPLUG_TIMEOUT == 40.0
    assert option.high == config.SCRIPT_DEADLINE - config.HANDOFF_RESERVE == 35.0
    assert isinstance(option.default, float)
    assert option.default <= option.high
    for other in SECONDS:
        assert other.high <= config.SCRIPT_DEADLINE < config.LIBXL_HOTPLUG_TIMEOUT


GRID = ["0.05", "0.1", "1", "30", "34.9", "35", "35.5", "36", "38", "38.5", "60", "x"]


@pytest.mark.parametrize("option", SECONDS, ids=lambda o: o.name)
def test_config_load_and_settings_agree_on_every_value(
    option: config.Option, no_files: dict[str, str]
) -> None:
    """The regression: handoff_timeout = 36 passed config.load() (and the man page) while
    Settings refused it, so `config show`/doctor said fine and every add failed."""
    for text in GRID:
        env = {**no_files, option.env: text}
        try:
            loaded: object = config.load(env)[option.key].value
        except config.ConfigError as exc:
            loaded = exc.code
        try:
            used: object = getattr(Settings.from_env(env), option.name)
        except config.ConfigError as exc:
            used = exc.code
        assert loaded == used, f"{option.env}={text}: config.load -> {loaded}, Settings -> {used}"


def test_handoff_timeout_36_is_refused_by_both(no_files: dict[str, str]) -> None:
    env = {**no_files, "XENBLOCKCTL_HANDOFF_TIMEOUT": "36"}
    with pytest.raises(config.SettingError):
        config.load(env)
    with pytest.raises(config.SettingError):
        Settings.from_env(env)


def _write(no_files: dict[str, str], text: str) -> Path:
    path = Path(no_files[config.PATH_ENV])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hotplug]\nhandoff_timeout = 36\n", "hotplug.handoff_timeout: 36.0 outside 0.1..35 s"),
        ("[hotplug]\nhandoff_timeout = 1e300\n", "outside 0.1..35 s"),
        ("[hotplug]\nhandoff_timeout = true\n", "expected a number of seconds, got bool"),
        ('[hotplug]\ndirect_io = "yes"\n', "expected true or false, got str"),
        ("[hotplug]\nhandof_timeout = 3\n", "unknown option hotplug.handof_timeout"),
        ("[hotplug\n", "not valid TOML"),
    ],
)
def test_bad_files_are_bad_config_for_settings_too(no_files: dict[str, str], text: str, message: str) -> None:
    path = _write(no_files, text)
    with pytest.raises(config.ConfigError) as exc:
        Settings.from_env(no_files)
    assert _code(exc) == "bad-config"
    assert exc.value.message.startswith(str(path))
    assert message in exc.value.message


def test_a_bad_option_of_another_section_in_the_environment_does_not_stop_the_script(
    no_files: dict[str, str],
) -> None:
    # attach.backend is not the script's business: its variable is checked where it is used.
    assert Settings.from_env({**no_files, "XENBLOCKCTL_ATTACH_BACKEND": "qemu"}) == Settings()
    with pytest.raises(config.SettingError):
        config.load({**no_files, "XENBLOCKCTL_ATTACH_BACKEND": "qemu"})


def test_files_then_dropins_then_variables(no_files: dict[str, str]) -> None:
    path = _write(no_files, "[hotplug]\nhandoff_timeout = 20\nlock_timeout = 5\ndirect_io = true\n")
    (path.parent / "conf.d").mkdir()
    (path.parent / "conf.d" / "10-x.conf").write_text("[hotplug]\nhandoff_timeout = 12.5\n")
    settings = Settings.from_env({**no_files, "XENBLOCKCTL_LOCK_TIMEOUT": "7"})
    assert (settings.handoff_timeout, settings.lock_timeout, settings.direct_io) == (12.5, 7.0, True)


def test_environment_defaults_and_an_empty_variable_is_unset() -> None:
    env = Environment({"XENBLOCKCTL_LOCK_DIR": "", "XENBLOCKCTL_PAUSE_AT": ""})
    assert (env.lock_dir, env.xen_backend_bus, env.pause_at, env.pause_file, env.gc_scope) == (
        LOCK_DIR,
        XEN_BACKEND_BUS,
        None,
        None,
        None,
    )
    hooks = Environment(
        {
            "XENBLOCKCTL_LOCK_DIR": "/tmp/l",
            "XENBLOCKCTL_TEST_XEN_BACKEND_BUS": "/tmp/bus",
            "XENBLOCKCTL_PAUSE_AT": "add-start",
            "XENBLOCKCTL_PAUSE_FILE": "/tmp/m",
            "XENBLOCKCTL_TEST_GC_SCOPE": "/tmp/s",
        }
    )
    assert (hooks.lock_dir, hooks.xen_backend_bus, hooks.pause_at, hooks.pause_file, hooks.gc_scope) == (
        "/tmp/l",
        "/tmp/bus",
        "add-start",
        "/tmp/m",
        "/tmp/s",
    )
