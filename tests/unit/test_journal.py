"""Journal entries reach a journald-like socket with their fields, and never stall the sender.

A real AF_UNIX datagram socket bound in a temporary directory stands in for journald's.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_vm import journal


def _parse(payload: bytes) -> dict[str, str]:
    """journald's native format: KEY=value lines, or KEY, newline, u64 length, data, newline."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(payload):
        end = payload.index(b"\n", offset)
        line = payload[offset:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            offset = end + 1
        else:
            key = line
            (length,) = struct.unpack_from("<Q", payload, end + 1)
            start = end + 1 + 8
            value = payload[start : start + length]
            assert payload[start + length : start + length + 1] == b"\n"
            offset = start + length + 1
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound datagram socket where journald's would be (the test reads it, or does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "socket"))
        server.settimeout(30)  # a missing entry fails the test instead of hanging it
        yield server


@pytest.fixture
def sender(journald: socket.socket, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point journal.send() at the stand-in socket for this test."""
    sock = journal.JournalSocket(journald.getsockname())
    monkeypatch.setattr(journal, "_journal", sock)
    yield
    sock.close()


def _receive(server: socket.socket) -> dict[str, str]:
    return _receive_carried(server)[0]


def _receive_carried(server: socket.socket) -> tuple[dict[str, str], str]:
    """One entry and how it came: "datagram", or "memfd" (which must be sealed for journald)."""
    data, ancdata, _flags, _address = server.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    if not ancdata:
        return _parse(data), "datagram"
    assert data == b""
    level, kind, fd_bytes = ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", fd_bytes)[0]
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == journal._MEMFD_SEALS
        size = os.fstat(fd).st_size
        return _parse(os.pread(fd, size, 0)), "memfd"
    finally:
        os.close(fd)


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.usefixtures("sender")
def test_entry_arrives_with_its_fields(journald: socket.socket) -> None:
    journal.send("VM acc started", logging.WARNING, vm_name="acc", vm_pid=42, skipped=None)
    fields, carrier = _receive_carried(journald)
    assert carrier == "datagram"
    assert fields == {
        "MESSAGE": "VM acc started",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "supervisord-vm",
        "VM_NAME": "acc",
        "VM_PID": "42",
        "OBJECT_SYSTEMD_UNIT": "svm-acc.scope",  # `journalctl -u svm-acc.scope` shows it
    }


@pytest.mark.usefixtures("sender")
def test_multiline_value_arrives_whole(journald: socket.socket) -> None:
    journal.send("QEMU said\nline two", vm_detail="a=b\nc")
    fields = _receive(journald)
    assert fields["MESSAGE"] == "QEMU said\nline two"
    assert fields["VM_DETAIL"] == "a=b\nc"


@pytest.mark.usefixtures("sender")
def test_entry_larger_than_a_datagram_arrives_whole_as_sealed_memfd(
    journald: socket.socket,
) -> None:
    sndbuf = journal._journal._open().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    message = "x" * (4 * sndbuf)  # more than the socket can send in one datagram (EMSGSIZE)
    journal.send(message, vm_name="big")
    fields, carrier = _receive_carried(journald)
    assert carrier == "memfd"
    assert fields["MESSAGE"] == message
    assert fields["VM_NAME"] == "big"


@pytest.mark.usefixtures("sender")
def test_many_entries_share_one_socket(journald: socket.socket) -> None:
    journal.send("first")
    _receive(journald)
    before = _fd_count()
    for number in range(50):
        journal.send(f"entry {number}")
        assert _receive(journald)["MESSAGE"] == f"entry {number}"
    assert _fd_count() == before


@pytest.mark.usefixtures("sender")
def test_a_burst_beyond_journalds_queue_arrives_whole_and_in_order(
    journald: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """journald's queue takes few datagrams (max_dgram_qlen); a burst of audit records must
    keep its fields: the rest waits in the backlog and arrives once journald reads."""
    caplog.set_level(logging.INFO, logger=journal.__name__)
    burst = 300
    for number in range(burst):
        journal.send(f"entry {number}", logging.INFO, vm_result="denied")
    assert journal._journal._backlog, "the burst never filled the queue: the test proves nothing"
    received = [_receive(journald) for _ in range(burst)]
    assert [entry["MESSAGE"] for entry in received] == [f"entry {n}" for n in range(burst)]
    assert all(entry["VM_RESULT"] == "denied" for entry in received)
    assert not caplog.records


@pytest.mark.usefixtures("sender")
def test_a_drained_burst_leaves_no_writer_thread_or_socket_behind(
    journald: socket.socket,
) -> None:
    """The backlog's writer and its socket last as long as a burst: a daemon that met one
    full queue must not hold an extra fd for the rest of its life (the load test counts)."""
    journal.send("first")
    _receive(journald)
    before = _fd_count()
    for round_ in range(3):
        for number in range(100):
            journal.send(f"round {round_} entry {number}")
        assert journal._journal._backlog, "the burst never filled the queue"
        for _ in range(100):
            _receive(journald)
        assert journal._journal.drain(5.0)
        deadline = time.monotonic() + 5
        while journal._journal._writer is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert journal._journal._writer is None
        assert _fd_count() == before


@pytest.mark.usefixtures("sender")
def test_full_journal_socket_does_not_block_and_entries_go_to_logging(
    journald: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads the socket: its queue and the backlog fill, then entries are logged."""
    caplog.set_level(logging.INFO, logger=journal.__name__)
    outcome: list[int] = []

    def flood() -> None:
        for number in range(100_000):
            journal.send(f"entry {number}")
            if caplog.records:  # the queue is full: this one went to logging
                journal.send("after full", logging.ERROR)
                outcome.append(number)
                return

    # A blocking send would hang here forever; the thread lets the test fail instead.
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "journal.send blocked on a full socket"
    assert outcome, "the socket never filled"
    logged = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert logged[-1] == (logging.ERROR, "after full")
    # What was queued before it filled up is intact.
    assert _receive(journald)["MESSAGE"] == "entry 0"


def test_missing_journal_socket_falls_back_to_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sock = journal.JournalSocket(str(tmp_path / "no-such-socket"))
    monkeypatch.setattr(journal, "_journal", sock)
    caplog.set_level(logging.INFO, logger=journal.__name__)
    try:
        journal.send("nobody listens", logging.WARNING)
    finally:
        sock.close()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "nobody listens")
    ]


def test_object_unit_names_the_vm_scope_from_vm_unit_or_a_valid_vm_name() -> None:
    assert journal.object_unit({"VM_UNIT": "svm-a\\x2db.scope"}) == "svm-a\\x2db.scope"
    assert journal.object_unit({"VM_NAME": "acc-a"}) == "svm-acc\\x2da.scope"
    assert journal.object_unit({"VM_NAME": "../etc"}) is None  # not a VM name: no unit
    assert journal.object_unit({"VM_NAME": "a", "OBJECT_SYSTEMD_UNIT": "x.service"}) is None
    assert journal.object_unit({"VM_OPERATION": "define"}) is None
