"""Every hand-written dm number, flag, limit, struct size and offset against linux/dm-ioctl.h."""

from __future__ import annotations

import pytest

from tests.support.cheaders import c_values
from xenblockctl.kernel import dm_abi
from xenblockctl.kernel.dm_abi import Cmd, Flag

HEADERS = ["linux/dm-ioctl.h"]

#: Our Cmd member -> the header's ioctl macro (DM_DEV_SUSPEND is the resume command too).
IOCTL_MACROS = {cmd: f"DM_{cmd.name}" for cmd in Cmd}
#: Our Flag member -> the header's macro (two kernel names lack the _FLAG suffix).
FLAG_MACROS = {
    flag: "DM_DEFERRED_REMOVE" if flag is Flag.DEFERRED_REMOVE else f"DM_{flag.name}_FLAG" for flag in Flag
}
STRUCT_OFFSETS = {
    ("dm_ioctl", "version"): 0,
    ("dm_ioctl", "data_size"): 12,
    ("dm_ioctl", "data_start"): 16,
    ("dm_ioctl", "target_count"): 20,
    ("dm_ioctl", "open_count"): 24,
    ("dm_ioctl", "flags"): 28,
    ("dm_ioctl", "event_nr"): 32,
    ("dm_ioctl", "padding"): 36,
    ("dm_ioctl", "dev"): 40,
    ("dm_ioctl", "name"): 48,
    ("dm_ioctl", "uuid"): 176,
    ("dm_ioctl", "data"): dm_abi.DM_IOCTL_DATA_OFFSET,
    ("dm_target_spec", "sector_start"): 0,
    ("dm_target_spec", "length"): 8,
    ("dm_target_spec", "status"): 16,
    ("dm_target_spec", "next"): 20,
    ("dm_target_spec", "target_type"): 24,
    ("dm_name_list", "dev"): 0,
    ("dm_name_list", "next"): 8,
    ("dm_name_list", "name"): dm_abi.DM_NAME_LIST_NAME_OFFSET,
    ("dm_target_versions", "next"): 0,
    ("dm_target_versions", "version"): 4,
    ("dm_target_versions", "name"): dm_abi.DM_TARGET_VERSIONS.size,
    ("dm_target_deps", "count"): 0,
    ("dm_target_deps", "dev"): dm_abi.DM_TARGET_DEPS.size,
    ("dm_target_msg", "sector"): 0,
    ("dm_target_msg", "message"): dm_abi.DM_TARGET_MSG.size,
}
STRUCT_SIZES = {
    "dm_ioctl": dm_abi.DM_IOCTL.size,
    "dm_target_spec": dm_abi.DM_TARGET_SPEC.size,
    "dm_name_list": 16,
    "dm_target_versions": dm_abi.DM_TARGET_VERSIONS.size,
    "dm_target_deps": dm_abi.DM_TARGET_DEPS.size,
    "dm_target_msg": dm_abi.DM_TARGET_MSG.size,
}
LIMITS = {
    "DM_NAME_LEN": dm_abi.DM_NAME_LEN,
    "DM_UUID_LEN": dm_abi.DM_UUID_LEN,
    "DM_MAX_TYPE_NAME": dm_abi.DM_MAX_TYPE_NAME,
    "DM_VERSION_MAJOR": dm_abi.DM_VERSION_MAJOR,
    "DM_IOCTL": dm_abi.DM_IOCTL_TYPE,
    "DM_NAME_LIST_FLAG_HAS_UUID": dm_abi.DM_NAME_LIST_FLAG_HAS_UUID,
    "DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID": dm_abi.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID,
}


@pytest.fixture(scope="module")
def header() -> dict[str, int]:
    exprs: dict[str, str] = {}
    exprs.update({macro: macro for macro in IOCTL_MACROS.values()})
    exprs.update({macro: macro for macro in FLAG_MACROS.values()})
    exprs.update({name: name for name in LIMITS})
    exprs.update({f"{s}.{f}": f"offsetof(struct {s}, {f})" for s, f in STRUCT_OFFSETS})
    exprs.update({f"sizeof {s}": f"sizeof(struct {s})" for s in STRUCT_SIZES})
    return c_values(HEADERS, exprs)


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
def test_ioctl_numbers(header: dict[str, int], cmd: Cmd) -> None:
    assert dm_abi.request(cmd) == header[IOCTL_MACROS[cmd]]


@pytest.mark.parametrize("flag", list(Flag), ids=lambda f: f.name or "")
def test_flags(header: dict[str, int], flag: Flag) -> None:
    assert flag.value == header[FLAG_MACROS[flag]]


@pytest.mark.parametrize("name", list(LIMITS))
def test_limits(header: dict[str, int], name: str) -> None:
    assert LIMITS[name] == header[name]


@pytest.mark.parametrize(("struct_field", "offset"), list(STRUCT_OFFSETS.items()), ids=str)
def test_offsets(header: dict[str, int], struct_field: tuple[str, str], offset: int) -> None:
    assert header[".".join(struct_field)] == offset


@pytest.mark.parametrize(("name", "size"), list(STRUCT_SIZES.items()))
def test_struct_sizes(header: dict[str, int], name: str, size: int) -> None:
    assert header[f"sizeof {name}"] == size


def test_data_start_is_the_aligned_struct_size(header: dict[str, int]) -> None:
    assert dm_abi.DM_DATA_START == header["sizeof dm_ioctl"] == 312
