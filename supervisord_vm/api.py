"""The names of the org.supervisordvm1 D-Bus API, shared by the daemon's adapter (bus.py) and
svmctl: bus name, paths, interfaces, error prefix, limits, and a VM's object path.

Pure and import-free on purpose: svmctl starts on every command a user or script runs, and
reading these names must not load the D-Bus library the daemon uses (sdbus imports asyncio).
"""

from __future__ import annotations

BUS_NAME = "org.supervisordvm1"
MANAGER_PATH = "/org/supervisordvm1"
MACHINE_PATH_PREFIX = "/org/supervisordvm1/machine"
MANAGER_INTERFACE = "org.supervisordvm1.Manager"
MACHINE_INTERFACE = "org.supervisordvm1.Machine"
ERROR_PREFIX = "org.supervisordvm1.Error."
ADMIN_GROUP = "supervisord-vm"
# The longest wait a caller may ask for; svmctl waits for the daemon's answer as long.
TIMEOUT_MAX = 7 * 24 * 3600.0

_HEX = "0123456789abcdef"


def machine_path(name: str) -> str:
    """Object path of VM ``name``, escaped as sd-bus's sd_bus_path_encode escapes it (which the
    daemon's objects are exported under): ASCII letters stay, digits stay except first, every
    other byte of the UTF-8 text becomes ``_`` and two lowercase hex digits; "" is ``_``."""
    if not name:
        return MACHINE_PATH_PREFIX + "/_"
    label = []
    for index, byte in enumerate(name.encode()):
        char = chr(byte)
        if ("a" <= char <= "z") or ("A" <= char <= "Z") or (index and "0" <= char <= "9"):
            label.append(char)
        else:
            label.append("_" + _HEX[byte >> 4] + _HEX[byte & 15])
    return MACHINE_PATH_PREFIX + "/" + "".join(label)
