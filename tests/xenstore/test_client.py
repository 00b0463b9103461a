"""The XenStore client against real daemons (Debian's C xenstored and ours, via `daemon`)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import Transaction, WatchEvent, XenStore
from xenblockctl.xenstore.errors import (
    TransactionConflict,
    XenstoreDisconnected,
    XenstoreError,
    XenstoreExists,
    XenstoreInvalid,
    XenstoreNoEntry,
    XenstoreTooBig,
)
from xenblockctl.xenstore.perms import Access, Perm

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")


@pytest.fixture
def store(daemon: Daemon) -> Iterator[XenStore]:
    with XenStore.connect(timeout=5) as s:
        yield s


@pytest.fixture
def other(daemon: Daemon) -> Iterator[XenStore]:
    """A second connection: another writer, as blkback or libxl would be."""
    with XenStore.connect(timeout=5) as s:
        yield s


def test_write_read_round_trip(store: XenStore) -> None:
    store.write("/t/a", "hello")
    assert store.read("/t/a") == "hello"
    assert store.read("/t") == ""  # WRITE created the parent with an empty value


def test_empty_value_is_a_value(store: XenStore) -> None:
    # pyxs 0.4.1 refuses empty values client-side; the protocol allows them.
    store.write("/t/empty", "")
    assert store.read("/t/empty") == ""
    assert store.exists("/t/empty")


@pytest.mark.parametrize("value", ["héllo wörld", "line1\nline2", "tab\there", "\x7f", "x" * 3000])
def test_values_beyond_pyxs_7bit_ascii(store: XenStore, value: str) -> None:
    store.write("/t/v", value)
    assert store.read("/t/v") == value


def test_undecodable_bytes_survive_a_str_round_trip(store: XenStore) -> None:
    store.write_bytes("/t/raw", b"\x80\xff\xfe ok")
    text = store.read("/t/raw")
    assert store.read_bytes("/t/raw") == b"\x80\xff\xfe ok"
    store.write("/t/copy", text)
    assert store.read_bytes("/t/copy") == b"\x80\xff\xfe ok"


def test_nul_in_value_is_refused_before_sending(store: XenStore) -> None:
    with pytest.raises(XenstoreInvalid):
        store.write("/t/nul", "a\0b")
    assert not store.exists("/t/nul")


def test_oversize_value_is_refused_locally_and_the_connection_survives(store: XenStore) -> None:
    with pytest.raises(XenstoreTooBig) as info:
        store.write("/t/big", "x" * 4096)
    assert info.value.errno == errno.E2BIG
    store.write("/t/big", "x" * (4096 - len("/t/big") - 1))  # exactly the payload limit
    assert len(store.read("/t/big")) == 4089


@pytest.mark.parametrize("path", ["", "/a//b", "/a/", "/a b", "/ä", "@introduceDomain", "/a\n", "/a\0b"])
def test_invalid_paths_are_refused_locally(store: XenStore, path: str) -> None:
    with pytest.raises(XenstoreInvalid) as info:
        store.read(path)
    assert info.value.code == "xenstore-einval"


def test_overlong_path(store: XenStore) -> None:
    with pytest.raises(XenstoreTooBig):
        store.read("/" + "a" * 3072)
    with pytest.raises(XenstoreTooBig):
        store.read("a" * 2049)


def test_missing_node(store: XenStore) -> None:
    with pytest.raises(XenstoreNoEntry) as info:
        store.read("/t/missing")
    assert info.value.errno == errno.ENOENT
    assert info.value.code == "xenstore-enoent"
    assert "read /t/missing" in str(info.value)
    assert store.read_optional("/t/missing") is None
    assert not store.exists("/t/missing")
    with pytest.raises(XenstoreNoEntry):
        store.ls("/t/missing")


def test_ls_mkdir_rm(store: XenStore) -> None:
    store.write("/d/x", "1")
    store.write("/d/y/z", "2")
    assert sorted(store.ls("/d")) == ["x", "y"]
    assert store.ls("/d/x") == []
    store.mkdir("/d/x")  # idempotent, keeps the value
    assert store.read("/d/x") == "1"
    store.mkdir("/d/new/deep")
    assert store.read("/d/new") == ""
    store.rm("/d/y")
    assert not store.exists("/d/y/z")
    store.rm("/d/y")  # missing is fine by default
    store.rm("/nothing/here")  # even when the parent is missing (daemon says ENOENT)
    with pytest.raises(XenstoreNoEntry):
        store.rm("/d/y", missing_ok=False)


def test_permissions(store: XenStore) -> None:
    store.write("/p/node", "v")
    assert store.get_perms("/p/node") == [Perm(Access.NONE, 0)]
    store.set_perms("/p/node", [Perm(Access.NONE, 0), "r5", Perm(Access.BOTH, 7)])
    assert [str(p) for p in store.get_perms("/p/node")] == ["n0", "r5", "b7"]
    perms = store.get_perms("/p/node")
    assert perms[1].can_read
    assert not perms[1].can_write
    with pytest.raises(XenstoreInvalid):
        store.set_perms("/p/node", ["x5"])
    with pytest.raises(XenstoreInvalid):
        store.set_perms("/p/node", [])
    with pytest.raises(XenstoreNoEntry):
        store.set_perms("/p/missing", ["n0"])


def test_domain_paths_and_relative_paths(store: XenStore) -> None:
    assert store.get_domain_path(5) == "/local/domain/5"
    assert store.own_domid() == 0
    assert store.home() == "/local/domain/0"
    assert store.absolute("backend/vbd/5/51712") == "/local/domain/0/backend/vbd/5/51712"
    assert store.absolute("/already/absolute") == "/already/absolute"
    store.write("backend/vbd/5/51712/x", "rel")  # sent relative: resolved by the daemon
    assert store.read("/local/domain/0/backend/vbd/5/51712/x") == "rel"
    assert store.read("backend/vbd/5/51712/x") == "rel"
    with pytest.raises(XenstoreInvalid):
        store.get_domain_path(70000)


def test_transaction_commits_on_clean_exit(store: XenStore, other: XenStore) -> None:
    with store.transaction() as tx:
        tx.write("/tx/a", "1")
        assert tx.read("/tx/a") == "1"  # own writes are visible inside
        assert other.read_optional("/tx/a") is None  # and to nobody else
    assert not tx.is_open
    assert other.read("/tx/a") == "1"
    with pytest.raises(XenstoreInvalid):
        tx.read("/tx/a")  # the transaction is over


def test_transaction_aborts_on_exception(store: XenStore) -> None:
    tx = store.transaction()

    def body() -> None:
        with tx:
            tx.write("/tx/b", "1")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert not tx.is_open
    assert store.read_optional("/tx/b") is None


def test_conflict_raises_transaction_conflict(store: XenStore, other: XenStore) -> None:
    store.write("/tx/c", "0")

    def body() -> None:
        with store.transaction() as tx:
            tx.write("/tx/c", str(int(tx.read("/tx/c")) + 1))
            other.write("/tx/c", "100")

    with pytest.raises(TransactionConflict) as info:
        body()
    assert info.value.errno == errno.EAGAIN
    assert info.value.code == "xenstore-eagain"
    assert store.read("/tx/c") == "100"


def test_run_transaction_retries_until_it_wins(store: XenStore, other: XenStore) -> None:
    store.write("/tx/n", "0")
    calls = 0

    def increment(tx: Transaction) -> int:
        nonlocal calls
        calls += 1
        value = int(tx.read("/tx/n")) + 1
        if calls == 1:
            other.write("/tx/n", "10")  # forces EAGAIN at the first commit
        tx.write("/tx/n", str(value))
        return value

    assert store.run_transaction(increment) == 11
    assert calls == 2
    assert store.read("/tx/n") == "11"


def test_run_transaction_gives_up_after_the_bound(store: XenStore, other: XenStore) -> None:
    store.write("/tx/hot", "0")
    calls = 0

    def always_conflicts(tx: Transaction) -> None:
        nonlocal calls
        calls += 1
        tx.read("/tx/hot")
        tx.write("/tx/mine", str(calls))
        other.write("/tx/hot", str(calls))

    with pytest.raises(TransactionConflict, match="after 3 attempts"):
        store.run_transaction(always_conflicts, attempts=3)
    assert calls == 3
    assert store.read_optional("/tx/mine") is None  # no attempt leaked a commit


def test_run_transaction_retries_the_first_conflict_at_once_then_backs_off(
    store: XenStore, other: XenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conflict is another commit (progress): the first retry does not sleep; later ones do,
    each within the jittered bound."""
    import xenblockctl.xenstore.client as client_module

    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    store.write("/tx/hot", "0")

    def always_conflicts(tx: Transaction) -> None:
        tx.read("/tx/hot")
        tx.write("/tx/mine", "1")
        other.write("/tx/hot", str(len(sleeps)))

    with pytest.raises(TransactionConflict):
        store.run_transaction(always_conflicts, attempts=4)
    assert len(sleeps) == 2  # after the 2nd and 3rd conflicts; none after the 1st or the last
    assert all(0 <= pause <= client_module._BACKOFF_CAP for pause in sleeps)


def test_read_many_then_write_is_one_batch_whose_writes_an_abort_discards(store: XenStore) -> None:
    """The guard's reads and the guarded writes go in one batch; a refusal raised after reading
    aborts the transaction, and nothing it wrote (or removed) is seen."""
    store.write_many({"/tx/g/state": "4", "/tx/g/old": "x"})

    def refuse(tx: Transaction) -> None:
        (state, missing), failure = tx.read_many_then_write(
            ["/tx/g/state", "/tx/g/missing"], {"/tx/g/new": "1"}, remove=["/tx/g/old", "/tx/g/gone"]
        )
        assert (state, missing, failure) == ("4", None, None)
        raise ValueError("the guard refuses")

    with pytest.raises(ValueError, match="the guard refuses"):
        store.run_transaction(refuse)
    assert store.read_optional("/tx/g/new") is None
    assert store.read("/tx/g/old") == "x"

    def accept(tx: Transaction) -> None:
        (state,), failure = tx.read_many_then_write(["/tx/g/state"], {"/tx/g/new": "1"}, remove=["/tx/g/old"])
        assert state == "4"
        assert failure is None

    store.run_transaction(accept)
    assert store.read("/tx/g/new") == "1"
    assert store.read_optional("/tx/g/old") is None


def test_run_transaction_does_not_retry_other_errors(store: XenStore) -> None:
    calls = 0

    def fails(tx: Transaction) -> None:
        nonlocal calls
        calls += 1
        tx.write("/tx/half", "1")
        raise ValueError("decided to stop")

    with pytest.raises(ValueError, match="decided to stop"):
        store.run_transaction(fails)
    assert calls == 1
    assert store.read_optional("/tx/half") is None


def test_concurrent_increments_are_exact(daemon: Daemon) -> None:
    """Four connections race read-increment-write; EAGAIN retries must make the total exact."""
    with XenStore.connect(timeout=5) as setup:
        setup.write("/tx/counter", "0")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with XenStore.connect(timeout=5) as s:
                for _ in range(50):
                    s.run_transaction(
                        lambda tx: tx.write("/tx/counter", str(int(tx.read("/tx/counter")) + 1)), attempts=200
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with XenStore.connect(timeout=5) as check:
        assert check.read("/tx/counter") == "200"


def test_read_dir_and_write_many(store: XenStore) -> None:
    store.write_many({"/rd/a": "1", "/rd/b": "", "/rd/c/d": "deep"})
    assert store.read_dir("/rd") == {"a": "1", "b": "", "c": ""}
    with pytest.raises(XenstoreNoEntry):
        store.read_dir("/rd/missing")


def test_watch_fires_on_register_and_on_changes(store: XenStore, other: XenStore) -> None:
    store.watch("/w/dev", "tok")
    assert store.wait_watch(5) == WatchEvent("/w/dev", "tok")  # even though /w/dev does not exist
    other.write("/w/dev/state", "4")
    assert store.wait_watch(5) == WatchEvent("/w/dev/state", "tok")
    other.write("/w/devices", "x")  # a sibling with a common prefix is not below /w/dev
    other.write("/w/dev", "v")
    assert store.wait_watch(5) == WatchEvent("/w/dev", "tok")
    assert store.wait_watch(0.2) is None
    store.unwatch("/w/dev", "tok")
    other.write("/w/dev/state", "5")
    assert store.wait_watch(0.3) is None


def test_same_token_on_two_paths(store: XenStore, other: XenStore) -> None:
    store.watch("/w/a", "t")
    store.watch("/w/b", "t")
    assert sorted(e.path for e in (store.wait_watch(5), store.wait_watch(5)) if e) == ["/w/a", "/w/b"]
    store.unwatch("/w/a", "t")
    other.write("/w/b/x", "1")
    assert store.wait_watch(5) == WatchEvent("/w/b/x", "t")
    with pytest.raises(XenstoreExists):
        store.watch("/w/b", "t")
    other.write("/w/b/y", "1")  # the failed duplicate must not have dropped the subscription
    assert store.wait_watch(5) == WatchEvent("/w/b/y", "t")


def test_transaction_events_arrive_at_commit_in_write_order(store: XenStore, other: XenStore) -> None:
    store.watch("/w/be", "be")
    assert store.wait_watch(5) == WatchEvent("/w/be", "be")
    with other.transaction() as tx:
        tx.write("/w/be/physical-device-luid", "1")
        tx.write("/w/be/physical-device", "7:0")
        assert store.wait_watch(0.2) is None
    other.write("/w/be/hotplug-status", "connected")
    events = [store.wait_watch(5) for _ in range(3)]
    assert [e.path for e in events if e] == [
        "/w/be/physical-device-luid",
        "/w/be/physical-device",
        "/w/be/hotplug-status",
    ]


@pytest.mark.usefixtures("threaded_only")
def test_many_threads_share_one_connection(store: XenStore) -> None:
    for i in range(8):
        store.write(f"/mt/{i}", str(i))
    bad: list[str] = []

    def reader(i: int) -> None:
        for _ in range(100):
            value = store.read(f"/mt/{i}")
            if value != str(i):
                bad.append(value)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not bad


def test_closed_store_refuses_requests(daemon: Daemon) -> None:
    store = XenStore.connect(timeout=5)
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(XenstoreDisconnected):
        store.read("/")
    with pytest.raises(XenstoreDisconnected):
        store.watch("/x", "t")


def test_ls_of_a_directory_longer_than_one_reply(store: XenStore) -> None:
    names = [f"n{k:03d}" + "x" * 40 for k in range(200)]  # ~9 KB of names: three parts
    store.write_many({f"/big/{n}": "v" for n in names})
    assert store.ls("/big") == names  # creation order, via DIRECTORY_PART
    assert list(store.read_dir("/big")) == names  # also inside a transaction


def test_reset_watches(store: XenStore, other: XenStore) -> None:
    store.watch("/rw", "t")
    assert store.wait_watch(5) == WatchEvent("/rw", "t")
    store.reset_watches()
    other.write("/rw/x", "1")
    assert store.wait_watch(0.3) is None
    store.watch("/rw", "t")  # registering again works: the old watch is gone everywhere
    assert store.wait_watch(5) == WatchEvent("/rw", "t")


def test_request_ids_wrap_at_the_headers_32_bits(store: XenStore) -> None:
    """The engine's connection lives for months: its 2**32nd request used to fail the header's
    pack (struct.error), and the link with it. Ids now go 2**32 - 1, then 1 again, never 0."""
    store._ids = iter(range(0xFFFFFFFF - 3, 1 << 62))  # the same counter, 4 requests before the wrap
    for k in range(8):
        store.write(f"/t/wrap{k}", str(k))
    assert store.read_many([f"/t/wrap{k}" for k in range(8)]) == [str(k) for k in range(8)]
    seen: list[str] = []

    def follow(got: list[tuple[int, str | list[str] | XenstoreError]]) -> list[tuple[int, str]]:
        seen.extend(str(value) for _index, value in got)
        return []

    store.stream([(wire.READ, "/t/wrap0"), (wire.READ, "/t/wrap7")], follow)  # the walk's numbering too
    assert sorted(seen) == ["0", "7"]
