"""The files xenblockctl lays onto a host: block script, udev rules and hook, units, man pages,
completions; where they come from and where each goes.

They ship inside the package (`xenblockctl/share/`, put there by setup.py's build step) so an
installed wheel has them; in a source checkout they are read from the tree (`hotplug/`, `man/`,
`completions/`). A layout names the destinations: LOCAL for an admin installing from a wheel
(`/etc`, `/usr/libexec`, `/usr/local/share`; scripts run with the installing interpreter, so their
imports always find this package), DEBIAN for the .deb (distribution paths, /usr/bin/python3).

The block script runs on every VM start and the udev hook on every block event, so their laid
copies start without site.py: the `#!` line names the interpreter with `-S` (directly: flags cannot
pass through `env` on busybox) and the script puts the directory holding this package on sys.path
itself. Nothing else they import lives outside the standard library (tests/lint/
test_hotplug_imports.py, test_udev_imports.py). Without site, a venv's interpreter still
finds the standard library (getpath reads pyvenv.cfg's home); only site-packages would be missing.
The laid script also names its hotplug bundle's directory (Layout.cache_dir), and `install` has
it write the bundle (blockscript/bundle.py) once the files are laid.

The warm hotplug path (issue 18, block-xenblockctl(8)): where the package carries the compiled
hotplug client (setup.py builds it into xenblockctl/libexec/, optionally), the client is laid at the
script path libxl execs and the Python block script next to it as `<script>.py` (the client's
fallback and the hotplug server's entry, `--serve`), with the server's unit. Where it carries none
(built without a compiler), the Python script is laid at the script path as before, and a `.py` and
a hotplug unit left by an earlier install that had the client are removed (the unit would start a
server no client asks).

Installing is idempotent: a file whose content and mode already match is left alone and reported
`unchanged`; every other one is written to a temporary name and renamed over, so a running udev or
libxl never sees half a script."""

from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple

from xenblockctl.blockscript.bundle import CACHE_DIR, CACHE_DIR_ENV, NAME
from xenblockctl.errors import XenblockError

PACKAGE = Path(__file__).resolve().parents[1]
#: Package data of an installed xenblockctl (setup.py copies the checkout's files here).
SHARE = PACKAGE / "share"
CHECKOUT = PACKAGE.parent
#: The paths the shipped files name, which a layout rewrites.
SHIPPED_HOOK = "/usr/libexec/xenblockctl/xenblockctl-udev"
SHIPPED_CLI = "/usr/bin/xenblockctl"
SHIPPED_SHEBANG = "#!/usr/bin/env python3\n"
#: The shipped block script's lines that find the package (its checkout, else site's paths), which
#: the laid copy replaces with the directory the package was installed in.
WHERE_BEGIN = "# >>> where the package is"
WHERE_END = "# <<< where the package is\n"
SCRIPT_NAME = "block-xenblockctl"
HOOK_NAME = "xenblockctl-udev"
RULES_NAME = "60-xenblockctl.rules"
UNITS = ("xenblockctl-engine.service", "xenblockctl-xenstored.service")
#: The hotplug server's unit (laid only with the client): it starts the laid Python script.
HOTPLUG_UNIT = "xenblockctl-hotplug.service"
#: What the shipped hotplug unit starts, which a layout rewrites (Layout.python_script).
SHIPPED_SERVE = "ExecStart=/etc/xen/scripts/block-xenblockctl.py --serve\n"
#: The compiled hotplug client in the package (setup.py's CLIENT_PROGRAM), when the build made it.
CLIENT = PACKAGE / "libexec" / SCRIPT_NAME
#: The laid Python script's name beside the client: the client execs `realpath(itself) + ".py"`.
PYTHON_SUFFIX = ".py"
MAN_PAGES = ("xenblockctl.1", "xenblockctl.conf.5", "xenblockctl-hooks.7", "block-xenblockctl.8")


class InstallError(XenblockError):
    code = "install-failed"


class Layout(NamedTuple):
    name: str
    scripts: str  # libxl resolves `script=block-xenblockctl` here
    hook_dir: str
    rules_dir: str
    units_dir: str
    man_dir: str
    bash_dir: str
    zsh_dir: str
    fish_dir: str
    python: str  # the interpreter the script and hook run with
    packages: str  # the directory holding the xenblockctl package that interpreter imports
    cli: str  # the xenblockctl the units start
    #: the laid block script's bundle directory (blockscript/bundle.py), unless the script's
    #: environment names another in XENBLOCKCTL_CACHE_DIR (as XENBLOCKCTL_LOCK_DIR does locks)
    cache_dir: str = CACHE_DIR

    @property
    def script(self) -> str:
        return f"{self.scripts}/{SCRIPT_NAME}"

    @property
    def python_script(self) -> str:
        """The Python block script's path when the client is laid at `script`."""
        return self.script + PYTHON_SUFFIX

    @property
    def hook(self) -> str:
        return f"{self.hook_dir}/{HOOK_NAME}"


def local_layout() -> Layout:
    """An admin's install from a wheel: admin-owned directories, this environment's interpreter and
    console script (a venv's bin/, or /usr/local/bin for a system-wide pip)."""
    return Layout(
        "local",
        scripts="/etc/xen/scripts",
        hook_dir="/usr/libexec/xenblockctl",
        rules_dir="/etc/udev/rules.d",
        units_dir="/etc/systemd/system",
        man_dir="/usr/local/share/man",
        bash_dir="/usr/local/share/bash-completion/completions",
        zsh_dir="/usr/local/share/zsh/site-functions",
        fish_dir="/usr/local/share/fish/vendor_completions.d",
        python=sys.executable,
        # this package's own directory: a venv's or pip's site-packages, a --user site, or the
        # checkout of an editable install
        packages=str(PACKAGE.parent),
        cli=os.path.join(sysconfig.get_path("scripts"), "xenblockctl"),
    )


#: The Debian package: distribution paths (udev helpers and units under /usr/lib and /lib), never a
#: file of xen-utils-common (only the new name block-xenblockctl in /etc/xen/scripts).
DEBIAN = Layout(
    "debian",
    scripts="/etc/xen/scripts",
    hook_dir="/usr/lib/udev",
    rules_dir="/usr/lib/udev/rules.d",
    units_dir="/lib/systemd/system",
    man_dir="/usr/share/man",
    bash_dir="/usr/share/bash-completion/completions",
    zsh_dir="/usr/share/zsh/vendor-completions",
    fish_dir="/usr/share/fish/vendor_completions.d",
    python="/usr/bin/python3",
    packages="/usr/lib/python3/dist-packages",  # dh-python's, for every python3 version
    cli="/usr/bin/xenblockctl",
)


def layout(name: str) -> Layout:
    if name == "local":
        return local_layout()
    if name == "debian":
        return DEBIAN
    raise InstallError(f"unknown layout {name!r} (local, debian)")


def shipped(relative: str) -> Path:
    """A shipped file by its checkout-relative name (`hotplug/block-xenblockctl`)."""
    for base in (SHARE, CHECKOUT):
        path = base / relative
        if path.is_file():
            return path
    raise InstallError(
        f"{relative} is neither in {SHARE} (installed package data) nor in a source checkout at "
        f"{CHECKOUT}: the package was installed without its data files",
        code="files-missing",
    )


class Item(NamedTuple):
    """One file to lay: its host path, mode and exact content."""

    path: str
    mode: int
    content: bytes


def _text(relative: str) -> str:
    return shipped(relative).read_text()


def _with_python(text: str, python: str) -> str:
    if not text.startswith(SHIPPED_SHEBANG):
        raise InstallError(f"shipped script does not start with {SHIPPED_SHEBANG.strip()!r}")
    return f"#!{python}\n" + text[len(SHIPPED_SHEBANG) :]


def block_script(text: str, where: Layout) -> str:
    """The shipped block script as laid for `where` (_without_site), naming its bundle's directory."""
    return _without_site(
        text,
        where,
        "block script",
        # posix.environ, not os.environ: the laid script never imports os (issue 18 round 10); the
        # import is the block's own, so an older shim (benches lay one) gets it too
        "import posix\n"
        f"_bundle_dir = posix.environ.get({CACHE_DIR_ENV.encode()!r}, b'').decode('utf-8', 'surrogateescape')"
        f" or {where.cache_dir!r}\n",
    )


def udev_hook(text: str, where: Layout) -> str:
    """The shipped udev hook as laid for `where` (_without_site): it runs on every block event."""
    return _without_site(text, where, "udev hook")


def _without_site(text: str, where: Layout, what: str, extra: str = "") -> str:
    """A shipped script as laid for `where`: `#!<python> -S`, and the package's directory put on
    sys.path where the shipped copy looks for its checkout (then `extra`). Appended, as site.py
    would: the standard library comes first."""
    begin = text.find(WHERE_BEGIN)
    end = text.find(WHERE_END, begin)
    if begin < 0 or end < 0 or text[begin - 1] != "\n":
        raise InstallError(f"shipped {what} lacks the {WHERE_BEGIN!r} … {WHERE_END.strip()!r} lines")
    where_lines = (
        "# Laid by `xenblockctl install-hooks`: run without site.py (-S, see the docstring), so the\n"
        "# directory holding the xenblockctl package it was installed from goes on the path here.\n"
        f"{_APPEND}{where.packages!r})\n"
        f"{extra}"
    )
    text = text[:begin] + where_lines + text[end + len(WHERE_END) :]
    return _with_python(text, f"{where.python} -S")


def laid_packages(text: str) -> str | None:
    """The directory a block script laid by block_script() puts on sys.path (it then runs with
    `-S`), or None for any other script (the shipped shim, a hand-written one)."""
    first, _, rest = text.partition("\n")
    if not first.startswith("#!") or first.split()[-1] != "-S":
        return None
    for line in rest.splitlines():
        if line.startswith(_APPEND) and line.endswith(")"):
            try:
                value = ast.literal_eval(line[len(_APPEND) : -1])
            except (ValueError, SyntaxError):
                return None
            return value if isinstance(value, str) else None
    return None


_APPEND = "sys.path.append("


def client() -> bytes | None:
    """The compiled hotplug client this package carries, or None (built without one)."""
    try:
        return CLIENT.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError.from_oserror(exc, f"cannot read the hotplug client {CLIENT}") from exc


def hotplug_unit(text: str, where: Layout) -> str:
    """The shipped hotplug server unit, starting the Python script laid beside the client."""
    if SHIPPED_SERVE not in text:
        raise InstallError(f"{HOTPLUG_UNIT}: no {SHIPPED_SERVE.strip()!r} line")
    return text.replace(SHIPPED_SERVE, f"ExecStart={where.python_script} --serve\n")


def python_script_path(where: Layout, program: bytes | None) -> str:
    """Where the Python block script is laid: beside the client, or at the script path without one."""
    return where.python_script if program is not None else where.script


def plan(where: Layout, program: bytes | None = None) -> list[Item]:
    """Every file of the layout, content rendered for it; `program` is the hotplug client (client())."""
    python_script = block_script(_text(f"hotplug/{SCRIPT_NAME}"), where).encode()
    if program is None:
        items = [Item(where.script, 0o755, python_script)]
    else:
        items = [
            Item(where.script, 0o755, program),
            Item(where.python_script, 0o755, python_script),
            Item(
                f"{where.units_dir}/{HOTPLUG_UNIT}",
                0o644,
                hotplug_unit(_text(f"hotplug/{HOTPLUG_UNIT}"), where).encode(),
            ),
        ]
    items += [
        Item(where.hook, 0o755, udev_hook(_text(f"hotplug/{HOOK_NAME}"), where).encode()),
        Item(
            f"{where.rules_dir}/{RULES_NAME}",
            0o644,
            _text(f"hotplug/{RULES_NAME}").replace(SHIPPED_HOOK, where.hook).encode(),
        ),
    ]
    for unit in UNITS:
        text = _text(f"hotplug/{unit}")
        if f"ExecStart={SHIPPED_CLI} " not in text:
            raise InstallError(f"{unit}: ExecStart does not start {SHIPPED_CLI}")
        items.append(
            Item(
                f"{where.units_dir}/{unit}",
                0o644,
                text.replace(f"={SHIPPED_CLI} ", f"={where.cli} ").encode(),
            )
        )
    for page in MAN_PAGES:
        section = page.rsplit(".", 1)[1]
        items.append(Item(f"{where.man_dir}/man{section}/{page}", 0o644, shipped(f"man/{page}").read_bytes()))
    completions = {
        "bash": f"{where.bash_dir}/xenblockctl",
        "zsh": f"{where.zsh_dir}/_xenblockctl",
        "fish": f"{where.fish_dir}/xenblockctl.fish",
    }
    for shell, path in completions.items():
        items.append(Item(path, 0o644, shipped(f"completions/xenblockctl.{shell}").read_bytes()))
    return items


class Done(NamedTuple):
    path: str  # the host path (without the root)
    result: str  # installed, updated, unchanged (dry run: would install, would update)


def _current(target: Path) -> tuple[bytes, int] | None:
    try:
        return target.read_bytes(), target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError.from_oserror(exc, f"cannot read {target}") from exc


def _write(target: Path, item: Item) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(item.content)
            os.chmod(tmp, item.mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise InstallError.from_oserror(exc, f"cannot write {target}") from exc


def stale(where: Layout, program: bytes | None) -> list[str]:
    """Files of the warm hotplug path an install with the client laid, which one without it removes."""
    return [] if program is not None else [where.python_script, f"{where.units_dir}/{HOTPLUG_UNIT}"]


def install(where: Layout, root: str = "/", *, dry_run: bool = False) -> list[Done]:
    """Lay every file of the layout under root; returns what happened to each, in order."""
    done: list[Done] = []
    program = client()
    for item in plan(where, program):
        target = Path(root) / item.path.lstrip("/")
        now = _current(target)
        if now == (item.content, item.mode):
            done.append(Done(item.path, "unchanged"))
            continue
        if dry_run:
            done.append(Done(item.path, "would install" if now is None else "would update"))
            continue
        _write(target, item)
        done.append(Done(item.path, "installed" if now is None else "updated"))
    for path in stale(where, program):
        target = Path(root) / path.lstrip("/")
        if not target.is_file():
            continue
        if not dry_run:
            try:
                target.unlink()
            except OSError as exc:
                raise InstallError.from_oserror(exc, f"cannot remove {target}") from exc
        done.append(Done(path, "would remove" if dry_run else "removed"))
    bundle = _bundle(where, root, python_script_path(where, program), dry_run=dry_run)
    if bundle is not None:
        done.append(bundle)
    return done


def _bundle(where: Layout, root: str, laid: str, *, dry_run: bool) -> Done | None:
    """The laid block script's bundle (blockscript/bundle.py), written now so that the first VM
    start is as fast as the others: by the laid Python script itself (`laid --write-bundle`; never
    the client, which would hand the request to a running server), so it is made by the
    interpreter and from the package directory every VM start uses, and checked by the same
    loader. Only when that directory holds this very package: a package build (the .deb) lays a
    script for a directory its package is not in yet, and must not ship a cache file; there the
    first VM start has a background writer write it (bundlewriter.renew_later)."""
    if where.packages != str(PACKAGE.parent):
        return None
    path = f"{where.cache_dir}/{NAME}"
    directory = Path(root) / where.cache_dir.lstrip("/")
    existed = (directory / NAME).exists()
    if dry_run:
        return Done(path, "would check" if existed else "would install")
    script = Path(root) / laid.lstrip("/")
    env = {**os.environ, CACHE_DIR_ENV: str(directory)}
    try:
        ran = subprocess.run(
            [str(script), "--write-bundle"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot run {script} --write-bundle: {exc}") from exc
    if ran.returncode == 0:
        return Done(path, "unchanged")
    if ran.returncode == 3:  # the script wrote a fresh bundle
        return Done(path, "updated" if existed else "installed")
    raise InstallError(
        f"{script} --write-bundle could not write {directory / NAME} (exit {ran.returncode}): "
        f"{ran.stderr.strip()[-500:]}"
    )
