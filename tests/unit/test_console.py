"""The serial console's pieces without QEMU: the scrollback, the log on disk, QEMU's arguments,
and the relay between a serial socket and clients (real unix sockets; the QEMU end is played
by the test). With real QEMU and systemd: tests/integration/test_console.py."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisord_vm import console
from supervisord_vm.console import (
    ConsoleBusy,
    ConsoleManager,
    ConsoleUnavailable,
    Scrollback,
    append_log,
    last_lines,
    read_log_tail,
    rotated_path,
)
from supervisord_vm.definition import parse_definition
from supervisord_vm.model import Caller
from supervisord_vm.qemu import LaunchResources, build_argv, serial_console_args
from supervisord_vm.store import Paths

WAIT = 10.0

# --- the scrollback ------------------------------------------------------------------------------


def test_scrollback_keeps_the_newest_bytes_and_counts_all() -> None:
    ring = Scrollback(8)
    ring.append(b"abc")
    ring.append(b"defghijk")
    assert ring.total == 11
    assert ring.tail(8) == b"defghijk"
    assert ring.tail(3) == b"ijk"


def test_scrollback_memory_stays_bounded_when_fed_byte_by_byte() -> None:
    ring = Scrollback(64)
    for index in range(10_000):
        ring.append(bytes([index % 251]))
        assert len(ring._buffer) < 2 * 64
    assert ring.total == 10_000
    assert ring.tail(64) == bytes(i % 251 for i in range(10_000 - 64, 10_000))


def test_scrollback_since_says_how_much_a_reader_missed() -> None:
    ring = Scrollback(4)
    ring.append(b"0123456789")  # 10 bytes at once: only the newest 4 are sure to be kept
    data, skipped = ring.since(0)
    assert data.endswith(b"6789") and skipped == 10 - len(data)
    assert ring.since(8) == (b"89", 0)
    assert ring.since(10) == (b"", 0)


def test_last_lines() -> None:
    assert last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert last_lines(b"a\nb\nc", 1) == b"c"
    assert last_lines(b"a\nb\n", 0) == b"a\nb\n"


# --- the log on disk -----------------------------------------------------------------------------


def test_log_rotates_and_stays_about_twice_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "console" / "vm.log"
    for index in range(100):
        append_log(path, f"line {index:03d}\n".encode() * 10, limit=1000)
    assert path.stat().st_size <= 1000
    assert rotated_path(path).stat().st_size <= 1000
    assert path.parent.stat().st_mode & 0o777 == 0o750
    assert path.stat().st_mode & 0o777 == 0o640
    # The newest output reads across both generations, in order.
    tail = read_log_tail(path, 1500)
    assert tail.endswith(b"line 099\n")
    lines = tail.decode().splitlines()
    numbers = [int(line.split()[1]) for line in lines[1:]]
    assert numbers == sorted(numbers)


def test_reading_a_missing_log_is_empty(tmp_path: Path) -> None:
    assert read_log_tail(tmp_path / "none.log", 100) == b""


def test_console_files_cannot_collide_with_other_vms_files() -> None:
    paths = Paths(runtime_dir=Path("/run/x"), log_dir=Path("/var/log/x"))
    assert console.log_path(paths, "web1") == Path("/var/log/x/console/web1.log")
    assert console.socket_path(paths, "web1") == Path("/run/x/web1.console")
    # QEMU's log of a VM named "a.console" is /var/log/x/a.console.log: another directory.
    assert console.log_path(paths, "a").parent != Path("/var/log/x")


# --- QEMU's arguments ----------------------------------------------------------------------------

DEFINITION = 'name = "web1"\nextra_args = ["-serial", "null"]\n'


def test_serial_console_args_use_the_daemons_listening_socket() -> None:
    assert serial_console_args(7) == [
        "-chardev",
        "socket,id=serial0,fd=7,server=on,wait=off",
        "-serial",
        "chardev:serial0",
    ]


def test_the_console_is_the_first_serial_port_before_extra_args() -> None:
    defn = parse_definition(DEFINITION)
    resources = LaunchResources(qmp_socket=Path("/run/x/web1.qmp"), console_fd=9, pass_fds=[9])
    argv = build_argv(defn, resources.qmp_socket, resources)
    assert argv[-2:] == ["-serial", "null"]
    ours = argv.index("socket,id=serial0,fd=9,server=on,wait=off")
    assert argv[ours + 1 : ours + 3] == ["-serial", "chardev:serial0"]
    assert ours < len(argv) - 2


def test_no_console_arguments_without_a_console_fd() -> None:
    defn = parse_definition(DEFINITION)
    argv = build_argv(defn, Path("/run/x/web1.qmp"))
    assert not any("chardev" in arg for arg in argv)


# --- the relay -----------------------------------------------------------------------------------


@dataclass
class Serial:
    """The test's stand-in for QEMU's end: the connection QEMU would accept."""

    sock: socket.socket
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_until(self, marker: bytes) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.reader.readuntil(marker)


async def accept_as_qemu(listener_fd: int) -> Serial:
    """Accept the daemon's queued connection on (a duplicate of) the listening socket."""
    listener = socket.socket(fileno=listener_fd)
    try:
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            conn, _ = await loop.sock_accept(listener)
    finally:
        listener.close()
    reader, writer = await asyncio.open_unix_connection(sock=conn)
    return Serial(conn, reader, writer)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ConsoleManager]:
    paths = Paths(runtime_dir=tmp_path / "run", log_dir=tmp_path / "log")
    consoles = ConsoleManager(paths, log_limit=4096)
    yield consoles
    await consoles.close()


async def start_console(manager: ConsoleManager, name: str = "vm") -> Serial:
    """prepare() + started(), with the test accepting as QEMU would."""
    prepared = manager.prepare(name)
    qemu_copy = socket.dup(prepared.listen_fd)  # what QEMU inherits
    await manager.started(name, prepared)
    return await accept_as_qemu(qemu_copy)


async def recorded(manager: ConsoleManager, name: str, total: int) -> None:
    """Wait until the daemon's end has read `total` bytes of output in all."""
    state = manager._consoles[name]
    async with asyncio.timeout(WAIT):
        while state.scrollback.total < total:  # noqa: ASYNC110 - a counter, no event
            await asyncio.sleep(0.01)


async def client_streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(sock=sock, limit=4 << 20)


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    async with asyncio.timeout(WAIT):
        return await reader.readuntil(marker)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT):
        return await reader.read()


async def test_output_from_before_qemu_accepts_is_recorded_and_relayed(
    manager: ConsoleManager,
) -> None:
    prepared = manager.prepare("vm")
    assert prepared.path.stat().st_mode & 0o777 == 0o600
    qemu_copy = socket.dup(prepared.listen_fd)
    await manager.started("vm", prepared)
    serial = await accept_as_qemu(qemu_copy)
    before = manager._consoles["vm"].scrollback.total
    serial.writer.write(b"booting\r\n")
    await serial.writer.drain()
    await recorded(manager, "vm", before + 9)
    client = await manager.open("vm", Caller(1000, 42), force=False)
    reader, writer = await client_streams(client)
    serial.writer.write(b"login: ")
    await serial.writer.drain()
    # A client gets what comes after it attached (as virsh console): no replay.
    assert await read_until(reader, b"login: ") == b"login: "
    writer.write(b"root\r")
    await writer.drain()
    assert await serial.read_until(b"\r") == b"root\r"
    log = await manager.read_log("vm", 1000)
    assert log.endswith(b"booting\r\nlogin: ")
    assert b"VM vm started" in log
    writer.close()
    serial.writer.close()


async def test_a_second_client_is_busy_unless_it_forces(manager: ConsoleManager) -> None:
    serial = await start_console(manager)
    first = await manager.open("vm", Caller(1000, 42), force=False)
    with pytest.raises(ConsoleBusy, match=r"in use by another client \(uid 1000, pid 42"):
        await manager.open("vm", Caller(1001, 43), force=False)
    second = await manager.open("vm", Caller(1001, 43), force=True)
    first_reader, _first_writer = await client_streams(first)
    # The first one is told, then disconnected.
    assert b"console taken over by uid 1001, pid 43" in await read_to_eof(first_reader)
    second_reader, _second_writer = await client_streams(second)
    serial.writer.write(b"for the second\n")
    assert await read_until(second_reader, b"\n") == b"for the second\n"
    _second_writer.close()
    _first_writer.close()
    serial.writer.close()


async def test_detaching_frees_the_console_for_the_next_client(manager: ConsoleManager) -> None:
    serial = await start_console(manager)
    first = await manager.open("vm", None, force=False)
    first.close()  # svmctl exits: the daemon's end sees EOF
    async with asyncio.timeout(WAIT):
        while True:
            try:
                second = await manager.open("vm", None, force=False)
                break
            except ConsoleBusy:
                await asyncio.sleep(0.01)
    second.close()
    serial.writer.close()


async def test_qemus_end_closing_ends_the_client_and_release_removes_the_socket(
    manager: ConsoleManager,
) -> None:
    serial = await start_console(manager)
    client = await manager.open("vm", None, force=False)
    reader, writer = await client_streams(client)
    serial.writer.write(b"last words\n")
    await serial.writer.drain()
    serial.writer.close()  # QEMU exits
    assert await read_to_eof(reader) == b"last words\n"
    await manager.release("vm")
    assert not console.socket_path(manager.paths, "vm").exists()
    assert (await manager.read_log("vm", 1000)).endswith(b"last words\n")
    with pytest.raises(ConsoleUnavailable):
        await manager.open("vm", None, force=False)
    writer.close()


async def test_a_slow_client_misses_output_but_holds_nothing_up(manager: ConsoleManager) -> None:
    serial = await start_console(manager)
    client = await manager.open("vm", None, force=False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"x" * 4095 + b"\n"
    for _ in range(256):  # 1 MiB the client does not read
        serial.writer.write(chunk)
        await serial.writer.drain()  # never waits long: the daemon reads QEMU's end at once
    serial.writer.write(b"END\n")
    await serial.writer.drain()
    state = manager._consoles["vm"]
    await recorded(manager, "vm", 256 * 4096 + 4)
    queued = state._client.transport.get_write_buffer_size()  # type: ignore[union-attr]
    assert queued <= console.CLIENT_OUTPUT_LIMIT + 200  # and the note on what was skipped
    reader, writer = await client_streams(client)
    reading = asyncio.ensure_future(read_until(reader, b"AFTER\n"))
    async with asyncio.timeout(WAIT):  # the client catches up ...
        while state._client.transport.get_write_buffer_size():  # type: ignore[union-attr]  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    serial.writer.write(b"AFTER\n")  # ... and is told what it missed before what comes next
    received = await reading
    assert received.endswith(
        b"bytes of output skipped: this client read too slowly; "
        b"svmctl console --log has them]\r\nAFTER\n"
    )
    # Every byte was either delivered or counted as skipped (kernel socket buffers took some).
    notes = re.findall(rb"\r\n\[supervisord-vm: (\d+) bytes of output skipped[^]]*\]\r\n", received)
    delivered = re.sub(rb"\r\n\[supervisord-vm: [^]]*\]\r\n", b"", received)
    assert notes and sum(int(n) for n in notes) + len(delivered) == (
        256 * len(chunk) + len(b"END\n") + len(b"AFTER\n")
    )
    # All of it is in the log, as far as the log keeps it.
    assert (await manager.read_log("vm", 4096)).endswith(b"END\nAFTER\n")
    writer.close()
    serial.writer.close()


async def test_a_guest_that_does_not_read_stops_only_its_clients_input(
    manager: ConsoleManager,
) -> None:
    serial = await start_console(manager)
    serial.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client = await manager.open("vm", None, force=False)
    client.setblocking(False)
    state = manager._consoles["vm"]
    block = b"y" * 65536
    async with asyncio.timeout(WAIT):  # until the client's writes are no longer taken
        while not state.input_paused:
            try:
                client.send(block)
            except BlockingIOError:
                await asyncio.sleep(0.01)
    queued = state._qemu.get_write_buffer_size()  # type: ignore[union-attr]
    assert queued <= console.QEMU_INPUT_LIMIT + 256 * 1024  # the limit plus one read
    assert state.input_paused
    # Output still flows the other way.
    serial.writer.write(b"still here\n")
    reader, writer = await client_streams(client)
    assert await read_until(reader, b"still here\n")
    writer.close()
    serial.writer.close()


async def test_reconnect_after_the_daemon_let_go(manager: ConsoleManager) -> None:
    prepared = manager.prepare("vm")
    qemu_listener = socket.socket(fileno=socket.dup(prepared.listen_fd))
    await manager.started("vm", prepared)
    qemu_listener.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT):
        first, _ = await loop.sock_accept(qemu_listener)
    await manager.detach("vm")  # the daemon stops; QEMU keeps its listening socket
    assert console.socket_path(manager.paths, "vm").exists()
    reconnect = asyncio.ensure_future(manager.reconnect("vm"))
    async with asyncio.timeout(WAIT):
        second, _ = await loop.sock_accept(qemu_listener)
    await reconnect
    _reader, writer = await asyncio.open_unix_connection(sock=second)
    writer.write(b"after restart\n")
    await writer.drain()
    client = await manager.open("vm", None, force=False)
    client_reader, client_writer = await client_streams(client)
    writer.write(b"seen\n")
    assert await read_until(client_reader, b"seen\n")
    log = await manager.read_log("vm", 4096)
    assert b"reconnected" in log and log.endswith(b"after restart\nseen\n")
    client_writer.close()
    writer.close()
    first.close()
    qemu_listener.close()


async def test_reconnect_without_a_socket_leaves_no_console(manager: ConsoleManager) -> None:
    await manager.reconnect("old")  # a VM started before consoles existed: no error
    with pytest.raises(ConsoleUnavailable):
        await manager.open("old", None, force=False)


async def test_a_failed_start_leaves_no_socket(manager: ConsoleManager) -> None:
    prepared = manager.prepare("vm")
    prepared.discard()
    assert not prepared.path.exists()


async def test_a_taken_over_client_that_never_reads_is_cut_off(
    manager: ConsoleManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "DISCONNECT_GRACE", 0.1)
    serial = await start_console(manager)
    first = await manager.open("vm", None, force=False)  # never read
    state = manager._consoles["vm"]
    daemon_end = state._client
    assert daemon_end is not None and daemon_end.transport is not None
    for _ in range(256):  # more than the kernel buffers: the daemon's end queues output
        serial.writer.write(b"z" * 4095 + b"\n")
        await serial.writer.drain()
    await recorded(manager, "vm", 256 * 4096)
    assert daemon_end.transport.get_write_buffer_size() > 0
    second = await manager.open("vm", None, force=True)
    sock = daemon_end.transport.get_extra_info("socket")
    async with asyncio.timeout(WAIT):  # its socket is closed although output is still queued
        while sock.fileno() != -1:  # noqa: ASYNC110 - a descriptor, no event
            await asyncio.sleep(0.02)
    first.close()
    second.close()
    serial.writer.close()


async def test_sweep_removes_the_sockets_of_vms_that_do_not_run(manager: ConsoleManager) -> None:
    runtime = manager.paths.runtime_dir
    runtime.mkdir(parents=True)
    for name in ("running", "gone"):
        (runtime / f"{name}.console").touch()
    (runtime / "gone.json").touch()  # not a console socket: not the sweep's business
    await manager.sweep(keep={"running"})
    assert sorted(p.name for p in runtime.iterdir()) == ["gone.json", "running.console"]


async def test_output_is_read_from_memory_when_the_log_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "log").write_text("a file where the log directory should be")
    consoles = ConsoleManager(Paths(runtime_dir=tmp_path / "run", log_dir=tmp_path / "log"))
    try:
        serial = await start_console(consoles)
        before = consoles._consoles["vm"].scrollback.total
        serial.writer.write(b"kept in memory\n")
        await serial.writer.drain()
        await recorded(consoles, "vm", before + 15)
        assert (await consoles.read_log("vm", 1000)).endswith(b"kept in memory\n")
        assert "cannot write its console log" in caplog.text
        serial.writer.close()
    finally:
        await consoles.close()


async def test_letting_go_of_many_consoles_waits_for_a_hung_disk_once(
    manager: ConsoleManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waits for the logs run together (one bound for all, not one per VM)."""
    release = threading.Event()
    monkeypatch.setattr(console, "append_log", lambda *_args: release.wait(WAIT))
    monkeypatch.setattr(console, "SETTLE_TIMEOUT", 0.2)
    waiting: list[int] = []
    most = 0
    real_wait_idle = console.LogWriter.wait_idle

    async def wait_idle(writer: console.LogWriter, timeout: float) -> bool:  # noqa: ASYNC109
        nonlocal most
        waiting.append(1)
        most = max(most, len(waiting))
        try:
            return await real_wait_idle(writer, timeout)
        finally:
            waiting.pop()

    monkeypatch.setattr(console.LogWriter, "wait_idle", wait_idle)
    serials = [await start_console(manager, f"vm{index}") for index in range(4)]
    try:
        await manager.close()  # every writer is stuck in the disk
        assert most == 4
    finally:
        release.set()
        for serial in serials:
            serial.writer.close()
