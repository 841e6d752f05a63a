"""The only place that talks to systemd: transient scopes, their jobs and their signals.

Method calls go through sdbus's asyncio client on a private system-bus connection: each call is
sent with ``sd_bus_call_async`` and its reply read on the loop, so the loop runs on while systemd
is slow to answer (during ``daemon-reload`` it answers nothing for the reload's whole length).
They used to run on pystemd in a worker thread, but pystemd's ``call_method`` holds the GIL
through ``sd_bus_call``: the "background" call froze the loop for as long as systemd took.

The unit signals arrive on a second connection, opened with pystemd and read from the loop
(``add_reader`` on its fd). It registers its match rules with the bus daemon directly and reads
the matching signals as unhandled messages from ``process()``: this allows a ``path_namespace``
rule (neither pystemd's ``match_signal`` nor sdbus's ``match_signal_async`` can express one),
lets the adapter trust only systemd's current unique name, and needs no C-level callbacks
(pystemd keeps a raw pointer to those, so a collected callback crashes). Its only blocking calls
are the setup calls to the bus daemon itself (AddMatch, GetNameOwner), never to systemd, and
after setup it makes no call at all, so no signal can hide in sd-bus's queue while the fd stays
quiet. systemd's Subscribe goes over the sdbus connection and lasts as long as the adapter.

Either connection can be lost (`systemctl restart dbus` closes every client's connection; the
bus daemon can also drop one connection alone). A lost connection is noticed from the bus
itself, never by polling: sd-bus's local ``Disconnected`` signal on the call connection, the
same message or a failing ``process()`` on the signal connection. The adapter then fails every
waiting job, refuses further calls and sets ``lost``: it does not reconnect by itself, because
its Subscribe, its match rules and the unit states it tracked are gone with the connection and
signals sent meanwhile are lost. Its owner decides what to do (the daemon exits and is
restarted by systemd, whose reattach resynchronises every VM from systemd's current state).

systemd itself may go away for a moment while both connections stay: ``systemctl daemon-reexec``
(also run by upgrades of systemd) makes it drop its bus connection and come back under a new
unique name, keeping its units, jobs and subscribers. A call it had not answered gets NoReply
from the bus. The adapter rides through that (``_wait_for_systemd``): it waits, without
polling, for the NameOwnerChanged that names systemd's new owner, then calls again if the call
is safe to repeat, or finds out what the call did (a scope's creation, a stop). Checked with
systemd 252: the calls that got NoReply had not been carried out, jobs in progress end with
their JobRemoved from the new systemd, Subscribe lasts. During a reload or re-execution systemd
also sends UnitRemoved for every unit it is about to load again; the adapter reports a scope
removed only if it is still gone afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import logging
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pystemd.dbusexc import DBusBaseError, DBusNoSuchUnitError, DBusUnixProcessIdUnknownError
from pystemd.dbuslib import DBus
from sdbus.dbus_exceptions import DbusFailedError
from sdbus.sd_bus_internals import (
    SdBus,
    SdBusBaseError,
    SdBusLibraryError,
    SdBusUnmappedMessageError,
    sd_bus_open_system,
)

from supervisord_vm import _spawn_trampoline
from supervisord_vm.errors import NoSuchUnit, ProcessGone, SystemdError, UnitExists
from supervisord_vm.unitname import UNIT_NAME_MAX as UNIT_NAME_MAX  # noqa: PLC0414 - re-export
from supervisord_vm.unitname import escape_name as escape_name  # noqa: PLC0414 - re-export
from supervisord_vm.unitname import scope_name as scope_name  # noqa: PLC0414 - re-export

if TYPE_CHECKING:
    from supervisord_vm.confinement import QemuIdentity

log = logging.getLogger(__name__)

SCOPE_PATTERN = "svm-*.scope"

# How long a call waits for systemd to come back after it went away mid-call (daemon-reexec,
# measured about 0.25 s on 2 cores) before failing with the error that told it so.
SYSTEMD_AWAY_TIMEOUT = 30.0

# Method calls to systemd waiting for their reply at once, on the one call connection. The bus
# refuses more than a few hundred pending replies per connection (DbusLimitsExceededError);
# listing 400 scopes' Results at once hit that limit.
CALLS_IN_FLIGHT = 64

_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER_PATH = "/org/freedesktop/systemd1"
_MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
_UNIT_IFACE = "org.freedesktop.systemd1.Unit"
_UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

# The signal connection (pystemd) speaks bytes.
_B_SYSTEMD = _SYSTEMD.encode()
_B_MANAGER_IFACE = _MANAGER_IFACE.encode()
_B_UNIT_IFACE = _UNIT_IFACE.encode()
_B_PROPS_IFACE = b"org.freedesktop.DBus.Properties"
_B_DBUS = b"org.freedesktop.DBus"
_B_DBUS_PATH = b"/org/freedesktop/DBus"
_B_LOCAL_IFACE = b"org.freedesktop.DBus.Local"
LOCAL_IFACE = "org.freedesktop.DBus.Local"

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
# sdbus reports a failed sd-bus function as "... returned error number: -107".
_LIBRARY_ERRNO = re.compile(r"error number: -?(\d+)")

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
    # Resource-control properties as (name, D-Bus signature, value): resources.scope_properties
    resource_control: tuple[tuple[str, str, Any], ...] = ()


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


# --- D-Bus arguments ------------------------------------------------------------------------

_START_TRANSIENT_SIGNATURE = "ssa(sv)a(sa(sv))"


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
        *props.resource_control,
    ]


def _start_transient_args(
    unit: str, pids: Sequence[int], props: ScopeProperties
) -> tuple[str, str, list[tuple[str, tuple[str, Any]]], list[Any]]:
    """StartTransientUnit's arguments as sdbus takes them (a variant is (signature, value))."""
    properties = [
        (name, (signature, value)) for name, signature, value in scope_properties(pids, props)
    ]
    return unit, "fail", properties, []


# --- errors ----------------------------------------------------------------------------------

_ERRORS_BY_NAME: dict[str, type[SystemdError]] = {
    "org.freedesktop.systemd1.NoSuchUnit": NoSuchUnit,
    "org.freedesktop.systemd1.UnitExists": UnitExists,
    "org.freedesktop.systemd1.NoSuchProcess": ProcessGone,
    "org.freedesktop.DBus.Error.UnixProcessIdUnknown": ProcessGone,
}

# systemd left the bus while a call waited for it (re-executing): the bus answers the call.
_AWAY_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    }
)
_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"

# An object that vanished between two calls (unit unloaded meanwhile).
_GONE_ERRORS = frozenset(
    {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"}
)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


def error_name(exc: Exception) -> str:
    """The D-Bus error name an sdbus or pystemd error carries ("" for a local failure)."""
    if isinstance(exc, DbusFailedError):
        return exc.dbus_error_name  # a name some module mapped to a class
    if isinstance(exc, SdBusUnmappedMessageError) and exc.args:
        return _text(exc.args[0])  # args: (name, message)
    if isinstance(exc, DBusNoSuchUnitError):
        return "org.freedesktop.systemd1.NoSuchUnit"  # pystemd drops the name of mapped ones
    if isinstance(exc, DBusUnixProcessIdUnknownError):
        return "org.freedesktop.DBus.Error.UnixProcessIdUnknown"
    return _text(getattr(exc, "err_name", ""))


def _error_message(exc: Exception) -> str:
    if isinstance(exc, SdBusUnmappedMessageError) and len(exc.args) >= 2:
        return _text(exc.args[1])
    if isinstance(exc, SdBusBaseError):
        return _text(exc.args[0]) if exc.args else type(exc).__name__
    message = _text(getattr(exc, "err_message", ""))
    if message:
        return message
    code = getattr(exc, "errno", None)
    return os.strerror(abs(code)) if isinstance(code, int) and code else str(exc)


def map_error(exc: Exception, context: str) -> SystemdError:
    """Turn an sdbus (calls) or pystemd (signal connection) error into the project's type.

    Mapped by the D-Bus error name; the message is systemd's own.
    """
    name = error_name(exc)
    error_type = _ERRORS_BY_NAME.get(name, SystemdError)
    if error_type is SystemdError and getattr(exc, "errno", None) == -errno.ESRCH:
        error_type = ProcessGone
    return error_type(f"{context}: {_error_message(exc)}")


def systemd_away(exc: Exception) -> bool:
    """True for the bus's answer to a call systemd can no longer answer: it left the bus.

    NoReply is also what sd-bus says when a call times out (25 s); such a call then waits for
    an owner change that does not come, and fails after SYSTEMD_AWAY_TIMEOUT.
    """
    return error_name(exc) in _AWAY_ERRORS


def start_done(status: UnitStatus | None) -> bool:
    """The unit's state shows a start job's effect."""
    return status is not None and status.active_state == "active"


def stop_done(status: UnitStatus | None) -> bool:
    """The unit's state shows a stop job's effect (a stopped scope may be collected at once)."""
    return status is None or status.active_state in ("inactive", "failed")


def _disconnected(exc: SdBusBaseError) -> bool:
    """True when sd-bus failed because the connection is gone (the next call reconnects)."""
    if not isinstance(exc, SdBusLibraryError):
        return False
    found = _LIBRARY_ERRNO.search(str(exc))
    return found is not None and int(found.group(1)) in _DISCONNECTED_ERRNOS


def _variant_text(value: Any) -> str:
    """A property read's reply is a variant: (signature, value)."""
    if isinstance(value, tuple) and len(value) == 2:
        return _text(value[1])
    return _text(value)


# --- the signal connection's setup (blocking, but answered by the bus daemon only) ------------


def _open_signal_bus() -> tuple[Any, bytes]:
    """Open the signal connection: match rules first, then learn systemd's unique name.

    These calls go to the bus daemon, which answers at once even while systemd is busy.
    """
    bus = DBus()
    bus.open()
    try:
        for rule in _MATCH_RULES:
            bus.call_method(
                _B_DBUS, _B_DBUS_PATH, _B_DBUS, b"AddMatch", [(ord("s"), rule.encode())]
            )
        owner = bus.call_method(
            _B_DBUS, _B_DBUS_PATH, _B_DBUS, b"GetNameOwner", [(ord("s"), _B_SYSTEMD)]
        ).body
    except BaseException:
        bus.close()
        raise
    return bus, owner


# --- the adapter -----------------------------------------------------------------------------


@dataclass
class _JobWatch:
    """Collects JobRemoved for one unit from before the job's path is known (no lost race).

    ``done_when`` tells from the unit's state that the job's effect is there: after systemd
    re-executed, that settles a job whose JobRemoved might not come.
    """

    future: asyncio.Future[str]
    done_when: Callable[[UnitStatus | None], bool]
    path: str | None = None
    any_job: bool = False  # the path is unknown (the reply was lost): the unit's next job
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def job_known(self) -> bool:
        """systemd has the job: it was answered with its path, or found done or under way."""
        return self.path is not None or self.any_job

    def job_removed(self, path: str, result: str) -> None:
        if self.future.done():
            return
        if self.any_job or path == self.path:
            self.future.set_result(result)
        elif self.path is None:
            self.seen[path] = result

    def expect(self, path: str) -> None:
        self.path = path
        if path in self.seen and not self.future.done():
            self.future.set_result(self.seen[path])
        self.seen.clear()

    def expect_any(self) -> None:
        """Take the unit's first job to end, seen already or not (its path was never known)."""
        self.any_job = True
        if self.seen and not self.future.done():
            self.future.set_result(next(iter(self.seen.values())))
        self.seen.clear()

    def settle_from(self, status: UnitStatus | None) -> None:
        if self.job_known and not self.future.done() and self.done_when(status):
            self.future.set_result("done")


@dataclass
class _Tracked:
    """Last known state of one scope, assembled from its two PropertiesChanged signals."""

    load_state: str = "loaded"  # not in systemd's signal; a unit that sends one is loaded
    active_state: str = ""
    sub_state: str = ""
    result: str = ""


class Systemd:
    """systemd's manager on asyncio: calls with sdbus's async client, signals read on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        call_bus: SdBus | None,
        signal_bus: Any,
        systemd_owner: bytes,
    ) -> None:
        """Use ``connect()``; this only wires already opened parts together."""
        self._loop = loop
        self._call_bus = call_bus  # None: (re)opened by the next call
        self._signal_bus = signal_bus
        self._signal_fd: int | None = None
        self._systemd_owner = systemd_owner
        self._subscribers: list[Callable[[UnitEvent], None]] = []
        self._in_flight = asyncio.Semaphore(CALLS_IN_FLIGHT)
        self._job_watches: dict[str, list[_JobWatch]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._closed = False
        self._lost_reason = ""
        self._owner_event = asyncio.Event()  # set, and replaced, when systemd's owner changes
        self._reloading = False  # between systemd's Reloading(true) and Reloading(false)
        self._removed_while_reloading: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._disconnect_watches: list[asyncio.Future[Any]] = []  # keep the match slots alive
        self.lost = asyncio.Event()  # set once a connection is gone; see lost_reason

    @property
    def lost_reason(self) -> str:
        """Which connection was lost and how ("" while both are up)."""
        return self._lost_reason

    @classmethod
    async def connect(cls) -> Systemd:
        loop = asyncio.get_running_loop()
        try:
            signal_bus, owner = _open_signal_bus()
        except DBusBaseError as exc:
            raise map_error(exc, "connecting to systemd") from exc
        self = cls(loop, None, signal_bus, owner)
        self._signal_fd = signal_bus.get_fd()
        loop.add_reader(self._signal_fd, self._drain)
        loop.call_soon(self._drain)  # setup calls may have queued signals without waking the fd
        try:
            try:
                self._bus()
                await self._disconnect_watches[-1]  # the match is in place before Subscribe
            except SdBusBaseError as exc:
                raise map_error(exc, "connecting to systemd") from exc
            # Without a subscriber systemd emits no unit signals. The subscription belongs to
            # the call connection, so it ends when the adapter closes it.
            await self._call("subscribing to systemd", _MANAGER_PATH, _MANAGER_IFACE, "Subscribe")
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_signals(SystemdError("connection to systemd closed"))
        self._wake_owner_waiters()
        for task in list(self._tasks):
            task.cancel()
        bus, self._call_bus = self._call_bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.close()

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
        context = f"creating scope {unit}"

        async def after_lost_reply(watch: _JobWatch) -> str | None:
            return await self._scope_after_lost_reply(unit, pids, watch, context)

        result = await self._job(
            unit,
            context,
            "StartTransientUnit",
            _START_TRANSIENT_SIGNATURE,
            *_start_transient_args(unit, pids, props),
            done_when=start_done,
            after_lost_reply=after_lost_reply,
        )
        if result == "done":
            return
        status = await self.unit_status(unit)
        await self._discard(unit, status)
        detail = f"job {result}" + (f", unit result {status.result}" if status else "")
        if status is not None and status.result == "resources" and not any(map(_alive, pids)):
            raise ProcessGone(f"creating scope {unit}: the process exited ({detail})")
        raise SystemdError(f"creating scope {unit} failed: {detail}")

    async def _scope_after_lost_reply(
        self, unit: str, pids: Sequence[int], watch: _JobWatch, context: str
    ) -> str | None:
        """StartTransientUnit got no reply (systemd re-executed): did it create the scope?

        None: it did not, call again. A scope of that name holding our PIDs is ours: done, or
        its start job still runs (its path is unknown, so the unit's next job to end is it).
        """
        status = await self.unit_status(unit)
        if status is None:
            return None
        try:
            held = set(await self.unit_pids(unit))
        except NoSuchUnit:
            return None  # collected meanwhile: nothing of it is left
        if held.intersection(pids):
            if start_done(status):
                return "done"
            watch.expect_any()
            return await watch.future
        if not any(map(_alive, pids)):
            raise ProcessGone(f"{context}: the process exited (systemd re-executed meanwhile)")
        raise UnitExists(f"{context}: unit {unit} already exists and does not hold our process")

    async def kill_unit(self, unit: str, signal: int, who: str = "all") -> None:
        await self._manager(f"killing {unit}", "KillUnit", "ssi", unit, who, signal)

    async def stop_unit(self, unit: str) -> str:
        """Stop and wait for the job; "done" also after a timeout kill: read Result for that.

        Also "done" when a stop whose reply was lost (systemd re-executed) finds the unit
        stopped or gone.
        """

        async def after_lost_reply(watch: _JobWatch) -> str | None:
            return "done" if stop_done(await self.unit_status(unit)) else None

        return await self._job(
            unit,
            f"stopping {unit}",
            "StopUnit",
            "ss",
            unit,
            "replace",
            done_when=stop_done,
            after_lost_reply=after_lost_reply,
        )

    async def reset_failed(self, unit: str) -> None:
        await self._manager(f"resetting failed {unit}", "ResetFailedUnit", "s", unit)

    async def unit_status(self, unit: str) -> UnitStatus | None:
        context = f"reading {unit}"
        try:
            path = _text(await self._call_raw(_MANAGER_PATH, _MANAGER_IFACE, "GetUnit", "s", unit))
            load, active, sub, result = await asyncio.gather(
                self._get(path, _UNIT_IFACE, "LoadState"),
                self._get(path, _UNIT_IFACE, "ActiveState"),
                self._get(path, _UNIT_IFACE, "SubState"),
                self._result_of(unit, path),
            )
        except SdBusBaseError as exc:
            if error_name(exc) in _GONE_ERRORS:
                return None  # not loaded, or unloaded between GetUnit and the property reads
            raise map_error(exc, context) from exc
        return UnitStatus(unit, load, active, sub, result)

    async def list_scopes(self, pattern: str = SCOPE_PATTERN) -> list[UnitStatus]:
        """Every loaded unit matching `pattern`: one call, plus one Result read per unit that
        has ended (inactive or failed). A running unit's Result says nothing yet ("" here):
        at 500 running VMs this is one call, not 501."""
        rows = await self._manager(
            f"listing {pattern}", "ListUnitsByPatterns", "asas", [], [pattern]
        )
        rows = list(rows or [])

        async def result_of(row: Any) -> str:
            if _text(row[3]) not in ("inactive", "failed"):
                return ""
            return await self._result_of(_text(row[0]), _text(row[6]))

        results = await asyncio.gather(*(result_of(row) for row in rows), return_exceptions=True)
        statuses = []
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, SdBusBaseError) and error_name(result) in _GONE_ERRORS:
                    continue  # unloaded meanwhile
                if isinstance(result, Exception):
                    raise map_error(result, f"listing {pattern}") from result
                raise result
            statuses.append(
                UnitStatus(_text(row[0]), _text(row[2]), _text(row[3]), _text(row[4]), result)
            )
        return statuses

    async def unit_properties(self, unit: str, interface: str) -> dict[str, Any] | None:
        """Every property of a loaded unit on one interface (a GetAll), values unwrapped; None
        when the unit is not loaded."""
        try:
            path = _text(await self._call_raw(_MANAGER_PATH, _MANAGER_IFACE, "GetUnit", "s", unit))
            values = await self._call_raw(
                path, "org.freedesktop.DBus.Properties", "GetAll", "s", interface
            )
        except SdBusBaseError as exc:
            if error_name(exc) in _GONE_ERRORS:
                return None
            raise map_error(exc, f"reading properties of {unit}") from exc
        return {str(name): value[1] for name, value in (values or {}).items()}

    async def unit_pids(self, unit: str) -> list[int]:
        rows = await self._manager(f"reading processes of {unit}", "GetUnitProcesses", "s", unit)
        return sorted({int(row[1]) for row in rows or []})

    # --- calls (sdbus, on the loop) ---

    def _bus(self) -> SdBus:
        """The call connection, opened on first use; never reopened once lost."""
        if self._lost_reason:
            raise SdBusLibraryError(f"connection to systemd lost: {self._lost_reason}")
        if self._call_bus is None:
            bus = sd_bus_open_system()
            self._call_bus = bus
            self._watch_disconnect(bus)
        return self._call_bus

    def _watch_disconnect(self, bus: SdBus) -> None:
        """Learn of the call connection's end from sd-bus's local Disconnected signal.

        The rule names only the member: a rule naming the interface org.freedesktop.DBus.Local
        is kept local by sd-bus, which then never completes sdbus's future for the match (and
        sdbus hands the signal to that future instead of the callback). The bus daemon routes
        signals of that member from others too; the callback checks the interface.
        """

        def disconnected(message: Any) -> None:
            if message.interface == LOCAL_IFACE and self._call_bus is bus:
                self._call_bus = None
                with contextlib.suppress(Exception):
                    bus.close()
                self._lose("the system bus closed the connection for calls to systemd")

        watch = asyncio.ensure_future(
            bus.match_signal_async(None, None, None, "Disconnected", disconnected)
        )
        # A bus closed before the bus daemon confirmed the rule fails the future: nobody waits.
        watch.add_done_callback(lambda future: future.cancelled() or future.exception())
        self._disconnect_watches.append(watch)

    async def _call_raw(
        self, path: str, interface: str, method: str, signature: str = "", *args: Any
    ) -> Any:
        """One method call to systemd; raises sdbus's errors. The reply's contents: one value
        for a one-value reply, a tuple for several.

        Only for calls that are safe to repeat: one that systemd left unanswered (it went away,
        see ``systemd_away``) is made again once systemd is back.
        """
        while True:
            owner = self._systemd_owner
            try:
                return await self._call_once(path, interface, method, signature, *args)
            except SdBusBaseError as exc:
                if not systemd_away(exc) or not await self._wait_for_systemd(owner):
                    raise
                log.info("systemd went away during %s (%s); calling again", method, exc)

    async def _wait_for_systemd(self, owner_at_call: bytes) -> bool:
        """Wait until systemd's name has an owner other than the one a failed call went to.

        NameOwnerChanged on the signal connection says so; the bus's error for the call comes
        on the other connection, in either order. False if systemd is not back within
        SYSTEMD_AWAY_TIMEOUT, or the adapter was closed or lost meanwhile.
        """
        try:
            async with asyncio.timeout(SYSTEMD_AWAY_TIMEOUT):
                while self._systemd_owner in (owner_at_call, b"") and self._usable():
                    await self._owner_event.wait()
        except TimeoutError:
            log.error("systemd did not come back within %g s", SYSTEMD_AWAY_TIMEOUT)
            return False
        return self._usable()

    def _usable(self) -> bool:
        return not (self._closed or self._lost_reason)

    def _wake_owner_waiters(self) -> None:
        event, self._owner_event = self._owner_event, asyncio.Event()
        event.set()

    async def call_service(
        self,
        destination: str,
        path: str,
        interface: str,
        method: str,
        signature: str = "",
        *args: Any,
    ) -> Any:
        """One call to another of systemd's services (machined) on the call connection, within
        the same bound of calls in flight. Raises sdbus's errors as they are (``error_name``
        reads their D-Bus name); never repeated, whatever the answer."""
        return await self._call_once(
            path, interface, method, signature, *args, destination=destination
        )

    async def _call_once(
        self,
        path: str,
        interface: str,
        method: str,
        signature: str = "",
        *args: Any,
        destination: str = _SYSTEMD,
    ) -> Any:
        if self._closed:
            raise SdBusLibraryError("connection to systemd closed")
        bus: SdBus | None = None
        try:
            bus = self._bus()  # opening the system bus can fail too: map that like a call
            message = bus.new_method_call_message(destination, path, interface, method)
            if signature:
                message.append_data(signature, *args)
            async with self._in_flight:
                reply = await bus.call_async(message)
        except SdBusBaseError as exc:
            if bus is not None and self._call_bus is bus and _disconnected(exc):
                self._call_bus = None
                with contextlib.suppress(Exception):
                    bus.close()
                self._lose(f"a call to systemd found its connection gone ({exc})")
            raise
        return reply.get_contents()

    async def _call(
        self, context: str, path: str, interface: str, method: str, signature: str = "", *args: Any
    ) -> Any:
        try:
            return await self._call_raw(path, interface, method, signature, *args)
        except SdBusBaseError as exc:
            raise map_error(exc, context) from exc

    async def _manager(self, context: str, method: str, signature: str = "", *args: Any) -> Any:
        return await self._call(context, _MANAGER_PATH, _MANAGER_IFACE, method, signature, *args)

    async def _get(self, path: str, interface: str, prop: str) -> str:
        """Read one string property (org.freedesktop.DBus.Properties.Get); raw sdbus errors."""
        value = await self._call_raw(
            path, "org.freedesktop.DBus.Properties", "Get", "ss", interface, prop
        )
        return _variant_text(value)

    async def _result_of(self, unit: str, path: str) -> str:
        iface = _RESULT_IFACES.get(unit.rpartition(".")[2])
        if iface is None:
            return ""
        return await self._get(path, f"org.freedesktop.systemd1.{iface}", "Result")

    async def _job(
        self,
        unit: str,
        context: str,
        method: str,
        signature: str,
        *args: Any,
        done_when: Callable[[UnitStatus | None], bool],
        after_lost_reply: Callable[[_JobWatch], Awaitable[str | None]],
    ) -> str:
        """Run a manager call that returns a job path; wait for that job's JobRemoved result.

        A call systemd left unanswered is not blindly repeated: once systemd is back,
        ``after_lost_reply`` finds out what it did and returns the job's result, or None to
        call again.
        """
        watch = _JobWatch(self._loop.create_future(), done_when)
        self._job_watches.setdefault(unit, []).append(watch)
        try:
            if self._signal_bus is None:
                raise SystemdError(f"{context}: no connection for systemd's signals")
            while True:
                owner = self._systemd_owner
                try:
                    job_path = await self._call_once(
                        _MANAGER_PATH, _MANAGER_IFACE, method, signature, *args
                    )
                except SdBusBaseError as exc:
                    if not systemd_away(exc) or not await self._wait_for_systemd(owner):
                        raise map_error(exc, context) from exc
                    log.info("systemd went away during %s (%s); checking what it did", method, exc)
                    result = await after_lost_reply(watch)
                    if result is not None:
                        return result
                    continue
                watch.expect(_text(job_path))
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
                self._lose(f"the connection for systemd's signals failed: {map_error(exc, 'read')}")
                return
            if self._dispatch(message):
                empty_in_a_row = 0
            else:
                empty_in_a_row += 1

    def _dispatch(self, message: Any) -> bool:
        """Handle one message; False when there was none."""
        if message.is_empty():
            if message.is_signal(_B_LOCAL_IFACE, b"Disconnected"):
                self._lose("the system bus closed the connection for systemd's signals")
                return True
            return False  # NULL (or a body-less message we do not match)
        if message.is_signal(_B_DBUS, b"NameOwnerChanged"):
            if message.get_sender() == _B_DBUS:
                message.process_reply(True)
                self._owner_changed(bytes(message.body[2]))
            return True
        if message.get_sender() != self._systemd_owner:
            return True  # a forged or stray signal: only systemd's own are trusted
        if message.is_signal(_B_PROPS_IFACE, b"PropertiesChanged"):
            self._properties_changed(message)
        elif message.is_signal(_B_MANAGER_IFACE, b"JobRemoved"):
            message.process_reply(True)
            _job_id, job_path, unit, result = message.body
            self._job_removed(_text(unit), _text(job_path), _text(result))
        elif message.is_signal(_B_MANAGER_IFACE, b"UnitRemoved"):
            message.process_reply(True)
            unit = _text(message.body[0])
            if not fnmatch.fnmatchcase(unit, SCOPE_PATTERN):
                pass
            elif self._reloading:
                self._removed_while_reloading.add(unit)  # systemd unloads every unit to reload
            else:
                self._unit_removed(unit)
        elif message.is_signal(_B_MANAGER_IFACE, b"Reloading"):
            message.process_reply(True)
            self._reloading = bool(message.body)
            self._emit(UnitEvent("reloading", "", reloading=self._reloading))
            if not self._reloading and self._removed_while_reloading:
                self._spawn(self._settle_removals())
        return True

    def _unit_removed(self, unit: str) -> None:
        self._tracked.pop(unit, None)
        self._emit(UnitEvent("removed", unit))

    def _owner_changed(self, owner: bytes) -> None:
        """systemd's unique name changed: it left the bus, or came back after re-executing."""
        if owner == self._systemd_owner:
            return
        previous, self._systemd_owner = self._systemd_owner, owner
        self._wake_owner_waiters()
        if not owner:
            log.warning("systemd left the bus (was %s)", _text(previous))
            return
        log.info("systemd is on the bus as %s (was %s)", _text(owner), _text(previous) or "none")
        self._spawn(self._after_systemd_returned())

    async def _after_systemd_returned(self) -> None:
        """Check what re-executing may have cost: Subscribe, jobs' JobRemoved, removals.

        Calls made now are answered once systemd has loaded its state again.
        """
        try:
            await self._call_raw(_MANAGER_PATH, _MANAGER_IFACE, "Subscribe")
            log.warning("systemd had forgotten the adapter's Subscribe; subscribed again")
        except SdBusBaseError as exc:
            if error_name(exc) != _ALREADY_SUBSCRIBED:
                log.error("cannot subscribe to systemd again: %s", map_error(exc, "subscribing"))
        for unit, watches in list(self._job_watches.items()):
            if not any(watch.job_known and not watch.future.done() for watch in watches):
                continue
            try:
                status = await self.unit_status(unit)
            except SystemdError as err:
                log.error("cannot read %s after systemd came back: %s", unit, err)
                continue
            for watch in watches:
                watch.settle_from(status)
        await self._settle_removals()

    async def _settle_removals(self) -> None:
        """Report the scopes systemd removed while reloading that it did not load again.

        One listing of this project's scopes answers for all of them, however many VMs run.
        """
        units, self._removed_while_reloading = self._removed_while_reloading, set()
        if not units:
            return
        try:
            rows = await self._manager(
                "listing scopes after a reload", "ListUnitsByPatterns", "asas", [], [SCOPE_PATTERN]
            )
            loaded = {_text(row[0]) for row in rows or []}
        except SystemdError as err:
            log.error("cannot list scopes after systemd reloaded: %s", err)
            loaded = set()  # a false "removed" only makes the owner look at its process
        for unit in sorted(units - loaded):
            self._unit_removed(unit)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _properties_changed(self, message: Any) -> None:
        unit = unit_name_from_path(_text(message.get_path()))
        if unit is None or not fnmatch.fnmatchcase(unit, SCOPE_PATTERN):
            return  # filtered before decoding the (large) body
        message.process_reply(True)
        interface, changed = message.body[0], message.body[1]
        if not isinstance(changed, dict):
            return
        tracked = self._tracked.setdefault(unit, _Tracked())
        if interface == _B_UNIT_IFACE:
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

    def _job_removed(self, unit: str, job_path: str, result: str) -> None:
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

    def _lose(self, reason: str) -> None:
        """A connection is gone: fail what waits on it, refuse what comes, tell the owner once.

        Both connections go: a Subscribe or a match rule that lived on the lost one is not
        there any more, so half an adapter would silently miss exits.
        """
        if self._closed or self._lost_reason:
            return
        self._lost_reason = reason
        log.error("lost the connection to systemd: %s", reason)
        self._wake_owner_waiters()
        self._stop_signals(SystemdError(f"connection to systemd lost: {reason}"))
        bus, self._call_bus = self._call_bus, None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.close()
        self.lost.set()

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
    pass_fds: Sequence[int] = (),
    run_as: QemuIdentity | None = None,
    umask: int = 0o022,
) -> asyncio.subprocess.Process:
    """Start ARGV already inside a new scope: not one instruction of it runs outside.

    A trampoline child waits on a socket until the scope holds it, then execs ARGV. If the scope
    cannot be created, the child is killed and reaped before it ran ARGV and the error is
    re-raised. Returns once ARGV is executing; an exec failure raises OSError (the empty scope
    is stopped). stdin is /dev/null; the caller removes NOTIFY_SOCKET from ENV. PASS_FDS are
    handed to ARGV under the same numbers (sockets and files the daemon opened for QEMU).
    RUN_AS (with UMASK): the trampoline drops to that identity, with no capability left and
    no_new_privs, after the scope holds it and before the exec (None: ARGV runs as we do). A
    failure to drop raises OSError(EPERM) with the trampoline's message; ARGV never ran.
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
            _spawn_trampoline.UNCONFINED
            if run_as is None
            else _spawn_trampoline.encode_credentials(run_as.uid, run_as.gid, run_as.groups, umask),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            pass_fds=(child_fd, *pass_fds),
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
    await process.wait()
    with contextlib.suppress(SystemdError):
        await systemd.stop_unit(unit)
    if report.startswith(_spawn_trampoline.PRIVILEGE_FAILURE):
        raise OSError(errno.EPERM, report[1:].decode("utf-8", "replace"))
    code = int(report.decode() or 0)
    raise OSError(code, f"cannot execute {argv[0]}: {os.strerror(code)}")
