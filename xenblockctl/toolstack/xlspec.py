"""xl disk specs (`format=raw,vdev=xvdb,access=rw,target=/srv/a.img`), read as xl reads them.

The grammar and meanings are xl-disk-configuration(5) and libxlu's lexer (libxlu_disk_l.l):
comma-separated `key=value` parameters, flags and positional parameters (target, format, vdev,
access, in that order); `target=` swallows the rest of the string, commas included; whitespace
before a parameter is ignored; each parameter at most once (an empty value may be given again).
The deprecated forms (`raw:/path,hda,w`, `tap:aio:/path`, `hdc:cdrom`) are read as libxl reads them.

What a spec asks for and xenblockctl does not do (other formats, cdroms, other backend types or
scripts, virtio, COLO) is refused with the parameter named: a disk attached other than as written
is worse than no disk."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenblockctl.errors import XenblockError


class DiskSpecError(XenblockError):
    code = "disk-spec-invalid"
    hint = "see xl-disk-configuration(5); e.g. --spec 'format=raw,vdev=xvdb,access=rw,target=/srv/a.img'"


@dataclass(frozen=True)
class XlDisk:
    """A spec reduced to what xenblockctl attaches: a raw disk."""

    target: str
    vdev: str
    #: "r" or "w" (libxl's mode node)
    mode: str
    #: domain name or id of `backend=`, None: this domain
    backend: str | None = None
    #: "kernel" for backendtype=phy, "engine" for backendtype=tap, None: not given
    backend_type: str | None = None
    #: discard / no-discard; None: libxl's default (on for writable disks)
    discard: bool | None = None


#: xl's flags (bare words) that we can honour, and what they set
_FLAGS = {"discard": ("discard", True), "no-discard": ("discard", False)}
#: flags and keys of xl-disk-configuration(5) we refuse, with why
_UNSUPPORTED = {
    "cdrom": "cdrom devices are not supported (xenblockctl attaches disks)",
    "direct-io-safe": "direct-io-safe applies to qdisk, which xenblockctl does not drive",
    "trusted": "trusted/untrusted is not supported",
    "untrusted": "trusted/untrusted is not supported",
    "colo": "COLO is not supported",
    "no-colo": "COLO is not supported",
    "colo-host": "COLO is not supported",
    "colo-port": "COLO is not supported",
    "colo-export": "COLO is not supported",
    "active-disk": "COLO is not supported",
    "hidden-disk": "COLO is not supported",
    "grant_usage": "grant_usage applies to virtio only, which is not supported",
    "script": "script= is not supported: xenblockctl attaches with its own block script "
    "(block-xenblockctl reads every target form it supports from target=)",
}
_KEYS = {"format", "vdev", "access", "backend", "backendtype", "specification", "target", "devtype"}
_FORMATS = {"raw", "qcow", "qcow2", "vhd", "qed", "empty"}
_FORMAT_PREFIXES = {"raw", "qcow", "qcow2", "vhd"}
_SCRIPT_PREFIXES = {"iscsi", "nbd", "enbd", "drbd"}
_IGNORED_PREFIXES = {"tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"}
_KNOWN_PREFIX = re.compile(
    r"("
    + "|".join(sorted(_FORMAT_PREFIXES | _SCRIPT_PREFIXES | _IGNORED_PREFIXES, key=len, reverse=True))
    + r"):"
)
_OTHER_PREFIX = re.compile(r"([a-z][a-z0-9]*):(?![a-z0-9])")
#: bare words xl reads as flags that we refuse
_UNSUPPORTED_FLAGS = {"cdrom", "direct-io-safe", "trusted", "untrusted", "colo", "no-colo"}
_KEY = re.compile(r"[a-z][-a-z0-9_]*=")
_ACCESS = {"r": "r", "ro": "r", "w": "w", "rw": "w", "": "w"}
_BACKEND_TYPES = {"phy": "kernel", "tap": "engine"}
#: the longest spec accepted (xl has no limit; this bounds the work and the messages)
MAX_SPEC = 4096


def _fail(spec: str, what: str) -> DiskSpecError:
    return DiskSpecError(f"{what} (in {spec[:200]!r})")


class _Parse:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.values: dict[str, str] = {}
        self.flags: dict[str, bool] = {}
        self.had_depr_prefix = False
        self.positional_done: set[str] = set()

    def save(self, key: str, value: str) -> None:
        # libxl's savestring: an empty value may be given again, a non-empty one may not
        if self.values.get(key):
            raise _fail(self.spec, f"{key} respecified")
        self.values[key] = value

    def set_format(self, value: str) -> None:
        if value not in _FORMATS and value != "":
            raise _fail(self.spec, f"unknown value for format: {value[:40]!r}")
        value = value or "raw"
        if self.values.get("format", value) != value:
            raise _fail(self.spec, "format respecified")
        self.values["format"] = value

    def vdev_and_devtype(self, token: str) -> bool:
        """The deprecated `vdev:devtype` positional; True if it was one."""
        if ":" not in token:
            return False
        vdev, _, devtype = token.rpartition(":")
        self.save("vdev", vdev)
        if devtype == "cdrom":
            raise _fail(self.spec, _UNSUPPORTED["cdrom"])
        if devtype != "disk":
            raise _fail(self.spec, f"unknown deprecated type {devtype[:40]!r}")
        return True

    def positional(self, token: str) -> None:
        if "target" not in self.values:
            self.values["target"] = token
        elif not self.had_depr_prefix and "format" not in self.values:
            if self.values["target"] == "" and self.vdev_and_devtype(token):
                raise _fail(self.spec, "an empty cdrom drive is not supported")
            self.set_format(token)
        elif not self.values.get("vdev"):
            if not self.vdev_and_devtype(token):
                self.save("vdev", token)
        elif "access" not in self.positional_done:
            self.positional_done.add("access")
            self.keyed("access", token)
        else:
            raise _fail(self.spec, f"too many positional parameters at {token[:40]!r}")

    def keyed(self, key: str, value: str) -> None:
        if key == "format":
            self.set_format(value)
        elif key == "access":
            if value not in _ACCESS:
                raise _fail(self.spec, f"unknown value for access: {value[:40]!r} (r, ro, w, rw)")
            if self.values.get("access", _ACCESS[value]) != _ACCESS[value]:
                raise _fail(self.spec, "access respecified")
            self.values["access"] = _ACCESS[value]
        elif key == "devtype":
            if value == "disk":
                return
            if value == "cdrom":
                raise _fail(self.spec, _UNSUPPORTED["cdrom"])
            raise _fail(self.spec, f"unknown value for devtype: {value[:40]!r}")
        elif key == "backendtype":
            if value not in (*_BACKEND_TYPES, "qdisk", "standalone"):
                raise _fail(self.spec, f"unknown value for backendtype: {value[:40]!r}")
            if value not in _BACKEND_TYPES:
                raise _fail(
                    self.spec, f"backendtype={value} is not supported (phy: kernel blkback, tap: engine)"
                )
            self.save("backendtype", value)
        elif key == "specification":
            if value == "virtio":
                raise _fail(self.spec, "specification=virtio is not supported")
            if value != "xen":
                raise _fail(self.spec, f"unknown value for specification: {value[:40]!r}")
        else:
            self.save(key, value)

    def prefix(self, name: str) -> None:
        self.had_depr_prefix = True
        if name in _FORMAT_PREFIXES:
            self.set_format(name)
        elif name in _SCRIPT_PREFIXES:
            raise _fail(self.spec, f"the {name}: prefix (script=block-{name}) is not supported")


def parse(spec: str) -> XlDisk:
    """Read an xl disk spec; raises DiskSpecError naming the parameter it cannot honour."""
    if len(spec) > MAX_SPEC:
        raise DiskSpecError(f"disk spec longer than {MAX_SPEC} characters")
    if any((ord(ch) < 32 and ch not in " \t\n") or ord(ch) == 127 for ch in spec):
        raise _fail(spec, "control character in the disk spec")
    p = _Parse(spec)
    pos = 0
    while pos < len(spec):
        rest = spec[pos:]
        stripped = rest.lstrip(" \t\n")
        if stripped != rest:
            pos += len(rest) - len(stripped)
            continue
        if rest.startswith("target="):
            value = rest[len("target=") :]
            p.save("target", value[:-1] if value.endswith(",") else value)
            break
        prefix = _KNOWN_PREFIX.match(rest)
        if prefix is not None:
            p.prefix(prefix.group(1))
            pos += prefix.end()
            continue
        other = _OTHER_PREFIX.match(rest)
        if other is not None:
            raise _fail(
                spec,
                f"unknown deprecated disk prefix {other.group(0)!r} (a target with a prefix such as "
                "snapshot: goes last, as target=...)",
            )
        token, comma, _ = rest.partition(",")
        pos += len(token) + len(comma)
        key = _KEY.match(token)
        if key is not None:
            name = key.group(0)[:-1]
            if name in _UNSUPPORTED:
                raise _fail(spec, _UNSUPPORTED[name])
            if name not in _KEYS:
                raise _fail(spec, f"unknown parameter {name!r}")
            p.keyed(name, token[key.end() :])
        elif token in _FLAGS:
            attr, flag = _FLAGS[token]
            p.flags[attr] = flag
        elif token in _UNSUPPORTED_FLAGS:
            raise _fail(spec, _UNSUPPORTED[token])
        elif "=" in token:
            raise _fail(spec, f"bad disk syntax at {token[:40]!r}")
        else:
            p.positional(token)
    return _result(p)


def _result(p: _Parse) -> XlDisk:
    values = p.values
    fmt = values.get("format") or "raw"
    if fmt != "raw":
        raise _fail(p.spec, f"format={fmt} is not supported: xenblockctl serves raw images and devices")
    target = values.get("target", "")
    if not target:
        raise _fail(p.spec, "no target (an empty cdrom drive is not supported)")
    vdev = values.get("vdev", "")
    if not vdev:
        raise _fail(p.spec, "no vdev (it is mandatory in an xl disk spec)")
    from xenblockctl.blockscript.target import has_target_prefix

    if not target.startswith("/") and not has_target_prefix(target):
        target = f"/dev/{target}"  # xl-disk-configuration(5): "/dev will be prepended"
    return XlDisk(
        target=target,
        vdev=vdev,
        mode=values.get("access", "w"),
        backend=values.get("backend") or None,
        backend_type=_BACKEND_TYPES.get(values.get("backendtype", "")),
        discard=p.flags.get("discard"),
    )
