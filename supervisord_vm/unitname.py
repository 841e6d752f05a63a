"""Scope unit names for VMs, escaped exactly as ``systemd-escape`` does, and the VM's UUID
(pure, no systemd)."""

from __future__ import annotations

import uuid

UNIT_NAME_MAX = 255  # systemd refuses longer unit names (UNIT_NAME_MAX 256 includes the NUL)

_ESCAPE_VERBATIM = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:_."  # systemd VALID_CHARS
)


def escape_name(name: str) -> str:
    """Escape like ``systemd-escape NAME`` (unit_name_escape): the scope name must match it."""
    out: list[str] = []
    for index, byte in enumerate(name.encode()):
        if byte == ord("/"):
            out.append("-")
        elif byte in _ESCAPE_VERBATIM and not (index == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def scope_name(vm_name: str) -> str:
    """The VM's scope unit; a name still loaded in systemd cannot be reused (UnitExists)."""
    return f"svm-{escape_name(vm_name)}.scope"


_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "org.supervisordvm1.machine")


def machine_uuid(name: str) -> uuid.UUID:
    """The VM's stable UUID, derived from its name: machined's Id and the guest's SMBIOS UUID
    (QEMU's -uuid), so that `machinectl status` and `dmidecode` in the guest agree."""
    return uuid.uuid5(_UUID_NAMESPACE, name)
