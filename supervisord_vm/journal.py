"""Structured journal entries (audit records, lifecycle records) without python3-systemd.

journald's native protocol is one datagram of KEY=value lines; speaking it directly keeps the
service's venv free of a compiled binding. Outside systemd (no journal socket) the entry goes to
the ``logging`` module instead, so nothing is lost in tests or foreground runs.

Entries are sent from the event loop, so sending never blocks: one non-blocking socket serves
every entry, and when journald's queue is full (it is slow or stopped) the entry goes to the
``logging`` module (stderr, which journald also reads) instead of waiting. An entry too large
for one datagram travels as a sealed memfd, as sd_journal_send() does.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import threading

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
    for key, value in fields.items():
        if value is not None:
            payload += _field(key.upper(), str(value))
    return payload


class JournalSocket:
    """The daemon's one datagram socket to journald's native socket at `path`.

    Not connected: each entry is addressed by path, so a restarted journald (a new socket at
    the same path) gets the next entry without reconnecting.
    """

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()  # entries may also come from worker threads

    def send(self, payload: bytes) -> bool:
        """Hand `payload` (one entry) to journald without waiting; False if it did not take it.

        False covers a full queue (EAGAIN, ENOBUFS), no journald (ENOENT, ECONNREFUSED) and
        any other OSError: the caller then writes the entry elsewhere.
        """
        try:
            sock = self._open()
            try:
                sock.sendto(payload, self.path)
            except OSError as err:
                if err.errno != errno.EMSGSIZE:
                    raise
                self._send_as_memfd(sock, payload)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _open(self) -> socket.socket:
        with self._lock:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            return self._socket

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
    if not _journal.send(entry(message, priority, **fields)):
        log.log(priority, "%s", message)
