"""The shortcuts the 128-backend walk takes per request (bench/README.md, issue 18 round 8) decide
exactly what the one-at-a-time code they stand for decides: a batch's paths checked in one pass
(paths.check_paths), a listing decoded in one piece (client._split_list), a reply buffer decoded
in one loop (wire.FrameDecoder.frames), a batch framed in one join (wire.encode_many). And a batch
of no requests costs no send."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.client import XenStore, _split_list
from xenblockctl.xenstore.errors import XenstoreError
from xenblockctl.xenstore.paths import check_path, check_paths, decode_value
from xenblockctl.xenstore.wire import (
    ABS_PATH_MAX,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    FrameDecoder,
    OversizeFrame,
    encode,
    encode_many,
)

#: Node characters, and near misses: NUL, space, '.', a non-ASCII letter.
PATH_CHARS = "ab0/_-@\0 .é"
PATHS = st.lists(
    st.one_of(
        st.text(alphabet=PATH_CHARS, max_size=12),
        st.builds(lambda a: "/local/domain/0/backend/vbd/" + a, st.text(alphabet=PATH_CHARS, max_size=6)),
        st.sampled_from(
            ["/", "", "@releaseDomain", "a/", "/a", "a//b", "a" * REL_PATH_MAX, "a" * (REL_PATH_MAX + 1)]
        ),
        st.sampled_from(["/" + "a" * (ABS_PATH_MAX - 1), "/" + "a" * ABS_PATH_MAX]),
    ),
    max_size=6,
)


def one_by_one(paths: list[object]) -> str | None:
    for path in paths:
        try:
            check_path(path)  # type: ignore[arg-type]
        except XenstoreError as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


@given(PATHS)
@example(["a\0b"])
@example(["a", "b\0"])
@example(["/"])
@example(["a", ""])
@example(["a", None])
@example(["/local/domain/0", "@x"])
def test_a_batch_of_paths_is_checked_as_one_by_one(paths: list[object]) -> None:
    try:
        check_paths(paths)  # type: ignore[arg-type]
        batch = None
    except XenstoreError as exc:
        batch = f"{type(exc).__name__}: {exc}"
    assert batch == one_by_one(paths)


@given(st.binary(max_size=64) | st.lists(st.binary(max_size=8)).map(b"\0".join))
@example(b"\xe2\x82\0\xac")  # a sequence cut by a NUL
@example(b"\0")
@example(b"a\0\0b\0")
def test_a_listing_decoded_in_one_piece_equals_each_name_decoded(payload: bytes) -> None:
    expected = [decode_value(item) for item in payload.rstrip(b"\0").split(b"\0")] if payload else []
    assert _split_list(payload) == expected


FRAMES = st.lists(
    st.tuples(
        st.integers(0, 30), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=40)
    ),
    max_size=8,
)


@given(FRAMES, st.lists(st.integers(1, 50), max_size=10))
def test_frames_decode_as_one_frame_at_a_time(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    """Whatever pieces the bytes come in, frames() hands out what next_frame() does, payloads as
    bytes (one loop decodes both: next_frame slices the buffer, a bytearray, and converts)."""
    data = encode_many(frames)
    assert data == b"".join(encode(*frame) for frame in frames)
    batch, single = FrameDecoder(), FrameDecoder()
    got_batch, got_single = [], []
    at = 0
    for size in [*cuts, len(data)]:
        piece, at = data[at : at + size], at + size
        got_batch += batch.feed(piece)
        single.push(piece)
        while (frame := single.next_frame()) is not None:
            got_single.append(frame)
    assert got_batch == got_single
    assert [tuple(frame) for frame in got_batch] == frames
    assert {type(frame.payload) for frame in got_batch + got_single} <= {bytes}
    assert batch.pending == single.pending == 0


def test_frames_stop_at_an_oversize_header_after_the_frames_before_it() -> None:
    decoder = FrameDecoder()
    decoder.push(encode(2, 1, 0, b"ok") + encode(2, 2, 0, b"")[:12] + (PAYLOAD_MAX + 1).to_bytes(4, "little"))
    with pytest.raises(OversizeFrame):
        decoder.frames()
    assert decoder.pending == 16  # consumed up to the bad header, as before: the link is lost anyway


def test_an_empty_batch_sends_nothing(daemon: Daemon) -> None:
    """The sharing check reads its matches' owner records with read_many, which for a device
    nobody else publishes is no request at all: no send either (two empty sends per block-device
    add before)."""
    with XenStore.connect(str(daemon.socket), timeout=5, synchronous=True) as store:
        link = store._link
        sent: list[bytes] = []
        real = link._send  # type: ignore[union-attr]

        def counting(data: bytes, index: int) -> None:
            sent.append(data)
            real(data, index)

        link._send = counting  # type: ignore[union-attr]
        assert store.read_many([]) == []
        assert store.ls_many([]) == []
        assert sent == []
        assert store.read_many(["/walk-codec"]) == [None]  # a real batch still goes out
        assert len(sent) == 1
