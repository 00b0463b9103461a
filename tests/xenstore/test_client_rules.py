"""Client-side rules without a daemon: error mapping, path/value/permission checks."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.errors import (
    TransactionConflict,
    XenstoreError,
    XenstoreExists,
    XenstoreInvalid,
    XenstoreNoEntry,
    XenstorePermissionDenied,
    XenstoreQuota,
    XenstoreTooBig,
    errno_from_name,
    error_for,
)
from xenblockctl.xenstore.paths import (
    check_path,
    check_token,
    check_watch_path,
    decode_value,
    encode_value,
    join,
)
from xenblockctl.xenstore.perms import Access, Perm


@pytest.mark.parametrize(
    ("name", "cls", "code"),
    [
        ("ENOENT", XenstoreNoEntry, "xenstore-enoent"),
        ("EACCES", XenstorePermissionDenied, "xenstore-eacces"),
        ("EEXIST", XenstoreExists, "xenstore-eexist"),
        ("EINVAL", XenstoreInvalid, "xenstore-einval"),
        ("E2BIG", XenstoreTooBig, "xenstore-e2big"),
        ("ENOSPC", XenstoreQuota, "xenstore-equota"),
        ("EAGAIN", TransactionConflict, "xenstore-eagain"),
    ],
)
def test_daemon_error_names_map_to_typed_errors(name: str, cls: type[XenstoreError], code: str) -> None:
    num = errno_from_name(name)
    assert num == getattr(errno, name)
    exc = error_for(num, "read /x")
    assert type(exc) is cls
    assert isinstance(exc, XenblockError)
    assert (exc.code, exc.errno) == (code, num)
    assert str(exc).startswith(f"{code}: read /x ({name}:")


def test_other_errnos_keep_their_name_in_the_code() -> None:
    exc = error_for(errno.ENOTEMPTY, "rm /x")
    assert type(exc) is XenstoreError
    assert exc.code == "xenstore-enotempty"
    assert error_for(None, "odd").code == "xenstore-error"
    assert errno_from_name("EWHATEVER") is None


@pytest.mark.parametrize(
    "path",
    ["/", "/a", "a", "backend/vbd/5/51712", "/local/domain/0/x-y_z@w", "/" + "a" * 3071, "a" * 2048],
)
def test_valid_paths(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["", "//", "/a//b", "/a/", "a/", "/a b", "/a.b", "/ä", "@x", "/a\0"])
def test_invalid_paths(path: str) -> None:
    with pytest.raises(XenstoreInvalid):
        check_path(path)


def test_path_limits() -> None:
    with pytest.raises(XenstoreTooBig):
        check_path("/" + "a" * 3072)
    with pytest.raises(XenstoreTooBig):
        check_path("a" * 2049)


def test_watch_paths_and_tokens() -> None:
    assert check_watch_path("@introduceDomain") == "@introduceDomain"
    assert check_watch_path("@releaseDomain") == "@releaseDomain"
    assert check_watch_path("/a") == "/a"
    for bad in ("@", "@a/b", "@ x"):
        with pytest.raises(XenstoreInvalid):
            check_watch_path(bad)
    assert check_token("be-51712") == "be-51712"
    for bad in ("", "a b", "a\0", "é"):
        with pytest.raises(XenstoreInvalid):
            check_token(bad)


@given(st.text().filter(lambda s: "\0" not in s))
def test_values_round_trip_through_bytes(value: str) -> None:
    assert decode_value(encode_value(value)) == value


@given(st.binary().filter(lambda b: b"\0" not in b))
def test_any_stored_bytes_decode_and_re_encode_unchanged(raw: bytes) -> None:
    # read() never fails on foreign bytes, and writing the str back stores the same bytes
    assert encode_value(decode_value(raw)) == raw


def test_nul_values_are_refused() -> None:
    with pytest.raises(XenstoreInvalid):
        encode_value("a\0b")


def test_join() -> None:
    assert join("/local/domain/0", "backend", "vbd") == "/local/domain/0/backend/vbd"
    assert join("/", "tool") == "/tool"
    assert join("backend", "vbd", "", "5") == "backend/vbd/5"


def test_perms() -> None:
    assert Perm.parse("r5") == Perm(Access.READ, 5)
    assert str(Perm(Access.BOTH, 0)) == "b0"
    assert Perm.parse("w3").can_write
    assert not Perm.parse("w3").can_read
    assert not Perm.parse("n0").can_read
    for bad in ("x5", "r", "5", "r-1", "R5", "r 5", "r65536"):
        with pytest.raises(XenstoreInvalid):
            Perm.parse(bad)
