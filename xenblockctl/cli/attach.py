"""`xenblockctl attach DOMAIN TARGET`: what `xl block-attach` does, with checks and feedback."""

from __future__ import annotations

import os
from typing import Any

import click

from xenblockctl.cli.complete import complete_domain
from xenblockctl.cli.exitcodes import EXIT_TIMEOUT
from xenblockctl.cli.output import Progress, connect, devnum, emit_json


def _default_script(*, remote: bool = False) -> str:
    """The configured script path; where no script is installed there, the one this package ships
    (package data, or the source checkout's).

    `remote`: another domain's `xl devd` runs the script, so the path is one in *that* domain (as
    libxl's script=block-xenblockctl names XEN_SCRIPT_DIR there): whether it exists here says
    nothing, and a path into this domain's checkout would not exist there (issue 14)."""
    from xenblockctl import config

    configured = str(config.load()["attach.script"].value)
    if remote or os.path.exists(configured):
        return configured
    from xenblockctl.errors import XenblockError
    from xenblockctl.toolstack import hostfiles

    try:
        return str(hostfiles.shipped(f"hotplug/{hostfiles.SCRIPT_NAME}"))
    except XenblockError:
        return configured


def resolve_target(target: str) -> str:
    """Relative file names are a convenience for people; prefixed forms (snapshot:, uuid:, raw:)
    are passed through as the block script reads them."""
    from xenblockctl.blockscript.target import has_target_prefix

    return target if target.startswith("/") or has_target_prefix(target) else os.path.abspath(target)


#: --mode values: libxl's mode node (r, w) and xl's access spellings (ro, rw)
MODES = {"r": "r", "ro": "r", "w": "w", "rw": "w"}


def _backend_domid(store: Any, text: str) -> int:
    """--backend-domain: an id is taken as given (what xenstore shows of that domain is then
    diagnosed if nothing serves the disk); a name must name a live domain."""
    from xenblockctl.toolstack import domains

    domid = domains.lookup(store, text)
    if domid > 0x7FEF:
        raise click.BadParameter(f"{domid} is not a domain id (0-32751)", param_hint="'--backend-domain'")
    return domid


def _from_spec(
    spec: str,
    *,
    target: str | None,
    vdev: str | None,
    mode: str | None,
    backend_domain: str | None,
    backend: str | None,
) -> Any:
    """--spec carries target, vdev and access itself: the same thing given twice is refused
    rather than one silently winning."""
    from xenblockctl.toolstack import xlspec

    given = {"TARGET": target, "--vdev": vdev, "--mode": mode}
    twice = [name for name, value in given.items() if value is not None]
    if twice:
        raise click.UsageError(
            f"--spec gives target, vdev and access: it does not go with {', '.join(twice)}"
        )
    disk = xlspec.parse(spec)
    if disk.backend is not None and backend_domain is not None:
        raise click.UsageError("--backend-domain and the spec's backend= both name the backend domain")
    if disk.backend_type is not None and backend is not None:
        raise click.UsageError("--engine/--kernel and the spec's backendtype= both choose the backend")
    return disk


def _refuse_spec_as_target(target: str) -> None:
    """`attach 5 'format=raw,vdev=xvdb,target=/srv/a.img'` is an xl habit: say so instead of
    target-missing for a file of that name."""
    if "," in target and "=" in target and not os.path.lexists(target):
        raise click.UsageError(f"TARGET {target[:80]!r} looks like an xl disk spec: give it as --spec '...'")


@click.command()
@click.argument("domain", shell_complete=complete_domain)
@click.argument("target", required=False, type=click.Path())
@click.option(
    "--spec",
    default=None,
    metavar="DISKSPEC",
    help="An xl disk spec instead of TARGET: 'format=raw,vdev=xvdb,access=rw,target=/srv/a.img'.",
)
@click.option(
    "--vdev", default=None, help="Virtual device (xvdb, sdc, d1p2, 51728) or auto.  [default: auto]"
)
@click.option(
    "--mode",
    type=click.Choice(sorted(MODES)),
    default=None,
    help="Read-only (r, ro) or writable (w, rw), as xl's access.  [default: w]",
)
@click.option(
    "--backend-domain",
    default=None,
    metavar="DOMAIN",
    shell_complete=complete_domain,
    help="Domain serving the disk, id or name (default: this one).",
)
@click.option("--engine", is_flag=True, help="Serve with the xenblockctl engine.")
@click.option("--kernel", is_flag=True, help="Serve with kernel blkback.")
@click.option(
    "--wait",
    type=click.FloatRange(0, 3600),
    default=None,
    metavar="SECONDS",
    help="How long to wait for the frontend to connect (0: do not wait) [config attach.wait, 10].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def attach(  # noqa: PLR0917 - one parameter per click option
    domain: str,
    target: str | None,
    spec: str | None,
    vdev: str | None,
    mode: str | None,
    backend_domain: str | None,
    engine: bool,
    kernel: bool,
    wait: float | None,
    as_json: bool,
) -> None:
    """Attach TARGET (image file or block device) to DOMAIN (id or name) as a virtual disk.

    Writes the vbd directories as libxl does, runs the block script's add in-process, and waits
    until the backend is Connected, or says exactly why not. A failed attach leaves nothing behind."""
    from xenblockctl import config
    from xenblockctl.blockscript.settings import Settings
    from xenblockctl.blockscript.target import parse_target
    from xenblockctl.environment import Environment
    from xenblockctl.toolstack import domains, lifecycle
    from xenblockctl.toolstack.vbd_dirs import DiskSpec
    from xenblockctl.xenstore.vdev import Vdev

    if engine and kernel:
        raise click.UsageError("--engine and --kernel are mutually exclusive")
    backend = "engine" if engine else "kernel" if kernel else None
    discard: bool | None = None
    if spec is not None:
        disk = _from_spec(
            spec, target=target, vdev=vdev, mode=mode, backend_domain=backend_domain, backend=backend
        )
        target, vdev, mode, discard = disk.target, disk.vdev, disk.mode, disk.discard
        backend_domain = disk.backend or backend_domain
        backend = disk.backend_type or backend
    elif target is None:
        raise click.UsageError("Missing argument 'TARGET' (or --spec DISKSPEC).")
    else:
        _refuse_spec_as_target(target)
    mode = MODES[mode or "w"]
    values = config.load()
    backend = backend or str(values["attach.backend"].value)
    wait = float(values["attach.wait"].value) if wait is None else wait
    path = resolve_target(target)
    parse_target(path)  # refuse what the block script would refuse, before writing anything
    auto = vdev in (None, "auto")
    env = Environment.of_process()
    settings = Settings.from_env(env.variables)
    progress = Progress(False if as_json else None)
    with connect() as store:
        domid = domains.resolve(store, domain)
        own = store.own_domid()
        backend_domid = own if backend_domain is None else _backend_domid(store, backend_domain)
        remote = backend_domid != own
        # Another domain's modules are out of sight: decide from its side, not from ours.
        kind = lifecycle.choose_kind(backend, remote=remote, store=store, backend_domid=backend_domid)
        disk_spec = DiskSpec(
            domid=domid,
            vdev=Vdev("xvd", 0) if auto or vdev is None else Vdev.parse(vdev),
            params=path if kind == "vbd" else f"raw:{path}",
            mode=mode,
            kind=kind,
            backend_domid=backend_domid,
            script=_default_script(remote=remote),
            # libxl__device_disk_setdefault: discard defaults to on for writable disks only (the
            # lane's node-by-node comparison with xl block-attach showed ours on for ro ones too).
            discard=mode == "w" if discard is None else discard,
        )
        try:
            result = lifecycle.attach(
                store,
                disk_spec,
                auto_vdev=auto,
                settings=settings,
                env=env,
                wait=wait,
                own_domid=own,
                progress=progress,
            )
        finally:
            progress.done()
    record = result.to_json()
    timed_out = wait > 0 and not result.connected
    if as_json:
        emit_json("attach", record)
    else:
        device = record["device_path"] or "-"
        numbers = devnum(record["major"], record["minor"])
        ident = "" if numbers is None else f" ({numbers}, diskseq {record['diskseq']})"
        # On a timeout the reason goes to stderr once, as the error line; stdout says what is attached.
        outcome = "" if timed_out else f": {result.message}"
        click.echo(
            f"{record['vdev']} of domain {record['domid']}: {device}{ident} via {record['consumer']}{outcome}"
        )
    if timed_out:
        if not as_json:
            click.echo(f"xenblockctl: wait-timeout: {result.message}", err=True)
            click.echo(
                "hint: the disk stays attached; `xenblockctl show` follows it, `detach` removes it", err=True
            )
        raise click.exceptions.Exit(EXIT_TIMEOUT)
