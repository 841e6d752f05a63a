"""A VM's `[resources]` as its scope's systemd properties, and what systemd reports back.

Pure (no I/O). The definition's keys map one to one onto systemd.resource-control(5) properties
in the units the D-Bus API takes (verified on systemd 252): a key left out sets nothing, so
systemd's own default applies (for TasksMax that is DefaultTasksMax, a limit in force all the
same). The limits in force are read back from the unit, never from the definition, so a change
an administrator made with `systemctl set-property` shows as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisord_vm.definition_devices import Resources

SCOPE_INTERFACE = "org.freedesktop.systemd1.Scope"  # where a scope's limits are read back
# systemd's "not set" / "infinity" for every uint64 resource property.
UNSET = (1 << 64) - 1
# CPUQuota= is a percentage of one CPU; on the bus it is microseconds of CPU time per second.
USEC_PER_PERCENT = 10_000


def cpu_mask(cpu_list: str) -> bytes:
    """A CPU list ("0-3,6") as AllowedCPUs= takes it on the bus: a bitmask, CPU n in bit n%8 of
    byte n//8 (systemd's cpu_set_from_dbus)."""
    cpus: set[int] = set()
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    mask = bytearray(max(cpus) // 8 + 1 if cpus else 0)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def cpu_list(mask: bytes) -> str:
    """The CPU list a bitmask stands for, with ranges ("0-3,6"); "" for an empty mask (systemd
    pads the mask it reports with zero bytes)."""
    cpus = [
        byte * 8 + bit for byte, value in enumerate(mask) for bit in range(8) if value >> bit & 1
    ]
    ranges: list[str] = []
    start = previous = -2
    for cpu in [*cpus, -2]:
        if cpu == previous + 1:
            previous = cpu
            continue
        if start >= 0:
            ranges.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(ranges)


def resource_control(resources: Resources) -> tuple[tuple[str, str, Any], ...]:
    """(name, D-Bus signature, value) of each property `resources` sets at StartTransientUnit.

    The slice is not among them: the launcher chooses it (the definition's or the daemon's
    default) and passes it as the scope's Slice.
    """
    props: list[tuple[str, str, Any]] = []
    for value, name in (
        (resources.cpu_weight, "CPUWeight"),
        (resources.memory_high, "MemoryHigh"),
        (resources.memory_max, "MemoryMax"),
        (resources.io_weight, "IOWeight"),
        (resources.tasks_max, "TasksMax"),
    ):
        if value is not None:
            props.append((name, "t", value))
    if resources.cpu_quota is not None:
        props.append(("CPUQuotaPerSecUSec", "t", resources.cpu_quota * USEC_PER_PERCENT))
    if resources.allowed_cpus is not None:
        props.append(("AllowedCPUs", "ay", cpu_mask(resources.allowed_cpus)))
    return tuple(props)


@dataclass(frozen=True)
class ResourcesInForce:
    """A running VM's limits as its scope reports them: None where nothing is set (infinity).

    Named and measured as systemd names and measures them (CPUQuotaPerSecUSec in µs per s),
    so a person or program that knows `systemctl show` reads them as they are.
    """

    slice: str
    control_group: str
    cpu_weight: int | None = None
    cpu_quota_per_sec_usec: int | None = None
    memory_high: int | None = None
    memory_max: int | None = None
    io_weight: int | None = None
    tasks_max: int | None = None
    allowed_cpus: str | None = None  # a CPU list, "0-3,6"


def _set(value: Any) -> int | None:
    return None if not isinstance(value, int) or value == UNSET else value


def in_force(props: Mapping[str, Any]) -> ResourcesInForce:
    """Decode the scope's properties (org.freedesktop.systemd1.Scope, values unwrapped)."""
    mask = props.get("AllowedCPUs", b"")
    allowed = cpu_list(bytes(mask)) if isinstance(mask, bytes | bytearray | list) else ""
    return ResourcesInForce(
        slice=str(props.get("Slice", "")),
        control_group=str(props.get("ControlGroup", "")),
        cpu_weight=_set(props.get("CPUWeight")),
        cpu_quota_per_sec_usec=_set(props.get("CPUQuotaPerSecUSec")),
        memory_high=_set(props.get("MemoryHigh")),
        memory_max=_set(props.get("MemoryMax")),
        io_weight=_set(props.get("IOWeight")),
        tasks_max=_set(props.get("TasksMax")),
        allowed_cpus=allowed or None,
    )


def bus_values(found: ResourcesInForce) -> dict[str, tuple[str, object]]:
    """The a{sv} a client reads (Machine.GetResources): systemd's property names and units;
    a limit that is not set is left out."""
    values: dict[str, tuple[str, object]] = {
        "Slice": ("s", found.slice),
        "ControlGroup": ("s", found.control_group),
    }
    for name, value in (
        ("CPUWeight", found.cpu_weight),
        ("CPUQuotaPerSecUSec", found.cpu_quota_per_sec_usec),
        ("MemoryHigh", found.memory_high),
        ("MemoryMax", found.memory_max),
        ("IOWeight", found.io_weight),
        ("TasksMax", found.tasks_max),
    ):
        if value is not None:
            values[name] = ("t", value)
    if found.allowed_cpus is not None:
        values["AllowedCPUs"] = ("s", found.allowed_cpus)
    return values
