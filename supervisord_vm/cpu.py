"""The guest's CPU model: the definition's `cpu`, else `host` where QEMU will use KVM.

`-cpu host` passes the host CPU's features through, which is what a server VM wants, but it
exists only with KVM: under TCG QEMU refuses it ("CPU model 'host' requires KVM"). `-accel`
falls back silently from kvm to the next accelerator, so the daemon predicts the outcome
before QEMU runs: KVM is used when it is the first accelerator and QEMU's user can open
/dev/kvm read-write. Without that, QEMU keeps its own default model.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from supervisord_vm.confinement import QemuIdentity
from supervisord_vm.definition import Definition

KVM_DEVICE = Path("/dev/kvm")


def cpu_args(defn: Definition, kvm: bool) -> list[str]:
    """`-cpu` for `defn` (pure): explicit, else `host` when `kvm` (KVM will be used)."""
    if defn.cpu is not None:
        return ["-cpu", defn.cpu]
    if kvm and defn.accel[:1] == ("kvm",):
        return ["-cpu", "host"]
    return []


def may_open_rw(mode: int, owner: int, group: int, identity: QemuIdentity) -> bool:
    """Whether `identity` may open a file of this mode and ownership read-write (pure; the
    classic permission bits, as the kernel checks them for a process without capabilities)."""
    if identity.uid == owner:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif group == identity.gid or group in identity.groups:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return mode & bits == bits


def kvm_usable(identity: QemuIdentity | None, device: Path = KVM_DEVICE) -> bool:
    """Whether QEMU, running as `identity` (None: root), can use KVM (blocking: opens `device`).

    The daemon opens the device itself (so the kvm module is loaded and answers), then checks
    the permission bits for QEMU's user, who opens it after the privilege drop.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if identity is None:
        return True
    return may_open_rw(info.st_mode, info.st_uid, info.st_gid, identity)
