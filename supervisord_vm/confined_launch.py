"""What a confined QEMU is handed at start: its monitor socket, its disks, who it runs as.

QEMU runs unprivileged (confinement.py), so it can neither create its monitor socket in root's
0700 runtime directory nor open an image only root can read. The daemon does both and hands
QEMU the descriptors: the QMP socket is bound and listening at the same path as ever (so `svmctl`
and a daemon restarted later reconnect as before, and VMs started by an older daemon, whose QEMU
made the socket itself, are reattached unchanged) and given as `-chardev socket,fd=N`, as libvirt
does; each disk is opened under the path policy of disk_access.py and given as an fd set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from supervisord_vm import confinement, disk_access
from supervisord_vm.confinement import QemuIdentity
from supervisord_vm.definition import Definition
from supervisord_vm.disk_access import Credentials
from supervisord_vm.qemu import LaunchResources
from supervisord_vm.systemd import Systemd

_QMP_BACKLOG = 16


@dataclass
class ConfinedLaunch:
    """The identity QEMU drops to (None: as root), and the daemon's copies of what it was
    handed, closed once QEMU holds its own (or the start failed)."""

    identity: QemuIdentity | None
    umask: int = confinement.QEMU_UMASK
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


async def prepare(
    defn: Definition,
    resources: LaunchResources,
    socket_path: Path,
    owner: Credentials | None,
    systemd: Systemd,
) -> ConfinedLaunch:
    """Open the disks, bind the monitor socket, pick the seccomp option; fill `resources`.

    Raises ConfinementUnavailable, DiskAccessDenied or OSError (naming the file); then nothing
    is left open and no socket file is left behind.
    """
    identity = confinement.qemu_identity()
    prepared = ConfinedLaunch(identity)
    try:
        disks = await disk_access.open_disks(defn, owner)
        for index, fds in enumerate(disks):
            prepared.fds += fds
            resources.disk_files[index] = resources.add_fdset(fds, f"disk{index}")
        qmp = await asyncio.to_thread(bind_qmp_socket, socket_path)
        prepared.fds.append(qmp)
        resources.qmp_fd = qmp
        resources.pass_fds.append(qmp)
        resources.sandbox = await confinement.sandbox_option(defn.qemu, identity, systemd)
    except BaseException:
        prepared.close_fds()
        raise
    return prepared


def bind_qmp_socket(path: Path) -> int:
    """A listening unix socket at `path` for QEMU's monitor, mode 0600 before anyone can
    connect (root only: QMP is full control of the VM); returns its fd (close-on-exec)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(0o600)  # before listen(): until then every connect is refused anyway
        listener.listen(_QMP_BACKLOG)
    except BaseException:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return listener.detach()
