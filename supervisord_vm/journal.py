"""Structured journal entries (audit records, lifecycle records) without python3-systemd.

journald's native protocol is one datagram of KEY=value lines; speaking it directly keeps the
service's venv free of a compiled binding. Outside systemd (no journal socket) the entry goes to
the ``logging`` module instead, so nothing is lost in tests or foreground runs.

Entries are sent from the event loop, so sending never blocks: one non-blocking socket serves
every entry, and when journald's queue is full (it is slow, or a burst outran it) the entry
waits in a bounded backlog that a writer thread hands over in order; only beyond that bound, or
without journald, does an entry go to the ``logging`` module (stderr, which journald also
reads, without the fields). An entry too large for one datagram travels as a sealed memfd, as
sd_journal_send() does.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass

from supervisord_vm.unitname import scope_name

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "supervisord-vm"

# journald maps a passed memfd only when exactly these seals are set; an unsealed fd it would
# accept only from a path under /dev/shm, /tmp or /var/tmp.
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

log = logging.getLogger(__name__)


def _field(key: str, value: str) -> bytes:
    """Encode one field; values with a newline use the length-prefixed binary form."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def entry(message: str, priority: int = logging.INFO, **fields: object) -> bytes:
    """One entry in journald's native format; ``priority`` is a ``logging`` level."""
    syslog_priority = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }.get(priority, 6)
    payload = _field("MESSAGE", message) + _field("PRIORITY", str(syslog_priority))
    payload += _field("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER)
    named = {key.upper(): value for key, value in fields.items() if value is not None}
    unit = object_unit(named)
    if unit is not None:
        named["OBJECT_SYSTEMD_UNIT"] = unit
    for key, value in named.items():
        payload += _field(key, str(value))
    return payload


# A VM name as definitions allow it (definition.py): only such a name is turned into a unit.
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def object_unit(fields: dict[str, object]) -> str | None:
    """The VM scope an entry is about (OBJECT_SYSTEMD_UNIT), from VM_UNIT or a valid VM_NAME.

    journald shows entries from root senders that carry it in `journalctl -u UNIT`, so a VM's
    lifecycle and audit entries sit beside QEMU's own output there. An explicit one stays.
    """
    if "OBJECT_SYSTEMD_UNIT" in fields:
        return None
    unit = fields.get("VM_UNIT")
    if isinstance(unit, str) and unit:
        return unit
    name = fields.get("VM_NAME")
    if isinstance(name, str) and _VM_NAME.match(name):
        return scope_name(name)
    return None


# Entries held while journald's queue is full (net.unix.max_dgram_qlen is only 10 where
# systemd-sysctl did not raise it, e.g. in a container): a burst of audit records keeps its
# fields instead of falling back to stderr. Beyond this, entries go to logging.
BACKLOG_LIMIT = 4096
# How long the writer waits for journald to take one entry before it gives that entry up.
WRITE_TIMEOUT = 10.0


@dataclass(frozen=True)
class _Waiting:
    payload: bytes
    message: str
    priority: int


class JournalSocket:
    """The daemon's datagram socket to journald's native socket at `path`.

    Not connected: each entry is addressed by path, so a restarted journald (a new socket at
    the same path) gets the next entry without reconnecting. The caller never waits: an entry
    journald cannot take at once (its queue is full) joins a bounded backlog, in order, that
    a writer thread hands over as journald reads.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, backlog_limit: int = BACKLOG_LIMIT) -> None:
        self.path = path
        self.backlog_limit = backlog_limit
        self.dropped = 0  # entries the backlog had no room for (they went to logging)
        self._socket: socket.socket | None = None
        self._lock = threading.Condition()  # entries may also come from worker threads
        self._backlog: collections.deque[_Waiting] = collections.deque()
        self._writer: threading.Thread | None = None
        self._closed = False

    def send(self, payload: bytes, message: str = "", priority: int = logging.INFO) -> bool:
        """Hand `payload` (one entry) to journald without waiting; False if it will not reach
        it (no journald: ENOENT, ECONNREFUSED; or the backlog is full): the caller then writes
        the entry elsewhere."""
        with self._lock:
            if self._backlog:  # behind the entries already waiting, to keep the order
                return self._hold(_Waiting(payload, message, priority))
        try:
            self._send(self._open(), payload)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.ENOBUFS):
                return False
            with self._lock:
                return self._hold(_Waiting(payload, message, priority))
        return True

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the backlog to reach journald; whether it did."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._backlog, timeout)

    def close(self) -> None:
        """Stop the writer; what still waits goes to logging (the process is ending)."""
        with self._lock:
            self._closed = True
            waiting = list(self._backlog)
            self._backlog.clear()
            self._lock.notify_all()
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        for entry_ in waiting:
            log.log(entry_.priority, "%s", entry_.message)

    def _open(self) -> socket.socket:
        with self._lock:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            return self._socket

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        try:
            sock.sendto(payload, self.path)
        except OSError as err:
            if err.errno != errno.EMSGSIZE:
                raise
            self._send_as_memfd(sock, payload)

    def _hold(self, waiting: _Waiting) -> bool:
        """Queue an entry for the writer (lock held); False when there is no room."""
        if self._closed or len(self._backlog) >= self.backlog_limit:
            self.dropped += 1
            return False
        self._backlog.append(waiting)
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(
                target=self._write_backlog, name="journal-backlog", daemon=True
            )
            self._writer.start()
        self._lock.notify()
        return True

    def _write_backlog(self) -> None:
        """Hand the backlog over in order, each entry waiting (bounded) for journald; end with
        it (the thread and its socket are made again by the next burst, not kept idle)."""
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.settimeout(WRITE_TIMEOUT)
            while True:
                with self._lock:
                    if self._closed or not self._backlog:
                        if self._writer is threading.current_thread():
                            self._writer = None  # the next held entry starts a new writer
                        return
                    waiting = self._backlog[0]
                try:
                    self._send(sock, waiting.payload)
                except OSError:  # journald gone or stuck: this entry goes to logging
                    with self._lock:
                        if self._closed:
                            return  # close() logged it with the rest
                    log.log(waiting.priority, "%s", waiting.message)
                with self._lock:
                    if self._backlog and self._backlog[0] is waiting:
                        self._backlog.popleft()
                    self._lock.notify_all()  # drain() waits for an empty backlog

    def _send_as_memfd(self, sock: socket.socket, payload: bytes) -> None:
        """Pass an entry larger than a datagram as a sealed memfd (journald reads it in place)."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            # An empty datagram with one fd is what journald takes as "the entry is in here".
            sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)


_journal = JournalSocket()


def send(message: str, priority: int = logging.INFO, **fields: object) -> None:
    """Write one journal entry with ``fields`` (upper-case names) next to MESSAGE.

    ``priority`` is a ``logging`` level; it becomes the syslog PRIORITY journald expects.
    Never raises and never waits: an audit trail that crashes or stalls the daemon would be
    worse than an entry that reaches the journal through stderr, without its fields.
    """
    if not _journal.send(entry(message, priority, **fields), message, priority):
        log.log(priority, "%s", message)


def finish(timeout: float = 2.0) -> None:
    """At exit: give journald a moment for the backlog, then log what is left elsewhere."""
    _journal.drain(timeout)
    _journal.close()
