"""Structured journal entries (audit records, lifecycle records) without python3-systemd.

journald's native protocol is one datagram of KEY=value lines; speaking it directly keeps the
service's venv free of a compiled binding. Outside systemd (no journal socket) the entry goes to
the ``logging`` module instead, so nothing is lost in tests or foreground runs.
"""

from __future__ import annotations

import logging
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "supervisord-vm"

log = logging.getLogger(__name__)


def _field(key: str, value: str) -> bytes:
    """Encode one field; values with a newline use the length-prefixed binary form."""
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def send(message: str, priority: int = logging.INFO, **fields: object) -> None:
    """Write one journal entry with ``fields`` (upper-case names) next to MESSAGE.

    ``priority`` is a ``logging`` level; it becomes the syslog PRIORITY journald expects.
    Never raises: an audit trail that crashes the daemon would be worse than a missing entry.
    """
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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, JOURNAL_SOCKET)
    except OSError:
        log.log(priority, "%s", message)
