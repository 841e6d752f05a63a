"""VM definitions: the dataclasses, their validation, and TOML in and out (pure, no I/O).

Every error names the source, the field and the reason, so a person can fix the file
without reading code. Files are read with tomllib and written by hand in one canonical
layout, so that ``parse_definition(definition_to_toml(d)) == d`` always holds.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from supervisord_vm.definition_devices import (
    Nic,
    Resources,
    nics_toml,
    parse_boot,
    parse_cpu,
    parse_display,
    parse_firmware,
    parse_media,
    parse_nics,
    parse_resources,
    parse_vnc_listen,
    resources_toml,
)

# Part of this module's API.
from supervisord_vm.definition_devices import nic_mac as nic_mac  # noqa: PLC0414
from supervisord_vm.definition_fields import FieldError as _FieldError
from supervisord_vm.definition_fields import absolute_path as _absolute_path
from supervisord_vm.definition_fields import bool_field as _bool
from supervisord_vm.definition_fields import int_field as _int
from supervisord_vm.definition_fields import show as _show
from supervisord_vm.definition_fields import str_field as _str
from supervisord_vm.definition_fields import suggest as _suggest
from supervisord_vm.definition_fields import toml_bool as _toml_bool
from supervisord_vm.definition_fields import toml_string as toml_string  # noqa: PLC0414 - API
from supervisord_vm.errors import InvalidDefinition
from supervisord_vm.unitname import UNIT_NAME_MAX, scope_name

RESTART_POLICIES = ("no", "on-crash", "always")
DISK_FORMATS = ("raw", "qcow2")
ACCELERATORS = ("kvm", "tcg", "xen", "hvf", "whpx", "nvmm")

NAME_MAX = 64
MEMORY_MIN, MEMORY_MAX = 16, 1048576  # MiB
CPUS_MIN, CPUS_MAX = 1, 255
STOP_TIMEOUT_MIN, STOP_TIMEOUT_MAX = 1, 3600  # seconds
# A definition is a few hundred bytes; the cap keeps a 10 MB bus message from blocking the
# daemon's loop in the TOML parser and from landing in the definitions directory.
DEFINITION_MAX_BYTES = 1 << 20
# The kernel's MAX_ARG_STRLEN (including the NUL): a longer argument makes exec fail with E2BIG.
ARG_MAX_BYTES = 128 * 1024 - 1

# A name ending like this reads as a unit name (svm-x.service.scope would confuse people).
UNIT_SUFFIXES = (
    ".service",
    ".scope",
    ".slice",
    ".socket",
    ".target",
    ".mount",
    ".automount",
    ".swap",
    ".timer",
    ".path",
    ".device",
)

_T = TypeVar("_T")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MACHINE_RE = re.compile(r"[A-Za-z0-9._-]+")


_NO_RESOURCES = Resources()


@dataclass(frozen=True)
class Disk:
    path: str  # absolute
    format: str = "raw"  # raw | qcow2
    readonly: bool = False
    snapshot: bool = False  # discard guest writes
    media: str = "disk"  # disk | cdrom (a cdrom is read-only)


@dataclass(frozen=True)
class Definition:
    name: str
    memory: int = 512  # MiB
    cpus: int = 1
    machine: str = "pc"
    accel: tuple[str, ...] = ("kvm", "tcg")  # TOML: "kvm:tcg"
    stop_timeout: int = 10  # 1..3600, the scope's TimeoutStopSec
    restart: str = "no"
    autostart: bool = False
    qemu: str = "/usr/bin/qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()
    disks: tuple[Disk, ...] = ()
    cpu: str | None = None  # QEMU -cpu; None: host with KVM, QEMU's default with TCG
    firmware: str = "bios"  # bios | uefi
    display: str = "none"  # none | vnc
    vnc_listen: str | None = None  # None: a unix socket; else an IP address (port allocated)
    boot: tuple[str, ...] = ()  # disk | cdrom | network, in order; (): QEMU's default
    nics: tuple[Nic, ...] = ()
    resources: Resources = _NO_RESOURCES
    autostart_after: tuple[str, ...] = ()  # VMs that must be running before this one autostarts
    autostart_delay: int = 0  # seconds to wait after this VM started before those after it


_DEFAULT = Definition(name="default")
_DEFAULT_DISK = Disk(path="/")
_NO_STRINGS: tuple[str, ...] = ()

_TOP_KEYS = (
    "name",
    "memory",
    "cpus",
    "machine",
    "accel",
    "stop_timeout",
    "restart",
    "autostart",
    "qemu",
    "extra_args",
    "disks",
    "cpu",
    "firmware",
    "display",
    "vnc_listen",
    "boot",
    "nics",
    "resources",
    "autostart_after",
    "autostart_delay",
)
_DISK_KEYS = ("path", "format", "readonly", "snapshot", "media")
AUTOSTART_DELAY_MAX = 3600  # seconds
AUTOSTART_AFTER_MAX = 64


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid VM name, or None if it is."""
    if name == "":
        return "must not be empty"
    if len(name) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters long, got {len(name)}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "must not contain control characters (such as newlines)"
    if any(c.isspace() for c in name):
        return "must not contain spaces"
    if "/" in name:
        return "must not contain '/'"
    if not (name[0].isascii() and name[0].isalnum()):
        return "must start with a letter or digit"
    if not _NAME_RE.fullmatch(name):
        return "may contain only letters, digits, '.', '_' and '-'"
    for suffix in UNIT_SUFFIXES:
        if name.endswith(suffix):
            return f"must not end with '{suffix}' (it would read as a systemd unit name)"
    unit = scope_name(name)
    if len(unit) > UNIT_NAME_MAX:
        return (
            f"its scope unit name would be {len(unit)} characters, over systemd's limit of "
            f"{UNIT_NAME_MAX} (systemd-escape writes each '-' as 4 characters); use fewer '-'"
        )
    return None


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a VM (and a file, and a unit); else InvalidDefinition."""
    if not isinstance(name, str):
        raise InvalidDefinition(f"invalid VM name: must be a string, got {_show(name)}")
    problem = _name_problem(name)
    if problem is not None:
        raise InvalidDefinition(f"invalid VM name {name!r}: {problem}")
    return name


def _parse_name(table: dict[str, object]) -> str:
    if "name" not in table:
        raise _FieldError("name", "is required")
    value = table["name"]
    if not isinstance(value, str):
        raise _FieldError("name", f"must be a string, got {_show(value)}")
    problem = _name_problem(value)
    if problem is not None:
        # The length problem already says what it got; a 10 MB name need not be echoed.
        shown = "" if len(value) > NAME_MAX else f", got {_show(value)}"
        raise _FieldError("name", f"{problem}{shown}")
    return value


def _parse_machine(table: dict[str, object]) -> str:
    value = _str(table, "machine", _DEFAULT.machine)
    if not _MACHINE_RE.fullmatch(value):
        raise _FieldError(
            "machine",
            f"must be a non-empty QEMU machine type of letters, digits, '.', '_' and '-', "
            f"got {_show(value)}",
        )
    return value


def _parse_accel(table: dict[str, object]) -> tuple[str, ...]:
    value = table.get("accel", ":".join(_DEFAULT.accel))
    expect = f"must be accelerators separated by ':', each one of {', '.join(ACCELERATORS)}"
    if not isinstance(value, str):
        raise _FieldError("accel", f"{expect}; got {_show(value)}")
    parts = value.split(":")
    for part in parts:
        if part not in ACCELERATORS:
            what = "an empty entry" if part == "" else f"unknown accelerator {part!r}"
            raise _FieldError("accel", f"{expect}; got {what} in {_show(value)}")
    seen: set[str] = set()
    for part in parts:
        if part in seen:
            raise _FieldError("accel", f"lists {part!r} twice in {_show(value)}")
        seen.add(part)
    return tuple(parts)


def _parse_restart(table: dict[str, object]) -> str:
    value = table.get("restart", _DEFAULT.restart)
    if not isinstance(value, str) or value not in RESTART_POLICIES:
        raise _FieldError(
            "restart", f"must be one of {', '.join(RESTART_POLICIES)}, got {_show(value)}"
        )
    return value


def _parse_extra_args(table: dict[str, object]) -> tuple[str, ...]:
    value = table.get("extra_args", [])
    if not isinstance(value, list):
        raise _FieldError("extra_args", f"must be an array of strings, got {_show(value)}")
    args: list[str] = []
    for index, arg in enumerate(value):
        field = f"extra_args[{index}]"
        if not isinstance(arg, str):
            raise _FieldError(field, f"must be a string, got {_show(arg)}")
        if "\0" in arg:
            raise _FieldError(field, "must not contain NUL characters")
        if len(arg.encode("utf-8", "surrogatepass")) > ARG_MAX_BYTES:
            raise _FieldError(
                field, f"is longer than the kernel's limit of {ARG_MAX_BYTES} bytes per argument"
            )
        args.append(arg)
    return tuple(args)


def _parse_disk(index: int, entry: object, errors: list[str]) -> Disk | None:
    prefix = f"disks[{index}]"
    if not isinstance(entry, dict):
        errors.append(f"field '{prefix}': must be a table ([[disks]]), got {_show(entry)}")
        return None
    before = len(errors)
    for key in entry:
        if key not in _DISK_KEYS:
            close = difflib.get_close_matches(key, _DISK_KEYS, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            errors.append(f"unknown key '{prefix}.{key}'{hint}")
    path = fmt = None
    readonly = snapshot = False
    try:
        path = _absolute_path(entry, "path", None, f"{prefix}.path")
    except _FieldError as exc:
        errors.append(str(exc))
    try:
        fmt = entry.get("format", _DEFAULT_DISK.format)
        if not isinstance(fmt, str) or fmt not in DISK_FORMATS:
            raise _FieldError(
                f"{prefix}.format", f"must be one of {', '.join(DISK_FORMATS)}, got {_show(fmt)}"
            )
    except _FieldError as exc:
        errors.append(str(exc))
    try:
        readonly = _bool(entry, "readonly", _DEFAULT_DISK.readonly, f"{prefix}.readonly")
    except _FieldError as exc:
        errors.append(str(exc))
    try:
        snapshot = _bool(entry, "snapshot", _DEFAULT_DISK.snapshot, f"{prefix}.snapshot")
    except _FieldError as exc:
        errors.append(str(exc))
    media = "disk"
    try:
        media = parse_media(entry, prefix)
        if media == "cdrom":
            if entry.get("readonly", True) is not True:
                raise _FieldError(f"{prefix}.readonly", "a cdrom is always read-only")
            readonly = True
    except _FieldError as exc:
        errors.append(str(exc))
    if len(errors) > before or path is None or not isinstance(fmt, str):
        return None
    return Disk(path=path, format=fmt, readonly=readonly, snapshot=snapshot, media=media)


def _parse_autostart_after(table: dict[str, object]) -> tuple[str, ...]:
    """Names only: whether they exist, and cycles, are the supervisor's to check (it knows the
    other definitions)."""
    value = table.get("autostart_after", [])
    if not isinstance(value, list):
        raise _FieldError("autostart_after", f"must be an array of VM names, got {_show(value)}")
    if len(value) > AUTOSTART_AFTER_MAX:
        raise _FieldError("autostart_after", f"may name at most {AUTOSTART_AFTER_MAX} VMs")
    names: list[str] = []
    for index, item in enumerate(value):
        field = f"autostart_after[{index}]"
        if not isinstance(item, str):
            raise _FieldError(field, f"must be a VM name (a string), got {_show(item)}")
        problem = _name_problem(item)
        if problem is not None:
            raise _FieldError(field, f"is not a valid VM name: {problem}")
        if item == table.get("name"):
            raise _FieldError(field, "a VM cannot autostart after itself")
        if item in names:
            raise _FieldError("autostart_after", f"names {item!r} twice")
        names.append(item)
    return tuple(names)


def _parse_disks(table: dict[str, object], errors: list[str]) -> tuple[Disk, ...]:
    value = table.get("disks", [])
    if not isinstance(value, list):
        errors.append(f"field 'disks': must be an array of tables ([[disks]]), got {_show(value)}")
        return ()
    disks = [_parse_disk(index, entry, errors) for index, entry in enumerate(value)]
    return tuple(disk for disk in disks if disk is not None)


def parse_definition(text: str, source: str = "definition") -> Definition:
    """Parse and validate one definition; InvalidDefinition lists every problem found.

    Files named in the definition are not checked here: they may appear before the VM starts,
    and the core checks them at start.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > DEFINITION_MAX_BYTES:
        raise InvalidDefinition(
            f"{source}: too large ({size} bytes; a definition may have at most "
            f"{DEFINITION_MAX_BYTES} bytes)"
        )
    # Editors on some systems start a UTF-8 file with a byte order mark; TOML does not allow it.
    text = text.removeprefix("\ufeff")
    try:
        table: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line L, column C)".
        raise InvalidDefinition(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise InvalidDefinition(
            f"{source}: not valid as a definition: arrays or tables nested too deeply"
        ) from None

    errors: list[str] = []
    for key in table:
        if key not in _TOP_KEYS:
            errors.append(f"unknown key '{key}'{_suggest(key, _TOP_KEYS)}")

    def field(parse: Callable[[], _T], fallback: _T) -> _T:
        try:
            return parse()
        except _FieldError as exc:
            errors.append(str(exc))
            return fallback

    name = field(lambda: _parse_name(table), "")
    memory = field(
        lambda: _int(
            table, "memory", low=MEMORY_MIN, high=MEMORY_MAX, unit="MiB", default=_DEFAULT.memory
        ),
        0,
    )
    cpus = field(
        lambda: _int(
            table, "cpus", low=CPUS_MIN, high=CPUS_MAX, unit="CPUs", default=_DEFAULT.cpus
        ),
        0,
    )
    machine = field(lambda: _parse_machine(table), "")
    accel = field(lambda: _parse_accel(table), _NO_STRINGS)
    stop_timeout = field(
        lambda: _int(
            table,
            "stop_timeout",
            low=STOP_TIMEOUT_MIN,
            high=STOP_TIMEOUT_MAX,
            unit="seconds",
            default=_DEFAULT.stop_timeout,
        ),
        0,
    )
    restart = field(lambda: _parse_restart(table), "")
    autostart = field(lambda: _bool(table, "autostart", _DEFAULT.autostart), False)
    qemu = field(lambda: _absolute_path(table, "qemu", _DEFAULT.qemu, "qemu"), "")
    extra_args = field(lambda: _parse_extra_args(table), _NO_STRINGS)
    disks = _parse_disks(table, errors)
    cpu = field(lambda: parse_cpu(table), None)
    firmware = field(lambda: parse_firmware(table), "")
    display = field(lambda: parse_display(table), "")
    vnc_listen = field(lambda: parse_vnc_listen(table, display), None)
    boot = field(lambda: parse_boot(table), _NO_STRINGS)
    nics = parse_nics(table, errors)
    resources = parse_resources(table, errors)
    autostart_after = field(lambda: _parse_autostart_after(table), _NO_STRINGS)
    autostart_delay = field(
        lambda: _int(
            table, "autostart_delay", low=0, high=AUTOSTART_DELAY_MAX, unit="seconds", default=0
        ),
        0,
    )

    if errors:
        raise InvalidDefinition(f"{source}: " + "; ".join(errors))
    defn = Definition(
        name=name,
        memory=memory,
        cpus=cpus,
        machine=machine,
        accel=accel,
        stop_timeout=stop_timeout,
        restart=restart,
        autostart=autostart,
        qemu=qemu,
        extra_args=extra_args,
        disks=disks,
        cpu=cpu,
        firmware=firmware,
        display=display,
        vnc_listen=vnc_listen,
        boot=boot,
        nics=nics,
        resources=resources,
        autostart_after=autostart_after,
        autostart_delay=autostart_delay,
    )
    _check_writable(defn, source)
    return defn


def _check_writable(defn: Definition, source: str) -> None:
    """Refuse a definition whose canonical file could not be read back.

    The daemon stores and records definitions in their canonical form, which spells out every
    default and escapes unprintable characters (up to 10 bytes for one): a text just under the
    size limit can grow past it, and a string holding a lone surrogate (possible from a Python
    caller, never from UTF-8) cannot be written at all. Accepting either would store a file
    that the next reload or daemon start refuses.
    """
    try:
        size = len(definition_to_toml(defn).encode("utf-8"))
    except InvalidDefinition:
        raise InvalidDefinition(
            f"{source}: a string holds a lone surrogate, which is not a Unicode character"
        ) from None
    if size > DEFINITION_MAX_BYTES:
        raise InvalidDefinition(
            f"{source}: too large once written out ({size} bytes with every default and "
            f"escape spelled out; a definition may have at most {DEFINITION_MAX_BYTES} bytes)"
        )


# --- writing ---------------------------------------------------------------------------------


def definition_to_toml(defn: Definition) -> str:
    """The canonical file for ``defn``: every key, in a fixed order, defaults included."""
    lines = [
        f"name = {toml_string(defn.name)}",
        f"memory = {defn.memory}",
        f"cpus = {defn.cpus}",
        f"machine = {toml_string(defn.machine)}",
        f"accel = {toml_string(':'.join(defn.accel))}",
        f"stop_timeout = {defn.stop_timeout}",
        f"restart = {toml_string(defn.restart)}",
        f"autostart = {_toml_bool(defn.autostart)}",
        f"qemu = {toml_string(defn.qemu)}",
        f"extra_args = [{', '.join(toml_string(arg) for arg in defn.extra_args)}]",
    ]
    if defn.cpu is not None:
        lines.append(f"cpu = {toml_string(defn.cpu)}")
    lines += [f"firmware = {toml_string(defn.firmware)}", f"display = {toml_string(defn.display)}"]
    if defn.vnc_listen is not None:
        lines.append(f"vnc_listen = {toml_string(defn.vnc_listen)}")
    lines += [
        f"boot = [{', '.join(toml_string(item) for item in defn.boot)}]",
        f"autostart_after = [{', '.join(toml_string(name) for name in defn.autostart_after)}]",
        f"autostart_delay = {defn.autostart_delay}",
    ]
    lines += resources_toml(defn.resources)
    for disk in defn.disks:
        lines += [
            "",
            "[[disks]]",
            f"path = {toml_string(disk.path)}",
            f"format = {toml_string(disk.format)}",
            f"readonly = {_toml_bool(disk.readonly)}",
            f"snapshot = {_toml_bool(disk.snapshot)}",
            f"media = {toml_string(disk.media)}",
        ]
    lines += nics_toml(defn.nics)
    return "\n".join(lines) + "\n"
