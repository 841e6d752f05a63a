"""The hardware and host-side parts of a definition (issues 9 and 11): CPU model, firmware,
display, boot order, network cards and the scope's resource limits — parsed, validated and
written back (pure, no I/O). definition.py assembles them into a Definition.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import re
from dataclasses import dataclass, fields

from supervisord_vm.definition_fields import FieldError, show, str_field, toml_string

FIRMWARES = ("bios", "uefi")
DISPLAYS = ("none", "vnc")
BOOT_DEVICES = ("disk", "cdrom", "network")
DISK_MEDIA = ("disk", "cdrom")
NIC_TYPES = ("user", "bridge", "tap")
NICS_MAX = 32  # PCI slots on a pc/q35 board run out around here
FORWARDS_MAX = 64
CPU_MODEL_MAX = 256
IFNAMSIZ = 16  # the kernel's limit, including the NUL

# QEMU's -cpu value: a model name, then optional ",feature" / ",+flag" / ",key=value" parts.
_CPU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9._=+-]+)*")
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# QEMU's hostfwd: [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport (IPv4 only in QEMU 7.2).
_FORWARD_RE = re.compile(r"(?:(tcp|udp):)?([0-9.]*):([0-9]+)-([0-9.]*):([0-9]+)")
_CPU_LIST_RE = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
_SLICE_PART_RE = re.compile(r"[A-Za-z0-9:_.\\]+")
CPU_INDEX_MAX = 8191
SLICE_NAME_MAX = 255
_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MEMORY_LIMIT_MIN = 1 << 20  # bytes; a smaller limit only makes QEMU fail
MEMORY_LIMIT_MAX = 1 << 62
WEIGHT_MIN, WEIGHT_MAX = 1, 10000  # systemd's CPUWeight= and IOWeight=
CPU_QUOTA_MAX = 100 * 1024  # percent: 1024 CPUs' worth
TASKS_MAX_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT


@dataclass(frozen=True)
class Nic:
    type: str  # user | bridge | tap
    bridge: str | None = None  # bridge: the bridge the daemon's tap joins
    tap: str | None = None  # tap: an existing tap device the administrator manages
    forward: tuple[str, ...] = ()  # user: hostfwd rules, host address defaulted to 127.0.0.1
    model: str = "virtio-net-pci"
    mac: str | None = None  # None: derived from the VM's name and the NIC's index


@dataclass(frozen=True)
class Resources:
    """The scope's resource-control properties; None leaves systemd's default."""

    cpu_weight: int | None = None  # CPUWeight=
    cpu_quota: int | None = None  # CPUQuota=, percent of one CPU
    memory_high: int | None = None  # MemoryHigh=, bytes
    memory_max: int | None = None  # MemoryMax=, bytes
    io_weight: int | None = None  # IOWeight=
    tasks_max: int | None = None  # TasksMax=
    allowed_cpus: str | None = None  # AllowedCPUs=, a CPU list such as "0-3,6"
    slice: str | None = None  # Slice=; None: the daemon's configured slice

    def is_default(self) -> bool:
        return self == Resources()


_NIC_KEYS = ("type", "bridge", "tap", "forward", "model", "mac")
_RESOURCE_KEYS = tuple(f.name for f in fields(Resources))


def nic_mac(vm_name: str, index: int, nic: Nic) -> str:
    """The NIC's MAC: the explicit one, else one derived from the VM's name and the NIC's index.

    Stable across restarts and daemon versions (a guest's network config often keys on it), in
    QEMU's own locally administered 52:54:00 prefix, unicast.
    """
    if nic.mac is not None:
        return nic.mac
    digest = hashlib.sha256(f"{vm_name}\0{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


# --- top-level keys ------------------------------------------------------------------------------


def _one_of(table: dict[str, object], key: str, choices: tuple[str, ...], default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise FieldError(key, f"must be one of {', '.join(choices)}, got {show(value)}")
    return value


def parse_cpu(table: dict[str, object]) -> str | None:
    if "cpu" not in table:
        return None
    value = table["cpu"]
    if not isinstance(value, str) or len(value) > CPU_MODEL_MAX or not _CPU_RE.fullmatch(value):
        raise FieldError(
            "cpu",
            "must be a QEMU CPU model such as 'host', 'max' or 'Haswell,-hle' (letters, digits, "
            f"'.', '_', '-', then ',feature' parts), got {show(value)}",
        )
    return value


def parse_firmware(table: dict[str, object]) -> str:
    return _one_of(table, "firmware", FIRMWARES, "bios")


def parse_display(table: dict[str, object]) -> str:
    return _one_of(table, "display", DISPLAYS, "none")


def parse_vnc_listen(table: dict[str, object], display: str) -> str | None:
    if "vnc_listen" not in table:
        return None
    value = table["vnc_listen"]
    if display != "vnc":
        raise FieldError("vnc_listen", 'is only valid with display = "vnc"')
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise FieldError(
            "vnc_listen",
            f"must be an IP address to listen on, such as '127.0.0.1', got {show(value)}",
        ) from None


def _string_list(table: dict[str, object], key: str, field: str | None = None) -> list[str]:
    value = table.get(key, [])
    name = field or key
    if not isinstance(value, list):
        raise FieldError(name, f"must be an array of strings, got {show(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise FieldError(f"{name}[{index}]", f"must be a string, got {show(item)}")
    return [str(item) for item in value]


def parse_boot(table: dict[str, object]) -> tuple[str, ...]:
    items = _string_list(table, "boot")
    for index, item in enumerate(items):
        if item not in BOOT_DEVICES:
            raise FieldError(
                f"boot[{index}]", f"must be one of {', '.join(BOOT_DEVICES)}, got {show(item)}"
            )
        if item in items[:index]:
            raise FieldError("boot", f"lists {item!r} twice")
    return tuple(items)


def parse_media(entry: dict[str, object], prefix: str) -> str:
    value = entry.get("media", "disk")
    if not isinstance(value, str) or value not in DISK_MEDIA:
        raise FieldError(
            f"{prefix}.media", f"must be one of {', '.join(DISK_MEDIA)}, got {show(value)}"
        )
    return value


# --- [[nics]] ------------------------------------------------------------------------------------


def _ifname(entry: dict[str, object], key: str, field: str) -> str:
    value = entry[key]
    if (
        not isinstance(value, str)
        or not 0 < len(value.encode()) < IFNAMSIZ
        or value in (".", "..")
        or not _IFNAME_RE.fullmatch(value)
    ):
        raise FieldError(
            field,
            f"must be a network interface name of 1 to {IFNAMSIZ - 1} letters, digits, '_', "
            f"'.' or '-', got {show(value)}",
        )
    return value


def _mac(value: object, field: str) -> str:
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
        raise FieldError(
            field, f"must be a MAC address like '52:54:00:12:34:56', got {show(value)}"
        )
    if int(value[:2], 16) & 1:
        raise FieldError(field, f"must be a unicast MAC address (first octet even), got {value!r}")
    return value.lower()


def _ipv4_or_empty(text: str) -> bool:
    if text == "":
        return True
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def normalize_forward(value: object, field: str) -> str:
    """A hostfwd rule in QEMU's syntax, with the protocol and the loopback host address spelled
    out: a forward that does not name an address must not open a port on every interface."""
    expect = (
        "must be a port forward like 'tcp:127.0.0.1:2222-:22' "
        "([tcp|udp:][host address]:host port-[guest address]:guest port)"
    )
    match = _FORWARD_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise FieldError(field, f"{expect}, got {show(value)}")
    proto, host, host_port, guest, guest_port = match.groups()
    for address in (host, guest):
        if not _ipv4_or_empty(address):
            raise FieldError(field, f"{expect}; {address!r} is not an IPv4 address")
    for port in (host_port, guest_port):
        if not 1 <= int(port) <= 65535:
            raise FieldError(field, f"{expect}; port {port} is not from 1 to 65535")
    return f"{proto or 'tcp'}:{host or '127.0.0.1'}:{int(host_port)}-{guest}:{int(guest_port)}"


def _parse_nic(index: int, entry: object) -> Nic:
    prefix = f"nics[{index}]"
    if not isinstance(entry, dict):
        raise FieldError(prefix, f"must be a table ([[nics]]), got {show(entry)}")
    for key in entry:
        if key not in _NIC_KEYS:
            close = difflib.get_close_matches(key, _NIC_KEYS, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            raise FieldError(f"{prefix}.{key}", f"is not a known key{hint}")
    if "type" not in entry:
        raise FieldError(f"{prefix}.type", f"is required: one of {', '.join(NIC_TYPES)}")
    kind = _one_of(entry, "type", NIC_TYPES, "user")
    bridge = tap = None
    for key, wanted in (("bridge", "bridge"), ("tap", "tap")):
        if key in entry and kind != wanted:
            raise FieldError(f"{prefix}.{key}", f'is only valid with type = "{wanted}"')
        if kind == wanted and key not in entry:
            raise FieldError(f"{prefix}.{key}", f'is required with type = "{wanted}"')
    if kind == "bridge":
        bridge = _ifname(entry, "bridge", f"{prefix}.bridge")
    if kind == "tap":
        tap = _ifname(entry, "tap", f"{prefix}.tap")
    if "forward" in entry and kind != "user":
        raise FieldError(f"{prefix}.forward", 'is only valid with type = "user"')
    rules = _string_list(entry, "forward", f"{prefix}.forward")
    if len(rules) > FORWARDS_MAX:
        raise FieldError(f"{prefix}.forward", f"may list at most {FORWARDS_MAX} forwards")
    forward = tuple(
        normalize_forward(rule, f"{prefix}.forward[{i}]") for i, rule in enumerate(rules)
    )
    host_ports = [rule.split("-", 1)[0] for rule in forward]
    for i, port in enumerate(host_ports):
        proto, _, number = port.split(":")
        if any(p.split(":")[0] == proto and p.split(":")[2] == number for p in host_ports[:i]):
            raise FieldError(
                f"{prefix}.forward[{i}]", f"host port {proto} {number} is forwarded twice"
            )
    model = str_field(entry, "model", "virtio-net-pci", f"{prefix}.model")
    if not _MODEL_RE.fullmatch(model):
        raise FieldError(
            f"{prefix}.model",
            f"must be a QEMU network device model such as 'virtio-net-pci' or 'e1000', "
            f"got {show(model)}",
        )
    mac = _mac(entry["mac"], f"{prefix}.mac") if "mac" in entry else None
    return Nic(type=kind, bridge=bridge, tap=tap, forward=forward, model=model, mac=mac)


def parse_nics(table: dict[str, object], errors: list[str]) -> tuple[Nic, ...]:
    value = table.get("nics", [])
    if not isinstance(value, list):
        errors.append(f"field 'nics': must be an array of tables ([[nics]]), got {show(value)}")
        return ()
    if len(value) > NICS_MAX:
        errors.append(f"field 'nics': a VM may have at most {NICS_MAX} NICs, got {len(value)}")
        return ()
    nics: list[Nic] = []
    for index, entry in enumerate(value):
        try:
            nics.append(_parse_nic(index, entry))
        except FieldError as exc:
            errors.append(str(exc))
    taps = [nic.tap for nic in nics if nic.tap is not None]
    for index, tap in enumerate(taps):
        if tap in taps[:index]:
            errors.append(f"field 'nics': tap device {tap} is given to two NICs")
    macs = [nic.mac for nic in nics if nic.mac is not None]
    for index, mac in enumerate(macs):
        if mac in macs[:index]:
            errors.append(f"field 'nics': MAC address {mac} is given to two NICs")
    return tuple(nics)


def nics_toml(nics: tuple[Nic, ...]) -> list[str]:
    lines: list[str] = []
    for nic in nics:
        lines += ["", "[[nics]]", f"type = {toml_string(nic.type)}"]
        if nic.bridge is not None:
            lines.append(f"bridge = {toml_string(nic.bridge)}")
        if nic.tap is not None:
            lines.append(f"tap = {toml_string(nic.tap)}")
        if nic.type == "user":
            lines.append(f"forward = [{', '.join(toml_string(rule) for rule in nic.forward)}]")
        lines.append(f"model = {toml_string(nic.model)}")
        if nic.mac is not None:
            lines.append(f"mac = {toml_string(nic.mac)}")
    return lines


# --- [resources] ---------------------------------------------------------------------------------


def _bounded(value: object, field: str, low: int, high: int, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(
            field, f"must be an integer from {low} to {high} ({unit}), got {show(value)}"
        )
    return value


def parse_size(value: object, field: str) -> int:
    """Bytes from an integer or systemd's "512M" / "2G" notation (1024-based)."""
    expect = (
        f"must be a size in bytes (an integer) or a string such as '512M' or '2G' "
        f"(K, M, G, T: powers of 1024), from {MEMORY_LIMIT_MIN} bytes (1M)"
    )
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and value[-1:].upper() in _SIZE_SUFFIXES and value[:-1].isdigit():
        size = int(value[:-1]) * _SIZE_SUFFIXES[value[-1].upper()]
    elif isinstance(value, str) and value.isdigit():
        size = int(value)
    if size is None or not MEMORY_LIMIT_MIN <= size <= MEMORY_LIMIT_MAX:
        raise FieldError(field, f"{expect}, got {show(value)}")
    return size


def parse_cpu_list(value: object, field: str) -> str:
    expect = "must be a list of CPU numbers and ranges such as '0-3,6'"
    if not isinstance(value, str) or not _CPU_LIST_RE.fullmatch(value):
        raise FieldError(field, f"{expect}, got {show(value)}")
    for part in value.split(","):
        low, _, high = part.partition("-")
        if int(low) > CPU_INDEX_MAX or (high and not int(low) <= int(high) <= CPU_INDEX_MAX):
            raise FieldError(
                field, f"{expect}: {part!r} is not a range of CPUs from 0 to {CPU_INDEX_MAX}"
            )
    return value


def parse_slice(value: object, field: str) -> str:
    """A slice unit name: '-' separates levels (tenant-a-web.slice is in tenant-a.slice)."""
    expect = (
        "must be a slice unit name such as 'tenant-a.slice' (letters, digits, ':', '_', '.', "
        "'\\'; '-' separates nested slices)"
    )
    if not isinstance(value, str) or not value.endswith(".slice") or len(value) > SLICE_NAME_MAX:
        raise FieldError(field, f"{expect}, got {show(value)}")
    stem = value.removesuffix(".slice")
    if not all(_SLICE_PART_RE.fullmatch(part) for part in stem.split("-")):
        raise FieldError(field, f"{expect}, got {show(value)}")
    return value


def parse_resources(table: dict[str, object], errors: list[str]) -> Resources:
    value = table.get("resources", {})
    if not isinstance(value, dict):
        errors.append(f"field 'resources': must be a table ([resources]), got {show(value)}")
        return Resources()
    found: dict[str, object] = {}
    for key, item in value.items():
        field = f"resources.{key}"
        try:
            if key in ("cpu_weight", "io_weight"):
                found[key] = _bounded(item, field, WEIGHT_MIN, WEIGHT_MAX, "a relative weight")
            elif key == "cpu_quota":
                found[key] = _bounded(item, field, 1, CPU_QUOTA_MAX, "percent of one CPU")
            elif key in ("memory_high", "memory_max"):
                found[key] = parse_size(item, field)
            elif key == "tasks_max":
                found[key] = _bounded(item, field, 1, TASKS_MAX_MAX, "tasks")
            elif key == "allowed_cpus":
                found[key] = parse_cpu_list(item, field)
            elif key == "slice":
                found[key] = parse_slice(item, field)
            else:
                close = difflib.get_close_matches(key, _RESOURCE_KEYS, n=1)
                hint = f" (did you mean 'resources.{close[0]}'?)" if close else ""
                raise FieldError(field, f"is not a known resource-control key{hint}")
        except FieldError as exc:
            errors.append(str(exc))
    return Resources(**found)  # type: ignore[arg-type]


def resources_toml(resources: Resources) -> list[str]:
    if resources.is_default():
        return []
    lines = ["", "[resources]"]
    for f in fields(Resources):
        value = getattr(resources, f.name)
        if value is None:
            continue
        lines.append(f"{f.name} = {toml_string(value) if isinstance(value, str) else value}")
    return lines
