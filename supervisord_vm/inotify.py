"""inotify through libc, which Python's standard library does not wrap.

libc is looked up once per process: ctypes.util.find_library forks `ldconfig -p`, which must
not happen on the event loop at every QMP connect or log watch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IN_MODIFY = 0x2
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library with errno kept, or None where it cannot be found (computed once)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _errno_error(filename: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err), filename)


def open_inotify() -> int:
    """A non-blocking, close-on-exec inotify fd (OSError when inotify is unavailable)."""
    lib = libc()
    if lib is None:
        raise OSError(errno.ENOSYS, "libc not found")
    fd: int = lib.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise _errno_error()
    return fd


def add_watch(fd: int, path: Path, mask: int) -> int:
    """Watch `path` on inotify `fd`; the watch descriptor (OSError naming the path)."""
    lib = libc()
    if lib is None:
        raise OSError(errno.ENOSYS, "libc not found")
    wd: int = lib.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        raise _errno_error(str(path))
    return wd


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str  # "" for an event about the watched object itself


def parse_events(buffer: bytes) -> Iterator[Event]:
    """The events in what one read() of an inotify fd returned."""
    offset = 0
    while offset + _HEADER.size <= len(buffer):
        wd, mask, _cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        raw = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield Event(wd, mask, os.fsdecode(raw))
