"""The D-Bus face of the supervisor: org.supervisordvm1 on the system bus (sdbus).

Modelled on org.freedesktop.machine1: one Manager object that takes VM names, and one object per
VM whose properties follow the VM (with PropertiesChanged). The Manager is also the VM objects'
org.freedesktop.DBus.ObjectManager, so one GetManagedObjects call reads every VM's properties
(svmctl list) and InterfacesAdded/InterfacesRemoved announce VMs coming and going. This module
only translates: bus calls become Supervisor calls, core exceptions become one error name each,
core events become signals. It authorizes every changing call from the caller's credentials
(root or group supervisord-vm) and audits it in the journal; reading is open to everyone.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import pwd
import socket
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from sdbus import (
    DbusFailedError,
    DbusInterfaceCommonAsync,
    DbusObjectManagerInterfaceAsync,
    DbusPropertyEmitsChangeFlag,
    DbusUnprivilegedFlag,
    SdBus,
    dbus_method_async,
    dbus_property_async,
    dbus_signal_async,
    get_current_message,
)
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle

from supervisord_vm import api, errors, journal
from supervisord_vm.api import ADMIN_GROUP, ERROR_PREFIX, MANAGER_INTERFACE, MANAGER_PATH
from supervisord_vm.console import ConsoleUnavailable
from supervisord_vm.model import Caller, DestroyMode, MachineEvent, MachineInfo
from supervisord_vm.resources import bus_values
from supervisord_vm.shutdown_all import shutdown_all
from supervisord_vm.signals import signal_number

if TYPE_CHECKING:
    from supervisord_vm.supervisor import Supervisor

log = logging.getLogger(__name__)

# The API's names live in api.py (svmctl reads them without loading sdbus); these are named
# here too for the daemon, the tests and other existing callers.
BUS_NAME = api.BUS_NAME
MACHINE_PATH_PREFIX = api.MACHINE_PATH_PREFIX
MACHINE_INTERFACE = api.MACHINE_INTERFACE
TIMEOUT_MAX = api.TIMEOUT_MAX
machine_path = api.machine_path
# The core's audit MESSAGE_ID (supervisor.AUDIT_MESSAGE_ID, derived the same way; importing the
# core here would load it into svmctl too): refusals and accepted calls share one catalogue id.
AUDIT_MESSAGE_ID = uuid.uuid5(uuid.NAMESPACE_URL, "org.supervisordvm1.audit").hex
LOG_TAIL_LIMIT = 1 << 20  # bytes of QEMU output one GetLog call may return
CONSOLE_FORCE = 1  # OpenConsoleWithFlags: take the console over (virsh console --force)

T = TypeVar("T")


# --- errors: one D-Bus name per core error -------------------------------------------------


class NoSuchMachineError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "NoSuchMachine"


class MachineExistsError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "MachineExists"


class AlreadyRunningError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "AlreadyRunning"


class NotRunningError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "NotRunning"


class InvalidStateError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "InvalidState"


class BusyError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "Busy"


class TimeoutError_(DbusFailedError):  # "TimeoutError" would shadow the builtin
    dbus_error_name = ERROR_PREFIX + "Timeout"


class InvalidDefinitionError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "InvalidDefinition"


class InvalidArgumentError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "InvalidArgument"


class AccessDeniedError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "AccessDenied"


class DiskAccessDeniedError(DbusFailedError):
    """A group member's definition names a disk they may not use (README, "Confinement")."""

    dbus_error_name = ERROR_PREFIX + "DiskAccessDenied"


class StartFailedError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "StartFailed"


class SystemdErrorError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "SystemdError"


class QmpErrorError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "QmpError"


class FailedError(DbusFailedError):
    dbus_error_name = ERROR_PREFIX + "Failed"


class ConsoleUnavailableError(DbusFailedError):
    """The VM runs but the daemon has no connection to its serial console."""

    dbus_error_name = ERROR_PREFIX + "ConsoleUnavailable"


class NoSpaceError(DbusFailedError):
    """The daemon's files could not be written: the file system (or quota) is full."""

    dbus_error_name = ERROR_PREFIX + "NoSpace"


# Most specific first: the first isinstance match wins (QmpDisconnected is a QmpError, ...).
_ERROR_MAP: tuple[tuple[type[Exception], type[DbusFailedError]], ...] = (
    (errors.NoSuchMachine, NoSuchMachineError),
    (errors.MachineExists, MachineExistsError),
    (errors.AlreadyRunning, AlreadyRunningError),
    (errors.NotRunning, NotRunningError),
    (errors.InvalidState, InvalidStateError),
    (errors.Busy, BusyError),
    (errors.OperationTimeout, TimeoutError_),
    (errors.InvalidDefinition, InvalidDefinitionError),
    (errors.DiskAccessDenied, DiskAccessDeniedError),
    (errors.StartFailed, StartFailedError),
    (errors.SystemdError, SystemdErrorError),
    (errors.QmpError, QmpErrorError),
    (ConsoleUnavailable, ConsoleUnavailableError),
)


def to_bus_error(exc: BaseException) -> DbusFailedError:
    """The error a client sees for ``exc``: a specific name, a message for a person."""
    if isinstance(exc, DbusFailedError) and exc.dbus_error_name.startswith(ERROR_PREFIX):
        return exc
    for core_type, bus_type in _ERROR_MAP:
        if isinstance(exc, core_type):
            return bus_type(str(exc) or core_type.__name__)
    if isinstance(exc, errors.SvmError):
        return FailedError(str(exc) or type(exc).__name__)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"cannot write {exc.filename}" if exc.filename else "cannot write a file"
        return NoSpaceError(f"{where}: {exc.strerror}; nothing was changed")
    if isinstance(exc, OSError):
        return FailedError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    log.error("internal error in a D-Bus call", exc_info=exc)
    return FailedError(f"internal error ({type(exc).__name__}: {exc}); see the daemon's journal")


async def _translated(operation: Awaitable[T]) -> T:
    """Await ``operation``; whatever it raises leaves as an org.supervisordvm1.Error.*."""
    try:
        return await operation
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise to_bus_error(exc) from exc


# --- who is calling -------------------------------------------------------------------------


class _DBusDaemon(DbusInterfaceCommonAsync, interface_name="org.freedesktop.DBus"):
    """Just enough of the bus driver to learn a caller's credentials."""

    @dbus_method_async(
        "s",
        "a{sv}",
        method_name="GetConnectionCredentials",
        flags=DbusUnprivilegedFlag,
        result_args_names=(),
    )
    async def get_connection_credentials(self, bus_name: str) -> dict[str, tuple[str, Any]]:
        raise NotImplementedError


def _admin_gid() -> int | None:
    try:
        return grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return None


def _user_groups(uid: int) -> set[int]:
    """Supplementary and primary groups of ``uid`` from the user database (fallback path)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)}


# Authorization's own threads: a refusal must stay quick however busy the shared pool is with
# slow jobs of VMs (a hostile client's failed starts each read the journal for seconds).
_AUTH_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="svm-auth")


async def _in_auth_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_AUTH_THREADS, function, *args)


class Authorizer:
    """Decides who may change things: root and members of group supervisord-vm.

    The credentials come from the bus driver (GetConnectionCredentials): the uid, pid and the
    groups the caller's process had when it connected — the kernel's view, not a claim.
    """

    # Credential look-ups waiting for the bus driver at once: each is a pending reply on the
    # daemon's own connection, which the bus limits to a few hundred; callers beyond this wait.
    LOOKUPS_IN_FLIGHT = 32

    def __init__(self, bus: SdBus) -> None:
        self._driver = _DBusDaemon.new_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", bus)
        self._lookups = asyncio.Semaphore(self.LOOKUPS_IN_FLIGHT)

    async def caller(self) -> tuple[Caller, set[int] | None]:
        sender = get_current_message().sender
        if sender is None:  # a direct (peer-to-peer) connection: only root can have made it
            return Caller(uid=0, pid=0), {0}
        async with self._lookups:
            creds = await self._driver.get_connection_credentials(sender)
        uid = int(creds["UnixUserID"][1])
        pid = int(creds["ProcessID"][1]) if "ProcessID" in creds else 0
        groups = {int(g) for g in creds["UnixGroupIDs"][1]} if "UnixGroupIDs" in creds else None
        caller_groups = tuple(sorted(groups)) if groups is not None else None
        return Caller(uid=uid, pid=pid, groups=caller_groups), groups

    @staticmethod
    async def allowed(caller: Caller, groups: set[int] | None) -> bool:
        """Root, or a member of the admin group.

        The group database is read in a worker thread: NSS may ask LDAP or sssd, which can take
        seconds, and the event loop must keep answering other callers (and feeding the watchdog)
        meanwhile. It is read on every call, not cached, so a group created or a member added
        while the daemon runs counts at once.
        """
        if caller.uid == 0:
            return True
        gid = await _in_auth_thread(_admin_gid)
        if gid is None:
            return False
        if groups is None:
            groups = await _in_auth_thread(_user_groups, caller.uid)
        return gid in groups


def audit(caller: Caller, operation: str, target: str, result: str) -> None:
    """One journal record per changing call: who, what, on which VM, and how it ended.

    It carries the same fields as the core's audit records (CALLER_UID, CALLER_PID,
    VM_OPERATION, VM_RESULT), so one journalctl match finds a caller's refusals and its
    accepted calls alike; the SVM_AUDIT_* fields are kept for existing queries.
    """
    journal.send(
        f"audit: uid={caller.uid} pid={caller.pid} {operation}({target}): {result}",
        logging.INFO if result == "ok" else logging.WARNING,
        MESSAGE_ID=AUDIT_MESSAGE_ID,
        CALLER_UID=caller.uid,
        CALLER_PID=caller.pid,
        VM_OPERATION=operation.lower(),
        VM_RESULT=result,
        SVM_AUDIT_UID=caller.uid,
        SVM_AUDIT_PID=caller.pid,
        SVM_AUDIT_OPERATION=operation,
        SVM_AUDIT_RESULT=result,
        VM_NAME=target or None,
    )


def parse_signal(text: str) -> int:
    """A signal as `systemctl kill --signal` takes it; InvalidArgument for anything else."""
    try:
        return signal_number(text)
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None


def parse_mode(text: str) -> DestroyMode:
    try:
        return DestroyMode(text or "default")
    except ValueError:
        raise InvalidArgumentError(
            f"unknown destroy mode {text!r} (use default, graceful or force)"
        ) from None


def parse_timeout(seconds: float, what: str) -> float | None:
    """D-Bus has no optional arguments: 0 means "none given"."""
    if not 0 <= seconds <= TIMEOUT_MAX:  # negative, NaN, infinite or beyond any sane wait
        raise InvalidArgumentError(
            f"{what} must be from 0 to {TIMEOUT_MAX:.0f} seconds (0 = none), not {seconds}"
        )
    return seconds or None


class _Service:
    """What both object types share: the supervisor, authorization, audit, translation."""

    def __init__(self, supervisor: Supervisor, authorizer: Authorizer) -> None:
        self.supervisor = supervisor
        self.authorizer = authorizer

    async def change(
        self, operation: str, target: str, action: Callable[[Caller], Awaitable[T]]
    ) -> T:
        """Authorize, then run and translate one changing call; audit every refusal.

        ``action`` parses the call's arguments itself, so it runs only once the caller is
        known to be allowed: whoever may not change anything gets AccessDenied, whatever the
        arguments, and learns nothing from them. The core writes the audit record of every
        call it receives (it has the Caller); the refusals made here never reach it, so this
        audits them: AccessDenied ("denied") and arguments refused by the edge
        ("InvalidArgument: ...", as the core words its own refusals).
        """
        caller, groups = await _translated(self.authorizer.caller())
        if not await _translated(self.authorizer.allowed(caller, groups)):
            await _in_auth_thread(audit, caller, operation, target, "denied")
            raise AccessDeniedError(
                f"permission denied: {operation} needs root or membership in group "
                f"{ADMIN_GROUP} (caller uid {caller.uid})"
            )
        try:
            return await action(caller)
        except asyncio.CancelledError:
            raise
        except InvalidArgumentError as exc:
            await _in_auth_thread(audit, caller, operation, target, f"InvalidArgument: {exc}")
            raise
        except Exception as exc:
            raise to_bus_error(exc) from exc

    async def read(self, action: Callable[[], T]) -> T:
        """Run a read-only call (open to everyone) with error translation."""

        async def run() -> T:
            return action()

        return await _translated(run())

    def tail_log(self, name: str, lines: int) -> str:
        """The end of VM ``name``'s QEMU output (the journal's, or its log file's). Blocking
        (journalctl, or a stat and a read of up to LOG_TAIL_LIMIT bytes): call it in a worker
        thread, never on the event loop."""
        data = self.supervisor.read_log(name, LOG_TAIL_LIMIT, lines)  # NoSuchMachine: neither
        text = data.decode("utf-8", "replace")
        if lines:
            text = "".join(text.splitlines(keepends=True)[-lines:])
        return text

    async def console_fd(self, name: str, flags: int) -> int:
        """VM ``name``'s console for the caller, as the descriptor the reply carries."""

        async def run(caller: Caller) -> socket.socket:
            if flags & ~CONSOLE_FORCE:
                raise InvalidArgumentError(f"unknown console flags {flags:#x} (1 = force)")
            return await self.supervisor.open_console(name, bool(flags & CONSOLE_FORCE), caller)

        fd = (await self.change("OpenConsole", name, run)).detach()
        # sd-bus duplicates the descriptor into the reply, which sdbus builds as soon as the
        # handler returns, in the same step of its task; the daemon's copy is closed right
        # after, so the client's end is the only one left and its close reaches the relay.
        asyncio.get_running_loop().call_soon(os.close, fd)
        return fd


# --- the per-VM object ------------------------------------------------------------------------

_EMITS = DbusPropertyEmitsChangeFlag
# Every method carries DbusUnprivilegedFlag: without it sd-bus itself refuses non-root callers,
# even for reading. Authorization is ours: _Service.change() checks every changing call.
# result_args_names is always given: only then does sdbus put the input argument names into the
# introspection data.


class MachineObject(DbusInterfaceCommonAsync, interface_name=MACHINE_INTERFACE):
    """One VM. Properties mirror the supervisor's MachineInfo and announce their changes."""

    def __init__(self, service: _Service, info: MachineInfo) -> None:
        super().__init__()
        self._service = service
        self._info = info
        self.path = machine_path(info.name)
        self._handle: DbusExportHandle | None = None

    def export(self, manager: ManagerObject, bus: SdBus) -> None:
        """Export under the manager: InterfacesAdded announces it with all its properties."""
        self._handle = manager.export_with_manager(self.path, self, bus)

    def unexport(self) -> None:
        """InterfacesRemoved, then the object goes (also when the bus is already gone)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.stop()
        except Exception as err:  # the signal cannot be sent: still let go of the object
            log.debug("VM object %s removed without InterfacesRemoved: %s", self.path, err)
            DbusExportHandle.stop(handle)

    def _values(self, info: MachineInfo) -> dict[str, tuple[str, object]]:
        return {
            "State": ("s", str(info.state)),
            "Reason": ("s", str(info.reason)),
            "Unit": ("s", info.unit),
            "MainPID": ("u", info.pid),
            "StopTimeout": ("u", info.stop_timeout),
            "Transient": ("b", info.transient),
            "Autostart": ("b", info.autostart),
            "Restart": ("s", info.restart),
            "ExitResult": ("s", info.exit.result),
            "ExitStatus": ("i", -1 if info.exit.exit_status is None else info.exit.exit_status),
            "ExitSignal": ("i", info.exit.exit_signal or 0),
            "ExitTime": ("d", info.exit.time),
            "Display": ("s", info.display),
        }

    def update(self, info: MachineInfo) -> None:
        """Take a new snapshot; one PropertiesChanged names everything that differs."""
        old = self._values(self._info)
        new = self._values(info)
        self._info = info
        changed = {key: value for key, value in new.items() if old[key] != value}
        if changed and self._handle is not None:
            self.properties_changed.emit((MACHINE_INTERFACE, changed, []))

    # Properties: getters read the cached snapshot only, so they can never fail.
    @dbus_property_async("s", property_name="Name")
    def name(self) -> str:
        return self._info.name

    @dbus_property_async("s", flags=_EMITS, property_name="State")
    def state(self) -> str:
        """shutoff, starting, running, paused or stopping."""
        return str(self._info.state)

    @dbus_property_async("s", flags=_EMITS, property_name="Reason")
    def reason(self) -> str:
        """Why the VM is shut off: shutdown, destroyed, stopped-externally, crashed, ..."""
        return str(self._info.reason)

    @dbus_property_async("s", flags=_EMITS, property_name="Unit")
    def unit(self) -> str:
        return self._info.unit

    @dbus_property_async("u", flags=_EMITS, property_name="MainPID")
    def main_pid(self) -> int:
        return self._info.pid

    @dbus_property_async("u", flags=_EMITS, property_name="StopTimeout")
    def stop_timeout(self) -> int:
        return self._info.stop_timeout

    @dbus_property_async("b", flags=_EMITS, property_name="Transient")
    def transient(self) -> bool:
        return self._info.transient

    @dbus_property_async("b", flags=_EMITS, property_name="Autostart")
    def autostart(self) -> bool:
        return self._info.autostart

    @dbus_property_async("s", flags=_EMITS, property_name="Restart")
    def restart(self) -> str:
        return self._info.restart

    @dbus_property_async("s", flags=_EMITS, property_name="ExitResult")
    def exit_result(self) -> str:
        return self._info.exit.result

    @dbus_property_async("i", flags=_EMITS, property_name="ExitStatus")
    def exit_status(self) -> int:
        status = self._info.exit.exit_status
        return -1 if status is None else status

    @dbus_property_async("i", flags=_EMITS, property_name="ExitSignal")
    def exit_signal(self) -> int:
        return self._info.exit.exit_signal or 0

    @dbus_property_async("d", flags=_EMITS, property_name="ExitTime")
    def exit_time(self) -> float:
        return self._info.exit.time

    @dbus_property_async("s", flags=_EMITS, property_name="Display")
    def display(self) -> str:
        """How to reach the running VM's display: vnc+unix:///PATH or vnc://HOST:PORT; "" when
        it has none or is not running."""
        return self._info.display

    # Convenience methods: the same operations as the Manager's, on this VM.
    @dbus_method_async(flags=DbusUnprivilegedFlag, method_name="Start", result_args_names=())
    async def start(self) -> None:
        name = self._info.name
        await self._service.change("Start", name, lambda c: self._service.supervisor.start(name, c))

    @dbus_method_async(
        "db", flags=DbusUnprivilegedFlag, method_name="Shutdown", result_args_names=()
    )
    async def shutdown(self, timeout: float, then_destroy: bool) -> None:  # noqa: ASYNC109 - an argument, not our deadline
        name = self._info.name

        async def run(caller: Caller) -> MachineInfo:
            limit = parse_timeout(timeout, "timeout")
            return await self._service.supervisor.shutdown(name, limit, then_destroy, caller)

        await self._service.change("Shutdown", name, run)

    @dbus_method_async(
        "sd", flags=DbusUnprivilegedFlag, method_name="Destroy", result_args_names=()
    )
    async def destroy(self, mode: str, timeout: float) -> None:  # noqa: ASYNC109 - an argument, not our deadline
        name = self._info.name

        async def run(caller: Caller) -> MachineInfo:
            how, limit = parse_mode(mode), parse_timeout(timeout, "timeout")
            return await self._service.supervisor.destroy(name, how, limit, caller)

        await self._service.change("Destroy", name, run)

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Kill", result_args_names=())
    async def kill(self, signal_name: str) -> None:
        name = self._info.name

        async def run(caller: Caller) -> None:
            await self._service.supervisor.kill(name, parse_signal(signal_name), caller)

        await self._service.change("Kill", name, run)

    @dbus_method_async(flags=DbusUnprivilegedFlag, method_name="Reboot", result_args_names=())
    async def reboot(self) -> None:
        name = self._info.name
        await self._service.change(
            "Reboot", name, lambda c: self._service.supervisor.reboot(name, c)
        )

    @dbus_method_async(flags=DbusUnprivilegedFlag, method_name="Reset", result_args_names=())
    async def reset(self) -> None:
        name = self._info.name
        await self._service.change("Reset", name, lambda c: self._service.supervisor.reset(name, c))

    @dbus_method_async(flags=DbusUnprivilegedFlag, method_name="Pause", result_args_names=())
    async def pause(self) -> None:
        name = self._info.name
        await self._service.change("Pause", name, lambda c: self._service.supervisor.pause(name, c))

    @dbus_method_async(flags=DbusUnprivilegedFlag, method_name="Resume", result_args_names=())
    async def resume(self) -> None:
        name = self._info.name
        await self._service.change(
            "Resume", name, lambda c: self._service.supervisor.resume(name, c)
        )

    @dbus_method_async(
        result_signature="s",
        method_name="GetDefinition",
        flags=DbusUnprivilegedFlag,
        result_args_names=(),
    )
    async def get_definition(self) -> str:
        name = self._info.name
        return await self._service.read(lambda: self._service.supervisor.definition_toml(name))

    @dbus_method_async(
        result_signature="h",
        method_name="OpenConsole",
        flags=DbusUnprivilegedFlag,
        result_args_names=("fd",),
    )
    async def open_console(self) -> int:
        """The VM's serial console as a socket, like machined's Machine.OpenPTY (the Manager's
        OpenConsole for this VM)."""
        return await self._service.console_fd(self._info.name, 0)

    @dbus_method_async(
        result_signature="a{sv}",
        method_name="GetResources",
        flags=DbusUnprivilegedFlag,
        result_args_names=("resources",),
    )
    async def get_resources(self) -> dict[str, tuple[str, object]]:
        """The running VM's resource limits as its scope reports them now (systemd's property
        names and units; a limit not set is left out; empty while shut off). Read from systemd
        on each call, so a `systemctl set-property` shows at once."""
        name = self._info.name

        async def read() -> dict[str, tuple[str, object]]:
            found = await self._service.supervisor.resources_in_force(name)
            return {} if found is None else bus_values(found)

        return await _translated(read())


# --- the manager ----------------------------------------------------------------------------

MachineRow = tuple[str, str, str, str, int, str]
EventRow = tuple[float, str, str, str, str]


class ManagerObject(DbusObjectManagerInterfaceAsync, interface_name=MANAGER_INTERFACE):
    """All VMs by name; lifecycle signals; reload and host-shutdown entry points.

    Also the org.freedesktop.DBus.ObjectManager of the VM objects below it (served by sd-bus
    itself): GetManagedObjects answers every VM's properties in one call.
    """

    def __init__(
        self,
        service: _Service,
        objects: MachineRegistry,
        on_reload: Callable[[Caller], Awaitable[tuple[list[str], ...]]],
    ) -> None:
        super().__init__()
        self._service = service
        self._objects = objects
        self._on_reload = on_reload

    @property
    def _sup(self) -> Supervisor:
        return self._service.supervisor

    async def _changed(
        self, operation: str, name: str, action: Callable[[Caller], Awaitable[T]]
    ) -> T:
        """A call that changes which VMs exist: the objects are brought in line with all of
        them afterwards (events and registry changes keep them in step one VM at a time; this
        full pass is the safety net where VMs come and go)."""
        result = await self._service.change(operation, name, action)
        self._objects.sync()
        return result

    async def _operation(
        self, operation: str, name: str, action: Callable[[Caller], Awaitable[T]]
    ) -> T:
        """A call on one VM: its events update its object, nothing else is touched."""
        return await self._service.change(operation, name, action)

    @dbus_method_async(
        result_signature="a(ssssuo)",
        result_args_names=("machines",),
        method_name="ListMachines",
        flags=DbusUnprivilegedFlag,
    )
    async def list_machines(self) -> list[MachineRow]:
        """Every VM: name, state, reason, unit, main PID (0 if none), object path."""
        infos = await self._service.read(self._sup.list_machines)
        return [
            (i.name, str(i.state), str(i.reason), i.unit, i.pid, machine_path(i.name))
            for i in infos
        ]

    @dbus_method_async(
        "s", "o", result_args_names=("path",), method_name="GetMachine", flags=DbusUnprivilegedFlag
    )
    async def get_machine(self, name: str) -> str:
        info = await self._service.read(lambda: self._sup.get_machine(name))
        return self._objects.ensure(info).path

    @dbus_method_async(
        "s",
        "s",
        result_args_names=("definition",),
        method_name="GetDefinition",
        flags=DbusUnprivilegedFlag,
    )
    async def get_definition(self, name: str) -> str:
        """The VM's definition as TOML."""
        return await self._service.read(lambda: self._sup.definition_toml(name))

    @dbus_method_async(
        "s", "o", flags=DbusUnprivilegedFlag, result_args_names=("path",), method_name="Define"
    )
    async def define(self, definition: str) -> str:
        """Store a definition (TOML) in the definitions directory; replaces one of that name."""
        info = await self._changed("Define", "", lambda c: self._sup.define(definition, c))
        return self._objects.ensure(info).path

    @dbus_method_async(
        "s", flags=DbusUnprivilegedFlag, method_name="Undefine", result_args_names=()
    )
    async def undefine(self, name: str) -> None:
        await self._changed("Undefine", name, lambda c: self._sup.undefine(name, c))

    @dbus_method_async(
        "s", "o", flags=DbusUnprivilegedFlag, result_args_names=("path",), method_name="Create"
    )
    async def create(self, definition: str) -> str:
        """Start a transient VM from a definition (TOML); it is forgotten when it stops."""
        info = await self._changed("Create", "", lambda c: self._sup.create(definition, c))
        return self._objects.ensure(info).path

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Start", result_args_names=())
    async def start(self, name: str) -> None:
        await self._operation("Start", name, lambda c: self._sup.start(name, c))

    @dbus_method_async(
        "sdb", flags=DbusUnprivilegedFlag, method_name="Shutdown", result_args_names=()
    )
    async def shutdown(self, name: str, timeout: float, then_destroy: bool) -> None:  # noqa: ASYNC109 - an argument, not our deadline
        """ACPI power button; wait until off (timeout 0 = no limit); then_destroy after it."""

        async def run(caller: Caller) -> MachineInfo:
            limit = parse_timeout(timeout, "timeout")
            return await self._sup.shutdown(name, limit, then_destroy, caller)

        await self._operation("Shutdown", name, run)

    @dbus_method_async(
        "ssd", flags=DbusUnprivilegedFlag, method_name="Destroy", result_args_names=()
    )
    async def destroy(self, name: str, mode: str, timeout: float) -> None:  # noqa: ASYNC109 - an argument, not our deadline
        """mode default|graceful|force; timeout 0 = the VM's stop timeout."""

        async def run(caller: Caller) -> MachineInfo:
            how, limit = parse_mode(mode), parse_timeout(timeout, "timeout")
            return await self._sup.destroy(name, how, limit, caller)

        await self._operation("Destroy", name, run)

    @dbus_method_async("ss", flags=DbusUnprivilegedFlag, method_name="Kill", result_args_names=())
    async def kill(self, name: str, signal_name: str) -> None:
        """Send a signal (number or name) to every process of the VM's scope."""

        async def run(caller: Caller) -> None:
            await self._sup.kill(name, parse_signal(signal_name), caller)

        await self._operation("Kill", name, run)

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Reboot", result_args_names=())
    async def reboot(self, name: str) -> None:
        await self._operation("Reboot", name, lambda c: self._sup.reboot(name, c))

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Reset", result_args_names=())
    async def reset(self, name: str) -> None:
        await self._operation("Reset", name, lambda c: self._sup.reset(name, c))

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Pause", result_args_names=())
    async def pause(self, name: str) -> None:
        await self._operation("Pause", name, lambda c: self._sup.pause(name, c))

    @dbus_method_async("s", flags=DbusUnprivilegedFlag, method_name="Resume", result_args_names=())
    async def resume(self, name: str) -> None:
        await self._operation("Resume", name, lambda c: self._sup.resume(name, c))

    @dbus_method_async(
        result_signature="asasasas",
        flags=DbusUnprivilegedFlag,
        result_args_names=("added", "removed", "changed", "errors"),
        method_name="Reload",
    )
    async def reload(self) -> tuple[list[str], ...]:
        """Re-read the definitions directory (as SIGHUP does) and say what changed."""
        return await self._changed("Reload", "", self._on_reload)

    @dbus_method_async(
        "du",
        "a(ss)",
        flags=DbusUnprivilegedFlag,
        result_args_names=("results",),
        method_name="ShutdownAll",
    )
    async def shutdown_all(self, timeout: float, parallel: int) -> list[tuple[str, str]]:  # noqa: ASYNC109 - an argument, not our deadline
        """Host shutdown: ACPI to every running VM, `parallel` at a time (0 = all), destroy
        what is still running after `timeout` seconds (0 = each VM's stop timeout)."""

        async def run(caller: Caller) -> dict[str, str]:
            limit = parse_timeout(timeout, "timeout")
            return await shutdown_all(self._sup, limit, parallel, caller)

        results = await self._operation("ShutdownAll", "", run)
        return sorted(results.items())

    @dbus_method_async(
        "s",
        "a(dssss)",
        result_args_names=("events",),
        method_name="GetEvents",
        flags=DbusUnprivilegedFlag,
    )
    async def get_events(self, name: str) -> list[EventRow]:
        """Recent lifecycle events (a bounded ring) of one VM, or of all for ''."""
        if name:
            await self._service.read(lambda: self._sup.get_machine(name))
        events = await self._service.read(lambda: self._sup.recent_events(name or None))
        return [event_row(e) for e in events]

    @dbus_method_async(
        "su", "s", flags=DbusUnprivilegedFlag, result_args_names=("text",), method_name="GetLog"
    )
    async def get_log(self, name: str, lines: int) -> str:
        """The end of QEMU's own output for a VM (0 lines = as much as is kept). Privileged:
        the output may carry guest console text."""

        async def tail(_caller: Caller) -> str:
            return await asyncio.to_thread(self._service.tail_log, name, lines)

        return await self._service.change("GetLog", name, tail)

    @dbus_method_async(
        "s", "h", flags=DbusUnprivilegedFlag, result_args_names=("fd",), method_name="OpenConsole"
    )
    async def open_console(self, name: str) -> int:
        """The VM's serial console as a socket, like machined's OpenMachinePTY: what the guest
        writes can be read from it, what is written to it the guest reads. One client at a
        time (Busy while another is attached); privileged."""
        return await self._open_console(name, 0)

    @dbus_method_async(
        "st",
        "h",
        flags=DbusUnprivilegedFlag,
        result_args_names=("fd",),
        method_name="OpenConsoleWithFlags",
    )
    async def open_console_with_flags(self, name: str, flags: int) -> int:
        """OpenConsole with flags: 1 = force, disconnect the client attached now (as
        `virsh console --force`)."""
        return await self._open_console(name, flags)

    async def _open_console(self, name: str, flags: int) -> int:
        return await self._service.console_fd(name, flags)

    @dbus_method_async(
        "su",
        "ay",
        flags=DbusUnprivilegedFlag,
        result_args_names=("output",),
        method_name="GetConsoleLog",
    )
    async def get_console_log(self, name: str, lines: int) -> bytes:
        """The newest output of the VM's serial console, as the guest wrote it (bytes), its
        last `lines` lines (0 = all that is kept, at most 1 MiB); also after the VM stopped.
        Privileged: a console shows what was typed into it."""
        return await self._service.change(
            "GetConsoleLog", name, lambda _caller: self._sup.console_log(name, lines)
        )

    @dbus_signal_async(
        "dssss", ("time", "name", "event", "state", "reason"), signal_name="MachineEvent"
    )
    def machine_event(self) -> EventRow:
        raise NotImplementedError

    @dbus_signal_async("so", ("name", "path"), signal_name="MachineNew")
    def machine_new(self) -> tuple[str, str]:
        raise NotImplementedError

    @dbus_signal_async("so", ("name", "path"), signal_name="MachineRemoved")
    def machine_removed(self) -> tuple[str, str]:
        raise NotImplementedError


def event_row(event: MachineEvent) -> EventRow:
    return (event.time, event.name, str(event.event), str(event.state), str(event.reason))


class MachineRegistry:
    """Keeps exactly one exported MachineObject per VM the supervisor knows.

    The objects must stay referenced while exported (sdbus drops unreferenced ones), so this
    dict is their owner. It follows the supervisor one VM at a time (refresh), so the work per
    event does not grow with the number of VMs; sync, the full pass, is for start-up and the
    calls that add or remove VMs.
    """

    def __init__(self, bus: SdBus, service: _Service) -> None:
        self._bus = bus
        self._service = service
        self._objects: dict[str, MachineObject] = {}
        self.manager: ManagerObject | None = None

    def ensure(self, info: MachineInfo) -> MachineObject:
        obj = self._objects.get(info.name)
        if obj is None:
            if self.manager is None:
                raise RuntimeError("MachineRegistry.manager must be set before objects exist")
            obj = MachineObject(self._service, info)
            obj.export(self.manager, self._bus)
            self._objects[info.name] = obj
            if self.manager is not None:
                self.manager.machine_new.emit((info.name, obj.path))
        else:
            obj.update(info)
        return obj

    def _remove(self, name: str) -> None:
        obj = self._objects.pop(name, None)
        if obj is None:
            return
        obj.unexport()
        if self.manager is not None:
            self.manager.machine_removed.emit((name, obj.path))

    def refresh(self, name: str) -> None:
        """Bring VM ``name``'s object in line with the supervisor: add, update or remove it."""
        try:
            info = self._service.supervisor.get_machine(name)
        except errors.NoSuchMachine:
            self._remove(name)
        else:
            self.ensure(info)

    def sync(self) -> None:
        """Bring every object in line with the supervisor: add, update, remove."""
        infos = {info.name: info for info in self._service.supervisor.list_machines()}
        for name in [name for name in self._objects if name not in infos]:
            self._remove(name)
        for info in infos.values():
            self.ensure(info)

    def close(self) -> None:
        for obj in self._objects.values():
            obj.unexport()
        self._objects.clear()


class BusService:
    """Exports the Manager and the VM objects and forwards the supervisor's events."""

    def __init__(
        self,
        bus: SdBus,
        supervisor: Supervisor,
        on_reload: Callable[[Caller], Awaitable[tuple[list[str], ...]]],
    ) -> None:
        self._bus = bus
        self._service = _Service(supervisor, Authorizer(bus))
        self.registry = MachineRegistry(bus, self._service)
        self.manager = ManagerObject(self._service, self.registry, on_reload)
        self.registry.manager = self.manager
        self._manager_handle: DbusExportHandle | None = None
        self._unsubscribe: list[Callable[[], None]] = []

    def export(self) -> None:
        """Export everything; call before taking the bus name so no caller finds it empty."""
        self._manager_handle = self.manager.export_to_dbus(MANAGER_PATH, self._bus)
        self.registry.sync()
        supervisor = self._service.supervisor
        self._unsubscribe = [
            supervisor.subscribe(self._on_event),
            supervisor.watch_registry(self._on_registry_change),
        ]

    def _on_event(self, event: MachineEvent) -> None:
        try:
            self.registry.refresh(event.name)
            self.manager.machine_event.emit(event_row(event))
        except Exception:
            log.exception("could not publish event %s of %s", event.event, event.name)

    def _on_registry_change(self, name: str) -> None:
        try:
            self.registry.refresh(name)
        except Exception:
            log.exception("could not update the D-Bus object of VM %s", name)

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.registry.close()
        if self._manager_handle is not None:
            self._manager_handle.stop()
            self._manager_handle = None
