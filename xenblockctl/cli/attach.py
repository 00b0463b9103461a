"""`xenblockctl attach DOMAIN TARGET`: what `xl block-attach` does, with checks and feedback."""

from __future__ import annotations

import os
from typing import Any

import click

from xenblockctl.cli.exitcodes import EXIT_TIMEOUT
from xenblockctl.cli.output import Progress, connect, emit_json


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


@click.command()
@click.argument("domain")
@click.argument("target")
@click.option(
    "--vdev", default="auto", show_default=True, help="Virtual device (xvdb, sdc, d1p2, 51728) or auto."
)
@click.option(
    "--mode", type=click.Choice(["r", "w"]), default="w", show_default=True, help="Read-only or writable."
)
@click.option(
    "--backend-domain",
    type=click.IntRange(0, 0x7FEF),
    default=None,
    metavar="N",
    help="Domain serving the disk (default: this one).",
)
@click.option("--engine", "backend", flag_value="engine", help="Serve with the xenblockctl engine.")
@click.option("--kernel", "backend", flag_value="kernel", help="Serve with kernel blkback.")
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
    target: str,
    vdev: str,
    mode: str,
    backend_domain: int | None,
    backend: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Attach TARGET (image file or block device) to DOMAIN (id or name) as a virtual disk.

    Writes the vbd directories as libxl does, runs the block script's add in-process, and waits
    until the backend is Connected, or says exactly why not. A failed attach leaves nothing behind."""
    from xenblockctl import config
    from xenblockctl.blockscript.settings import Settings
    from xenblockctl.blockscript.target import parse_target
    from xenblockctl.toolstack import domains, lifecycle
    from xenblockctl.toolstack.vbd_dirs import DiskSpec
    from xenblockctl.xenstore.vdev import Vdev

    values = config.load()
    backend = backend or str(values["attach.backend"].value)
    wait = float(values["attach.wait"].value) if wait is None else wait
    path = resolve_target(target)
    parse_target(path)  # refuse what the block script would refuse, before writing anything
    auto = vdev == "auto"
    settings = Settings.from_env(os.environ)
    progress = Progress(False if as_json else None)
    with connect() as store:
        domid = domains.resolve(store, domain)
        own = store.own_domid()
        remote = backend_domain is not None and backend_domain != own
        # Another domain's modules are out of sight: decide from its side, not from ours.
        kind = lifecycle.choose_kind(backend, remote=remote, store=store, backend_domid=backend_domain)
        spec = DiskSpec(
            domid=domid,
            vdev=Vdev("xvd", 0) if auto else Vdev.parse(vdev),
            params=path if kind == "vbd" else f"raw:{path}",
            mode=mode,
            kind=kind,
            backend_domid=own if backend_domain is None else backend_domain,
            script=_default_script(remote=remote),
            # libxl__device_disk_setdefault: discard defaults to on for writable disks only (the
            # lane's node-by-node comparison with xl block-attach showed ours on for ro ones too).
            discard=mode == "w",
        )
        try:
            result = lifecycle.attach(
                store, spec, auto_vdev=auto, settings=settings, wait=wait, own_domid=own, progress=progress
            )
        finally:
            progress.done()
    record = _record(result)
    if as_json:
        emit_json("attach", record)
    else:
        device = record["device_path"] or record["physical_device"]
        click.echo(
            f"{record['vdev']} of domain {record['domid']}: {device} ({record['physical_device']}, "
            f"luid {record['luid']}) via {record['consumer']}: {result.message}"
        )
    if wait > 0 and not result.connected:
        if not as_json:
            click.echo(f"xenblockctl: wait-timeout: {result.message}", err=True)
            click.echo(
                "hint: the disk stays attached; `xenblockctl show` follows it, `detach` removes it", err=True
            )
        raise click.exceptions.Exit(EXIT_TIMEOUT)


def _record(result: Any) -> dict[str, Any]:
    spec = result.spec
    loc = spec.location
    add = result.add
    snap = result.snapshot
    return {
        "domid": spec.domid,
        "devid": loc.devid,
        "vdev": spec.vdev.name,
        "kind": loc.kind,
        "backend_domid": loc.backend_domid,
        "backend_path": loc.backend,
        "frontend_path": loc.frontend,
        "target": spec.params,
        "mode": spec.mode,
        "physical_device": None if add is None else add.physical_device,
        "luid": None if add is None else add.luid,
        "device_path": None if add is None else add.device_path,
        "consumer": None if add is None else add.consumer,
        "connected": result.connected,
        "backend_state": None if snap is None or snap.backend_state is None else int(snap.backend_state),
        "frontend_state": None if snap is None or snap.frontend_state is None else int(snap.frontend_state),
        "message": result.message,
    }
