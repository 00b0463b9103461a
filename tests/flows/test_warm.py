"""The warm hotplug server (blockscript/warm.py) and its C client (hotplug/block-xenblockctl.c), real
processes against the real C xenstored and loop devices: what libxl sees through them, every way
the client falls back to the Python script (and the one way it must not), and what the server and
its workers refuse (logged, nothing acted)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl, wait_gone
from tests.fixtures.warm import WarmServer, ask, lay_warm, raw_request
from tests.support import libxl_stub
from xenblockctl.blockscript import warm as warm_module
from xenblockctl.environment import WARM_IMPORTS_ENV

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _untouched(libxl: Libxl, be: Backend, image: Path) -> None:
    nodes = libxl.nodes(be)
    assert "hotplug-status" not in nodes, nodes
    assert "physical-device" not in nodes, nodes
    assert bound_loops_under(image.parent) == {}


def test_status_and_output_are_the_workers(warm: WarmServer, libxl: Libxl, tmp_path: Path) -> None:
    """A refused add: the client exits with the worker's status, its stderr has the worker's coded
    line, and hotplug-error is written, as in process; the worker ran it, not a fallback."""
    be = libxl.create_backend(5, 51712, str(tmp_path / "missing.img"), "w")
    result = libxl.run("add", be)
    assert result.returncode == 1
    assert "block-xenblockctl:" in result.stderr
    assert libxl.nodes(be).get("hotplug-status") == "error"
    assert "refused" not in warm.log()
    assert "stale" not in warm.log()


def test_an_add_and_a_remove_import_nothing_from_disk(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """The server imported everything a worker runs (warm.PRELOAD): a file add handed to the
    engine, a kernel-blkback add (its AUTOCLEAR job) and their removes import no module."""
    outputs = []
    hook = {WARM_IMPORTS_ENV: "1"}
    for domid, engine in ((5, True), (7, False)):
        image = make_image()
        be = libxl.create_backend(domid, 51712, str(image), "w", engine=engine)
        consumer = libxl.engine_consumer(be) if engine else libxl.blkback_consumer(be)
        added = libxl.run("add", be, **hook)
        assert added.returncode == 0, added.stderr
        consumer.wait_opened()
        if not engine:
            libxl.wait_autoclear_off(be)
        consumer.release()
        libxl.store.write(be.node("online"), "0")
        libxl.store.write(be.node("state"), "6")
        removed = libxl.run("remove", be, **hook)
        assert removed.returncode == 0, removed.stderr
        outputs += [added.stderr, removed.stderr]
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("warm-imports:")]
    assert lines == ["warm-imports: "] * 4, outputs


def test_without_a_server_the_client_runs_the_python_script(
    warm_client: Path, libxl: Libxl, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = lay_warm(tmp_path / "scripts", warm_client)
    monkeypatch.setattr(libxl_stub, "script_argv", lambda action: [str(layout.client), action])
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be, XENBLOCKCTL_HOTPLUG_SOCKET=str(tmp_path / "nobody.sock"))
    assert result.returncode == 0, result.stderr
    assert "handed to engine" in result.stderr, result.stderr
    consumer.wait_opened()
    consumer.release()


def test_without_its_python_script_the_client_says_so(warm_client: Path, tmp_path: Path) -> None:
    alone = tmp_path / "block-xenblockctl"
    alone.write_bytes(warm_client.read_bytes())
    alone.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", warm_module.SOCKET_ENV: str(tmp_path / "nobody.sock")}
    result = subprocess.run(
        [str(alone), "add"], env=env, capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"block-xenblockctl: cannot run the Python script {alone}.py: No such file or directory\n"
    )


def test_a_server_that_never_answers_costs_two_seconds_then_the_script_runs(
    warm_client: Path, libxl: Libxl, make_image: ImageFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listening socket that accepts nothing (a hung or stopped server): the client gives up on
    the first byte after 2 s and runs the Python script, which does the add."""
    layout = lay_warm(tmp_path / "scripts", warm_client)
    monkeypatch.setattr(libxl_stub, "script_argv", lambda action: [str(layout.client), action])
    path = tmp_path / "hung.sock"
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as hung:
        hung.bind(str(path))
        hung.listen(8)
        began = time.monotonic()
        running = libxl.start("add", be, XENBLOCKCTL_HOTPLUG_SOCKET=str(path))
        returncode = running.proc.wait(30)
        took = time.monotonic() - began
    # only now: the request, with the client's stdout and stderr, sat in the never-accepted
    # connection's queue until the listener closed, so their pipes saw no EOF before
    _out, err = running.proc.communicate(timeout=10)
    assert returncode == 0, err
    assert "handed to engine" in err, err
    assert took >= 2.0, f"fell back after {took:.2f} s, before the first byte's 2 s"
    consumer.wait_opened()
    consumer.release()


def test_stale_code_falls_back_and_the_server_exits(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """A file the server's code came from changed (an upgrade): the worker answers S without acting,
    the client runs the Python script (new code), and the server exits for its unit to restart it."""
    script = warm.layout.script
    st = script.stat()
    os.utime(script, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    assert "handed to engine" in result.stderr, result.stderr
    try:
        status = warm.proc.wait(10)
    except subprocess.TimeoutExpired:
        status = None
    log = warm.log()
    assert status == warm_module.STALE_EXIT, (log, result.stderr)
    assert f"stale: {script} changed" in log, log
    assert not warm.socket.exists(), "the stale server left its socket"
    consumer.wait_opened()
    consumer.release()


def test_eof_after_accepted_is_a_failure_not_a_second_run(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """The worker dies after its A (here: killed at the add's first step): the client exits 1 with one
    line and never runs the Python script, which would act a second time."""
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    running = libxl.start("add", be, pause_at="add-start")
    assert running.wait_paused() == "add-start"
    worker = running.paused_pid
    assert worker != running.proc.pid
    os.kill(worker, signal.SIGKILL)
    _out, err = running.proc.communicate(timeout=20)
    assert running.proc.returncode == 1
    assert err == "block-xenblockctl: the hotplug worker ended without a status\n"
    _untouched(libxl, be, image)


def test_a_client_killed_before_the_arm_makes_the_worker_act_on_nothing(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """The client dies between its send and the worker's arm (the worker stopped right after reading
    the request): the worker finds the connection hung up and leaves without acting."""
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    running = libxl.start("add", be, pause_at="warm-received")
    assert running.wait_paused() == "warm-received"
    worker = running.paused_pid
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait(10)
    running.resume()
    wait_gone(worker)
    assert "hung up (or sent more) before its request was armed" in warm.wait_log(
        "before its request was armed"
    )
    _untouched(libxl, be, image)


def test_the_socket_is_root_only_and_a_peer_of_another_uid_is_refused(
    warm: WarmServer, warm_client: Path, libxl: Libxl, make_image: ImageFactory, tmp_path: Path
) -> None:
    """Mode 0600 keeps others from connecting; behind it, the server checks the peer's uid before it
    forks. A server of its own here, its socket opened to all in a directory all may pass (the
    tests' temporary directories are root's alone), so that uid 65534 can connect and send a valid
    add: no A comes."""
    assert stat.S_IMODE(warm.socket.stat().st_mode) == 0o600
    public = Path(tempfile.mkdtemp(prefix="xbc-warm-"))
    try:
        public.chmod(0o755)
        server = WarmServer.start(lay_warm(tmp_path / "public", warm_client), public / "run" / "hotplug.sock")
        try:
            _refused_for_another_uid(server, libxl, make_image)
        finally:
            server.stop()
    finally:
        shutil.rmtree(public)


def _refused_for_another_uid(warm: WarmServer, libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    warm.socket.chmod(0o666)
    request = raw_request(["block-xenblockctl", "add"], libxl.env("add", be))
    # the C client's request, sent by a process of uid 65534 (the stdlib only: it cannot read the
    # checkout or its venv)
    child = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.settimeout(10); s.connect({str(warm.socket)!r})\n"
        "cwd = os.open('/', os.O_RDONLY | os.O_DIRECTORY)\n"
        "fds = b''.join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, cwd))\n"
        "try:\n"
        f"    s.sendmsg([{request!r}], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\n"
        "    print(s.recv(1) or 'closed')\n"
        "except (BrokenPipeError, ConnectionResetError):\n"  # closed before or after the send
        "    print('closed')\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-S", "-c", child],
        user=65534,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "closed", f"a worker answered a peer of another uid: {result.stdout}"
    assert "runs as uid 65534, not 0" in warm.wait_log("runs as uid 65534")
    _untouched(libxl, be, image)


def test_a_second_server_is_refused_by_the_lock(warm: WarmServer, warm_client: Path, tmp_path: Path) -> None:
    before = warm.socket.stat().st_ino
    second = WarmServer.start(lay_warm(tmp_path / "second", warm_client), warm.socket, wait=False)
    try:
        assert second.proc.wait(30) == 1
    finally:
        second.stop()
    assert f"another server holds {warm.socket.parent}/hotplug.lock (pid {warm.proc.pid})" in second.log()
    assert warm.socket.stat().st_ino == before, "the second server replaced the first one's socket"
    assert warm.proc.poll() is None


def _bad(request: bytes) -> list[tuple[str, bytes, int, str]]:
    """(name, payload, fd count, the reason logged) of requests a worker must refuse; `request` is
    a valid add."""
    umask_end = request.index(b"\0")
    rest = request[umask_end:]
    after_argc = rest[rest.index(b"\0", 1) :]
    head = request[:umask_end]
    return [
        ("not-nul-terminated", request[:-1], 4, "request not NUL-terminated"),
        ("umask-not-octal", b"9" + rest, 4, "umask b'9' is not octal"),
        ("umask-empty", rest, 4, "umask b'' is not octal"),
        ("umask-above-777", b"1777" + rest, 4, "umask 1777 above 777"),
        ("argc-zero", head + b"\x000" + after_argc, 4, "argc b'0' is not a decimal"),
        ("argc-leading-zero", head + b"\x0002" + after_argc, 4, "argc b'02' is not a decimal"),
        ("argc-beyond-fields", head + b"\x0099" + after_argc, 4, "argc 99 but"),
        ("env-without-equals", request + b"NOEQUALS\0", 4, "entry b'NOEQUALS' is not NAME=value"),
        ("env-empty-name", request + b"=value\0", 4, "entry b'=value' is not NAME=value"),
        ("env-twice", request + b"PATH=/elsewhere\0", 4, "variable b'PATH' twice"),
        ("three-fds", request, 3, "3 fds, not 4"),
        ("five-fds", request, 5, "truncated"),
        ("no-fds", request, 0, "0 fds, not 4"),
    ]


@pytest.mark.parametrize("case", [case[0] for case in _bad(raw_request(["x", "add"], {"A": "1"}))])
def test_a_bad_request_is_refused_without_acting(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory, case: str
) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    valid = raw_request(["block-xenblockctl", "add"], libxl.env("add", be))
    payload, count, reason = next((p, n, r) for name, p, n, r in _bad(valid) if name == case)
    answer = ask(warm.socket, payload, count)
    assert answer == b"", f"{case}: the worker answered {answer!r}"
    assert reason in warm.wait_log("refused:"), warm.log()
    time.sleep(0.2)  # a worker that acted anyway would have written its first nodes by now
    _untouched(libxl, be, image)
    assert not warm.workers()


def test_the_valid_form_of_those_requests_is_accepted(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """The other side of the refusals above: the same request, well-formed, gets its A (and the add
    runs, without a consumer until its hand-off gives up: the connection's close ends it)."""
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    answer = ask(warm.socket, raw_request(["block-xenblockctl", "add"], libxl.env("add", be)))
    assert answer == b"A", warm.log()
    for pid in warm.workers():  # the connection is closed: kill-on-hangup ends the worker
        wait_gone(pid)


def test_the_workers_log_lines_carry_the_clients_pid(warm: WarmServer, libxl: Libxl, tmp_path: Path) -> None:
    """libxl logs the pid it ran (the client's); the worker's records carry it as CLIENT_PID=, so
    the two can be matched. Read from the syslog socket the journal module writes to when there is
    no journald (a socket of the test's at /dev/log, which this host lacks)."""
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log exists (a syslog daemon's): the test cannot listen there")
    be = libxl.create_backend(5, 51712, str(tmp_path / "missing.img"), "w")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind("/dev/log")
        try:
            running = libxl.start("add", be)
            _out, err = running.proc.communicate(timeout=30)
            syslog.settimeout(0)
            lines = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    lines.append(syslog.recv(65536).decode())
        finally:
            os.unlink("/dev/log")
    assert running.proc.returncode == 1, err
    ours = [line for line in lines if f"XENBUS_PATH={be.relative}" in line]
    assert ours, lines
    assert all(f"CLIENT_PID={running.proc.pid}" in line for line in ours), ours
