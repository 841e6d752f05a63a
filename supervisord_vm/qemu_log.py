"""QEMU's log files: opened for a run, rotated at start, kept bounded while it runs.

The fallback where the journal is unavailable: QEMU's output normally goes to journald from
inside its scope (qemu_journal.py); only a start that finds journald's stream socket missing
(a host or container without journald) gets a log file. Files of earlier versions, and of such
starts, stay readable (svmctl log falls back to them when the journal has nothing).

QEMU writes its stdout and stderr straight into LOG_DIR/NAME.log through an O_APPEND fd it
inherits, so its output never waits for the daemon and survives daemon restarts. The daemon
bounds the file from the side instead of sitting in the output path: at each start a log over
the limit becomes NAME.log.1 (one older generation is kept), and while QEMU runs a LogBounder
woken by inotify copies a log that passed the limit to NAME.log.1 and truncates it, as
logrotate's ``copytruncate`` does. So each VM keeps about twice the limit on disk (more only
while a QEMU writes faster than the copy keeps up, see copy_truncate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from supervisord_vm import inotify

log = logging.getLogger(__name__)

# 1 MiB per file, 2 MiB per VM with NAME.log.1: thousands of starts' worth of QEMU's usual
# output (a header and a few warnings each), the size one GetLog call returns (bus.py's
# LOG_TAIL_LIMIT), and a copy of about 3 ms (measured on ext4, page cache), so a copytruncate
# holds a worker thread and _generation_lock only briefly. 500 VMs take at most about 1 GiB.
DEFAULT_LIMIT = 1 << 20
LOG_SUFFIX = ".log"
_CHUNK = 64 * 1024

# Held while a log's generations move (rotation at start, copytruncate) and while both are read,
# so that a reader never sees a generation twice or not at all, and a rotation at start never
# renames the file a copytruncate is about to truncate. One lock for all VMs: it is held for one
# copy of about `limit` bytes at most.
_generation_lock = threading.Lock()


def rotated_path(path: Path) -> Path:
    """Where the previous generation of log `path` lives (NAME.log.1)."""
    return path.with_name(path.name + ".1")


def open_log(path: Path, limit: int = DEFAULT_LIMIT) -> tuple[int, bool]:
    """Open QEMU's log for appending for one run; True if this call created the file.

    A log over `limit` first becomes NAME.log.1 (replacing the older one), so that every run
    starts in a short file. The fd is O_APPEND, which copytruncate relies on: after the
    truncation QEMU's next write lands at the new end, not at its old offset (no sparse file).
    """
    with _generation_lock:
        try:
            if path.stat().st_size > limit:
                path.replace(rotated_path(path))
        except FileNotFoundError:
            pass
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o640), True
    except FileExistsError:
        return os.open(path, flags), False


def read_tail(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` QEMU wrote to log `path`, continued into NAME.log.1 when NAME.log
    holds less (it was just rotated or truncated). Missing files read as empty."""
    with _generation_lock:
        current = _read_range(path, None, max_bytes)
        if len(current) >= max_bytes:
            return current
        return _read_range(rotated_path(path), None, max_bytes - len(current)) + current


def read_since(path: Path, offset: int, max_bytes: int) -> bytes:
    """The last `max_bytes` written to log `path` since `offset` (a run's header), also when a
    copytruncate moved part of it to NAME.log.1 meanwhile (NAME.log is then shorter than
    `offset`, and the run's earlier output is in NAME.log.1 from `offset` on)."""
    with _generation_lock:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= offset:
            return _read_range(path, offset, max_bytes)
        current = _read_range(path, 0, max_bytes)
        if len(current) >= max_bytes:
            return current
        return _read_range(rotated_path(path), offset, max_bytes - len(current)) + current


def _read_range(path: Path, start: int | None, max_bytes: int) -> bytes:
    """The last `max_bytes` of `path` from `start` on (None: from wherever that leaves)."""
    if max_bytes <= 0:
        return b""
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            begin = max(size - max_bytes, start or 0)
            stream.seek(begin)
            return stream.read(max_bytes)
    except FileNotFoundError:
        return b""


def copy_truncate(path: Path, limit: int) -> bool:
    """If log `path` is over `limit`: copy it to NAME.log.1 and truncate it to zero. True if so.

    What can be lost: QEMU's writes that land between the copy's last read and the truncation
    (the gap between two system calls, see _copy_and_truncate) are in neither file; measured
    with a writer appending 100-byte lines as fast as it can, about 2 lines per copytruncate.
    A write in progress during that last read may be cut: its beginning is copied, the rest
    truncated away; the copy then ends with a newline so the fragment never runs into another
    line. The truncation itself tears no write (the kernel serialises it with O_APPEND writes).
    The copy reads at most the size seen at open plus `limit`: what a QEMU writes faster than
    that is lost too. A daemon killed between truncation and rename leaves the copy in
    NAME.log.1.tmp, which the next copytruncate overwrites.
    """
    with _generation_lock:
        try:
            source = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode) or info.st_size <= limit:
                return False
            temp = path.with_name(path.name + ".1.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            copy = os.open(temp, flags, 0o640)
            try:
                os.fchmod(copy, stat.S_IMODE(info.st_mode))
                _copy_and_truncate(source, copy, info.st_size + limit)
            finally:
                os.close(copy)
            temp.replace(rotated_path(path))
            return True
        finally:
            os.close(source)


def _copy_and_truncate(source: int, target: int, bound: int) -> None:
    """Copy `source` from its start up to its end or `bound` bytes, then truncate it to zero.

    The bulk goes to `target` as it is read. Once a read comes up short (the end is reached),
    what QEMU appended meanwhile is read into memory until a read finds nothing more, and the
    truncation follows at once: QEMU's writes are lost only in the gap between two system
    calls, not during a disk write. The copy ends with a newline (a cut write has none).
    """
    copied = 0
    last = b"\n"
    while copied < bound:
        wanted = min(_CHUNK, bound - copied)
        chunk = os.pread(source, wanted, copied)
        _write_all(target, chunk)
        copied += len(chunk)
        last = chunk[-1:] or last
        if len(chunk) < wanted:
            break
    tail: list[bytes] = []
    while copied < bound:
        chunk = os.pread(source, min(_CHUNK, bound - copied), copied)
        if not chunk:
            break
        tail.append(chunk)
        copied += len(chunk)
    os.ftruncate(source, 0)
    for chunk in tail:
        _write_all(target, chunk)
        last = chunk[-1:]
    if last != b"\n":
        _write_all(target, b"\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LogBounder:
    """Keeps every NAME.log in `log_dir` at about `limit` bytes while QEMU writes to it.

    One inotify fd watches the directory for IN_MODIFY (the kernel coalesces repeated events
    not read yet), read on the event loop; the stat and the copy run in a worker thread, so the
    loop never waits for the disk. No polling: an idle VM costs nothing. A file passes the limit
    by at most what is written while the worker gets to it (normally one write).
    """

    def __init__(self, log_dir: Path, limit: int = DEFAULT_LIMIT) -> None:
        if limit <= 0:
            raise ValueError(f"log limit must be positive, got {limit}")
        self.log_dir = log_dir
        self.limit = limit
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[str] = set()
        self._rescan = False
        self._worker: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Watch the directory (creating it), and bound the logs already there once.

        Never raises: without inotify (e.g. fs.inotify.max_user_instances reached) the daemon
        still supervises its VMs, with logs bounded only at each start; a warning says so.
        """
        if self._fd is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        try:
            self.log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = inotify.open_inotify()
            try:
                inotify.add_watch(fd, self.log_dir, inotify.IN_MODIFY)
            except OSError:
                os.close(fd)
                raise
        except OSError as err:
            log.warning(
                "QEMU's logs in %s are bounded only when a VM starts: cannot watch them (%s)",
                self.log_dir,
                err,
            )
            return
        self._fd = fd
        self._loop = loop
        loop.add_reader(fd, self._on_readable)
        # Logs of VMs that kept running while the daemon was away may be over the limit already.
        self._schedule((), rescan=True)

    async def close(self) -> None:
        """Stop watching; return once no copy is running (the fd and the reader are gone)."""
        self._closing = True
        self._stop_watching()
        self._pending.clear()
        self._rescan = False
        if self._worker is not None:
            await asyncio.shield(self._worker)

    def _stop_watching(self) -> None:
        if self._fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        # One read per wake-up: a QEMU that writes without pause cannot keep the loop here.
        assert self._fd is not None
        try:
            buffer = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("QEMU's logs are bounded only when a VM starts: inotify failed: %s", err)
            self._stop_watching()
            return
        names: set[str] = set()
        rescan = False
        for event in inotify.parse_events(buffer):
            if event.mask & inotify.IN_Q_OVERFLOW:
                rescan = True  # events were dropped: look at every log
            elif event.mask & inotify.IN_IGNORED:
                log.warning(
                    "QEMU's logs are bounded only when a VM starts: %s went away", self.log_dir
                )
                self._stop_watching()
                return
            elif event.name.endswith(LOG_SUFFIX):
                names.add(event.name)
        self._schedule(names, rescan=rescan)

    def _schedule(self, names: Iterable[str], *, rescan: bool) -> None:
        self._pending.update(names)
        self._rescan |= rescan
        if self._worker is None and (self._pending or self._rescan) and self._loop is not None:
            self._worker = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Bound the logs named meanwhile, batch after batch, one worker thread at a time."""
        try:
            while (self._pending or self._rescan) and not self._closing:
                names, rescan = self._pending, self._rescan
                self._pending, self._rescan = set(), False
                try:
                    await asyncio.to_thread(self._bound, names, rescan)
                except Exception:  # a bug here must not end the bounding of every log
                    log.exception("cannot keep QEMU's logs bounded")
        finally:
            self._worker = None

    def _bound(self, names: set[str], rescan: bool) -> None:
        """In the worker thread: copytruncate each named log that is over the limit."""
        if rescan:
            try:
                with os.scandir(self.log_dir) as entries:
                    names = names | {e.name for e in entries if e.name.endswith(LOG_SUFFIX)}
            except OSError as err:
                log.warning("cannot list QEMU's logs in %s: %s", self.log_dir, err)
        for name in sorted(names):
            if self._closing:
                return
            path = self.log_dir / name
            try:
                if copy_truncate(path, self.limit):
                    log.debug("%s passed %d bytes: moved to %s", path, self.limit, name + ".1")
            except OSError as err:
                log.warning("cannot keep %s bounded: %s", path, err)
