"""Who QEMU runs as: an unprivileged system user, never root (issue 9, confinement).

Interface used by every feature that prepares files or devices for QEMU: `qemu_identity()` is the
identity QEMU will run as for this daemon, or None when the host explicitly opted out of
confinement (QEMU then runs as root, as before). A feature that creates a file or device QEMU must
open itself (a tap device, a VNC socket directory, an NVRAM file) gives it to this identity;
better still, it opens the file in the daemon and hands QEMU the descriptor.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass

QEMU_USER = "supervisord-vm-qemu"


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
