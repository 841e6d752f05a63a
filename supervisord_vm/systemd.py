"""The only place that talks to systemd: transient scopes, their jobs and their signals.

Built on pystemd, whose method calls block (``sd_bus_call``). So every call runs in one
dedicated worker thread that owns its own bus connection, and the unit signals arrive on a
second connection that is read from the asyncio loop (``add_reader`` on its fd). That second
connection never makes a blocking call after setup, so no signal can hide in sd-bus's queue
while the fd stays quiet. The signal connection registers its match rules with the bus daemon
directly and reads the matching signals as unhandled messages from ``process()``: this allows a
``path_namespace`` rule (pystemd's ``match_signal`` cannot express one) and needs no C-level
callbacks at all (pystemd keeps a raw pointer to those, so a collected callback crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pystemd.dbusexc import DBusBaseError, DBusNoSuchUnitError, DBusUnixProcessIdUnknownError
from pystemd.dbuslib import DBus

from supervisord_vm import _spawn_trampoline
from supervisord_vm.errors import NoSuchUnit, ProcessGone, SystemdError, UnitExists
from supervisord_vm.unitname import UNIT_NAME_MAX as UNIT_NAME_MAX  # noqa: PLC0414 - re-export
from supervisord_vm.unitname import escape_name as escape_name  # noqa: PLC0414 - re-export
from supervisord_vm.unitname import scope_name as scope_name  # noqa: PLC0414 - re-export

log = logging.getLogger(__name__)

T = TypeVar("T")

SCOPE_PATTERN = "svm-*.scope"

_SYSTEMD = b"org.freedesktop.systemd1"
_MANAGER_PATH = b"/org/freedesktop/systemd1"
_MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
_UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
_UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
_PROPS_IFACE = b"org.freedesktop.DBus.Properties"
_DBUS = b"org.freedesktop.DBus"
_DBUS_PATH = b"/org/freedesktop/DBus"
_LOCAL_IFACE = b"org.freedesktop.DBus.Local"

# Rules for the signal connection. path_namespace keeps other objects' PropertiesChanged away.
_MATCH_RULES = (
    "type='signal',sender='org.freedesktop.systemd1',"
    "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
    "path_namespace='/org/freedesktop/systemd1/unit'",
    *(
        "type='signal',sender='org.freedesktop.systemd1',path='/org/freedesktop/systemd1',"
        f"interface='org.freedesktop.systemd1.Manager',member='{member}'"
        for member in ("JobRemoved", "UnitRemoved", "Reloading")
    ),
    # systemd's unique name changes when it re-executes; only its signals are trusted.
    "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.freedesktop.systemd1'",
)

# Unit-type interfaces that carry the unit's Result property.
_RESULT_IFACES = {
    "scope": "Scope",
    "service": "Service",
    "socket": "Socket",
    "mount": "Mount",
    "swap": "Swap",
    "timer": "Timer",
    "path": "Path",
    "automount": "Automount",
}

_DISCONNECTED_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE})

# --- unit names ------------------------------------------------------------------------------


def unit_name_from_path(path: str) -> str | None:
    """Decode a unit object path (sd_bus_path_encode: ``_2d`` is ``-``); None if not a unit."""
    if not path.startswith(_UNIT_PATH_PREFIX):
        return None
    label = path[len(_UNIT_PATH_PREFIX) :]
    if not label or "/" in label:
        return None
    if label == "_":
        return ""
    raw = bytearray()
    index = 0
    while index < len(label):
        char = label[index]
        if char == "_":
            try:
                raw.append(int(label[index + 1 : index + 3], 16))
            except ValueError:
                return None
            index += 3
        else:
            raw += char.encode()
            index += 1
    return raw.decode(errors="replace")


# --- public value types ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeProperties:
    """What a VM's scope is created with; KillMode/KillSignal/SendSIGKILL are fixed (DESIGN)."""

    description: str
    stop_timeout: float  # seconds -> TimeoutStopUSec
    slice: str = "machine.slice"
    after: tuple[str, ...] = ("supervisord-vm.service",)
    before: tuple[str, ...] = ("supervisord-vm-guests.service",)


@dataclass(frozen=True)
class UnitStatus:
    name: str
    load_state: str
    active_state: str
    sub_state: str
    result: str


@dataclass(frozen=True)
class UnitEvent:
    """One unit signal, already decoded and filtered to this project's scopes."""

    kind: str  # "changed" | "removed" | "job-removed" | "reloading"
    unit: str  # "" for reloading
    status: UnitStatus | None = None  # for "changed"
    job_result: str = ""  # for "job-removed"
    reloading: bool = False  # for "reloading": True at start, False at end


# --- D-Bus argument building (pystemd's raw append list) -------------------------------------

_Arg = tuple[int, Any]
_CLOSE: _Arg = (-1, None)


def _encode(signature: str, value: Any) -> list[_Arg]:
    """Encode a basic type or an array of one; pystemd's own helper has no ``au``."""
    if signature.startswith("a"):
        inner = signature[1:]
        args: list[_Arg] = [(ord("a"), inner.encode())]
        for item in value:
            args += _encode(inner, item)
        return [*args, _CLOSE]
    if signature in ("s", "o"):
        return [(ord(signature), str(value).encode())]
    if signature == "b":
        return [(ord("b"), bool(value))]
    if signature in ("i", "u", "t"):
        return [(ord(signature), int(value))]
    raise ValueError(f"unsupported D-Bus signature {signature!r}")


def _property(name: str, signature: str, value: Any) -> list[_Arg]:
    return [
        (ord("r"), b"sv"),
        (ord("s"), name.encode()),
        (ord("v"), signature.encode()),
        *_encode(signature, value),
        _CLOSE,
        _CLOSE,
    ]


def scope_properties(pids: Sequence[int], props: ScopeProperties) -> list[tuple[str, str, Any]]:
    """(name, D-Bus signature, value) of every property a scope is created with.

    CollectMode stays at its default (inactive): a failed scope stays loaded, so its Result can
    be read before the core resets it.
    """
    return [
        ("Description", "s", props.description),
        ("Slice", "s", props.slice),
        ("KillMode", "s", "control-group"),
        ("KillSignal", "i", 15),
        ("SendSIGKILL", "b", True),
        ("TimeoutStopUSec", "t", round(props.stop_timeout * 1_000_000)),
        ("After", "as", list(props.after)),
        ("Before", "as", list(props.before)),
        ("PIDs", "au", list(pids)),
    ]


def _start_transient_args(unit: str, pids: Sequence[int], props: ScopeProperties) -> list[_Arg]:
    args: list[_Arg] = [*_encode("s", unit), *_encode("s", "fail"), (ord("a"), b"(sv)")]
    for name, signature, value in scope_properties(pids, props):
        args += _property(name, signature, value)
    return [*args, _CLOSE, (ord("a"), b"(sa(sv))"), _CLOSE]


# --- errors ----------------------------------------------------------------------------------

_ERRORS_BY_NAME: dict[str, type[SystemdError]] = {
    "org.freedesktop.systemd1.NoSuchUnit": NoSuchUnit,
    "org.freedesktop.systemd1.UnitExists": UnitExists,
    "org.freedesktop.systemd1.NoSuchProcess": ProcessGone,
    "org.freedesktop.DBus.Error.UnixProcessIdUnknown": ProcessGone,
}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


def map_error(exc: DBusBaseError, context: str) -> SystemdError:
    """Turn a pystemd error into the project's type; pystemd drops the name of mapped ones."""
    name = _text(getattr(exc, "err_name", ""))
    message = _text(getattr(exc, "err_message", "")) or os.strerror(abs(exc.errno or 0))
    error_type: type[SystemdError]
    if isinstance(exc, DBusNoSuchUnitError):
        error_type = NoSuchUnit
    elif isinstance(exc, DBusUnixProcessIdUnknownError):
        error_type = ProcessGone
    elif name in _ERRORS_BY_NAME:
        error_type = _ERRORS_BY_NAME[name]
    elif exc.errno == -errno.ESRCH:
        error_type = ProcessGone
    else:
        error_type = SystemdError
    return error_type(f"{context}: {message}")


# --- blocking helpers (worker thread only) ---------------------------------------------------


def _call(bus: Any, path: bytes, interface: bytes, method: bytes, args: list[_Arg]) -> Any:
    return bus.call_method(_SYSTEMD, path, interface, method, args).body


def _manager(bus: Any, method: str, args: list[_Arg]) -> Any:
    return _call(bus, _MANAGER_PATH, _MANAGER_IFACE, method.encode(), args)


def _get(bus: Any, path: bytes, interface: str, prop: str) -> str:
    value = bus.get_property(_SYSTEMD, path, interface.encode(), prop.encode(), b"s")
    return _text(value)


def _result_of(bus: Any, unit: str, path: bytes) -> str:
    suffix = unit.rpartition(".")[2]
    iface = _RESULT_IFACES.get(suffix)
    if iface is None:
        return ""
    return _get(bus, path, f"org.freedesktop.systemd1.{iface}", "Result")


def _status_sync(bus: Any, unit: str) -> UnitStatus | None:
    try:
        path = _manager(bus, "GetUnit", _encode("s", unit))
        return UnitStatus(
            name=unit,
            load_state=_get(bus, path, "org.freedesktop.systemd1.Unit", "LoadState"),
            active_state=_get(bus, path, "org.freedesktop.systemd1.Unit", "ActiveState"),
            sub_state=_get(bus, path, "org.freedesktop.systemd1.Unit", "SubState"),
            result=_result_of(bus, unit, path),
        )
    except DBusNoSuchUnitError:
        return None
    except DBusBaseError as exc:
        if _text(getattr(exc, "err_name", "")).endswith(".UnknownObject"):
            return None  # unloaded between GetUnit and the property read
        raise


def _list_sync(bus: Any, pattern: str) -> list[UnitStatus]:
    rows = _manager(bus, "ListUnitsByPatterns", _encode("as", []) + _encode("as", [pattern]))
    statuses = []
    for row in rows or []:
        name = _text(row[0])
        try:
            result = _result_of(bus, name, row[6])
        except DBusBaseError:
            continue  # unloaded meanwhile
        statuses.append(UnitStatus(name, _text(row[2]), _text(row[3]), _text(row[4]), result))
    return statuses


def _open_signal_bus() -> tuple[Any, bytes]:
    """Open the signal connection: match rules first, then learn systemd's name, Subscribe."""
    bus = DBus()
    bus.open()
    try:
        for rule in _MATCH_RULES:
            bus.call_method(_DBUS, _DBUS_PATH, _DBUS, b"AddMatch", _encode("s", rule))
        owner = bus.call_method(
            _DBUS, _DBUS_PATH, _DBUS, b"GetNameOwner", _encode("s", "org.freedesktop.systemd1")
        ).body
        # Without a subscriber systemd emits no unit signals. The subscription belongs to this
        # connection, so it ends when the connection does.
        _manager(bus, "Subscribe", [])
    except BaseException:
        bus.close()
        raise
    return bus, owner


# --- the adapter -----------------------------------------------------------------------------


@dataclass
class _JobWatch:
    """Collects JobRemoved for one unit from before the job's path is known (no lost race)."""

    future: asyncio.Future[str]
    path: bytes | None = None
    seen: dict[bytes, str] = field(default_factory=dict)

    def job_removed(self, path: bytes, result: str) -> None:
        if self.future.done():
            return
        if self.path is None:
            self.seen[path] = result
        elif path == self.path:
            self.future.set_result(result)

    def expect(self, path: bytes) -> None:
        self.path = path
        if path in self.seen and not self.future.done():
            self.future.set_result(self.seen[path])
        self.seen.clear()


@dataclass
class _Tracked:
    """Last known state of one scope, assembled from its two PropertiesChanged signals."""

    load_state: str = "loaded"  # not in systemd's signal; a unit that sends one is loaded
    active_state: str = ""
    sub_state: str = ""
    result: str = ""


class Systemd:
    """systemd's manager on asyncio: calls in a worker thread, signals on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        signal_bus: Any,
        systemd_owner: bytes,
    ) -> None:
        """Use ``connect()``; this only wires already opened parts together."""
        self._loop = loop
        self._executor = executor
        self._call_bus: Any = None  # opened lazily in the worker thread, only used there
        self._signal_bus = signal_bus
        self._signal_fd: int | None = None
        self._systemd_owner = systemd_owner
        self._subscribers: list[Callable[[UnitEvent], None]] = []
        self._job_watches: dict[str, list[_JobWatch]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._closed = False

    @classmethod
    async def connect(cls) -> Systemd:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svm-systemd")
        try:
            signal_bus, owner = await loop.run_in_executor(executor, _open_signal_bus)
        except DBusBaseError as exc:
            executor.shutdown(wait=False)
            raise map_error(exc, "connecting to systemd") from exc
        self = cls(loop, executor, signal_bus, owner)
        try:
            await self._run(lambda bus: None)  # open the call connection now, fail early
        except BaseException:
            await self.close()
            raise
        self._signal_fd = signal_bus.get_fd()
        loop.add_reader(self._signal_fd, self._drain)
        loop.call_soon(self._drain)  # setup calls may have queued signals without waking the fd
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_signals(SystemdError("connection to systemd closed"))
        with contextlib.suppress(Exception):
            await self._loop.run_in_executor(self._executor, self._close_call_bus)
        self._executor.shutdown(wait=True)

    def subscribe(self, callback: Callable[[UnitEvent], None]) -> Callable[[], None]:
        """Deliver events of this project's scopes (svm-*.scope) on the loop, in order."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # --- operations ---

    async def start_scope(self, unit: str, pids: Sequence[int], props: ScopeProperties) -> None:
        """Create the scope around PIDs and wait until its start job is done."""
        args = _start_transient_args(unit, pids, props)
        result = await self._job(
            unit,
            f"creating scope {unit}",
            lambda bus: _manager(bus, "StartTransientUnit", args),
        )
        if result == "done":
            return
        status = await self.unit_status(unit)
        await self._discard(unit, status)
        detail = f"job {result}" + (f", unit result {status.result}" if status else "")
        if status is not None and status.result == "resources" and not any(map(_alive, pids)):
            raise ProcessGone(f"creating scope {unit}: the process exited ({detail})")
        raise SystemdError(f"creating scope {unit} failed: {detail}")

    async def kill_unit(self, unit: str, signal: int, who: str = "all") -> None:
        args = _encode("s", unit) + _encode("s", who) + _encode("i", signal)
        await self._run(lambda bus: _manager(bus, "KillUnit", args), f"killing {unit}")

    async def stop_unit(self, unit: str) -> str:
        """Stop and wait for the job; "done" also after a timeout kill: read Result for that."""
        args = _encode("s", unit) + _encode("s", "replace")
        return await self._job(
            unit, f"stopping {unit}", lambda bus: _manager(bus, "StopUnit", args)
        )

    async def reset_failed(self, unit: str) -> None:
        args = _encode("s", unit)
        await self._run(
            lambda bus: _manager(bus, "ResetFailedUnit", args), f"resetting failed {unit}"
        )

    async def unit_status(self, unit: str) -> UnitStatus | None:
        return await self._run(lambda bus: _status_sync(bus, unit), f"reading {unit}")

    async def list_scopes(self, pattern: str = SCOPE_PATTERN) -> list[UnitStatus]:
        return await self._run(lambda bus: _list_sync(bus, pattern), f"listing {pattern}")

    async def unit_pids(self, unit: str) -> list[int]:
        rows = await self._run(
            lambda bus: _manager(bus, "GetUnitProcesses", _encode("s", unit)),
            f"reading processes of {unit}",
        )
        return sorted({int(row[1]) for row in rows or []})

    # --- calls in the worker thread ---

    async def _run(self, function: Callable[[Any], T], context: str = "systemd") -> T:
        if self._closed:
            raise SystemdError(f"{context}: connection to systemd closed")
        return await self._loop.run_in_executor(self._executor, self._in_worker, function, context)

    def _in_worker(self, function: Callable[[Any], T], context: str) -> T:
        try:
            if self._call_bus is None:
                bus = DBus()
                bus.open()
                self._call_bus = bus
            return function(self._call_bus)
        except DBusBaseError as exc:
            if exc.errno is not None and -exc.errno in _DISCONNECTED_ERRNOS:
                self._close_call_bus()  # the next call reconnects
            raise map_error(exc, context) from exc

    def _close_call_bus(self) -> None:
        bus, self._call_bus = self._call_bus, None
        if bus is not None:
            bus.close()

    async def _job(self, unit: str, context: str, function: Callable[[Any], Any]) -> str:
        """Run a call that returns a job path; wait for that job's JobRemoved result."""
        watch = _JobWatch(self._loop.create_future())
        self._job_watches.setdefault(unit, []).append(watch)
        try:
            if self._signal_bus is None:
                raise SystemdError(f"{context}: no connection for systemd's signals")
            job_path = await self._run(function, context)
            watch.expect(job_path)
            return await watch.future
        finally:
            watches = self._job_watches.get(unit, [])
            with contextlib.suppress(ValueError):
                watches.remove(watch)
            if not watches:
                self._job_watches.pop(unit, None)

    async def _discard(self, unit: str, status: UnitStatus | None) -> None:
        """Leave nothing behind after a failed start: stop it if active, clear a failure."""
        if status is None:
            return
        with contextlib.suppress(SystemdError):
            if status.active_state not in ("inactive", "failed"):
                await self.stop_unit(unit)
            await self.reset_failed(unit)

    # --- signals on the loop ---

    def _drain(self) -> None:
        """Read every queued message; a NULL message twice in a row means the queue is empty.

        (pystemd hides sd_bus_process's return value: a message sd-bus handled itself also
        looks empty, so one empty result alone does not prove the queue is drained.)
        """
        empty_in_a_row = 0
        while empty_in_a_row < 2 and self._signal_bus is not None:
            try:
                message = self._signal_bus.process()
            except DBusBaseError as exc:
                log.error("systemd signal connection failed: %s", exc)
                self._stop_signals(map_error(exc, "systemd signal connection"))
                return
            if self._dispatch(message):
                empty_in_a_row = 0
            else:
                empty_in_a_row += 1

    def _dispatch(self, message: Any) -> bool:
        """Handle one message; False when there was none."""
        if message.is_empty():
            if message.is_signal(_LOCAL_IFACE, b"Disconnected"):
                log.error("the system bus closed the systemd signal connection")
                self._stop_signals(SystemdError("the system bus connection was closed"))
                return True
            return False  # NULL (or a body-less message we do not match)
        if message.is_signal(_DBUS, b"NameOwnerChanged"):
            if message.get_sender() == _DBUS:
                message.process_reply(True)
                self._systemd_owner = message.body[2]
            return True
        if message.get_sender() != self._systemd_owner:
            return True  # a forged or stray signal: only systemd's own are trusted
        if message.is_signal(_PROPS_IFACE, b"PropertiesChanged"):
            self._properties_changed(message)
        elif message.is_signal(_MANAGER_IFACE, b"JobRemoved"):
            message.process_reply(True)
            _job_id, job_path, unit, result = message.body
            self._job_removed(_text(unit), job_path, _text(result))
        elif message.is_signal(_MANAGER_IFACE, b"UnitRemoved"):
            message.process_reply(True)
            unit = _text(message.body[0])
            if fnmatch.fnmatchcase(unit, SCOPE_PATTERN):
                self._tracked.pop(unit, None)
                self._emit(UnitEvent("removed", unit))
        elif message.is_signal(_MANAGER_IFACE, b"Reloading"):
            message.process_reply(True)
            self._emit(UnitEvent("reloading", "", reloading=bool(message.body)))
        return True

    def _properties_changed(self, message: Any) -> None:
        unit = unit_name_from_path(_text(message.get_path()))
        if unit is None or not fnmatch.fnmatchcase(unit, SCOPE_PATTERN):
            return  # filtered before decoding the (large) body
        message.process_reply(True)
        interface, changed = message.body[0], message.body[1]
        if not isinstance(changed, dict):
            return
        tracked = self._tracked.setdefault(unit, _Tracked())
        if interface == _UNIT_IFACE:
            # systemd sends the type's interface (with Result) first, then Unit: so the status
            # emitted here carries the Result that belongs to this state.
            tracked.load_state = _text(changed.get(b"LoadState", tracked.load_state))
            tracked.active_state = _text(changed.get(b"ActiveState", tracked.active_state))
            tracked.sub_state = _text(changed.get(b"SubState", tracked.sub_state))
            status = UnitStatus(
                unit, tracked.load_state, tracked.active_state, tracked.sub_state, tracked.result
            )
            self._emit(UnitEvent("changed", unit, status=status))
        elif b"Result" in changed:
            tracked.result = _text(changed[b"Result"])

    def _job_removed(self, unit: str, job_path: bytes, result: str) -> None:
        for watch in list(self._job_watches.get(unit, ())):
            watch.job_removed(job_path, result)
        if fnmatch.fnmatchcase(unit, SCOPE_PATTERN):
            self._emit(UnitEvent("job-removed", unit, job_result=result))

    def _emit(self, event: UnitEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("unit event subscriber failed on %s", event)

    def _stop_signals(self, error: SystemdError) -> None:
        """The signal connection is gone: nothing will resolve waiting jobs, so fail them."""
        if self._signal_fd is not None:
            self._loop.remove_reader(self._signal_fd)
            self._signal_fd = None
        bus, self._signal_bus = self._signal_bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.close()
        for watches in self._job_watches.values():
            for watch in watches:
                if not watch.future.done():
                    watch.future.set_exception(error)


def _alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie (what systemd can put in a scope)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- race-free spawn -------------------------------------------------------------------------

_TRAMPOLINE = Path(_spawn_trampoline.__file__)


async def spawn_in_scope(
    systemd: Systemd,
    argv: Sequence[str],
    unit: str,
    props: ScopeProperties,
    *,
    env: Mapping[str, str],
    stdout: int,
    stderr: int,
) -> asyncio.subprocess.Process:
    """Start ARGV already inside a new scope: not one instruction of it runs outside.

    A trampoline child waits on a socket until the scope holds it, then execs ARGV. If the scope
    cannot be created, the child is killed and reaped before it ran ARGV and the error is
    re-raised. Returns once ARGV is executing; an exec failure raises OSError (the empty scope
    is stopped). stdin is /dev/null; the caller removes NOTIFY_SOCKET from ENV.
    """
    if not argv:
        raise ValueError("empty argv")
    loop = asyncio.get_running_loop()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        parent_end.setblocking(False)
        child_fd = child_end.fileno()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(_TRAMPOLINE),
            str(child_fd),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            pass_fds=(child_fd,),
        )
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()  # only the child holds it now: its EOF tracks the parent's life

    with parent_end:
        try:
            await systemd.start_scope(unit, [process.pid], props)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            parent_end.close()
            await asyncio.shield(process.wait())
            raise
        try:
            await loop.sock_sendall(parent_end, _spawn_trampoline.GO)
            report = await loop.sock_recv(parent_end, 64)  # b"": exec'd (close-on-exec)
        except OSError:
            report = b""  # the child died on its own; the caller sees its exit status
    if not report:
        return process
    code = int(report.decode() or 0)
    await process.wait()
    with contextlib.suppress(SystemdError):
        await systemd.stop_unit(unit)
    raise OSError(code, f"cannot execute {argv[0]}: {os.strerror(code)}")
