"""Which files a VM may use as disks, and the descriptors QEMU gets for them (confinement).

QEMU runs unprivileged, so the daemon opens every disk and hands QEMU the descriptors
(`-add-fd` + `file=/dev/fdset/N`). That must not become a way around file permissions: the
daemon opens files as root only for definitions root gave it, or for files inside the image
directories root configured (`--image-dir`). Any other disk of a definition that a group member
(not root) defined or created is opened with that member's own credentials, by a short-lived
helper that has switched to them (`_open_as.py`): the kernel decides, at the moment of the open,
exactly as if the member had opened the file — so `path = "/etc/shadow"` is refused, and a
symlink swapped in after the definition was accepted gains nothing. Who is responsible for a
definition's disks is kept across restarts (`OwnerStore`): a VM a member defined and that
autostarts as root later still has its disks opened with the member's rights.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisord_vm import _open_as, confinement
from supervisord_vm.definition import Definition, Disk, validate_name
from supervisord_vm.errors import DiskAccessDenied
from supervisord_vm.store import atomic_write

_HELPER_TIMEOUT = 30.0  # an open on a hung NFS mount must not hold a start forever
_NOBODY_UID = 65534
_NOBODY_GID = 65534


@dataclass(frozen=True)
class Credentials:
    """A caller's identity for permission checks: uid, primary gid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_caller(cls, uid: int, groups: Iterable[int] | None) -> Credentials:
        """The caller's credentials: `groups` as the bus reported them (the process's groups
        when it connected), else the user database's. The primary gid is the user's."""
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
        except KeyError:
            entry = None
        gid = entry.pw_gid if entry is not None else _NOBODY_GID
        if groups is None:
            groups = os.getgrouplist(entry.pw_name, gid) if entry is not None else ()
        return cls(uid, gid, tuple(sorted(set(groups))))

    def to_json(self) -> dict[str, object]:
        return {"uid": self.uid, "gid": self.gid, "groups": list(self.groups)}

    @classmethod
    def from_json(cls, data: object) -> Credentials:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        uid, gid, groups = data.get("uid"), data.get("gid"), data.get("groups")
        if not (isinstance(uid, int) and isinstance(gid, int) and isinstance(groups, list)):
            raise ValueError("uid, gid or groups missing or of the wrong type")
        if not all(isinstance(g, int) for g in groups):
            raise ValueError("groups are not all numbers")
        return cls(uid, gid, tuple(groups))


class OwnerStore:
    """`state_dir/owners/NAME.json`: the member whose rights a VM's disks are opened with.

    No record means root's (the administrator's) definition. Written before the definition it
    belongs to and removed only after a root-given definition replaced it, so a crash in between
    errs towards the member's (narrower) rights. An unreadable record counts as nobody's rights.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "owners"

    def _path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.json"

    def get(self, name: str) -> Credentials | None:
        try:
            text = self._path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return Credentials(_NOBODY_UID, _NOBODY_GID)
        try:
            return Credentials.from_json(json.loads(text))
        except ValueError:
            return Credentials(_NOBODY_UID, _NOBODY_GID)

    def set(self, name: str, owner: Credentials | None) -> None:
        """Record `owner` for VM `name`; None (root's definition) removes the record."""
        if owner is None or owner.uid == 0:
            self._path(name).unlink(missing_ok=True)
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self._path(name), json.dumps(owner.to_json()).encode(), 0o600)


def writable(disk: Disk) -> bool:
    """Whether QEMU writes to the file itself (snapshot=on writes to a temporary overlay)."""
    return not (disk.readonly or disk.snapshot or disk.media == "cdrom")


def _access_words(write: bool) -> str:
    return "for reading and writing" if write else "for reading"


def in_image_dirs(path: str, dirs: Sequence[Path] | None = None) -> bool:
    """Whether `path`, all symlinks resolved, lies inside one of the image directories."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(d) and real != d for d in (dirs or confinement.image_dirs()))


def _refusal(disk: Disk, creds: Credentials, problem: str) -> DiskAccessDenied:
    dirs = ", ".join(str(d) for d in confinement.image_dirs())
    return DiskAccessDenied(
        f"disk {disk.path}: not in an image directory ({dirs}), and uid {creds.uid} cannot "
        f"open it {_access_words(writable(disk))} ({problem}); a group member may use only "
        "files in the image directories or files they can open themselves"
    )


async def check_disks(defn: Definition, creds: Credentials | None) -> None:
    """DiskAccessDenied unless the caller `creds` may use every disk of `defn` (None: root).

    Files outside the image directories are opened by the helper with the caller's rights and
    closed again at once: nothing is read, and a refused file is never opened at all.
    """
    if creds is None or creds.uid == 0:
        return
    outside = [disk for disk in defn.disks if not in_image_dirs(disk.path)]
    if not outside:
        return
    results = await open_as(creds, [(disk.path, writable(disk)) for disk in outside])
    try:
        for disk, result in zip(outside, results, strict=True):
            if isinstance(result, str):
                raise _refusal(disk, creds, result)
    finally:
        for result in results:
            if isinstance(result, int):
                os.close(result)


async def open_disks(defn: Definition, owner: Credentials | None) -> list[list[int]]:
    """Open every disk of `defn` for QEMU, with `owner`'s rights where the policy says so.

    Returns one list of descriptors per disk (O_RDWR then O_RDONLY for a written disk, O_RDONLY
    otherwise), close-on-exec. Raises DiskAccessDenied, or OSError naming the file; on any
    failure every descriptor opened so far is closed.
    """
    opened: list[list[int]] = []
    try:
        for disk in defn.disks:
            write = writable(disk)
            modes = [True, False] if write else [False]
            if owner is None or owner.uid == 0:
                opened.append([await asyncio.to_thread(_open_as_root, disk.path, w) for w in modes])
            elif in_image_dirs(disk.path):
                opened.append(
                    [await asyncio.to_thread(_open_in_image_dirs, disk.path, w) for w in modes]
                )
            else:
                results = await open_as(owner, [(disk.path, w) for w in modes])
                fds = [r for r in results if isinstance(r, int)]
                opened.append(fds)
                problems = [r for r in results if isinstance(r, str)]
                if problems:
                    raise _refusal(disk, owner, problems[0])
    except BaseException:
        for fds in opened:
            for fd in fds:
                os.close(fd)
        raise
    return opened


_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _checked(fd: int, path: str) -> int:
    """`fd` if it is a regular file or block device (made blocking again), else OSError."""
    try:
        kind = os.fstat(fd).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISBLK(kind)):
            raise OSError(errno.EINVAL, "not a regular file or block device", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_as_root(path: str, write: bool) -> int:
    """Root's definition: open as the daemon (blocking: on any file system)."""
    return _checked(os.open(path, _OPEN_FLAGS | (os.O_RDWR if write else os.O_RDONLY)), path)


def _open_in_image_dirs(path: str, write: bool) -> int:
    """Open a file that must lie inside an image directory, as root, without a window for a
    symlink swap: the file is pinned with O_PATH (which neither reads it nor needs permission),
    its real path checked from /proc, and exactly that file reopened with the access it needs."""
    pinned = os.open(os.path.realpath(path), os.O_PATH | os.O_CLOEXEC)
    try:
        real = str(Path(f"/proc/self/fd/{pinned}").readlink())
        if not in_image_dirs(real):
            raise DiskAccessDenied(
                f"disk {path}: it was in an image directory when checked, but now is {real}"
            )
        mode = os.O_RDWR if write else os.O_RDONLY
        return _checked(os.open(f"/proc/self/fd/{pinned}", _OPEN_FLAGS | mode), path)
    finally:
        os.close(pinned)


# sys._base_executable: the interpreter a venv was made from (sys.executable outside a venv).
_HELPER_PYTHON: str = getattr(sys, "_base_executable", "") or sys.executable


@functools.cache
def _helper_source() -> str:
    """_open_as.py's text, read once by the daemon (as root)."""
    return Path(_open_as.__file__).read_text(encoding="utf-8")


async def open_as(creds: Credentials, requests: Sequence[tuple[str, bool]]) -> list[int | str]:
    """Open each (path, write) with `creds`' own rights: a descriptor, or why not (words).

    The helper is a new process switched to those ids before it runs (setgroups, setgid,
    setuid: no capability survives), so the check is the kernel's own, not an access(2)
    guess; it is bounded in time and reaped here.
    """
    return await asyncio.to_thread(_open_as_blocking, creds, list(requests))


def _open_as_blocking(creds: Credentials, requests: list[tuple[str, bool]]) -> list[int | str]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    results: list[int | str] = []
    with parent:
        try:
            # The caller must be able to run the interpreter and the script: the base python3
            # of the daemon's venv is world-executable, the script goes in as `-c` source (the
            # daemon's own files may sit in a directory only root can enter, like /root).
            argv = [_HELPER_PYTHON, "-I", "-S", "-c", _helper_source(), str(child.fileno())]
            for path, write in requests:
                argv += ["w" if write else "r", path]
            helper = subprocess.Popen(
                argv,
                pass_fds=(child.fileno(),),
                user=creds.uid,
                group=creds.gid,
                extra_groups=list(creds.groups),  # always: else root's groups would stay
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                cwd="/",
            )
        except OSError as exc:
            return [f"cannot be checked: the helper did not start ({exc.strerror})"] * len(requests)
        finally:
            child.close()
        try:
            parent.settimeout(_HELPER_TIMEOUT)
            for _ in requests:
                message, fds, _flags, _address = socket.recv_fds(parent, 64, 1)
                if message == b"+" and fds:
                    os.set_blocking(fds[0], True)  # O_NONBLOCK was for opening a FIFO only
                    results.append(fds[0])
                elif message.startswith(b"-"):
                    code = int(message[1:] or 0)
                    results.append(os.strerror(code) if code else "cannot be opened")
                elif message == b"!":
                    results.append("not a regular file or block device")
                else:
                    break  # the helper ended early
        except (OSError, ValueError):  # TimeoutError is an OSError
            pass
        finally:
            try:
                helper.wait(timeout=_HELPER_TIMEOUT)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    missing = len(requests) - len(results)
    return results + ["cannot be checked: the helper that opens it failed"] * missing
