"""Who QEMU runs as: an unprivileged system user, never root (issue 9, confinement).

Interface used by every feature that prepares files or devices for QEMU: `qemu_identity()` is the
identity QEMU will run as for this daemon, or None when the host explicitly opted out of
confinement (QEMU then runs as root, as before). A feature that creates a file or device QEMU must
open itself (a tap device, a VNC socket directory, an NVRAM file) gives it to this identity;
better still, it opens the file in the daemon and hands QEMU the descriptor.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from supervisord_vm.definition import validate_name
from supervisord_vm.store import Paths

QEMU_USER = "supervisord-vm-qemu"
ADMIN_GROUP = "supervisord-vm"


@dataclass(frozen=True)
class QemuIdentity:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class _Settings:
    user: str | None = QEMU_USER


def configure(user: str | None) -> None:
    """Set the user QEMU runs as (None: not confined, QEMU runs as root) — the daemon's option."""
    _Settings.user = user


def qemu_identity() -> QemuIdentity | None:
    """The identity QEMU runs as, or None when confinement is off (or the user does not exist).

    Stub until the confinement work lands: it resolves the user but nothing drops to it yet.
    """
    if _Settings.user is None:
        return None
    try:
        entry = pwd.getpwnam(_Settings.user)
    except KeyError:
        return None
    return QemuIdentity(entry.pw_name, entry.pw_uid, entry.pw_gid)


def qemu_runtime_dir(paths: Paths, name: str) -> Path:
    """The per-VM directory where QEMU may create files itself (a VNC socket), created if missing.

    `runtime_dir/qemu/NAME`, mode 2750: owned by QEMU's identity (root when not confined), group
    `supervisord-vm` (so the group's members reach what QEMU puts there, and new files inherit
    that group), nobody else. Its parents stay root's but are made traversable (0711), never
    listable. Idempotent; removed with `remove_qemu_runtime_dir` in the exit cleanup.
    """
    directory = paths.runtime_dir / "qemu" / validate_name(name)
    for parent in (paths.runtime_dir, directory.parent):
        parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod((mode & 0o7777) | 0o011)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        identity = qemu_identity()
        uid = identity.uid if identity is not None else 0
        try:
            gid = grp.getgrnam(ADMIN_GROUP).gr_gid
        except KeyError:
            gid = identity.gid if identity is not None else 0
        os.chown(directory, uid, gid, follow_symlinks=False)
    directory.chmod(0o2750)  # root's directories all the way: no symlink can be in the way
    return directory


def remove_qemu_runtime_dir(paths: Paths, name: str) -> None:
    """Remove a VM's QEMU directory and, when it was the last one, `runtime_dir/qemu` itself."""
    parent = paths.runtime_dir / "qemu"
    shutil.rmtree(parent / validate_name(name), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (another VM runs), or already gone
        parent.rmdir()
