"""The installation checks of `xenblockctl doctor`: what libxl, udev, systemd and man find on this
host (or under a root: an image, a chroot), each a finding with a fix.

Files are looked up under `root` where the .deb (hostfiles.DEBIAN) or `install-hooks` from a wheel
(hostfiles.local_layout) put them. A script's interpreter is run (from `/`, with a minimal
environment, as libxl and udev run it) to import the module the script imports: a script laid by the
wrong Python dies with ModuleNotFoundError before it can write hotplug-error, so libxl reports
nothing useful. Under a root the interpreter is the root's copy when it has one, else this host's
(what `install-hooks --root` from this host wrote). A check that cannot run is reported `skipped`,
with why: it never disappears from the report."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from xenblockctl.blockscript import warm
from xenblockctl.config import Value
from xenblockctl.toolstack import host, hostfiles
from xenblockctl.toolstack.findings import ERROR, INFO, OK, SKIPPED, WARNING, Finding

#: Where libxl resolves a bare `script=NAME` (XEN_SCRIPT_DIR of Debian's and upstream's builds).
XEN_SCRIPT_DIR = "/etc/xen/scripts"
RULES_DIRS = ("/etc/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d")
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
MAN_DIRS = ("/usr/share/man", "/usr/local/share/man")
ENGINE_UNIT = "xenblockctl-engine.service"
#: What each shipped script imports first; the interpreter must find it.
SCRIPT_MODULE = "xenblockctl.blockscript.hotplug"
HOOK_MODULE = "xenblockctl.toolstack.udev"
RUN_PROGRAM = re.compile(r'RUN\+="([^" ]+)')
#: PATH of libxl's and udev's children, where `#!/usr/bin/env python3` finds its interpreter.
SCRIPT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
IMPORT_TIMEOUT = 30.0
XEN_CAPABILITIES = "/proc/xen/capabilities"
#: The first bytes of the compiled hotplug client (an ELF program) laid at the script path.
ELF_MAGIC = b"\x7fELF"
SERVER_FIX = f"systemctl enable --now {hostfiles.HOTPLUG_UNIT}"


Settings = Mapping[str, Value]


def _under(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _skipped(check: str, why: str) -> Finding:
    return Finding(check, SKIPPED, f"skipped: {why}")


def interpreter(script: Path, root: str) -> tuple[str, Path] | str:
    """(the interpreter as the shebang names it, the file to run), or why there is none."""
    try:
        with script.open("rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError as exc:
        return f"cannot read {script}: {exc.strerror}"
    if not first.startswith("#!"):
        return f"{script} has no #! line"
    words = first[2:].split()
    if not words:
        return f"{script}: empty #! line"
    named = words[0]
    if os.path.basename(named) == "env" and len(words) > 1:
        for directory in SCRIPT_PATH:
            for base in (root,) if root == "/" else (root, "/"):
                candidate = _under(base, f"{directory}/{words[1]}")
                if os.access(candidate, os.X_OK):
                    return f"{named} {words[1]}", candidate
        return f"{words[1]} (via {named}) is not on {':'.join(SCRIPT_PATH)}"
    for base in (root,) if root == "/" else (root, "/"):
        candidate = _under(base, named)
        if os.access(candidate, os.X_OK):
            return named, candidate
    return f"its interpreter {named} does not exist"


def check_imports(check: str, script: Path, root: str, module: str, fix: str) -> Finding:
    """Run the script's interpreter as libxl/udev would (cwd /, no PYTHONPATH) and import `module`."""
    if not script.is_file():
        return _skipped(check, f"{script} is missing (see above)")
    found = interpreter(script, root)
    if isinstance(found, str):
        return Finding(check, ERROR, f"{script}: {found}", fix)
    named, binary = found
    # A block script laid by install-hooks runs with -S and appends the package's directory
    # itself: import the way it does, so a wrong path is found here, not at a VM start.
    try:
        packages = hostfiles.laid_packages(script.read_text(errors="replace"))
    except OSError as exc:
        return Finding(check, ERROR, f"cannot read {script}: {exc.strerror}", fix)
    shown = named
    if packages is None:
        argv = [str(binary), "-c", f"import {module}"]
    else:
        shown = f"{named} -S (with {packages} on its path)"
        argv = [str(binary), "-S", "-c", f"import sys; sys.path.append({packages!r}); import {module}"]
    try:
        result = subprocess.run(
            argv,
            cwd="/",
            env={"PATH": ":".join(SCRIPT_PATH), "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Finding(
            check, ERROR, f"{binary} -c 'import {module}' did not finish in {IMPORT_TIMEOUT:.0f}s", fix
        )
    except OSError as exc:
        return Finding(check, ERROR, f"cannot run {binary}: {exc.strerror}", fix)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        return Finding(check, ERROR, f"{script} runs {shown}, which cannot import {module}: {last}", fix)
    where = "" if str(binary) == named else f" ({binary})"
    return Finding(check, OK, f"{script} runs {shown}{where}, which imports {module}")


def _executable(check: str, path: Path, what: str, fix: str) -> Finding | None:
    """An error finding when `path` is missing or not executable, else None."""
    if not path.is_file():
        return Finding(check, ERROR, f"{what} {path} does not exist", fix)
    if not os.access(path, os.X_OK):
        return Finding(check, ERROR, f"{what} {path} is not executable", f"chmod 0755 {path}")
    return None


INSTALL_FIX = (
    "apt install xenblockctl (Debian), or `xenblockctl install-hooks` from the environment xenblockctl "
    "is installed in"
)
REINSTALL_FIX = (
    "apt install --reinstall xenblockctl, or run `xenblockctl install-hooks` with the xenblockctl of "
    "the environment the package is installed in (it writes that interpreter into the scripts)"
)


def is_client(path: Path) -> bool:
    """Whether `path` is the compiled hotplug client (else a script, or missing/unreadable)."""
    try:
        with path.open("rb") as f:
            return f.read(len(ELF_MAGIC)) == ELF_MAGIC
    except OSError:
        return False


def check_block_script(root: str) -> list[Finding]:
    """The program libxl runs for `script=block-xenblockctl`: the hotplug client with the Python
    script beside it (`.py`, its fallback), or the Python script alone; and whether that script's
    interpreter imports us."""
    script = _under(root, f"{XEN_SCRIPT_DIR}/{hostfiles.SCRIPT_NAME}")
    bad = _executable("block-script", script, "the block script", INSTALL_FIX)
    first = bad or Finding("block-script", OK, f"{script} is installed and executable")
    if bad is not None and not script.is_file():
        return [
            first,
            _skipped("script-import", f"{script} is missing"),
            _skipped("hotplug-client", f"{script} is missing"),
        ]
    if not is_client(script):
        return [
            first,
            check_imports("script-import", script, root, SCRIPT_MODULE, REINSTALL_FIX),
            Finding(
                "hotplug-client",
                INFO,
                f"{script} is the Python script itself: no hotplug client is laid (the package was built "
                "without a C compiler), so every VM start starts an interpreter and the hotplug server "
                "is unused",
            ),
        ]
    python = script.with_name(script.name + hostfiles.PYTHON_SUFFIX)
    missing = _executable(
        "hotplug-client",
        python,
        f"{script} is the hotplug client, but the Python script it runs without a server,",
        REINSTALL_FIX,
    )
    if missing is not None:
        why = f"{python} is missing" if not python.is_file() else f"{python} is not executable"
        return [first, _skipped("script-import", why), missing]
    return [
        first,
        check_imports("script-import", python, root, SCRIPT_MODULE, REINSTALL_FIX),
        Finding(
            "hotplug-client",
            OK,
            f"{script} is the hotplug client; {python} is the Python script it runs when no hotplug "
            "server answers",
        ),
    ]


def check_hotplug_server(root: str) -> Finding:
    """Whether the warm hotplug server answers on its socket: connected, then closed with nothing
    sent (a request is never made). Not running is a finding, not an error: the client then runs
    the Python script itself, as before the server existed, only slower."""
    if root != "/":
        return _skipped("hotplug-server", f"the hotplug server is a running process of /, not of {root}")
    client = is_client(_under(root, f"{XEN_SCRIPT_DIR}/{hostfiles.SCRIPT_NAME}"))
    path = warm.socket_path(os.environ)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
    except PermissionError:
        return _skipped("hotplug-server", f"cannot connect to {path}: permission denied (only root may)")
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if not client:
            return Finding(
                "hotplug-server",
                INFO,
                f"no hotplug server on {path} ({why}); none is needed without the client",
            )
        return Finding(
            "hotplug-server",
            WARNING,
            f"hotplug server not running ({path}: {why}): VM starts use the in-process path (slower)",
            SERVER_FIX,
        )
    finally:
        sock.close()
    if not client:
        return Finding(
            "hotplug-server",
            INFO,
            f"a hotplug server answers on {path}, but no hotplug client is laid to ask it",
        )
    return Finding("hotplug-server", OK, f"the hotplug server answers on {path}: VM starts go through it")


def attach_script_path(value: str) -> str:
    """Where libxl finds the configured `attach.script`: a bare name is in XEN_SCRIPT_DIR."""
    return value if value.startswith("/") else f"{XEN_SCRIPT_DIR}/{value}"


def check_attach_script(root: str, settings: Settings | None) -> Finding:
    if settings is None:
        return _skipped("attach-script", "the configuration does not load (see the config check)")
    value = str(settings["attach.script"].value)
    source = settings["attach.script"].source
    path = _under(root, attach_script_path(value))
    fix = (
        f"set attach.script in xenblockctl.conf(5) to an installed script (now {value!r} from {source}), "
        "or install the package"
    )
    bad = _executable("attach-script", path, f"attach.script ({source}):", fix)
    if bad is not None:
        return bad
    return Finding("attach-script", OK, f"attach.script {value} ({source}) exists and is executable")


def _rules_file(root: str) -> Path | None:
    # udev reads the first file of a name in this order: /etc overrides the distribution's.
    for directory in RULES_DIRS:
        path = _under(root, f"{directory}/{hostfiles.RULES_NAME}")
        if path.is_file():
            return path
    return None


def check_udev(root: str) -> list[Finding]:
    rules = _rules_file(root)
    if rules is None:
        where = ", ".join(RULES_DIRS)
        return [
            Finding(
                "udev-rules",
                WARNING,
                f"no {hostfiles.RULES_NAME} in {where}: vanished or replaced devices are not recorded "
                "on their backends (list/doctor cannot show them broken)",
                INSTALL_FIX,
            ),
            _skipped("udev-hook", "no udev rules file names a hook"),
        ]
    try:
        programs = sorted(set(RUN_PROGRAM.findall(rules.read_text(errors="replace"))))
    except OSError as exc:
        return [
            Finding("udev-rules", ERROR, f"cannot read {rules}: {exc.strerror}", f"check {rules}"),
            _skipped("udev-hook", f"{rules} is unreadable"),
        ]
    if not programs:
        return [
            Finding("udev-rules", ERROR, f"{rules} runs no program", REINSTALL_FIX),
            _skipped("udev-hook", f"{rules} names no hook"),
        ]
    found = [Finding("udev-rules", OK, f"{rules} present")]
    for program in programs:
        hook = _under(root, program)
        bad = _executable("udev-hook", hook, f"the hook {rules.name} runs,", REINSTALL_FIX)
        found.append(bad or check_imports("udev-hook", hook, root, HOOK_MODULE, REINSTALL_FIX))
    return found


def _unit_file(root: str, unit: str) -> Path | None:
    for directory in UNIT_DIRS:
        path = _under(root, f"{directory}/{unit}")
        if path.is_file():
            return path
    return None


def _wanted_by(unit_file: Path) -> list[str]:
    try:
        text = unit_file.read_text(errors="replace")
    except OSError:
        return []
    return [t for line in text.splitlines() if line.startswith("WantedBy=") for t in line[9:].split()]


def _enabled(root: str, unit: str, targets: Iterable[str]) -> bool:
    """`systemctl enable` made a symlink in TARGET.wants/ under /etc/systemd/system."""
    # The link is absolute, into the root's own tree: its presence is the fact, not its target here.
    return any(_under(root, f"/etc/systemd/system/{t}.wants/{unit}").is_symlink() for t in targets)


def engine_is_consumer(settings: Settings | None, blkback: bool) -> bool | None:
    """Whether disks `attach` creates are served by the engine (None: configuration unreadable)."""
    if settings is None:
        return None
    backend = str(settings["attach.backend"].value)
    return backend == "engine" or (backend == "auto" and not blkback)


def check_units(root: str, settings: Settings | None) -> Finding:
    blkback = host.blkback_loaded()
    engine = engine_is_consumer(settings, blkback)
    unit = _unit_file(root, ENGINE_UNIT)
    if engine is None:
        return _skipped("units", "the configuration does not load, so the consumer is unknown")
    why = f"attach.backend={settings['attach.backend'].value if settings else '?'}"
    if not engine:
        state = f"{unit} present" if unit else f"{ENGINE_UNIT} not installed"
        return Finding("units", INFO, f"{state}; not needed: kernel blkback is the consumer ({why})")
    if unit is None:
        return Finding(
            "units",
            ERROR,
            f"the engine serves disks ({why}) but {ENGINE_UNIT} is not in {', '.join(UNIT_DIRS)}",
            INSTALL_FIX,
        )
    targets = _wanted_by(unit)
    if not _enabled(root, ENGINE_UNIT, targets):
        return Finding(
            "units",
            WARNING,
            f"the engine serves disks ({why}); {unit} is present but not enabled: no engine after a reboot",
            f"systemctl enable --now {ENGINE_UNIT}",
        )
    return Finding("units", OK, f"{unit} present and enabled ({why})")


def check_blkback(settings: Settings | None) -> Finding:
    """Kernel blkback loaded or not, and what that means for the configured consumer
    (lifecycle.choose_kind: with blkback loaded the engine's disks are `vbd3`, else `vbd`)."""
    if not os.path.exists(XEN_CAPABILITIES):
        return _skipped(
            "blkback", f"not a Xen domain ({XEN_CAPABILITIES} missing): no backend driver applies"
        )
    loaded = host.blkback_loaded()
    if settings is None:
        state = "loaded" if loaded else "not loaded"
        return Finding("blkback", INFO, f"kernel blkback is {state}; the configuration does not load")
    backend = str(settings["attach.backend"].value)
    if loaded:
        engine = "; the engine serves attach.backend=engine disks as vbd3" if backend == "engine" else ""
        return Finding(
            "blkback",
            OK,
            f"kernel blkback is loaded: it serves every vbd (xl's disks, attach.backend={backend}){engine}",
        )
    if backend == "kernel":
        return Finding(
            "blkback",
            ERROR,
            "kernel blkback is not loaded but attach.backend=kernel: no disk `attach` creates can connect",
            "modprobe xen-blkback, or set attach.backend=auto and run the engine",
        )
    return Finding(
        "blkback",
        INFO,
        f"kernel blkback is not loaded: vbds (xl's too) need the engine (attach.backend={backend})",
        f"systemctl start {ENGINE_UNIT}, or modprobe xen-blkback",
    )


def check_man_pages(root: str) -> Finding:
    missing = []
    for page in hostfiles.MAN_PAGES:
        section = page.rsplit(".", 1)[1]
        names = (f"man{section}/{page}", f"man{section}/{page}.gz")
        if not any(_under(root, f"{d}/{n}").is_file() for d in MAN_DIRS for n in names):
            missing.append(page)
    if missing:
        return Finding(
            "man-pages",
            WARNING,
            f"{len(missing)} of {len(hostfiles.MAN_PAGES)} man pages not in {', '.join(MAN_DIRS)}",
            INSTALL_FIX,
            missing,
        )
    return Finding("man-pages", OK, f"{len(hostfiles.MAN_PAGES)} man pages installed")


def run(root: str, settings: Settings | None) -> list[Finding]:
    """Every installation check under `root`; `settings` is config.load()'s result, None if it failed."""
    if not os.path.isdir(root):
        return [_skipped("install", f"{root} is not a directory")]
    return [
        *check_block_script(root),
        check_hotplug_server(root),
        check_attach_script(root, settings),
        *check_udev(root),
        check_units(root, settings),
        check_blkback(settings),
        check_man_pages(root),
    ]
