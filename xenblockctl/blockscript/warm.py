"""The warm hotplug server: the add/remove graph imported once, one forked worker per request.

A VM start's block script spends most of its time starting an interpreter and running our imports
cold (bench/README.md, issue 18). This server (`block-xenblockctl.py --serve`, started by its unit)
imports the hotplug graph once and forks a worker per request; the C client
(hotplug/block-xenblockctl.c) is what libxl execs. The wire (the client's comment says the same
from its side):

  client -> server  one SOCK_SEQPACKET message `<umask octal>\\0<argc>\\0<argv...>\\0<NAME=value...>\\0`
                    with SCM_RIGHTS fds [stdin, stdout, stderr, cwd]
  worker -> client  b"A" (accepted: it acts now) or b"S" (stale: the code on disk changed), then,
                    after A, one byte: the exit status

The server (single-threaded: a poll on the listener and a SIGCHLD wakeup) accepts, checks the
peer's uid (SO_PEERCRED) and forks; it never reads a request, so the long-lived process parses no
client bytes. The worker:
  1. reads the request (bounded time) and parses it strictly (parse_request); anything else is
     refused, logged, and nothing is sent: the client falls back to the Python script;
  2. arms kill-on-hangup (F_SETOWN itself, F_SETSIG SIGKILL, O_ASYNC on the connection: the kernel
     SIGKILLs the worker the instant the client's end closes, as libxl's SIGKILL of the client at
     40 s would kill today's script), then checks once that the connection is not readable: a
     client gone before the arm (or one that sent more) makes it leave without acting;
  3. checks that every file the server's code came from is unchanged (stale: S, and the server
     exits for its unit to restart it; an upgrade replaced the code under a running server);
  4. takes over the client's stdio, cwd, umask, environment and rlimits (a failure: refused, so
     the client falls back), sends A, runs today's hotplug.main, closes its stdio and sends the
     status. Its journal lines carry CLIENT_PID=, the pid libxl logs.
  5. on the kernel-blkback path, turns AUTOCLEAR off after the status instead of forking a child
     for it (autoclear.STAGE; the fork was ~1 ms of the add's path), having disarmed its
     kill-on-hangup when the flow handed it that job; its stdio is then /dev/null, not closed.
Each worker also inherits one end of a socketpair the server made for it: its block-device add asks
the server's sharing table over it instead of walking every backend (sharetable.py; the server
answers from its poll loop, still single-threaded, and parses those bytes strictly too).
After the client reaps nothing can be assumed about the worker's last syscall: a worker killed
through its client may still be closing its files for ~ms. The flows already allow a dying run
beside a live one of the same backend (tests/flows/test_kill.py); a lock that ordered them was
measured and rejected (bench/README.md, issue 18, fork18).

The in-process path never imports this module (tests/lint/test_hotplug_imports.py): it imports
what the flows import, and the flows import nothing of it."""

from __future__ import annotations

import _socket
import _stat
import fcntl
import gc
import posix
import resource
import select
import signal
import sys

from xenblockctl import journal as journal_fields
from xenblockctl.blockscript import bundle, faults, sharetable
from xenblockctl.environment import WARM_IMPORTS_ENV, WARM_SHARING_ENV, Environment
from xenblockctl.journal import Journal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import NoReturn

SOCKET = "/run/xenblockctl/hotplug.sock"
SOCKET_ENV = "XENBLOCKCTL_HOTPLUG_SOCKET"
#: Beside the socket: held (flock) for the server's life, so a second server refuses to start
#: instead of unlinking a live server's socket.
LOCK_NAME = "hotplug.lock"
IDENTIFIER = "xenblockctl-hotplug"
ACCEPTED, STALE = b"A", b"S"
#: A worker that found the code stale exits with this, and the server then exits with it:
#: non-zero, so the unit's Restart=on-failure starts the new code (EX_TEMPFAIL).
STALE_EXIT = 75
#: The client sends its request right after connect; a worker waits at most this for it.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 256 * 1024  # the client falls back before sending a bigger one
MAX_ARGC = 64  # libxl passes [script, action]; anything near this is not libxl
STDIO_AND_CWD = 4
F_SETSIG = 10  # linux/fcntl.h; the fcntl module does not name it
#: What every target kind's flow imports lazily beyond bundle.ROOTS and LATER_ROOTS: the bug
#: path's traceback and the test pause points' signal. The server imports them once, so that a
#: file, block-device or kernel-blkback add and a remove read no code from disk in a worker
#: (tests/flows/test_warm.py checks it). Other target kinds' modules (dm, NBD: dataclasses,
#: hashlib, socket, ...) are not preloaded: they took the server from 88 to 167 modules and 10.9 to
#: 19.6 MB, and cost every worker's fork and exit ~0.5 ms more CPU (measured, session 18); a dm
#: or NBD add imports them in its worker, as the script does in process. An upgrade is caught by
#: the stamps before a worker acts; one during a flow is the same race as for the script today.
LAZY = ("signal", "traceback")
PRELOAD = (*bundle.ROOTS, *bundle.LATER_ROOTS, *LAZY)


class Refused(Exception):
    """A request (or a peer) the worker or server will not serve; the message says why."""


def socket_path(env: Mapping[str, str]) -> str:
    return env.get(SOCKET_ENV) or SOCKET


def parse_request(msg: bytes) -> tuple[int, list[bytes], dict[bytes, bytes]]:
    """`<umask octal>\\0<argc decimal>\\0<argv...>\\0<NAME=value...>\\0` -> (umask, argv, environ);
    Refused for anything else. The peer is root, but a request is still parsed as input: exactly
    the format, nothing skipped or guessed."""
    if len(msg) > MAX_REQUEST:
        raise Refused(f"request of {len(msg)} bytes (at most {MAX_REQUEST})")
    if not msg.endswith(b"\0"):
        raise Refused("request not NUL-terminated")
    parts = msg[:-1].split(b"\0")
    if len(parts) < 3:
        raise Refused(f"request of {len(parts)} fields (umask, argc, argv[0] at least)")
    umask, argc = parts[0], parts[1]
    if not 1 <= len(umask) <= 4 or umask.strip(b"01234567"):
        raise Refused(f"umask {umask[:8]!r} is not octal")
    if not 1 <= len(argc) <= 2 or argc.strip(b"0123456789") or argc.startswith(b"0"):
        raise Refused(f"argc {argc[:8]!r} is not a decimal 1..{MAX_ARGC}")
    mask, count = int(umask, 8), int(argc)
    if mask > 0o777:
        raise Refused(f"umask {mask:o} above 777")
    if count > MAX_ARGC or count > len(parts) - 2:
        raise Refused(f"argc {count} but {len(parts) - 2} fields follow")
    env: dict[bytes, bytes] = {}
    for item in parts[2 + count :]:
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise Refused(f"environment entry {item[:40]!r} is not NAME=value")
        if key in env:
            raise Refused(f"environment variable {key[:40]!r} twice")
        env[key] = value
    return mask, parts[2 : 2 + count], env


def stamps(script: str) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of every file the server's code came from: the laid script and each
    imported module's source (with the bundle, the code of those sources). A worker compares them
    before it acts, as the bundle and a .pyc are checked (~100 stats, in the worker, in parallel)."""
    paths = [script]
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if getattr(spec, "has_location", False) and isinstance(origin, str) and origin.startswith("/"):
            paths.append(origin)
    out = []
    for path in paths:
        st = posix.stat(path)
        out.append((path, st.st_size, st.st_mtime_ns))
    return tuple(out)


def changed(recorded: tuple[tuple[str, int, int], ...]) -> str | None:
    """The first file that differs from `recorded`, or None."""
    for path, size, mtime in recorded:
        try:
            st = posix.stat(path)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if st.st_size != size or st.st_mtime_ns != mtime:
            return path
    return None


class Server:
    """The listener and what a worker must not keep of it."""

    def __init__(self, path: str, journal: Journal, script: str) -> None:
        self.path = path
        self.journal = journal
        self.script = script
        self.lock_fd = -1
        self.listener: _socket.socket | None = None
        self.wake = (-1, -1)
        self.stamps: tuple[tuple[str, int, int], ...] = ()
        self.preloaded: frozenset[str] = frozenset()
        self.stopping: list[str] = []
        #: What block-device adds ask instead of walking (sharetable.py), and each live worker's
        #: end of its query channel, by fd.
        self.tables = sharetable.ShareTables(journal)
        self.queries: dict[int, _socket.socket] = {}
        self.poller = select.poll()
        self._table_fds: dict[int, sharetable.ShareTable] = {}

    def open(self) -> None:
        """The runtime directory checked, the lock taken, a stale socket replaced; Refused if not."""
        if not self.path.startswith("/"):
            raise Refused(f"socket path {self.path!r} is not absolute")
        directory = self.path.rpartition("/")[0] or "/"
        try:  # noqa: SIM105 (contextlib: the server imports the hotplug graph's modules only)
            posix.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        st = posix.lstat(directory)
        # a directory others can write is one where they could replace our socket or lock
        if not _stat.S_ISDIR(st.st_mode) or st.st_uid != posix.geteuid() or st.st_mode & 0o022:
            raise Refused(
                f"{directory}: not a directory owned by uid {posix.geteuid()} and writable by it alone "
                f"(owner {st.st_uid}, mode {st.st_mode & 0o7777:o})"
            )
        lock = f"{directory}/{LOCK_NAME}"
        self.lock_fd = posix.open(
            lock, posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC | posix.O_NOFOLLOW, 0o600
        )
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = posix.pread(self.lock_fd, 32, 0).decode("ascii", "replace").strip()
            raise Refused(f"another server holds {lock} (pid {holder or '?'})") from None
        posix.ftruncate(self.lock_fd, 0)
        posix.pwrite(self.lock_fd, f"{posix.getpid()}\n".encode(), 0)
        try:
            st = posix.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not _stat.S_ISSOCK(st.st_mode):
                raise Refused(f"{self.path} exists and is not a socket")
            posix.unlink(self.path)  # a dead server's: we hold the lock, nobody else serves it
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        old = posix.umask(0o177)  # mode 0600 from the bind on: no instant in which others may connect
        try:
            listener.bind(self.path)
        finally:
            posix.umask(old)
        listener.listen(256)
        listener.setblocking(False)
        self.listener = listener

    def loop(self) -> int:
        """Accept and fork until SIGTERM (0) or a worker found the code stale (STALE_EXIT)."""
        assert self.listener is not None
        wake_r, wake_w = self.wake = posix.pipe2(posix.O_NONBLOCK | posix.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.append("SIGTERM"))
        poller = self.poller
        listener = self.listener.fileno()
        poller.register(listener, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        status = 0
        while not self.stopping:
            self._track_tables()
            asked = []
            for fd, _events in poller.poll():
                if fd == wake_r:
                    _drain(wake_r)
                elif fd == listener:
                    self._accept_all()
                elif fd in self.queries:
                    asked.append(fd)
                elif fd in self._table_fds:
                    self._table_fds[fd].take_events()
            if asked:
                self._answer(asked)
            status = self._reap() or status
        return status

    def _track_tables(self) -> None:
        """The tables' watch connections in the poll while they are open (they change on a rebuild)."""
        now = self.tables.fds()
        for fd in self._table_fds.keys() - now.keys():
            if fd not in self.queries:  # (an fd number a query channel took over is the channel's now)
                try:  # noqa: SIM105 (contextlib: the server imports the hotplug graph's modules only)
                    self.poller.unregister(fd)
                except KeyError:
                    pass
        for fd in now.keys() - self._table_fds.keys():
            self.poller.register(fd, select.POLLIN)
        self._table_fds = now

    def _answer(self, fds: list[int]) -> None:
        """Every query that arrived (one sync for all), each answered on its channel; a channel
        whose worker has gone (EOF) is closed."""
        asked: list[tuple[_socket.socket, bytes]] = []
        for fd in fds:
            sock = self.queries[fd]
            try:
                msg = sock.recv(sharetable.MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                msg = b""
            if msg:
                asked.append((sock, msg))
                continue
            self.poller.unregister(fd)
            del self.queries[fd]
            sock.close()
        if not asked:
            return
        for (sock, _msg), reply in zip(asked, self.tables.answer([m for _s, m in asked]), strict=True):
            try:  # noqa: SIM105 (as above)
                sock.send(reply)
            except OSError:
                pass  # the worker is gone (killed with its client): its EOF closes the channel
        self._track_tables()

    def _accept_all(self) -> None:
        assert self.listener is not None
        euid = posix.geteuid()
        while True:
            try:
                conn_fd, _addr = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED, EMFILE, ...: that client falls back
                self.journal.warning(f"accept failed ({exc.strerror})", CODE="warm-accept", ERRNO=exc.errno)
                return
            conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, conn_fd)
            cred = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            pid, uid = (int.from_bytes(cred[i : i + 4], sys.byteorder, signed=True) for i in (0, 4))
            if uid != euid:
                self.journal.warning(
                    f"refused a client: pid {pid} runs as uid {uid}, not {euid}",
                    CODE="warm-peer",
                    PEER_UID=uid,
                )
                conn.close()
                continue
            ours: _socket.socket | None
            theirs: _socket.socket | None
            try:
                ours, theirs = _socket.socketpair(
                    _socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC
                )
            except OSError as exc:
                self.journal.warning(
                    f"no query channel ({exc.strerror}): client pid {pid}'s add walks every backend",
                    CODE="warm-sharing-query",
                    ERRNO=exc.errno,
                )
                ours = theirs = None
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                child = posix.fork()
            except OSError as exc:
                self.journal.warning(
                    f"fork failed ({exc.strerror}): client pid {pid} falls back",
                    CODE="warm-fork",
                    ERRNO=exc.errno,
                )
                conn.close()
                for end in (ours, theirs):
                    if end is not None:
                        end.close()
                continue
            if child == 0:
                if ours is not None:
                    ours.close()
                _worker(self, conn, pid, theirs)
            conn.close()
            if ours is not None and theirs is not None:
                theirs.close()
                ours.setblocking(False)
                self.queries[ours.fileno()] = ours
                self.poller.register(ours.fileno(), select.POLLIN)

    def _reap(self) -> int:
        while True:
            try:
                pid, status = posix.waitpid(-1, posix.WNOHANG)
            except ChildProcessError:
                return 0
            if pid == 0:
                return 0
            if posix.WIFEXITED(status) and posix.WEXITSTATUS(status) == STALE_EXIT:
                self.stopping.append(f"worker {pid} found the code on disk changed")
                return STALE_EXIT

    def close(self) -> None:
        self.tables.close()
        for sock in self.queries.values():
            sock.close()
        self.queries.clear()
        if self.listener is not None:
            posix.unlink(self.path)  # before the lock goes: no successor's socket is ours to unlink
            self.listener.close()
            self.listener = None
        if self.lock_fd >= 0:
            posix.close(self.lock_fd)
            self.lock_fd = -1


def serve(script: str, env: Mapping[str, str]) -> int:
    """The server's life: 0 after SIGTERM, STALE_EXIT when the code on disk changed, 1 if it cannot
    serve (each logged with its reason). `script`: the laid script it was started as."""
    journal = Journal(IDENTIFIER)
    if not script.startswith("/"):  # started by a relative path: stamped as the file it names now
        script = f"{posix.getcwd()}/{script}"
    server = Server(socket_path(env), journal, script)
    try:
        for fd in (0, 1, 2):
            _ensure_open(fd)  # so a client's fds never arrive as 0-2 in a worker
        for name in PRELOAD:
            __import__(name)
        server.stamps = stamps(script)
        server.open()
        from xenblockctl.xenstore.endpoints import default_endpoints

        first = default_endpoints(env)[0]  # the socket the workers' adds connect to first
        if first.path.startswith("/"):
            server.tables.table(first.path).build(first.path)  # or logged why not: a query retries
        server.preloaded = frozenset(sys.modules)
        gc.freeze()  # the imported graph in the permanent generation: no worker's collection walks it
        journal.info(f"ready on {server.path}, pid {posix.getpid()}, {len(server.stamps)} files stamped")
        status = server.loop()
    except Refused as exc:
        journal.error(f"cannot serve: {exc}", CODE="warm-refused")
        server.close()
        return 1
    except Exception as exc:
        journal.error(f"cannot serve: {type(exc).__name__}: {exc}", CODE="warm-failed")
        server.close()
        return 1
    server.close()
    why = ", ".join(server.stopping)
    journal.info(f"stopped ({why}); workers still running finish on their own", CODE="warm-stopped")
    return status


def main() -> NoReturn:
    """`block-xenblockctl.py --serve` (the laid script's mode, so that the server imports exactly as
    the script does; its unit starts it): serve, then exit with serve's status."""
    posix._exit(serve(sys.argv[0], Environment.of_process().variables))


def _worker(server: Server, conn: _socket.socket, peer_pid: int, query: _socket.socket | None) -> NoReturn:
    """The forked child: never returns. Refusals before A are logged to the server's journal and
    stderr, and the client, which got no A, falls back."""
    status = 1
    journal = server.journal
    accepted = False
    staged: list[Callable[[], int]] = []
    null: list[int] = []  # /dev/null, opened when a job is staged
    try:
        signal.set_wakeup_fd(-1)
        # (SIGINT too: the server's KeyboardInterrupt would unwind a worker into the server's code)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        mask, argv_b, env_b, fds = _receive(conn)
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        argv = [a.decode(encoding, errors) for a in argv_b]
        env = {k.decode(encoding, errors): v.decode(encoding, errors) for k, v in env_b.items()}
        faults.pause(Environment(env), "warm-received")  # tests: the client killed before the arm
        cfd = conn.fileno()
        # 2. kill-on-hangup first, then the one check: no instant in which a client's death is missed
        fcntl.fcntl(cfd, fcntl.F_SETOWN, posix.getpid())
        fcntl.fcntl(cfd, F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(cfd, fcntl.F_SETFL, fcntl.fcntl(cfd, fcntl.F_GETFL) | posix.O_ASYNC)
        check = select.poll()
        check.register(cfd, select.POLLIN)
        if check.poll(0):
            raise Refused(f"client pid {peer_pid} hung up (or sent more) before its request was armed")
        # After the arm the worker never reads the connection: a sleeping reader would suppress the
        # kernel's signal (net/socket.c sock_wake_async skips it while SOCKWQ_ASYNC_WAITDATA is set).
        stale = changed(server.stamps)
        if stale is not None:
            journal.warning(
                f"stale: {stale} changed since the server started; exiting for a restart", CODE="warm-stale"
            )
            # disarmed first: the client closes on S, and its hangup's SIGKILL must not beat the
            # exit status that tells the server to stop (the worker acts on nothing either way)
            fcntl.fcntl(cfd, fcntl.F_SETFL, fcntl.fcntl(cfd, fcntl.F_GETFL) & ~posix.O_ASYNC)
            _send(conn, STALE)
            posix._exit(STALE_EXIT)
        _take_over(server, conn, fds, mask=mask, env=env_b, peer_pid=peer_pid, query=query)
        if query is not None:
            from xenblockctl.blockscript import sharing

            trace = _trace if env.get(WARM_SHARING_ENV) else None
            sharing.TABLE = sharetable.worker_query(query.fileno(), trace)
        sys.argv = argv
        journal_fields.PROCESS_FIELDS["CLIENT_PID"] = str(peer_pid)
        if not _send(conn, ACCEPTED):
            raise Refused(f"client pid {peer_pid} gone before A")
        accepted = True
        from xenblockctl.blockscript import autoclear
        from xenblockctl.blockscript.hotplug import main

        def stage(job: Callable[[], int]) -> None:
            # The kernel path's AUTOCLEAR job, ours to run after the status (autoclear.py); an
            # OSError here makes the flow do it in line instead. /dev/null first: the job's fds
            # must not land on 0-2 once the client's stdio is let go. Then the client's death must
            # not kill us, or the job would go with us: the add's work is done (hotplug-status is
            # written), what is left of the flow only returns.
            null.append(posix.open("/dev/null", posix.O_RDWR | posix.O_CLOEXEC))
            fcntl.fcntl(cfd, fcntl.F_SETFL, fcntl.fcntl(cfd, fcntl.F_GETFL) & ~posix.O_ASYNC)
            staged.append(job)

        autoclear.STAGE = stage

        status = main(argv, env)
        if env.get(WARM_IMPORTS_ENV):
            grown = sorted(set(sys.modules) - server.preloaded)
            print(f"warm-imports: {' '.join(grown)}", file=sys.stderr)
    except Refused as exc:
        journal.warning(f"refused: {exc}", CODE="warm-request", CLIENT_PID=peer_pid)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105 (contextlib: the server imports the hotplug graph's modules only)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed log pipe must not turn a finished run into a failure
        if accepted:
            # output first, then the status: when the client exits, all of it is written and no
            # process of ours holds libxl's pipes
            _release_stdio(null[0] if null else -1)
            _send(conn, bytes([status & 0xFF]))
        try:
            for job in staged:  # after the status: the client, and libxl, have gone on
                job()  # logs its own give-ups
        except BaseException as exc:
            try:  # noqa: SIM105 (as above)
                Journal(IDENTIFIER, stderr=False).error(
                    f"AUTOCLEAR job: internal: {type(exc).__name__}: {exc}", CODE="internal"
                )
            except BaseException:
                pass
        finally:
            posix._exit(status)  # whatever happened: a worker never returns into the server's code


def _receive(conn: _socket.socket) -> tuple[int, list[bytes], dict[bytes, bytes], list[int]]:
    """The one request message and its four fds; Refused for anything else (fds received are
    closed with the worker)."""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        msg, ancdata, flags, _addr = conn.recvmsg(MAX_REQUEST + 1, _socket.CMSG_SPACE(4 * STDIO_AND_CWD))
    except TimeoutError:
        raise Refused(f"no request within {REQUEST_TIMEOUT:g} s") from None
    except OSError as exc:
        raise Refused(f"request unreadable ({exc.strerror})") from None
    conn.setblocking(True)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level != _socket.SOL_SOCKET or kind != _socket.SCM_RIGHTS:
            raise Refused(f"ancillary data of level {level} type {kind}")
        fds.extend(
            int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data) - len(data) % 4, 4)
        )
    if not msg:
        raise Refused("the client hung up before its request")
    if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        raise Refused("request or its fds truncated (too big, or more than four fds)")
    if len(fds) != STDIO_AND_CWD:
        raise Refused(f"{len(fds)} fds, not {STDIO_AND_CWD} (stdin, stdout, stderr, cwd)")
    mask, argv, env = parse_request(msg)
    return mask, argv, env, fds


def _take_over(
    server: Server,
    conn: _socket.socket,
    fds: list[int],
    *,
    mask: int,
    env: dict[bytes, bytes],
    peer_pid: int,
    query: _socket.socket | None,
) -> None:
    """The client's process state: stdio on 0-2, its cwd, umask, environment (posix.environ and the
    C environ) and rlimits; every other fd of the server's closed. Refused if one cannot be taken:
    nothing has acted yet, and the client falls back."""
    try:
        posix.fchdir(fds[3])
    except OSError as exc:
        raise Refused(f"the client's cwd: {exc.strerror}") from None
    # the server's fds the worker must not keep: the listener (a worker accepting), the lock (a new
    # server could not start while a worker lives), its journal socket
    # (and the sharing table's connections and other workers' query channels: closed through
    # their objects, so that no object of the server's later closes an fd number reused here)
    assert server.listener is not None
    server.listener.close()
    server.journal.close()
    server.tables.close()
    for sock in server.queries.values():
        sock.close()
    kept = sorted({conn.fileno(), *(() if query is None else (query.fileno(),))})
    for target, fd in enumerate(fds[:3]):
        posix.dup2(fd, target)
    low = 3
    for fd in kept:
        posix.closerange(low, fd)
        low = fd + 1
    posix.closerange(low, 1 << 20)
    posix.umask(mask)
    failed = []
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            which = getattr(resource, name)
            # the pid cannot be another process's yet: the client is alive (the check above), and
            # its death SIGKILLs this worker before the pid could be reused
            try:
                resource.setrlimit(which, resource.prlimit(peer_pid, which))
            except (OSError, ValueError) as exc:
                failed.append(f"{name} ({exc})")
    for key in list(posix.environ):
        posix.unsetenv(key)
    posix.environ.clear()
    for key, value in env.items():
        posix.putenv(key, value)
        posix.environ[key] = value
    if failed:
        Journal(IDENTIFIER).warning(
            f"client pid {peer_pid}'s limits not all copied: {', '.join(failed)[:300]}; the server's apply",
            CODE="warm-rlimit",
            CLIENT_PID=peer_pid,
        )


def _trace(what: str) -> None:
    print(f"warm-sharing: {what}", file=sys.stderr)


def _release_stdio(null: int) -> None:
    """The client's stdio let go: `null` (/dev/null, when work follows the reply) put in its place,
    so that an fd the work opens cannot land on 0-2, where a stray write would go into it; else
    closed."""
    for fd in (0, 1, 2):
        try:
            if null >= 0:
                posix.dup2(null, fd)
            else:
                posix.close(fd)
        except OSError:
            pass


def _send(conn: _socket.socket, data: bytes) -> bool:
    try:
        return conn.send(data) == len(data)
    except OSError:
        return False


def _drain(fd: int) -> None:
    try:
        while posix.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _ensure_open(fd: int) -> None:
    try:
        posix.fstat(fd)
    except OSError:
        null = posix.open("/dev/null", posix.O_RDWR)
        if null != fd:
            posix.dup2(null, fd)
            posix.close(null)
