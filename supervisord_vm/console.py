"""Every VM's serial console, whose other end the daemon keeps: recorded and relayed.

QEMU's first serial port is a socket chardev on a listening unix socket the daemon binds (0600,
root only, in its runtime directory) and hands over as an open descriptor (`-chardev
socket,fd=N,server=on`, as libvirt passes its monitor socket), so it works whatever user QEMU
runs as. The daemon is that
socket's client for the VM's whole life (it connects even before QEMU runs, so no output from
the first instruction on is missed) and reconnects after its own restart. What the guest
writes goes into a bounded in-memory scrollback and, written behind in a worker thread, into a
bounded log on disk (LOG_DIR/console/NAME.log, one older generation NAME.log.1); while a client
is attached (D-Bus OpenConsole: one end of a socket pair), it is relayed both ways.

One interactive client at a time, as `virsh console`: a second one is refused (ConsoleBusy)
unless it forces its way in, which disconnects the first. Two people typing into one serial
line at once would garble each other's input; libvirt users expect exactly this rule.

Nothing here waits for anything slow: the guest's output is always read at once (QEMU's serial
port never waits for the daemon), a client that reads slowly misses output (it stays in the
log) instead of holding anything up, a guest that reads its input slowly stops only its own
client's input (back-pressure through the socket pair), and the disk is written from a worker
thread. Output QEMU produces while no daemon is connected (between a daemon's exit and the next
one's reconnect) is dropped by QEMU and missing from the log; the log says where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from supervisord_vm.definition import validate_name
from supervisord_vm.errors import Busy, SvmError
from supervisord_vm.model import Caller
from supervisord_vm.store import Paths

log = logging.getLogger(__name__)

# The newest output kept in memory per VM (the write-behind buffer of the log, too): a few
# screens of a chatty boot. At most twice this is held between trims.
SCROLLBACK_BYTES = 64 * 1024
# Bytes per log generation; with NAME.log.1 a VM keeps at most about twice this on disk.
LOG_LIMIT = 1 << 20
# The most one GetConsoleLog call returns.
TAIL_LIMIT = 1 << 20
# Output queued for an attached client that reads slowly; beyond it, output is skipped for that
# client (with a note once it catches up) rather than buffered without end.
CLIENT_OUTPUT_LIMIT = 64 * 1024
# Input queued for a guest that does not read its serial port: the client's socket is not read
# further until the guest catches up, so typing ahead costs memory only up to this.
QEMU_INPUT_LIMIT = 64 * 1024
# How long output is gathered before it goes to disk: a guest printing byte by byte costs a
# write per batch, not one per byte.
FLUSH_DELAY = 0.05
CONNECT_TIMEOUT = 5.0  # reconnecting after a daemon restart (QEMU accepts in its main loop)
SETTLE_TIMEOUT = 2.0  # at an exit: for QEMU's end of the socket to close, for the log to be written
DISCONNECT_GRACE = 5.0  # a disconnected client gets this long to read its last output


class ConsoleBusy(Busy):
    """Another client is attached to the VM's console (take it over with force)."""


class ConsoleUnavailable(SvmError):
    """The VM runs, but the daemon has no connection to its serial console."""


def socket_path(paths: Paths, name: str) -> Path:
    """The console's listening socket, in the daemon's runtime directory (0600: root only)."""
    return paths.runtime_dir / f"{validate_name(name)}.console"


def log_path(paths: Paths, name: str) -> Path:
    """The console log, in a directory of its own: no VM name can make it collide with the
    QEMU log of another VM (NAME.log), and the QEMU log bounder does not touch it."""
    return paths.log_dir / "console" / f"{validate_name(name)}.log"


def last_lines(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data` (0: all of it)."""
    if not lines:
        return data
    return b"".join(data.splitlines(keepends=True)[-lines:])


# --- the scrollback ------------------------------------------------------------------------------


class Scrollback:
    """The newest `capacity` bytes of a stream, and how many bytes the stream has had in all.

    Positions are offsets in the whole stream, so a reader that is behind (the log writer) can
    ask for everything since its position and learn how much it missed.
    """

    def __init__(self, capacity: int = SCROLLBACK_BYTES) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.total = 0
        self._buffer = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        self._buffer += data
        # Trimmed only once twice the capacity is reached: a guest writing byte by byte must
        # not cost a move of the whole buffer per byte.
        if len(self._buffer) >= 2 * self.capacity:
            del self._buffer[: len(self._buffer) - self.capacity]

    @property
    def start(self) -> int:
        """The stream position of the oldest byte still kept."""
        return self.total - min(len(self._buffer), self.capacity)

    def since(self, position: int) -> tuple[bytes, int]:
        """The bytes from stream `position` on, and how many bytes after it are gone already."""
        first = max(position, self.start)
        skipped = first - position
        return bytes(self._buffer[len(self._buffer) - (self.total - first) :]), skipped

    def tail(self, max_bytes: int) -> bytes:
        """The newest `max_bytes` kept (at most `capacity`)."""
        data, _ = self.since(max(self.total - max_bytes, 0))
        return data


# --- the log on disk (blocking functions: worker threads only) ------------------------------

# Held while a log's generations move and while both are read, so a reader never sees a
# generation twice or not at all. One lock for all VMs: it is held for one small write or read.
_generation_lock = threading.Lock()


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def append_log(path: Path, data: bytes, limit: int) -> None:
    """Append `data` to the console log `path`, first moving a log that would pass `limit` to
    NAME.log.1 (replacing the older one). The daemon is the only writer: a rename suffices."""
    with _generation_lock:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            size = 0
        if size and size + len(data) > limit:
            path.replace(rotated_path(path))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def read_log_tail(path: Path, max_bytes: int) -> bytes:
    """The newest `max_bytes` of console log `path`, continued into NAME.log.1 when NAME.log
    holds less. Missing files read as empty."""
    with _generation_lock:
        current = _read_end(path, max_bytes)
        if len(current) >= max_bytes:
            return current
        return _read_end(rotated_path(path), max_bytes - len(current)) + current


def _read_end(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            stream.seek(max(size - max_bytes, 0))
            return stream.read(max_bytes)
    except FileNotFoundError:
        return b""


class LogWriter:
    """Writes a console's scrollback behind to disk, one batch at a time in a worker thread.

    The scrollback is the buffer: the writer remembers how far it has written, and what the
    scrollback dropped before the writer got to it (a disk slower than the guest) is replaced
    in the log by a note saying how much is missing.
    """

    def __init__(self, name: str, path: Path, scrollback: Scrollback, limit: int) -> None:
        self.name = name
        self.path = path
        self._scrollback = scrollback
        self._limit = limit
        self._position = scrollback.total
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()  # someone waits for the log: no FLUSH_DELAY
        self.failed = False

    def schedule(self) -> None:
        """There is new output: write it soon (FLUSH_DELAY gathers a burst into one write), at
        once when half the scrollback waits already (a fast guest must not outrun the log)."""
        if self._scrollback.total - self._position >= self._scrollback.capacity // 2:
            self._hurry.set()
        if self._task is None:
            self._idle.clear()
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name=f"console-log:{self.name}"
            )

    async def _drain(self) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), FLUSH_DELAY)
            while self._position < self._scrollback.total:
                data, skipped = self._scrollback.since(self._position)
                self._position = self._scrollback.total
                if skipped:
                    note = f"\n[supervisord-vm: {skipped} bytes of console output not logged]\n"
                    data = note.encode() + data
                try:
                    await asyncio.to_thread(append_log, self.path, data, self._limit)
                except OSError as err:
                    if not self.failed:
                        log.warning("VM %s: cannot write its console log: %s", self.name, err)
                    self.failed = True
                else:
                    self.failed = False
        finally:
            self._task = None
            self._hurry.clear()
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait (bounded) until everything recorded so far is on disk; False if it is not."""
        self._hurry.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._position < self._scrollback.total or self._task is not None:
                    await self._idle.wait()
        return self._position >= self._scrollback.total and self._task is None


# --- the relay ---------------------------------------------------------------------------------


class _QemuSide(asyncio.Protocol):
    """The daemon's connection to QEMU's serial chardev."""

    def __init__(self, console: Console, note: str) -> None:
        self._console = console
        self._note = note

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._note:  # before any output this connection brings
            self._console.note(self._note)

    def data_received(self, data: bytes) -> None:
        self._console.output(data)

    def eof_received(self) -> bool:
        return False  # QEMU closed its end: close ours (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._console.qemu_lost(exc)

    def pause_writing(self) -> None:
        self._console.pause_input(True)

    def resume_writing(self) -> None:
        self._console.pause_input(False)


class _Client(asyncio.Protocol):
    """One attached client: the daemon's end of the socket pair it was given."""

    def __init__(self, console: Console, caller: Caller | None) -> None:
        self._console = console
        self.caller = caller
        self.since = time.time()
        self.transport: asyncio.Transport | None = None
        self.skipped = 0

    def describe(self) -> str:
        who = f"uid {self.caller.uid}, pid {self.caller.pid}, " if self.caller else ""
        return f"{who}since {time.strftime('%H:%M:%S', time.localtime(self.since))}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._console.input_paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._console.input(self, data)

    def eof_received(self) -> bool:
        return False  # the client detached (or its input ended): close

    def connection_lost(self, exc: Exception | None) -> None:
        self._console.client_gone(self)

    def send(self, data: bytes) -> None:
        """Output for the client, skipped while it has CLIENT_OUTPUT_LIMIT unread already."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        room = CLIENT_OUTPUT_LIMIT - transport.get_write_buffer_size()
        if room <= 0:
            self.skipped += len(data)
            return
        if self.skipped:
            transport.write(
                f"\r\n[supervisord-vm: {self.skipped} bytes of output skipped: this client "
                "read too slowly; svmctl console --log has them]\r\n".encode()
            )
            self.skipped = 0
        if len(data) > room:
            self.skipped += len(data) - room
            data = data[:room]
        transport.write(data)

    def disconnect(self, note: str = "") -> None:
        """Close the client's connection, after `note` (for a person) and any queued output."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if note:
            transport.write(f"\r\n[supervisord-vm: {note}]\r\n".encode())
        transport.close()
        # A client that never reads would keep its queued output, and its socket, forever.
        asyncio.get_running_loop().call_later(DISCONNECT_GRACE, transport.abort)


class Console:
    """One VM's serial console while the daemon is connected to it."""

    def __init__(self, name: str, log_file: Path, log_limit: int) -> None:
        self.name = name
        self.scrollback = Scrollback()
        self.log = LogWriter(name, log_file, self.scrollback, log_limit)
        self._qemu: asyncio.Transport | None = None
        self._client: _Client | None = None
        self.input_paused = False
        self._closed = asyncio.Event()
        self._last_byte = b"\n"

    async def connect(
        self, sock: socket.socket | None = None, path: Path | None = None, note: str = ""
    ) -> None:
        """Take over `sock` (connected already) or connect to `path`, bounded; `note` goes to
        the log once connected, before what the connection brings."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            if sock is not None:
                transport, _ = await loop.create_unix_connection(
                    lambda: _QemuSide(self, note), sock=sock
                )
            else:
                transport, _ = await loop.create_unix_connection(
                    lambda: _QemuSide(self, note), path=str(path)
                )
        transport.set_write_buffer_limits(high=QEMU_INPUT_LIMIT)
        self._qemu = transport

    @property
    def connected(self) -> bool:
        return self._qemu is not None and not self._closed.is_set()

    # What QEMU and clients send

    def output(self, data: bytes) -> None:
        self.scrollback.append(data)
        self._last_byte = data[-1:]
        self.log.schedule()
        if self._client is not None:
            self._client.send(data)

    def note(self, text: str) -> None:
        """A line of the daemon's own in the log (never sent to a client), on a line of its own."""
        prefix = "" if self._last_byte == b"\n" else "\n"
        self.scrollback.append(f"{prefix}--- {text} ---\n".encode())
        self._last_byte = b"\n"
        self.log.schedule()

    def input(self, client: _Client, data: bytes) -> None:
        if client is self._client and self._qemu is not None and not self._qemu.is_closing():
            self._qemu.write(data)

    def pause_input(self, paused: bool) -> None:
        """QEMU's end is (no longer) behind with the input: stop (resume) reading the client."""
        self.input_paused = paused
        transport = self._client.transport if self._client is not None else None
        if transport is not None and not transport.is_closing():
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def qemu_lost(self, exc: Exception | None) -> None:
        """QEMU closed the serial connection (it exited): the console ends here."""
        if exc is not None and not isinstance(exc, ConnectionResetError):
            log.info("VM %s: console connection ended: %s", self.name, exc)
        self._closed.set()
        if self._client is not None:
            self._client.disconnect()

    def client_gone(self, client: _Client) -> None:
        if self._client is client:
            self._client = None

    # Attaching

    async def attach(self, caller: Caller | None, force: bool) -> socket.socket:
        """A socket whose peer is the console for `caller`; ConsoleBusy if taken, unless forced."""
        if not self.connected:
            raise ConsoleUnavailable(f"VM {self.name}'s serial console is not connected")
        current = self._client
        if current is not None and current.transport is not None and current.transport.is_closing():
            current = self._client = None  # detached already; only its last bytes are left
        if current is not None:
            if not force:
                raise ConsoleBusy(
                    f"VM {self.name}'s console is in use by another client ({current.describe()});"
                    " force it to take the console over"
                )
            who = f" by uid {caller.uid}, pid {caller.pid}" if caller is not None else ""
            current.disconnect(f"console taken over{who}")
            self._client = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client = _Client(self, caller)
        self._client = client  # taken now: a second attach during the await below is Busy
        try:
            ours.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: client, ours)
        except BaseException:
            ours.close()
            theirs.close()
            if self._client is client:
                self._client = None
            raise
        if self._client is not client or not self.connected:  # taken over or ended meanwhile
            client.disconnect()
            theirs.close()
            raise ConsoleUnavailable(f"VM {self.name}'s console went away while attaching")
        return theirs

    # The end

    async def wait_closed(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        return self._closed.is_set()

    def disconnect(self) -> None:
        """Let go of QEMU and the client (the log is still being written)."""
        if self._client is not None:
            self._client.disconnect()
        if self._qemu is not None:
            self._qemu.abort()  # input a guest has not read goes: it may never read it
        self._closed.set()

    async def close(self) -> None:
        """Let go of QEMU and the client; write what is left of the log (bounded)."""
        self.disconnect()
        await self.log_written()

    async def log_written(self) -> None:
        if not await self.log.wait_idle(SETTLE_TIMEOUT):
            log.warning(
                "VM %s: the end of its console output may be missing from the log", self.name
            )


@dataclass
class PreparedConsole:
    """The listening socket QEMU gets for one start, and the daemon's connection to it."""

    listener: socket.socket
    connection: socket.socket
    path: Path

    @property
    def listen_fd(self) -> int:
        return self.listener.fileno()

    def close_listener(self) -> None:
        """QEMU has its own copy now (or never will): the daemon's goes."""
        self.listener.close()

    def discard(self) -> None:
        """The start failed: nothing of the console stays behind."""
        self.listener.close()
        self.connection.close()
        self.path.unlink(missing_ok=True)


class ConsoleManager:
    """The consoles of all running VMs, by name (the Supervisor owns it, machines use it)."""

    def __init__(self, paths: Paths, log_limit: int = LOG_LIMIT) -> None:
        self.paths = paths
        self.log_limit = log_limit
        self._consoles: dict[str, Console] = {}
        self._detached: list[Console] = []  # their last output still to be logged

    def prepare(self, name: str) -> PreparedConsole:
        """Bind VM `name`'s console socket and connect to it, before QEMU exists.

        The connection waits in the listen backlog until QEMU accepts it, so QEMU's first
        output already has a reader. Blocking only on /run (a tmpfs): bind, listen, connect.
        """
        path = socket_path(self.paths, name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            path.chmod(0o600)
            listener.listen(1)
            connection.setblocking(False)
            connection.connect(str(path))  # a listening unix socket: completes at once
        except BaseException:
            listener.close()
            connection.close()
            path.unlink(missing_ok=True)
            raise
        return PreparedConsole(listener, connection, path)

    async def started(self, name: str, prepared: PreparedConsole) -> None:
        """QEMU runs with `prepared`'s socket: the daemon's connection becomes its console.

        Never raises: a console that cannot be set up leaves the VM running without one.
        """
        prepared.close_listener()
        console = Console(name, log_path(self.paths, name), self.log_limit)
        try:
            await console.connect(sock=prepared.connection, note=f"{_now()}: VM {name} started")
        except (OSError, TimeoutError) as err:
            prepared.connection.close()
            log.warning("VM %s: runs without a serial console: %s", name, err)
            return
        await self._replace(name, console)

    async def reconnect(self, name: str) -> None:
        """After a daemon restart: connect to a running VM's console again. Never raises."""
        path = socket_path(self.paths, name)
        if not path.exists():
            log.info("VM %s has no serial console (started before consoles existed)", name)
            return
        console = Console(name, log_path(self.paths, name), self.log_limit)
        note = f"{_now()}: supervisord-vm reconnected; output since it last let go is not recorded"
        try:
            await console.connect(path=path, note=note)
        except (OSError, TimeoutError) as err:
            log.warning("VM %s: cannot reconnect to its serial console: %s", name, err)
            return
        await self._replace(name, console)

    async def _replace(self, name: str, console: Console) -> None:
        old = self._consoles.pop(name, None)
        self._consoles[name] = console
        if old is not None:
            await old.close()

    async def open(self, name: str, caller: Caller | None, force: bool) -> socket.socket:
        """A socket for an interactive client of VM `name`'s console (the caller checked the VM
        runs). ConsoleUnavailable without a console, ConsoleBusy while another client has it."""
        console = self._consoles.get(name)
        if console is None or not console.connected:
            raise ConsoleUnavailable(
                f"VM {name} has no serial console connection (it was started before consoles "
                "existed, or the daemon could not reconnect; see its journal)"
            )
        return await console.attach(caller, force)

    async def read_log(self, name: str, max_bytes: int) -> bytes:
        """The newest `max_bytes` of VM `name`'s console output: the log on disk once what was
        read so far is written there; from memory if the disk is behind or failing."""
        console = self._consoles.get(name)
        if console is not None and (
            not await console.log.wait_idle(SETTLE_TIMEOUT) or console.log.failed
        ):
            return console.scrollback.tail(max_bytes)
        return await asyncio.to_thread(read_log_tail, log_path(self.paths, name), max_bytes)

    def has_log(self, name: str) -> bool:
        """A console log of `name` exists (blocking: a stat or two)."""
        path = log_path(self.paths, name)
        return path.is_file() or rotated_path(path).is_file()

    async def release(self, name: str) -> None:
        """VM `name` ended: take in the last output, close, remove the socket. Idempotent."""
        console = self._consoles.pop(name, None)
        if console is not None:
            await console.wait_closed(SETTLE_TIMEOUT)  # QEMU is gone: its end closes at once
            await console.close()
        try:
            socket_path(self.paths, name).unlink(missing_ok=True)
        except OSError as err:
            log.warning("VM %s: cannot remove its console socket: %s", name, err)

    async def sweep(self, keep: set[str]) -> None:
        """Remove the console sockets of VMs not in `keep` (at start-up, after reattach: those
        of VMs that ended while no daemon ran and were not settled through a record)."""

        def stale() -> list[Path]:
            try:
                entries = list(self.paths.runtime_dir.glob("*.console"))
            except OSError:
                return []
            return [path for path in entries if path.name.removesuffix(".console") not in keep]

        for path in await asyncio.to_thread(stale):
            log.info("removing the console socket %s of a VM that is not running", path)
            with contextlib.suppress(OSError):
                path.unlink()

    async def detach(self, name: str) -> None:
        """The daemon lets go of a VM that keeps running: disconnect, keep the socket for the
        next daemon to reconnect to. The log's last write is waited for by close()."""
        console = self._consoles.pop(name, None)
        if console is not None:
            console.disconnect()
            self._detached.append(console)

    async def close(self) -> None:
        """Let go of every console; wait for their logs together, once bounded (a disk that
        hangs must not hold a daemon's stop for SETTLE_TIMEOUT per VM)."""
        for name in list(self._consoles):
            await self.detach(name)
        detached, self._detached = self._detached, []
        await asyncio.gather(*(console.log_written() for console in detached))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
