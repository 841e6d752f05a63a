"""What one start prepares for the VM's CPU, firmware, disks and display, before QEMU runs.

The argv fragments are pure (cpu.py, firmware.py, boot.py, display.py); what they depend on
that only the host can tell — whether QEMU's user can use KVM, the VM's own UEFI variables
store opened for QEMU, where its VNC socket goes — is found here, once per start, and put in
LaunchResources. A definition this host cannot run as asked fails here, before anything is
spawned, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from supervisord_vm import boot, confinement, cpu, display, firmware
from supervisord_vm.definition import Definition
from supervisord_vm.launch import LaunchFailed, os_error
from supervisord_vm.qemu import LaunchResources
from supervisord_vm.store import Paths


def problem(defn: Definition) -> str | None:
    """Why this definition's hardware cannot be built as asked, or None (pure)."""
    return boot.devices_problem(defn) or firmware.firmware_problem(defn)


async def prepare(paths: Paths, defn: Definition, resources: LaunchResources) -> list[int]:
    """Fill `resources` for `defn`; returns the daemon's descriptors to close once QEMU runs
    (or the start failed). Raises LaunchFailed with the reason; then nothing is left open.
    """
    found = problem(defn)
    if found is not None:
        raise LaunchFailed(found)
    if defn.cpu is None and defn.accel[:1] == ("kvm",):
        identity = confinement.qemu_identity()
        resources.kvm = await asyncio.to_thread(cpu.kvm_usable, identity)
    if defn.display == "vnc" and defn.vnc_listen is None:
        resources.vnc_socket = display.vnc_socket(paths.runtime_dir, defn.name)
    if defn.firmware != "uefi":
        return []
    try:
        fds = await asyncio.to_thread(firmware.open_nvram, paths, defn.name)
    except firmware.FirmwareUnavailable as err:
        raise LaunchFailed(str(err)) from err
    except OSError as err:
        raise LaunchFailed(f"cannot open its UEFI variables store: {os_error(err)}") from err
    resources.nvram_file = resources.add_fdset(fds, "nvram")
    return fds


def close(fds: list[int]) -> None:
    """Close the daemon's copies of what `prepare` opened (QEMU holds its own once spawned)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
