"""Embedded xenstored building blocks on their own: C-compatible parsing, path rules, framing."""

from __future__ import annotations

import errno

import pytest

from xenblockctl.xenstore.server import paths
from xenblockctl.xenstore.server.permissions import NONE, OWNER, READ, WRITE, Perm, parse_perm, perm_for
from xenblockctl.xenstore.server.wire import (
    HEADER,
    FrameDecoder,
    OversizeFrame,
    c_atoi,
    error_name,
    error_payload,
    get_strings,
    onearg,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"5", 5),
        (b"  7", 7),
        (b"+3", 3),
        (b"-1", 0xFFFFFFFF),
        (b"12abc", 12),
        (b"abc", 0),
        (b"", 0),
        (b"-", 0),
    ],
)
def test_c_atoi(text: bytes, value: int) -> None:
    assert c_atoi(text) == value


@pytest.mark.parametrize(
    ("text", "perm"),
    [
        ("r5", Perm(READ, 5)),
        ("w0", Perm(WRITE, 0)),
        ("b12", Perm(READ | WRITE, 12)),
        ("n0x10", Perm(NONE, 16)),
        ("r010", Perm(READ, 8)),
        ("r 5", Perm(READ, 5)),
        ("r-1", Perm(READ, 0xFFFFFFFF)),
    ],
)
def test_parse_perm_accepts_what_strtol_base_0_accepts(text: str, perm: Perm) -> None:
    assert parse_perm(text) == perm


@pytest.mark.parametrize("text", ["", "r", "x5", "r5 ", "r08", "r0x", "r1_0", "R5", "rr5"])
def test_parse_perm_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad permission"):
        parse_perm(text)


def test_perm_strings_print_as_c_ints() -> None:
    assert str(Perm(READ, 0xFFFFFFFF)) == "r-1"
    assert str(Perm(READ | WRITE, 7)) == "b7"


def test_perm_for_owner_default_and_listed() -> None:
    perms = (Perm(NONE, 5), Perm(READ, 7), Perm(WRITE, 9))
    assert perm_for(5, False, None, perms) == READ | WRITE | OWNER
    assert perm_for(7, False, None, perms) == READ
    assert perm_for(9, False, None, perms) == WRITE
    assert perm_for(3, False, None, perms) == NONE
    assert perm_for(3, True, None, perms) == READ | WRITE | OWNER
    assert perm_for(3, False, 5, perms) == READ | WRITE | OWNER  # acting for the owner
    assert perm_for(3, False, 7, perms) == READ


@pytest.mark.parametrize(
    ("path", "valid"),
    [
        ("/", True),
        ("/a/b-c_d@e/F9", True),
        ("/a/", False),
        ("a", False),
        ("/a//b", False),
        ("/a.b", False),
        ("/" + "x" * 2047, True),
        ("/" + "x" * 2048, False),
        ("/local/domain/12/" + "x" * 2048, True),
        ("/local/domain/12/" + "x" * 2049, False),
        ("/local/domain/123456/" + "x" * 2040, False),
    ],
)
def test_path_validity(path: str, valid: bool) -> None:
    assert paths.is_valid(path) is valid


def test_path_relations() -> None:
    assert paths.canonicalize("a/b", 5) == "/local/domain/5/a/b"
    assert paths.canonicalize("@x", 5) == "@x"
    assert paths.parent("/a/b") == "/a"
    assert paths.parent("/a") == "/"
    assert paths.parent("/") == "/"
    assert paths.child("/", "a") == "/a"
    assert paths.is_child("/a/b", "/a")
    assert paths.is_child("/a", "/a")
    assert not paths.is_child("/ab", "/a")
    assert paths.is_child("/anything", "/")


def test_error_names_fall_back_to_einval() -> None:
    assert error_name(errno.EAGAIN) == "EAGAIN"
    assert error_payload(errno.ENOENT) == b"ENOENT\0"
    assert error_name(errno.ETIMEDOUT) == "EINVAL"


def test_argument_splitting() -> None:
    assert onearg(b"/a\0") == b"/a"
    assert onearg(b"/a") is None
    assert onearg(b"/a\0b\0") is None
    assert onearg(b"") is None
    assert get_strings(b"a\0b\0tail") == [b"a", b"b"]


def test_decoder_rejects_oversize_before_reading_the_payload() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(HEADER.pack(2, 1, 0, 4096) + b"x" * 10) == []
    with pytest.raises(OversizeFrame):
        FrameDecoder().feed(HEADER.pack(2, 1, 0, 4097))
