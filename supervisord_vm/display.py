"""A VM's graphical display: VNC on a unix socket in its QEMU directory, or on an IP address.

The default place is a unix socket, `runtime_dir/qemu/NAME/vnc.sock`: QEMU (unprivileged)
creates it in its own per-VM directory (confinement.qemu_runtime_dir, 0750, group
supervisord-vm); the daemon then gives the socket to that group, so root and the group's
members can connect and nobody else can. With `vnc_listen`, QEMU listens on that address on
the first free port from 5900 up (`to=`: QEMU tries each port by binding it, so two VMs, or a
VM and another program, never share one, and nothing is reserved and then lost between a
check and QEMU's bind). The port is known from QMP's `query-vnc`, asked once the monitor is
up: after each start and again when a restarted daemon adopts the VM, so it survives daemon
restarts without being stored.

A TCP display has no password: any local user can connect to it. The unix socket is the
default for that reason.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import Protocol

from supervisord_vm.definition import Definition, validate_name
from supervisord_vm.errors import SvmError

log = logging.getLogger(__name__)

VNC_SOCKET_NAME = "vnc.sock"
VNC_BASE_PORT = 5900
VNC_DISPLAYS = 100  # QEMU tries ports 5900 to 5999
VNC_GROUP = "supervisord-vm"


class QmpExecutor(Protocol):
    """What this module needs of a QMP session (QmpSession is one)."""

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object: ...


def vnc_socket(runtime_dir: Path, name: str) -> Path:
    """VM `name`'s VNC socket, in its QEMU directory (see confinement.qemu_runtime_dir)."""
    return runtime_dir / "qemu" / validate_name(name) / VNC_SOCKET_NAME


def display_args(defn: Definition, socket_path: Path | None) -> list[str]:
    """`-vnc` and a graphics card for `defn` (pure); none for `display = "none"`.

    `socket_path`: where QEMU creates the VNC socket (`vnc_socket`) when `vnc_listen` is unset.
    `-nodefaults` leaves the board without a VGA card, so a display adds the standard one.
    """
    if defn.display != "vnc":
        return []
    if defn.vnc_listen is None:
        if socket_path is None:
            raise ValueError(f"VM {defn.name} has a VNC display but no socket path for it")
        where = f"unix:{str(socket_path).replace(',', ',,')}"
    else:
        host = defn.vnc_listen
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        where = f"{host}:0,to={VNC_DISPLAYS - 1}"
    return ["-vnc", where, "-vga", "std"]


def address(defn: Definition, socket_path: Path, query_vnc: object) -> str:
    """How a client reaches the display, as a URI (pure): `vnc+unix:///PATH` or
    `vnc://HOST:PORT` (the port from QMP `query-vnc`'s reply); "" for no display or a reply
    that names no port."""
    if defn.display != "vnc":
        return ""
    if defn.vnc_listen is None:
        return f"vnc+unix://{socket_path}"
    service = query_vnc.get("service") if isinstance(query_vnc, dict) else None
    if not isinstance(service, str) or not service.isdigit():
        return ""
    host = defn.vnc_listen
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    return f"vnc://{host}:{int(service)}"


async def attach(qmp: QmpExecutor | None, defn: Definition, runtime_dir: Path) -> str:
    """The display's address once QEMU runs (after a start or an adoption); "" without one.

    A unix socket is given to group supervisord-vm (QEMU made it with its own group). Never
    raises: a display that cannot be read is logged, and the VM runs on without its address.
    """
    if defn.display != "vnc":
        return ""
    socket_path = vnc_socket(runtime_dir, defn.name)
    if defn.vnc_listen is None:
        try:
            share_with_group(socket_path)
        except OSError as err:
            log.warning(
                "VM %s: cannot give %s to group %s: %s", defn.name, socket_path, VNC_GROUP, err
            )
        return address(defn, socket_path, None)
    if qmp is None:
        return ""
    try:
        reply = await qmp.execute("query-vnc")
    except SvmError as err:
        log.warning("VM %s: cannot read its VNC port: %s", defn.name, err)
        return ""
    found = address(defn, socket_path, reply)
    if not found:
        log.warning("VM %s: QEMU names no VNC port: %r", defn.name, reply)
    return found


def share_with_group(socket_path: Path) -> None:
    """Let group supervisord-vm connect to `socket_path` (mode 0660, never others).

    QEMU owns the directory and could put a symlink or another file there: the daemon (root)
    changes the file only through a descriptor of the very inode it checked, a socket owned by
    the directory's owner (QEMU's user), never following a link.
    """
    try:
        gid = grp.getgrnam(VNC_GROUP).gr_gid
    except KeyError:
        gid = -1  # no such group: root (and QEMU's user) only
    fd = os.open(socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        owner = socket_path.parent.stat().st_uid
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != owner:
            raise OSError(errno.EPERM, "not a socket of QEMU's", str(socket_path))
        # An O_PATH descriptor takes no fchmod; its /proc link reaches the same inode.
        inode = f"/proc/self/fd/{fd}"
        if gid != -1 and os.geteuid() == 0:
            os.chown(inode, -1, gid)
        Path(inode).chmod(0o660)
    finally:
        os.close(fd)
