"""NBD URIs: doc/uri.md's examples, and every refusal with its code."""

from __future__ import annotations

import pytest

from xenblockctl.nbd import uri
from xenblockctl.nbd.errors import NbdError

# doc/uri.md, "NBD URI export name"
URI_MD_EXAMPLES = [
    ("nbd://example.com/disk", "disk"),
    ("nbd+unix:///disk?socket=/run/sock", "disk"),
    ("nbd://example.com/", ""),
    ("nbd://example.com", ""),
    ("nbd://example.com//disk", "/disk"),
    ("nbd://example.com/hello%20world", "hello world"),
]


@pytest.mark.parametrize(("text", "export"), URI_MD_EXAMPLES)
def test_export_names_of_uri_md(text: str, export: str) -> None:
    assert uri.parse(text).export == export


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("nbd://example.com/disk", "nbd://example.com:10809/disk"),
        ("NBD://Example.COM:10810/disk", "nbd://example.com:10810/disk"),
        ("nbd://127.0.0.1:1/a/b", "nbd://127.0.0.1:1/a/b"),
        ("nbd://[::1]:10809/x", "nbd://[::1]:10809/x"),
        ("nbd://[fe80::1]/x", "nbd://[fe80::1]:10809/x"),
        ("nbd+unix:///disk?socket=/run/x.sock", "nbd+unix:///disk?socket=/run/x.sock"),
        ("nbd+unix:///?socket=/run/x%20y.sock", "nbd+unix:///?socket=/run/x%20y.sock"),
        ("nbd+unix:///h%C3%A9?socket=/s", "nbd+unix:///h%C3%A9?socket=/s"),
        ("nbd://h/%7e", "nbd://h:10809/~"),
    ],
)
def test_canonical_spelling(text: str, canonical: str) -> None:
    parsed = uri.parse(text)
    assert parsed.canonical() == canonical
    assert uri.parse(canonical) == parsed  # the canonical form parses back to the same export


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("nbds://h/disk", "nbd-uri-unsupported"),
        ("nbds+unix:///d?socket=/s", "nbd-uri-unsupported"),
        ("nbd+vsock://2/d", "nbd-uri-unsupported"),
        ("nbd://h/d?tls-type=x509", "nbd-uri-unsupported"),
        ("nbd://user@h/d", "nbd-uri-unsupported"),
        ("nbd+unix:///d?socket=%00abstract", "nbd-uri-unsupported"),
        ("/srv/disk.img", "nbd-uri-invalid"),
        ("http://h/d", "nbd-uri-invalid"),
        ("nbd:///d", "nbd-uri-invalid"),  # no host: never guess localhost
        ("nbd://h:0/d", "nbd-uri-invalid"),
        ("nbd://h:65536/d", "nbd-uri-invalid"),
        ("nbd://h:12a/d", "nbd-uri-invalid"),
        ("nbd://h:/d", "nbd-uri-invalid"),
        ("nbd://h:\u0661\u0662/d", "nbd-uri-invalid"),  # Arabic-Indic digits
        ("nbd://h/d#frag", "nbd-uri-invalid"),
        ("nbd://h/d?socket=/s", "nbd-uri-invalid"),  # socket is for nbd+unix only
        ("nbd://h/d?x-foo=1", "nbd-uri-invalid"),
        ("nbd+unix:///d", "nbd-uri-invalid"),
        ("nbd+unix://h/d?socket=/s", "nbd-uri-invalid"),
        ("nbd+unix:///d?socket=rel.sock", "nbd-uri-invalid"),
        ("nbd+unix:///d?socket=/a&socket=/b", "nbd-uri-invalid"),
        ("nbd+unix:///d?socket", "nbd-uri-invalid"),
        ("nbd+unix:///d?socket=/" + "s" * 120, "nbd-uri-invalid"),
        ("nbd://h/a%zz", "nbd-uri-invalid"),
        ("nbd://h/a%ff", "nbd-uri-invalid"),  # not UTF-8
        ("nbd://h/a%00b", "nbd-uri-invalid"),  # NUL in a string
        ("nbd://h/a b", "nbd-uri-invalid"),
        ("nbd://h/d\u00e9", "nbd-uri-invalid"),  # non-ASCII must be percent-encoded
        ("nbd://h/" + "a" * 4097, "nbd-uri-invalid"),
        ('nbd://h/a"b', "nbd-uri-invalid"),
        ("nbd://-h/d", "nbd-uri-invalid"),
        ("nbd://h_x/d", "nbd-uri-invalid"),
        ("nbd://[h]/d", "nbd-uri-invalid"),
        ("nbd://[::1]x/d", "nbd-uri-invalid"),
    ],
)
def test_refusals_are_coded(text: str, code: str) -> None:
    with pytest.raises(NbdError) as info:
        uri.parse(text)
    assert info.value.code == code
    assert "\n" not in info.value.one_line()


def test_looks_like_nbd() -> None:
    assert uri.looks_like_nbd("nbd://h/d")
    assert uri.looks_like_nbd("NBDS+unix:///d")
    assert not uri.looks_like_nbd("/dev/nbd0")
    assert not uri.looks_like_nbd("format=raw,target=nbd://h/d")
