"""QEMU's own output in the journal: sent there from inside the VM's scope, read back bounded.

At each start the spawn trampoline, already in the scope, connects QEMU's stdout (priority
info) and stderr (warning) to journald's stream socket under the identifier ``qemu-NAME``
(_spawn_trampoline.connect_journal_streams). journald takes the peer's cgroup at connect time,
so every line carries ``_SYSTEMD_UNIT=svm-NAME.scope``: ``journalctl -u svm-NAME.scope`` shows it
beside the daemon's lifecycle entries (OBJECT_SYSTEMD_UNIT, journal.py), and journald bounds,
rate-limits and rotates it like any unit's output. QEMU never waits for the daemon.

The daemon reads it back with journalctl (it is root; group members of supervisord-vm get it
through GetLog without journal access of their own), always bounded: at most LINES_MAX
entries, at most the caller's byte limit kept in memory, and READ_TIMEOUT for the whole read.
Where journald's stream socket is missing (a host or container without journald), QEMU writes
to the log files of qemu_log.py instead: that is the only fallback.
"""

from __future__ import annotations

import collections
import contextlib
import json
import stat
import subprocess
import threading
import time
from pathlib import Path

from supervisord_vm import _spawn_trampoline

STREAM_SOCKET = Path(_spawn_trampoline.JOURNAL_STREAM_SOCKET)
STREAM_ENV = _spawn_trampoline.JOURNAL_STREAM_ENV
UNIT_ENV = _spawn_trampoline.JOURNAL_UNIT_ENV
JOURNALCTL = "journalctl"
# "As much as is kept" (GetLog with 0 lines) reads at most this many entries.
LINES_MAX = 5000
# One whole read (journalctl --sync included) is given up after this long.
READ_TIMEOUT = 10.0
SYNC_TIMEOUT = 5.0


def identifier(name: str) -> str:
    """QEMU's SYSLOG_IDENTIFIER for VM `name` (`journalctl -t qemu-NAME`)."""
    return f"qemu-{name}"


def stream_available(socket_path: Path = STREAM_SOCKET) -> bool:
    """Whether journald's stream socket is there (blocking: one stat)."""
    try:
        return stat.S_ISSOCK(socket_path.stat().st_mode)
    except OSError:
        return False


def journalctl_argv(unit: str, lines: int, *, pid: int = 0, since: float = 0.0) -> list[str]:
    """journalctl reading what the processes of scope `unit` wrote (QEMU's output only: the
    daemon's entries about the VM match OBJECT_SYSTEMD_UNIT, not _SYSTEMD_UNIT)."""
    count = min(lines, LINES_MAX) if lines > 0 else LINES_MAX
    argv = [
        JOURNALCTL,
        "--no-pager",
        "--quiet",
        "--all",
        "--output=json",
        "--output-fields=MESSAGE,SYSLOG_IDENTIFIER,_PID",
        f"--lines={count}",
    ]
    if since:
        # Not --boot: in the service's sandbox (ProtectHostname= and the like) journalctl then
        # found nothing (checked on systemd 252).
        argv.append(f"--since=@{int(since)}")
    argv.append(f"_SYSTEMD_UNIT={unit}")
    if pid:
        argv.append(f"_PID={pid}")
    return argv


def format_entry(line: bytes, *, with_prefix: bool = True) -> str | None:
    """One journalctl JSON line as text: "TIME IDENT[PID]: MESSAGE\\n" (or the message alone).

    A MESSAGE that is not valid UTF-8 comes as an array of bytes: decoded with replacement.
    None for a line that is not an entry.
    """
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    message = data.get("MESSAGE")
    if isinstance(message, list):
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    elif not isinstance(message, str):
        message = ""
    if not with_prefix:
        return message + "\n"
    try:
        stamp = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(int(data.get("__REALTIME_TIMESTAMP", 0)) / 1e6)
        )
    except (TypeError, ValueError, OverflowError):
        stamp = "-"
    ident = data.get("SYSLOG_IDENTIFIER") or "qemu"
    pid = data.get("_PID") or "?"
    return f"{stamp} {ident}[{pid}]: {message}\n"


def read_output(
    unit: str,
    *,
    lines: int,
    max_bytes: int,
    pid: int = 0,
    since: float = 0.0,
    sync: bool = False,
    with_prefix: bool = True,
    timeout: float = READ_TIMEOUT,
) -> str:
    """The newest `lines` (0: up to LINES_MAX) lines QEMU wrote in scope `unit`, at most
    `max_bytes` characters of them (the newest). Blocking: call it in a worker thread.

    `pid`, `since`: only that process's lines since then (one start's). `sync`: first
    have journald store what it has received (what a QEMU that just exited wrote; root only).
    "" when the journal cannot be read (no journalctl, a timeout): never raises for that.
    """
    deadline = time.monotonic() + timeout
    if sync:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [JOURNALCTL, "--sync"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=min(SYNC_TIMEOUT, timeout),
                check=False,
            )
    argv = journalctl_argv(unit, lines, pid=pid, since=since)
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError:
        return ""
    # journalctl stuck on a huge or damaged journal is killed; its output so far counts.
    killer = threading.Timer(max(deadline - time.monotonic(), 0.0), process.kill)
    killer.start()
    tail: collections.deque[str] = collections.deque()
    size = 0
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            text = format_entry(raw, with_prefix=with_prefix)
            if text is None:
                continue
            tail.append(text)
            size += len(text)
            while size > max_bytes and len(tail) > 1:
                size -= len(tail.popleft())
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    text = "".join(tail)
    return text[-max_bytes:] if len(text) > max_bytes else text
