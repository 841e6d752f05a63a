"""Who QEMU runs as: an unprivileged system user, never root (issue 9, confinement).

Interface used by every feature that prepares files or devices for QEMU: `qemu_identity()` is the
identity QEMU will run as for this daemon, or None when the host explicitly opted out of
confinement (QEMU then runs as root, as before). A feature that creates a file or device QEMU must
open itself (a tap device, a VNC socket directory, an NVRAM file) gives it to this identity;
better still, it opens the file in the daemon and hands QEMU the descriptor.

What confinement means here (README, "Confinement"): the spawn trampoline drops to this identity
after the scope holds it and before the exec, with no capability left (bounding set included) and
no_new_privs, so whatever program a definition's `qemu` names never runs as root; QEMU's own
seccomp sandbox (`sandbox_option`) is on where the binary has it; QMP, disks and the other
sockets reach QEMU as descriptors the daemon opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import secrets
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from supervisord_vm.definition import validate_name
from supervisord_vm.errors import SvmError
from supervisord_vm.systemd import ScopeProperties, Systemd, spawn_in_scope

if TYPE_CHECKING:
    from supervisord_vm.store import Paths

log = logging.getLogger(__name__)

QEMU_USER = "supervisord-vm-qemu"
ADMIN_GROUP = "supervisord-vm"
# Files QEMU creates (a VNC socket in its runtime directory) are for it and its own group,
# never for others; the daemon gives such a socket to group supervisord-vm where needed.
QEMU_UMASK = 0o007
DEFAULT_IMAGE_DIRS = (Path("/var/lib/supervisord-vm/images"),)
# QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no scheduler or
# priority changes. A binary built without seccomp (or older than these options) refuses it.
SANDBOX_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_PROBE_TIMEOUT = 10.0
_SANDBOX_CACHE_SIZE = 64  # binaries remembered (a member could name many scripts)


class ConfinementUnavailable(SvmError):
    """QEMU cannot be confined as configured (its user does not exist): nothing is started."""


@dataclass(frozen=True)
class QemuIdentity:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class _Settings:
    user: str | None = QEMU_USER
    image_dirs: tuple[Path, ...] = DEFAULT_IMAGE_DIRS


def configure(user: str | None, image_dirs: Sequence[Path] | None = None) -> None:
    """Set the user QEMU runs as (None: not confined, QEMU runs as root, with the daemon's
    capabilities and no seccomp filter) and the image directories whose files group members may
    name as disks — the daemon's options."""
    _Settings.user = user
    if image_dirs is not None:
        _Settings.image_dirs = tuple(Path(d).resolve() for d in image_dirs)
    _sandbox_support.clear()


def confined() -> bool:
    """Whether QEMU runs confined (the default) rather than as root (the host opted out)."""
    return _Settings.user is not None


def image_dirs() -> tuple[Path, ...]:
    """The directories root configured, whose files any group member may use as disks."""
    return _Settings.image_dirs


def qemu_identity() -> QemuIdentity | None:
    """The identity QEMU runs as, or None when the host opted out of confinement.

    Raises ConfinementUnavailable when the configured user does not exist: a missing user
    never silently means "run QEMU as root".
    """
    user = _Settings.user
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfinementUnavailable(
            f"QEMU's user {user!r} does not exist (create it with systemd-sysusers, as "
            "`make install` does; or opt out of confinement with --no-confine)"
        ) from None
    if entry.pw_uid == 0:
        return None  # --qemu-user root: the same as --no-confine
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return QemuIdentity(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


# --- QEMU's seccomp sandbox -----------------------------------------------------------------

_sandbox_support: dict[tuple[str, int, int, int, int], bool] = {}


async def sandbox_option(
    binary: str, identity: QemuIdentity | None, systemd: Systemd
) -> str | None:
    """`-sandbox`'s value for `binary`, or None where it has no (complete) seccomp support.

    Asked once per binary (path, inode, mtime; cached): `BINARY -sandbox SANDBOX_OPTION -version`
    exits 0 only where QEMU parses every option of the filter. The probe is spawned like the VM's
    QEMU (in its own scope, through the trampoline, as QEMU's user): the program a definition
    names never runs as root, not even to be asked. A binary without it is said once in the log
    and runs without.
    """
    if identity is None:
        return None  # opted out: QEMU as before, as root and unfiltered
    try:
        st = await asyncio.to_thread(os.stat, binary)
    except OSError:
        return None  # the launch says what is wrong with the binary
    key = (binary, st.st_dev, st.st_ino, st.st_mtime_ns, identity.uid)
    supported = _sandbox_support.get(key)
    if supported is None:
        answer, output = await _probe_sandbox(binary, identity, systemd)
        if answer is None:
            return None  # not a program QEMU's user can run: the launch will say so
        supported = _sandbox_support[key] = answer
        while len(_sandbox_support) > _SANDBOX_CACHE_SIZE:  # bounded: oldest answers go first
            del _sandbox_support[next(iter(_sandbox_support))]
        if not supported:
            log.warning(
                "QEMU binary %s has no seccomp sandbox (-sandbox %s): its VMs run without it (%s)",
                binary,
                SANDBOX_OPTION,
                output or "no output",
            )
    return SANDBOX_OPTION if supported else None


async def _probe_sandbox(
    binary: str, identity: QemuIdentity, systemd: Systemd
) -> tuple[bool | None, str]:
    """Whether `binary` accepts the filter (None: it could not even be run), and its words.

    Run like a VM's QEMU: in a scope of its own (`supervisord-vm-probe-*.scope`, stopped after
    it, so nothing a definition's program leaves behind outlives the probe), as QEMU's user.
    """
    unit = f"supervisord-vm-probe-{secrets.token_hex(6)}.scope"
    props = ScopeProperties(
        description=f"supervisord-vm: does {binary} have a seccomp sandbox?", stop_timeout=5.0
    )
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        try:
            process = await spawn_in_scope(
                systemd,
                [binary, "-sandbox", SANDBOX_OPTION, "-version"],
                unit,
                props,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdout=null,
                stderr=write_end,
                run_as=identity,
                umask=QEMU_UMASK,
            )
        except (OSError, SvmError) as err:
            return None, str(err)  # cannot be run (as QEMU's user): the launch will say why
        finally:
            os.close(write_end)
            os.close(null)
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                code = await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            await process.wait()
            return False, f"no answer to -version within {_PROBE_TIMEOUT:g} s"
        finally:
            with contextlib.suppress(SvmError):
                await systemd.stop_unit(unit)  # whatever the program left running in it
        try:
            output = os.read(read_end, 65536)
        except BlockingIOError:
            output = b""
    finally:
        os.close(read_end)
    text = output[-400:].decode("utf-8", "replace").strip().replace("\n", " ")
    return code == 0, text


# --- QEMU's runtime directory ---------------------------------------------------------------


def qemu_runtime_dir(paths: Paths, name: str) -> Path:
    """The per-VM directory where QEMU may create files itself (a VNC socket), created if missing.

    `runtime_dir/qemu/NAME`, mode 0750: owned by QEMU's identity (root when not confined), group
    `supervisord-vm` (so the group's members may enter it), nobody else. Not setgid: the service's
    RestrictSUIDSGID= refuses that, so a file QEMU creates there has QEMU's group; the daemon gives
    it to group supervisord-vm where members need it (QEMU's umask is 0007). Its parents stay
    root's but are made traversable (0711), never listable. Idempotent; removed with
    `remove_qemu_runtime_dir` in the exit cleanup.
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
    directory.chmod(0o750)  # root's directories all the way: no symlink can be in the way
    return directory


def remove_qemu_runtime_dir(runtime_dir: Path, name: str) -> None:
    """Remove a VM's QEMU directory and, when it was the last one, `runtime_dir/qemu` itself."""
    parent = runtime_dir / "qemu"
    shutil.rmtree(parent / validate_name(name), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (another VM runs), or already gone
        parent.rmdir()


def sweep_runtime(runtime_dir: Path, keep: set[str]) -> None:
    """Remove the monitor sockets and QEMU directories of VMs not in `keep` (at start-up).

    The daemon binds each monitor socket itself, so QEMU no longer unlinks it when it exits: a
    VM that ended without a runtime record (an orphan scope stopped at start-up) would leave it.
    """
    for path in runtime_dir.glob("*.qmp") if runtime_dir.is_dir() else []:
        name = path.name.removesuffix(".qmp")
        if name not in keep and not (runtime_dir / f"{name}.json").exists():
            path.unlink(missing_ok=True)
    qemu_dir = runtime_dir / "qemu"
    for path in list(qemu_dir.iterdir()) if qemu_dir.is_dir() else []:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        qemu_dir.rmdir()  # only when no VM has one any more
