"""UEFI firmware for a VM: Debian's OVMF, and the VM's own copy of its variables store.

OVMF comes in two halves: the code (read-only, shared by every VM) and the variables store
(boot entries, Secure Boot keys), which the guest writes and which must persist across its
restarts. Each VM gets its own copy of the package's empty store under the state directory,
made on its first UEFI start (atomically: never half a copy), kept across restarts and daemon
restarts, and removed when the VM is undefined (or a transient VM is forgotten).

QEMU runs unprivileged and cannot open a root-owned file: the daemon opens the store and hands
QEMU the descriptors as an fd set (`-add-fd`, `file=/dev/fdset/N`), as libvirt does for its
disks. The code file is world-readable and QEMU opens it by name.

The 4 MiB non-Secure-Boot build (`OVMF_CODE_4M.fd`) is used: it needs no SMM, and its firmware
descriptor (/usr/share/qemu/firmware/60-edk2-x86_64.json) names both boards, i440fx (`pc`) and
q35. The Secure Boot builds would need q35 with SMM; they are not offered (yet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from supervisord_vm.definition import Definition, validate_name
from supervisord_vm.store import Paths, atomic_write

log = logging.getLogger(__name__)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
NVRAM_DIR_NAME = "nvram"
_STORE_SUFFIX = "_VARS.fd"
# The boards the firmware descriptor names: i440fx (pc, pc-i440fx-*) and q35 (q35, pc-q35-*).
_UEFI_MACHINE_PREFIXES = ("pc", "q35")


class FirmwareUnavailable(Exception):
    """The firmware a definition asks for cannot be used on this host; the message says why."""


def nvram_path(paths: Paths, name: str) -> Path:
    """Where VM `name` keeps its UEFI variables store (`state_dir/nvram/NAME_VARS.fd`)."""
    return paths.state_dir / NVRAM_DIR_NAME / f"{validate_name(name)}{_STORE_SUFFIX}"


def firmware_problem(defn: Definition) -> str | None:
    """Why `defn`'s firmware cannot be used with its machine type, or None (pure)."""
    if defn.firmware == "uefi" and not defn.machine.startswith(_UEFI_MACHINE_PREFIXES):
        return (
            f'firmware = "uefi" needs machine "pc" or "q35" (or a versioned pc-i440fx-*/'
            f"pc-q35-*), not {defn.machine!r}"
        )
    return None


def firmware_args(defn: Definition, nvram_file: str | None) -> list[str]:
    """The pflash drives for UEFI (pure; none for bios, where QEMU loads SeaBIOS itself).

    `nvram_file`: the name QEMU opens the VM's variables store by (`/dev/fdset/N`).
    """
    if defn.firmware != "uefi":
        return []
    if nvram_file is None:
        raise ValueError(f"VM {defn.name} boots UEFI but has no variables store")
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={nvram_file.replace(',', ',,')}",
    ]


def open_nvram(
    paths: Paths,
    name: str,
    code: Path = OVMF_CODE,
    template: Path = OVMF_VARS_TEMPLATE,
) -> list[int]:
    """Open VM `name`'s variables store, copying it from `template` first if it has none
    (blocking); returns a read-write and a read-only descriptor (QEMU picks the one whose mode
    fits each open it makes), close-on-exec.

    Raises FirmwareUnavailable when OVMF is not installed, OSError naming the file otherwise.
    """
    for path in (code, template):
        if not path.is_file():
            raise FirmwareUnavailable(
                f"UEFI firmware {path} is not there (install Debian's package ovmf)"
            )
    store = nvram_path(paths, name)
    if not store.exists():
        data = template.read_bytes()
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(store, data, 0o600)
    # O_NOFOLLOW: root's directory, but a store is never a link to somewhere else.
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    read_write = os.open(store, os.O_RDWR | flags)
    try:
        read_only = os.open(store, os.O_RDONLY | flags)
    except BaseException:
        os.close(read_write)
        raise
    return [read_write, read_only]


def remove_nvram(paths: Paths, name: str) -> bool:
    """Remove VM `name`'s variables store (it was undefined or forgotten); False if none."""
    try:
        nvram_path(paths, name).unlink()
    except FileNotFoundError:
        return False
    return True


def remove_stale_nvram(paths: Paths, keep: set[str]) -> list[Path]:
    """Remove the stores of VMs not in `keep` (undefined while no daemon ran); blocking.

    Returns what it removed. Only NAME_VARS.fd files are touched; an unreadable directory
    is the same as an empty one.
    """
    directory = paths.state_dir / NVRAM_DIR_NAME
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        name = entry.name.removesuffix(_STORE_SUFFIX)
        if name == entry.name or name in keep or name.startswith("."):
            continue
        try:
            entry.unlink()
        except OSError as err:
            log.warning("cannot remove %s: %s", entry, err)
            continue
        removed.append(entry)
    return removed
