"""The hotplug path's string grammars, checked without `re` since issue 18, accept exactly what the
regular expressions they replaced accepted (the regexes are kept here as the reference)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenblockctl.blockscript import sharing
from xenblockctl.xenstore import identity, vbd
from xenblockctl.xenstore.errors import XenstoreError
from xenblockctl.xenstore.numbers import is_decimal, is_hex

_DEC = r"(0|[1-9][0-9]*)"
RELATIVE = re.compile(rf"backend/([a-z0-9]+)/{_DEC}/{_DEC}")
ABSOLUTE = re.compile(rf"/local/domain/{_DEC}/backend/([a-z0-9]+)/{_DEC}/{_DEC}")
FRONTEND = re.compile(rf"/local/domain/{_DEC}/device/([a-z0-9]+)/{_DEC}")
PHYSICAL = re.compile(r"([1-9a-f][0-9a-f]{0,7}|0):([1-9a-f][0-9a-f]{0,7}|0)")
LUID = re.compile(r"[1-9a-f][0-9a-f]{0,15}")
DISKSEQ_NODE = re.compile(r"[1-9a-fA-F][0-9a-fA-F]{0,15}")
HEX = re.compile(r"[0-9a-f]{1,16}")
TAG = re.compile(r"[A-Za-z0-9:._-]{1,63}")
DM_UUID = re.compile(r"XENBLOCKCTL-[!-.0-~]{1,116}")
VM_PATH = re.compile(r"/vm/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# near-misses are likelier than random text to find a difference: mostly the grammar's own alphabet
HEXISH = st.text(alphabet="0123456789abcdefABCDEFgx:-/ \u0663\u00b2", max_size=20)
PATHISH = st.lists(
    st.sampled_from(
        [
            "backend",
            "vbd",
            "vbd3",
            "local",
            "domain",
            "device",
            "",
            "0",
            "5",
            "05",
            "51712",
            "a",
            "Vbd",
            "\u0663",
            "x y",
        ]
    ),
    max_size=9,
).map("/".join)
PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x80), max_size=130)


def _accepts(fn: Callable[[str], object], text: str) -> tuple[str, object]:
    try:
        return ("ok", fn(text))
    except (identity.IdentityError, vbd.VbdPathError, XenstoreError, ValueError) as exc:
        return ("refused", type(exc).__name__)


@given(HEXISH)
@settings(max_examples=400)
def test_hex_grammars_match_the_regexes(text: str) -> None:
    assert is_hex(text, most=16, zero=False) == (LUID.fullmatch(text) is not None)
    assert is_hex(text, most=16, zero=False, lowercase=False) == (DISKSEQ_NODE.fullmatch(text) is not None)
    old_hex = HEX.fullmatch(text) is not None and not (len(text) > 1 and text.startswith("0"))
    assert is_hex(text, most=16) == old_hex
    m = PHYSICAL.fullmatch(text)
    old = ("ok", (int(m.group(1), 16), int(m.group(2), 16))) if m else ("refused", "IdentityError")
    assert _accepts(identity.parse_physical_device, text) == old


@given(st.text(alphabet="0123456789a\u0663 -+_", max_size=12))
def test_is_decimal_matches_the_regex(text: str) -> None:
    assert is_decimal(text) == (re.fullmatch(_DEC, text) is not None)


@pytest.mark.parametrize("cls", [vbd.BackendPath, vbd.FrontendPath])
@given(text=st.one_of(PATHISH, PATHISH.map(lambda p: "/" + p)))
@settings(max_examples=400)
def test_vbd_paths_match_the_regexes(cls: type[vbd.BackendPath] | type[vbd.FrontendPath], text: str) -> None:
    got = _accepts(cls.parse, text)
    if cls is vbd.BackendPath:
        matched = RELATIVE.fullmatch(text) or ABSOLUTE.fullmatch(text)
    else:
        matched = FRONTEND.fullmatch(text)
    if matched is None:
        assert got == ("refused", "VbdPathError")
    else:
        # what the regex let through goes on to the kind/domid/devid rules, as before
        assert got[0] == "ok" or got == ("refused", "VbdPathError")


@given(
    st.one_of(
        PRINTABLE, PRINTABLE.map(lambda t: "xenblockctl:" + t), PRINTABLE.map(lambda t: "XENBLOCKCTL-" + t)
    )
)
@settings(max_examples=400)
def test_tag_and_dm_uuid_characters_match_the_regexes(text: str) -> None:
    assert (0 < len(text) <= 63 and identity._TAG_CHARS.issuperset(text)) == (TAG.fullmatch(text) is not None)
    prefix = identity.DM_UUID_PREFIX
    ours = (
        text.startswith(prefix)
        and 0 < len(text) - len(prefix) <= 116
        and identity._DM_UUID_CHARS.issuperset(text[len(prefix) :])
    )
    assert ours == (DM_UUID.fullmatch(text) is not None)


@given(
    st.one_of(
        st.uuids().map(lambda u: f"/vm/{u}"),
        st.uuids().map(lambda u: f"/vm/{u}".upper()),
        st.text(alphabet="/vm0123456789abcdef-", max_size=44),
    )
)
def test_vm_path_matches_the_regex(text: str) -> None:
    assert sharing._is_vm_path(text) == (VM_PATH.fullmatch(text) is not None)
