"""QEMU's command line (a pure function of a Definition) and a QMP session on qemu.qmp 0.0.6.

The session hides qemu.qmp's rough edges (SANDBOX.md): it never reconnects by itself, `async for`
over a listener does not end on EOF, every listener keeps its whole history, and `disconnect()`
re-raises the reader's error. Callers get events through one callback, errors as QmpError /
QmpDisconnected, and `wait_closed()` that returns on EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from supervisord_vm import boot
from supervisord_vm.cpu import cpu_args
from supervisord_vm.definition import Definition, Disk
from supervisord_vm.display import display_args
from supervisord_vm.errors import QmpDisconnected, QmpError, QmpTimeout
from supervisord_vm.firmware import firmware_args
from supervisord_vm.inotify import libc as _libc  # looked up once: it forks ldconfig
from supervisord_vm.network import nic_argv
from supervisord_vm.unitname import machine_uuid

log = logging.getLogger(__name__)

# qemu.qmp logs a connect attempt that finds no socket yet (a normal wait here) as an ERROR:
# the library must not speak for the daemon. Our own messages say what went wrong.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def qemu_option_value(value: str) -> str:
    """Quote a value for QEMU's `key=value,...` option syntax, where a comma is written `,,`."""
    return value.replace(",", ",,")


def drive_interface(machine: str, disk: Disk) -> str:
    """Pick the bus for a disk: IDE where the board has it, else virtio (see boot.on_ide)."""
    return "ide" if boot.on_ide(machine, disk) else "virtio"


def drive_option(
    machine: str, disk: Disk, file: str | None = None, drive_id: str | None = None
) -> str:
    """`-drive`'s value; `file` replaces the path (`/dev/fdset/N`: the daemon opened it);
    `drive_id`: a drive without a device (`if=none`), for an explicit `-device`."""
    parts = [
        f"file={qemu_option_value(file if file is not None else disk.path)}",
        f"format={disk.format}",
        f"if={drive_interface(machine, disk)}" if drive_id is None else f"if=none,id={drive_id}",
    ]
    if disk.media == "cdrom":
        parts.append("media=cdrom")
    if disk.readonly:
        parts.append("readonly=on")
    if disk.snapshot:
        parts.append("snapshot=on")
    return ",".join(parts)


def disk_args(defn: Definition, files: Mapping[int, str]) -> list[str]:
    """Every disk's `-drive` (and `-device`), in definition order; `files`: disk index ->
    `/dev/fdset/N` where the daemon opened the image.

    Without a boot order, `-drive if=ide|virtio` lets QEMU place each disk. With one, each
    disk gets its own `-device` (on the IDE bus and unit `if=ide` would have given it), since
    only a device carries the `bootindex` both SeaBIOS and OVMF follow (boot.py).
    """
    bootindex, _ = boot.boot_indexes(defn)
    if not bootindex:
        return [
            arg
            for index, disk in enumerate(defn.disks)
            for arg in ("-drive", drive_option(defn.machine, disk, files.get(index)))
        ]
    argv: list[str] = []
    ide_ordinal = 0
    for index, disk in enumerate(defn.disks):
        drive_id = f"drive-disk{index}"
        argv += ["-drive", drive_option(defn.machine, disk, files.get(index), drive_id)]
        if boot.on_ide(defn.machine, disk):
            bus, unit = boot.ide_address(defn.machine, ide_ordinal)
            ide_ordinal += 1
            model = "ide-cd" if disk.media == "cdrom" else "ide-hd"
            device = [model, f"drive={drive_id}", f"bus={bus}", f"unit={unit}"]
        else:
            device = ["virtio-blk-pci", f"drive={drive_id}"]
        if index in bootindex:
            device.append(f"bootindex={bootindex[index]}")
        argv += ["-device", ",".join(device)]
    return argv


@dataclass
class LaunchResources:
    """What the daemon prepared for one start of QEMU, beyond the definition: open file
    descriptors handed over to QEMU (under the same numbers) and host facts the argv depends on.

    Each feature adds its own field with a default; `pass_fds` lists every descriptor to hand
    over, and the launcher closes the daemon's copies once QEMU runs.
    """

    qmp_socket: Path
    pass_fds: list[int] = field(default_factory=list)
    console_fd: int | None = None  # the serial console's listening socket (console.py)
    nic_fds: dict[int, int] = field(default_factory=dict)  # NIC index -> tap fd (network.py)
    # Confinement (confined_launch.py): the QMP socket the daemon listens on (QEMU could not
    # create it in root's runtime directory), fd sets of files the daemon opened (fd, set,
    # opaque), each disk's `file=` (disk index -> /dev/fdset/N), QEMU's -sandbox value.
    qmp_fd: int | None = None
    fdsets: list[tuple[int, int, str]] = field(default_factory=list)
    disk_files: dict[int, str] = field(default_factory=dict)
    sandbox: str | None = None
    # CPU, firmware, display (hardware.py): QEMU's user can use KVM (`-cpu host` by default);
    # the VM's UEFI variables store as QEMU opens it (/dev/fdset/N); its VNC unix socket.
    kvm: bool = False
    nvram_file: str | None = None
    vnc_socket: Path | None = None

    def add_fdset(self, fds: list[int], opaque: str) -> str:
        """Hand `fds` (one file, opened in different modes) to QEMU as a new fd set; returns
        the name QEMU opens it by (`/dev/fdset/N`). QEMU picks the fd whose access mode fits."""
        fdset = 1 + max((entry[1] for entry in self.fdsets), default=0)
        for fd in fds:
            self.fdsets.append((fd, fdset, opaque))
            self.pass_fds.append(fd)
        return f"/dev/fdset/{fdset}"


QMP_CHARDEV = "qmp"


def qmp_args(qmp_socket: Path, qmp_fd: int | None) -> list[str]:
    """The monitor: on the socket the daemon listens on (`fd`, as libvirt hands it over), or,
    without one, a socket QEMU creates itself at `qmp_socket` (older daemons; tests)."""
    if qmp_fd is None:
        return ["-qmp", f"unix:{qemu_option_value(str(qmp_socket))},server=on,wait=off"]
    return [
        "-chardev",
        f"socket,id={QMP_CHARDEV},fd={qmp_fd},server=on,wait=off",
        "-mon",
        f"chardev={QMP_CHARDEV},mode=control",
    ]


def confinement_args(resources: LaunchResources) -> list[str]:
    """QEMU's seccomp filter and the fd sets of the files the daemon opened for it."""
    argv = ["-sandbox", resources.sandbox] if resources.sandbox is not None else []
    for fd, fdset, opaque in resources.fdsets:
        argv += ["-add-fd", f"fd={fd},set={fdset},opaque={qemu_option_value(opaque)}"]
    return argv


SERIAL_CHARDEV = "serial0"


def serial_console_args(fd: int) -> list[str]:
    """The first serial port on the daemon's listening socket `fd` (console.py).

    `server=on,wait=off`: QEMU accepts one client at a time and does not wait for one at start;
    `-serial` is the board's own first UART (COM1 on pc/q35), whatever the machine type.
    """
    return [
        "-chardev",
        f"socket,id={SERIAL_CHARDEV},fd={fd},server=on,wait=off",
        "-serial",
        f"chardev:{SERIAL_CHARDEV}",
    ]


def build_argv(
    defn: Definition, qmp_socket: Path, resources: LaunchResources | None = None
) -> list[str]:
    """QEMU's argv for `defn`, to be exec'd directly (never through a shell).

    `-S` keeps the CPUs stopped until the daemon has connected QMP and sent `cont`, so no guest
    code runs (and no event is missed) before the monitor is attached. `-accel` is repeated in
    preference order: QEMU falls back to the next one when one is unavailable.
    """
    argv = [
        defn.qemu,
        "-name",
        f"guest={qemu_option_value(defn.name)},debug-threads=on",
        "-uuid",
        str(machine_uuid(defn.name)),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        *qmp_args(qmp_socket, resources.qmp_fd if resources is not None else None),
        "-S",
    ]
    if resources is not None:
        argv += confinement_args(resources)
    for accel in defn.accel:
        argv += ["-accel", accel]
    argv += ["-machine", defn.machine, "-m", str(defn.memory), "-smp", str(defn.cpus)]
    argv += cpu_args(defn, resources is not None and resources.kvm)
    argv += firmware_args(defn, resources.nvram_file if resources is not None else None)
    argv += disk_args(defn, resources.disk_files if resources is not None else {})
    if resources is not None and resources.console_fd is not None:
        argv += serial_console_args(resources.console_fd)  # before extra_args: ours is COM1
    argv += nic_argv(defn, resources.nic_fds if resources is not None else {})
    argv += display_args(defn, resources.vnc_socket if resources is not None else None)
    argv += defn.extra_args
    return argv


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event; `timestamp` is QEMU's wall-clock time of the event in seconds."""

    name: str
    data: dict[str, object]
    timestamp: float


def _event_from_message(msg: Message) -> QmpEvent:
    name = msg.get("event")
    data = msg.get("data")
    stamp = msg.get("timestamp")
    timestamp = time.time()
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            timestamp = seconds + micros / 1_000_000
    return QmpEvent(
        name=name if isinstance(name, str) else "",
        data=dict(data) if isinstance(data, dict) else {},
        timestamp=timestamp,
    )


class _CallbackListener(EventListener):
    """An event listener that hands each event to a callback and keeps nothing.

    qemu.qmp's EventListener appends every accepted event to a history list and a queue forever;
    a VM that runs for months would grow both without bound. This one stores neither.
    """

    def __init__(self, callback: Callable[[QmpEvent], None]) -> None:
        super().__init__()
        self._callback = callback

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        try:
            self._callback(_event_from_message(event))
        except Exception:
            # An error in the consumer must not kill the reader task (and so the connection).
            log.exception("QMP event callback failed for %s", event.get("event"))


def _bounded_client(name: str, on_event: Callable[[QmpEvent], None]) -> QMPClient:
    """A QMPClient whose only listener is a _CallbackListener.

    The default listener (`client.events`) cannot be removed while it is the default, so ours is
    made the default first; then the library's own, history-keeping one is removed.
    """
    client = QMPClient(name)
    original = client.events
    listener = _CallbackListener(on_event)
    client.events = listener
    client.register_listener(listener)
    client.remove_listener(original)
    return client


# --- waiting for the socket to appear (inotify) ------------------------------------------------

_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_INOTIFY_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


async def _wait_for_path(path: Path) -> None:
    """Return once `path` exists, woken by inotify (no polling); the caller bounds the time.

    Raises OSError when inotify is unavailable or the directory cannot be watched, so the caller
    can fall back.
    """
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "libc not found")
    fd = libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    loop = asyncio.get_running_loop()
    try:
        mask = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
        if libc.inotify_add_watch(fd, os.fsencode(path.parent), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path.parent))
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            # Checked after the watch exists, so a creation in between is never missed.
            while not path.exists():  # noqa: ASYNC240 - one stat in /run, never blocks long
                await readable.wait()
                readable.clear()
                with contextlib.suppress(BlockingIOError):
                    buffer = os.read(fd, 64 * 1024)
                    _raise_if_directory_gone(buffer)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _raise_if_directory_gone(buffer: bytes) -> None:
    offset = 0
    while offset + _INOTIFY_HEADER.size <= len(buffer):
        _wd, mask, _cookie, length = _INOTIFY_HEADER.unpack_from(buffer, offset)
        if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
            raise OSError(errno.ENOENT, "socket directory went away")
        offset += _INOTIFY_HEADER.size + length


def _connect_errno(err: ConnectError) -> int | None:
    cause = err.exc
    return cause.errno if isinstance(cause, OSError) else None


class QmpSession:
    """One QMP connection to one QEMU, alive until QEMU closes it or close() is called."""

    # Between QEMU's bind() and listen() a connect is refused; the socket file gives no further
    # inotify event then, so a refused connect is retried after a short, growing pause.
    _REFUSED_RETRY_FIRST = 0.005
    _REFUSED_RETRY_MAX = 0.1

    # How long one command may take: QEMU answers in milliseconds unless its main loop is
    # wedged (SIGSTOP, uninterruptible I/O); then no caller may wait forever.
    COMMAND_TIMEOUT = 10.0

    def __init__(
        self, client: QMPClient, socket_path: Path, command_timeout: float = COMMAND_TIMEOUT
    ) -> None:
        self._client = client
        self._socket_path = socket_path
        self.command_timeout = command_timeout
        self._closed = asyncio.Event()
        self._disconnect_task: asyncio.Task[None] | None = None
        self._watcher = asyncio.create_task(self._watch(), name=f"qmp-watch:{socket_path}")

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        *,
        timeout: float,  # noqa: ASYNC109 - the agreed interface; bounds the whole connect
        on_event: Callable[[QmpEvent], None],
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> QmpSession:
        """Connect and negotiate, waiting up to `timeout` for QEMU to create its socket.

        QEMU creates the socket shortly after exec. A missing socket is waited for with inotify on
        its directory (falling back to a short backoff if inotify cannot be used); a refused
        connect (socket not listening yet, or a stale file) is retried with a short backoff.
        """
        client = _bounded_client(socket_path.name, on_event)
        last_error: BaseException | None = None
        retry_pause = cls._REFUSED_RETRY_FIRST
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await client.connect(str(socket_path))
                        break
                    except ConnectError as err:
                        last_error = err
                        code = _connect_errno(err)
                        if code == errno.ENOENT:
                            try:
                                await _wait_for_path(socket_path)
                                continue
                            except OSError as watch_error:
                                log.debug("cannot watch for %s: %s", socket_path, watch_error)
                        elif code != errno.ECONNREFUSED:
                            raise QmpError(
                                f"cannot connect to QMP socket {socket_path}: {err}"
                            ) from err
                        await asyncio.sleep(retry_pause)
                        retry_pause = min(retry_pause * 2, cls._REFUSED_RETRY_MAX)
        except TimeoutError as err:
            detail = f": {last_error}" if last_error is not None else ""
            raise QmpError(
                f"QMP socket {socket_path} not ready within {timeout:g} s{detail}"
            ) from err
        return cls(client, socket_path, command_timeout)

    async def _watch(self) -> None:
        """Notice EOF through the client's runstate (qemu.qmp's listeners never end on EOF)."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        self._start_disconnect()

    def _start_disconnect(self) -> asyncio.Task[None]:
        """Start the one and only disconnect (two concurrent ones trip qemu.qmp's assertions)."""
        if self._disconnect_task is None:
            self._disconnect_task = asyncio.create_task(
                self._disconnect(), name=f"qmp-disconnect:{self._socket_path}"
            )
        return self._disconnect_task

    async def _disconnect(self) -> None:
        """Finish the disconnect: qemu.qmp leaves a hung-up client DISCONNECTING until asked.

        This fails pending commands with ExecInterruptedError and releases the stream.
        """
        try:
            await self._client.disconnect()
        except Exception as err:  # the reader's EOFError/OSError, re-raised: expected on EOF
            log.debug("QMP %s disconnected: %r", self._socket_path, err)
        finally:
            self._closed.set()

    @property
    def closed(self) -> bool:
        """True once the connection is gone (QEMU hung up or close() was called)."""
        return self._closed.is_set() or self._client.runstate != Runstate.RUNNING

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command and return its `return` value."""
        args: Mapping[str, object] | None = arguments
        try:
            async with asyncio.timeout(self.command_timeout):
                return await self._client.execute(command, args)
        except TimeoutError:
            raise QmpTimeout(
                f"QEMU did not answer {command!r} within {self.command_timeout:g} s "
                "(is it stopped, or stuck in I/O?)"
            ) from None
        except ExecuteError as err:
            raise QmpError(
                f"QMP command {command!r} failed: {err.error_class}: {err.error.error.desc}"
            ) from err
        except (ExecInterruptedError, StateError) as err:
            raise QmpDisconnected(
                f"QMP connection to {self._socket_path} lost during {command!r}"
            ) from err
        except QMPError as err:
            raise QmpError(f"QMP command {command!r} failed: {err}") from err

    async def wait_closed(self) -> None:
        """Return when the connection has ended (QEMU exited or closed the socket)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Disconnect; idempotent and never raises (a dead QEMU is not an error here)."""
        task = self._start_disconnect()
        self._watcher.cancel()
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
