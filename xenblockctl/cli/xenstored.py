"""`xenblockctl xenstored`: run the embedded xenstored on unix sockets until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import sys

import click

from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.server.daemon import Daemon, Listener, XenstoredError, tie_to_parent


def _parse_domain_sockets(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[Listener]:
    listeners = []
    for text in values:
        domid_text, sep, path = text.partition(":")
        domid = uint_or_none(domid_text, maximum=0x7FEF)
        if not sep or domid is None or not path:
            raise click.BadParameter(f"expected DOMID:PATH with DOMID < 32752, got {text!r}")
        listeners.append(Listener(path, domid))
    return listeners


@click.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    metavar="PATH",
    help="Unix socket for privileged (dom0) clients; clients find it via XENSTORED_PATH.",
)
@click.option(
    "--domain-socket",
    "domain_sockets",
    multiple=True,
    metavar="DOMID:PATH",
    callback=_parse_domain_sockets,
    help="Extra socket whose clients act as domain DOMID, subject to permissions and quotas.",
)
@click.option(
    "--ready-fd",
    type=int,
    default=None,
    metavar="N",
    help="Also write the ready line to file descriptor N, then close it.",
)
@click.option(
    "--exit-with-parent",
    is_flag=True,
    help="Stop (as on SIGTERM) when the process that started it dies (for test harnesses).",
)
@click.option(
    "--trace-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append every message in and out (C xenstored --trace-file style).",
)
def xenstored(
    socket_path: str,
    domain_sockets: list[Listener],
    ready_fd: int | None,
    exit_with_parent: bool,
    trace_file: str | None,
) -> None:
    """Serve the xenstore wire protocol on PATH until SIGTERM or SIGINT.

    Prints `xenstored ready socket=PATH [domain-socket=DOMID:PATH ...]` once every socket
    listens. On SIGTERM/SIGINT it closes all connections, removes its socket files and exits 0."""
    listeners = [Listener(socket_path, 0), *domain_sockets]
    try:
        trace_out = open(trace_file, "a", buffering=1) if trace_file else None  # noqa: SIM115
    except OSError as exc:
        raise XenstoredError.from_oserror(exc, f"cannot open trace file {trace_file}") from exc

    def trace(line: str) -> None:
        assert trace_out is not None
        trace_out.write(line + "\n")

    daemon = Daemon(listeners, trace=trace if trace_out else None)
    try:
        daemon.open()
        daemon.install_signal_handlers()
        if exit_with_parent:
            tie_to_parent()
        extra = "".join(f" domain-socket={lst.domid}:{lst.path}" for lst in listeners[1:])
        line = f"xenstored ready socket={socket_path}{extra}\n"
        sys.stdout.write(line)
        sys.stdout.flush()
        if ready_fd is not None:
            os.write(ready_fd, line.encode())
            os.close(ready_fd)
        daemon.run()
    finally:
        daemon.close()
        if trace_out is not None:
            trace_out.close()
