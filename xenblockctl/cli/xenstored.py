"""`xenblockctl xenstored`: run the embedded xenstored on unix sockets until SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import click

from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.server.daemon import Daemon, Listener, XenstoredError, tie_to_parent
from xenblockctl.xenstore.server.quota import QUOTA_NAMES, SOFT_QUOTA_NAMES, Quota
from xenblockctl.xenstore.server.wire import REL_PATH_MAX


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


QuotaCallback = Callable[[click.Context, click.Parameter, tuple[str, ...]], dict[str, int]]


def _quota_callback(names: dict[str, str]) -> QuotaCallback:
    """Parse repeated `NAME=N` options into Quota field values."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
        result: dict[str, int] = {}
        for text in values:
            name, sep, number_text = text.partition("=")
            number = uint_or_none(number_text, maximum=(1 << 63) - 1)
            if not sep or name not in names or number is None:
                raise click.BadParameter(f"expected NAME=N, NAME one of {', '.join(sorted(names))}: {text!r}")
            result[names[name]] = number
        return result

    return parse


_COUNT = click.IntRange(min=0, max=2**31 - 1)


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
@click.option("-E", "--entry-nb", type=_COUNT, help="Nodes one domain may own (default 1000).")
@click.option("-S", "--entry-size", type=_COUNT, help="Bytes of one node record (default 2048).")
@click.option("-W", "--watch-nb", type=_COUNT, help="Watches of one domain (default 128).")
@click.option("-t", "--transaction", type=_COUNT, help="Open transactions of one domain (default 10).")
@click.option("-A", "--perm-nb", type=_COUNT, help="Permission entries per node (default 5).")
@click.option("-M", "--path-max", type=_COUNT, help=f"Node path length (default and maximum {REL_PATH_MAX}).")
@click.option(
    "-Q",
    "--quota",
    "hard_quotas",
    multiple=True,
    metavar="NAME=N",
    callback=_quota_callback(QUOTA_NAMES),
    help="transaction-nodes (1024), outstanding (20), memory (bytes, 2621440), connections (8).",
)
@click.option(
    "-q",
    "--quota-soft",
    "soft_quotas",
    multiple=True,
    metavar="NAME=N",
    callback=_quota_callback(SOFT_QUOTA_NAMES),
    help="memory=N: log when a domain uses more than N bytes (2097152).",
)
def xenstored(
    *,
    socket_path: str,
    domain_sockets: list[Listener],
    ready_fd: int | None,
    exit_with_parent: bool,
    trace_file: str | None,
    entry_nb: int | None,
    entry_size: int | None,
    watch_nb: int | None,
    transaction: int | None,
    perm_nb: int | None,
    path_max: int | None,
    hard_quotas: dict[str, int],
    soft_quotas: dict[str, int],
) -> None:
    """Serve the xenstore wire protocol on PATH until SIGTERM or SIGINT.

    Prints `xenstored ready socket=PATH [domain-socket=DOMID:PATH ...]` once every socket
    listens. On SIGTERM/SIGINT it closes all connections, removes its socket files and exits 0.
    Quotas apply to domain-socket clients only and take the C xenstored's options and defaults."""
    listeners = [Listener(socket_path, 0), *domain_sockets]
    limits = {
        "nodes_per_domain": entry_nb,
        "entry_size": entry_size,
        "watches_per_domain": watch_nb,
        "transactions": transaction,
        "perms_per_node": perm_nb,
        # Like the C daemon's -M: never above the protocol's limit.
        "path_max": None if path_max is None else min(path_max, REL_PATH_MAX),
    }
    quota = dataclasses.replace(
        Quota(),
        **{k: v for k, v in limits.items() if v is not None},
        **hard_quotas,
        **soft_quotas,
    )
    try:
        trace_out = open(trace_file, "a", buffering=1) if trace_file else None  # noqa: SIM115
    except OSError as exc:
        raise XenstoredError.from_oserror(exc, f"cannot open trace file {trace_file}") from exc

    def trace(line: str) -> None:
        assert trace_out is not None
        trace_out.write(line + "\n")

    daemon = Daemon(listeners, quota=quota, trace=trace if trace_out else None)
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
