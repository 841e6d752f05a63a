"""All VMs: the registry, reattach after a daemon restart, autostart, restart policy, events.

The Supervisor is the core's one entry point for the D-Bus adapter: it finds the Machine, writes
the audit record, and turns every Machine event into one fan-out (callbacks, bounded rings of
recent events, and a structured journal entry). Its per-event work does not grow with the number
of VMs: unit signals find their VM by unit name, and each VM keeps its own bounded history.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisord_vm import (
    autostart_order,
    disk_access,
    firmware,
    journal,
    qemu_journal,
    qemu_log,
    reattach,
    resources,
)
from supervisord_vm.confinement import sweep_runtime
from supervisord_vm.console import TAIL_LIMIT as CONSOLE_TAIL_LIMIT
from supervisord_vm.console import ConsoleManager, last_lines
from supervisord_vm.definition import (
    Definition,
    definition_to_toml,
    parse_definition,
    validate_name,
)
from supervisord_vm.disk_access import Credentials
from supervisord_vm.errors import (
    InvalidDefinition,
    InvalidState,
    MachineExists,
    NoSuchMachine,
    NotRunning,
    SvmError,
    SystemdError,
)
from supervisord_vm.machine import Machine, MachineContext
from supervisord_vm.model import (
    Caller,
    DestroyMode,
    EventType,
    MachineEvent,
    MachineInfo,
    Reason,
    State,
)
from supervisord_vm.qemu import QmpSession
from supervisord_vm.restart_policy import RestartPolicy, RestartPolicyLimits
from supervisord_vm.store import (
    DefinitionStore,
    Paths,
    RuntimeRecord,
    RuntimeStore,
    StateStore,
    remove_temp_files,
)
from supervisord_vm.store import (
    log_path as store_log_path,
)
from supervisord_vm.systemd import Systemd, UnitEvent, UnitStatus, scope_name

log = logging.getLogger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
RECENT_EVENTS = 1000  # the newest events of all VMs together (GetEvents(""))
# Each VM's own newest events, kept apart so that a busy VM never evicts a quiet one's history;
# dropped when the VM is forgotten, so memory stays bounded by the VMs that exist.
RECENT_EVENTS_PER_VM = 100
# VMs reattached or autostarted at once: each makes a few systemd and QMP calls at a time.
REATTACH_CONCURRENCY = 16
# How long `svmctl status` waits for systemd to report a running VM's limits (it answers at
# once unless it is reloading or re-executing; a status must not hang on that).
RESOURCES_READ_TIMEOUT = 5.0

# One MESSAGE_ID per event type, so `journalctl MESSAGE_ID=...` finds every VM stop (etc.).
MESSAGE_IDS: dict[EventType, str] = {
    event: uuid.uuid5(uuid.NAMESPACE_URL, f"org.supervisordvm1.event.{event}").hex
    for event in EventType
}
AUDIT_MESSAGE_ID = uuid.uuid5(uuid.NAMESPACE_URL, "org.supervisordvm1.audit").hex


@dataclass(frozen=True)
class ReloadReport:
    added: list[str]
    removed: list[str]
    changed: list[str]
    errors: list[str]


class Supervisor:
    """Every VM of this host, defined or transient."""

    def __init__(
        self,
        paths: Paths,
        systemd: Systemd,
        *,
        slice: str = "machine.slice",
        restart_limits: RestartPolicyLimits | None = None,
        qmp_connect_timeout: float = 10.0,
        qmp_command_timeout: float = QmpSession.COMMAND_TIMEOUT,
        log_limit: int = qemu_log.DEFAULT_LIMIT,
    ) -> None:
        self.paths = paths
        self._systemd = systemd
        self._definitions = DefinitionStore(paths.definitions_dir)
        self._runtime = RuntimeStore(paths.runtime_dir)
        self._state = StateStore(paths.state_dir)
        self._owners = disk_access.OwnerStore(paths.state_dir)
        self._restarts = RestartPolicy(restart_limits or RestartPolicyLimits())
        self._consoles = ConsoleManager(paths)
        self._ctx = MachineContext(
            paths=paths,
            systemd=systemd,
            runtime=self._runtime,
            state_store=self._state,
            emit=self._emit,
            on_exit=self._on_exit,
            slice=slice,
            qmp_connect_timeout=qmp_connect_timeout,
            qmp_command_timeout=qmp_command_timeout,
            log_limit=log_limit,
            consoles=self._consoles,
        )
        self._log_bounder = qemu_log.LogBounder(paths.log_dir, log_limit)
        # Every VM by name and by scope unit; changed only through _add and _forget.
        self._machines: dict[str, Machine] = {}
        self._by_unit: dict[str, Machine] = {}
        self._subscribers: list[Callable[[MachineEvent], None]] = []
        self._registry_watchers: list[Callable[[str], None]] = []
        self._recent: collections.deque[MachineEvent] = collections.deque(maxlen=RECENT_EVENTS)
        self._recent_by_vm: dict[str, collections.deque[MachineEvent]] = {}
        self._unsubscribe_units: Callable[[], None] | None = None
        self._definitions_lock = asyncio.Lock()  # definition files change one at a time
        self._broken_on_disk: set[str] = set()  # at start-up: NAME.toml there but unusable

    # --- start-up and shutdown of the daemon ----------------------------------------------------

    async def start_up(self, *, autostart: bool = True) -> None:
        """Load definitions, reattach running VMs, settle ended ones, autostart once per boot.

        The daemon passes autostart=False and calls `autostart()` once it is ready: waiting in
        dependency order with delays can take longer than systemd waits for READY=1.
        """
        self._unsubscribe_units = self._systemd.subscribe(self._on_unit_event)
        self._log_bounder.start()
        for directory in (
            self.paths.definitions_dir,
            self.paths.runtime_dir,
            self.paths.state_dir,
            self.paths.state_dir / "exits",
        ):
            try:
                for path in remove_temp_files(directory):
                    log.info("removed %s, left by an interrupted write", path)
            except OSError as err:
                log.warning("cannot clean up temporary files in %s: %s", directory, err)
        definitions, errors = await asyncio.to_thread(self._definitions.load_all)
        for message in errors:
            log.error("ignoring definition: %s", message)
        # A file that is there but broken is not an undefine: a running VM of that name is
        # reattached from its runtime record (whose definition becomes the one in effect), and
        # its exit record is kept for when the file is fixed.
        on_disk = await asyncio.to_thread(self._definitions.names_on_disk)
        self._broken_on_disk = on_disk - definitions.keys()
        for defn in definitions.values():
            self._add(Machine(defn, self._ctx, transient=False))
        for name, (reason, exit_info) in self._state.load_exits().items():
            if name in self._machines:
                self._machines[name].restore_exit(reason, exit_info)
            elif name not in self._broken_on_disk:
                self._state.remove_exit(name)
        for problem in autostart_order.graph_problems(self._autostart_graph()):
            log.error("autostart order: %s", problem)
        await self._reattach()
        # Stores of VMs undefined while no daemon ran (a definition file deleted by hand).
        kept = set(self._machines) | self._broken_on_disk
        for path in await asyncio.to_thread(firmware.remove_stale_nvram, self.paths, kept):
            log.info("removed %s: no VM %s any more", path, path.name.removesuffix("_VARS.fd"))
        if autostart:
            await self._autostart()

    async def autostart(self) -> None:
        """Autostart the VMs once per host boot, in their autostart_after order."""
        try:
            await self._autostart()
        except Exception:
            log.exception("autostart failed")

    async def _reattach(self) -> None:
        """Adopt or settle every VM a previous daemon left, several at a time.

        Concurrent so that hundreds of VMs, some of them wedged (a QMP connect that waits out
        its timeout), are reattached within the unit's start timeout; bounded so that the
        calls in flight to systemd stay far below the bus's per-connection limit.
        """
        records, errors = self._runtime.load_all()
        for message in errors:
            log.error("%s", message)
        scopes = {status.name: status for status in await self._systemd.list_scopes("svm-*.scope")}
        limit = asyncio.Semaphore(REATTACH_CONCURRENCY)

        async def bounded(job: Coroutine[Any, Any, None]) -> None:
            async with limit:
                await job

        jobs = [
            self._reattach_record(record, scopes.pop(record.unit, None))
            for record in records.values()
        ]
        jobs += [
            self._reattach_scope(unit, status, self._by_unit.get(unit))
            for unit, status in scopes.items()
        ]
        outcomes = await asyncio.gather(*(bounded(job) for job in jobs), return_exceptions=True)
        for outcome in outcomes:  # one VM that cannot be taken over must not stop the others
            if isinstance(outcome, Exception):
                log.error("reattach failed", exc_info=outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        # Console sockets of VMs that run no more (an orphan scope stopped, a record lost).
        running = {name for name, m in self._machines.items() if m.state is not State.SHUTOFF}
        await self._consoles.sweep(keep=running)
        # Monitor sockets and QEMU directories the daemon made for VMs that run no more.
        await asyncio.to_thread(sweep_runtime, self.paths.runtime_dir, running)

    async def _reattach_scope(self, unit: str, status: UnitStatus, machine: Machine | None) -> None:
        """A scope with no runtime record: adopt its QEMU, settle it, or stop an orphan."""
        try:
            pids = await self._systemd.unit_pids(unit) if _is_alive(status) else []
            if (
                machine is not None
                and machine.state is State.SHUTOFF
                and pids
                and await reattach.adopt(
                    machine, min(pids), time.time(), machine.definition, unit=status
                )
            ):
                return
            if machine is not None and machine.state is State.SHUTOFF:
                await reattach.settle_ended(machine, status)
            elif machine is None:
                log.warning("stopping scope %s: no VM of this daemon owns it", unit)
                await self._systemd.stop_unit(unit)
                with contextlib.suppress(SvmError):
                    await self._systemd.reset_failed(unit)
        except SvmError as err:
            log.error("cannot settle scope %s: %s", unit, err)

    async def _reattach_record(self, record: RuntimeRecord, status: UnitStatus | None) -> None:
        machine = self._machines.get(record.name)
        running_defn: Definition | None = None
        try:
            running_defn = parse_definition(record.definition_toml, f"runtime record {record.name}")
        except InvalidDefinition as err:
            log.error("runtime record of %s unusable: %s", record.name, err)
        if machine is None:
            if running_defn is None:
                log.warning("stopping scope %s: its VM cannot be reconstructed", record.unit)
                with contextlib.suppress(SvmError):
                    await self._systemd.stop_unit(record.unit)
                    await self._systemd.reset_failed(record.unit)
                self._runtime.remove(record.name)
                await self._consoles.release(record.name)  # its socket; nothing connected
                return
            defined = record.name in self._broken_on_disk
            if defined:
                log.error(
                    "VM %s is running but its definition file is broken; it keeps the "
                    "definition it was started with until the file loads again",
                    record.name,
                )
            machine = Machine(running_defn, self._ctx, transient=not defined)
            self._add(machine)
        alive = False
        pids: list[int] = []
        if _is_alive(status):
            try:
                pids = await self._systemd.unit_pids(record.unit)
            except SvmError as err:  # the scope ended just now
                log.info(
                    "VM %s: cannot read the processes of %s: %s", record.name, record.unit, err
                )
        # pid 0: the previous daemon died starting the VM, before it knew QEMU's PID; the scope
        # holds QEMU (or the spawn trampoline, which exits by itself) if it got that far.
        starting = record.pid == 0
        pid = min(pids) if starting and pids else record.pid
        if pids and pid not in pids:
            # The record names another process than the scope holds (a damaged record): the
            # scope is the truth about what runs, and a running VM is never stopped for that.
            log.warning(
                "VM %s: its runtime record names pid %d, but %s holds %s; adopting pid %d",
                record.name,
                record.pid,
                record.unit,
                pids,
                min(pids),
            )
            pid = min(pids)
        try:
            if pid in pids:
                alive = await reattach.adopt(
                    machine,
                    pid,
                    record.started_at,
                    running_defn or machine.definition,
                    unit=status,
                    starting=starting,
                    pending=record.pending,
                )
            if not alive:
                reason = await reattach.settle_ended(
                    machine, status, record.started_at, start_cut=starting, pending=record.pending
                )
                log.info("VM %s ended while the daemon was not running: %s", record.name, reason)
        except SvmError as err:
            log.error("cannot reattach VM %s: %s", record.name, err)

    async def _autostart(self) -> None:
        try:
            boot_id = BOOT_ID_PATH.read_text(encoding="ascii").strip()  # noqa: ASYNC240 - procfs
        except OSError as err:
            log.error("cannot read the boot ID, autostart skipped: %s", err)
            return
        if self._state.autostart_boot_id() == boot_id:
            return
        order = autostart_order.plan(
            self._autostart_graph(),
            (
                machine.name
                for machine in self._machines.values()
                if machine.definition.autostart and machine.state is State.SHUTOFF
            ),
        )
        rounds = autostart_order.levels(order)
        if len(rounds) > 1:
            log.info("autostart order: %s", " | ".join(", ".join(names) for names in rounds))

        async def start(name: str) -> bool:
            """Started (running) or not; what changed meanwhile (a delay is long) is respected."""
            machine = self._machines.get(name)
            if machine is None or not machine.definition.autostart:
                return False  # undefined, or its autostart turned off, while it waited
            if machine.state is not State.SHUTOFF:
                return machine.state is State.RUNNING  # started by someone else meanwhile
            try:
                await machine.start()
            except SvmError as err:
                log.error("autostart of VM %s failed: %s", name, err)
                return False
            return True

        def delay_of(name: str) -> float:
            machine = self._machines.get(name)
            return float(machine.definition.autostart_delay) if machine is not None else 0.0

        await autostart_order.run(order, start, delay_of, limit=REATTACH_CONCURRENCY)
        # Only once every start was attempted: a daemon killed during autostart leaves the
        # boot unmarked, and the next one starts the rest (the ones already running it
        # reattached, so none starts twice). A start that failed is not retried this boot.
        try:
            self._state.set_autostart_boot_id(boot_id)
        except OSError as err:
            log.error("cannot record that autostart ran in this boot: %s", err)

    async def close(self) -> None:
        """Detach from every VM and leave it running."""
        self._restarts.cancel_all()
        if self._unsubscribe_units is not None:
            self._unsubscribe_units()
            self._unsubscribe_units = None
        for machine in self._machines.values():
            await machine.detach()
        await self._consoles.close()
        await self._log_bounder.close()

    # --- the registry -------------------------------------------------------------------------

    def _add(self, machine: Machine) -> None:
        """Register a VM under its name and its scope unit, which unit signals are matched by."""
        self._machines[machine.name] = machine
        self._by_unit[machine.unit] = machine
        self._registry_changed(machine.name)

    def _forget(self, name: str) -> None:
        """Drop a VM from the registry, with its unit entry and its event history."""
        machine = self._machines.pop(name)
        if self._by_unit.get(machine.unit) is machine:
            del self._by_unit[machine.unit]
        self._recent_by_vm.pop(name, None)
        self._registry_changed(name)
        try:  # undefined, or a transient VM's run is over: its UEFI variables go with it
            firmware.remove_nvram(self.paths, name)
        except OSError as err:
            log.warning("VM %s: cannot remove its UEFI variables store: %s", name, err)

    def watch_registry(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(name)`` whenever VM ``name`` is added or forgotten, or its definition
        or transience changes without an event of its own (a reload, an undefine of a running
        VM): with the events, this is everything a mirror of one VM needs to stay in step, so
        nobody has to rescan every VM per change."""
        self._registry_watchers.append(callback)

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                self._registry_watchers.remove(callback)

        return unwatch

    def _registry_changed(self, name: str) -> None:
        for callback in list(self._registry_watchers):
            try:
                callback(name)
            except Exception:
                log.exception("registry watcher failed")

    # --- reading --------------------------------------------------------------------------------

    def _get(self, name: str) -> Machine:
        machine = self._machines.get(name)
        if machine is None:
            raise NoSuchMachine(f"no VM named {name!r}")
        return machine

    def list_machines(self) -> list[MachineInfo]:
        return [self._machines[name].info() for name in sorted(self._machines)]

    def get_machine(self, name: str) -> MachineInfo:
        return self._get(name).info()

    def definition_toml(self, name: str) -> str:
        return definition_to_toml(self._get(name).definition)

    def log_path(self, name: str) -> Path:
        """QEMU's log of VM `name`, also of a VM no longer known (a forgotten transient one, an
        undefined one) while its file exists, as journalctl shows a collected transient unit.

        NoSuchMachine only when there is neither such a VM nor a log of that name.
        """
        try:
            path = store_log_path(self.paths, name)
        except InvalidDefinition:
            raise NoSuchMachine(f"no VM named {name!r}") from None
        if name not in self._machines and not (
            path.is_file() or qemu_log.rotated_path(path).is_file()
        ):
            raise NoSuchMachine(f"no VM named {name!r} and no log of one")
        return path

    def read_log(self, name: str, max_bytes: int, lines: int = 0) -> bytes:
        """The newest of QEMU's output for VM `name`: its `lines` newest lines in the journal
        (0: up to qemu_journal.LINES_MAX), at most `max_bytes`; where the journal has none
        (journald missing, now or when it ran), the last `max_bytes` of its log files.

        Blocking (journalctl, file reads): call it in a worker thread. NoSuchMachine as
        log_path says.
        """
        if self._ctx.journal_stream is not None:
            with contextlib.suppress(InvalidDefinition):  # not a VM name: NoSuchMachine below
                unit = scope_name(validate_name(name))
                text = qemu_journal.read_output(unit, lines=lines, max_bytes=max_bytes)
                if text:
                    return text.encode("utf-8", "replace")[-max_bytes:]
        return qemu_log.read_tail(self.log_path(name), max_bytes)

    async def open_console(
        self, name: str, force: bool = False, caller: Caller | None = None
    ) -> socket.socket:
        """A socket whose peer is VM `name`'s serial console, for one interactive client.

        NotRunning for a shut-off VM; console.ConsoleBusy while another client is attached
        (unless `force`, which disconnects that one); console.ConsoleUnavailable for a running
        VM the daemon has no console connection to.
        """
        async with self._audit("open-console", name, caller, force=force):
            machine = self._get(name)
            if machine.state is State.SHUTOFF:
                raise NotRunning(f"VM {name} is not running")
            return await self._consoles.open(name, caller, force)

    async def console_log(self, name: str, lines: int = 0) -> bytes:
        """The newest output of VM `name`'s serial console (its last `lines` lines; 0: all
        that is kept, at most console.TAIL_LIMIT bytes), also of a VM that has stopped or is
        no longer known while its log exists. NoSuchMachine when there is neither."""
        known = name in self._machines
        try:
            has_log = known or await asyncio.to_thread(self._consoles.has_log, name)
        except InvalidDefinition:  # not a VM name at all
            has_log = False
        if not has_log:
            raise NoSuchMachine(f"no VM named {name!r} and no console log of one")
        return last_lines(await self._consoles.read_log(name, CONSOLE_TAIL_LIMIT), lines)

    def _autostart_graph(self) -> dict[str, tuple[str, ...]]:
        """Every defined VM's autostart_after (transient VMs never autostart)."""
        return {
            name: machine.definition.autostart_after
            for name, machine in self._machines.items()
            if not machine.transient
        }

    async def resources_in_force(self, name: str) -> resources.ResourcesInForce | None:
        """VM `name`'s limits as its scope reports them now, including changes made with
        `systemctl set-property`; None while it has no scope (shut off)."""
        machine = self._get(name)
        if machine.state is State.SHUTOFF:
            return None
        try:
            async with asyncio.timeout(RESOURCES_READ_TIMEOUT):
                props = await self._systemd.unit_properties(machine.unit, resources.SCOPE_INTERFACE)
        except TimeoutError:
            raise SystemdError(
                f"systemd did not report the limits of {machine.unit} within "
                f"{RESOURCES_READ_TIMEOUT:g} s"
            ) from None
        return None if props is None else resources.in_force(props)

    def summary(self) -> str:
        running = sum(1 for m in self._machines.values() if m.state is not State.SHUTOFF)
        defined = sum(1 for m in self._machines.values() if not m.transient)
        return f"{running} running, {defined} defined"

    def machine(self, name: str) -> Machine:
        """The Machine object itself (for tests and the daemon's own use)."""
        return self._get(name)

    # --- events ---------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[MachineEvent], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def recent_events(self, name: str | None = None) -> list[MachineEvent]:
        """The newest events of VM ``name`` (up to RECENT_EVENTS_PER_VM), or of all VMs (up to
        RECENT_EVENTS), oldest first."""
        if name is None:
            return list(self._recent)
        return list(self._recent_by_vm.get(name, ()))

    def _emit(self, event: MachineEvent) -> None:
        self._recent.append(event)
        machine = self._machines.get(event.name)
        if machine is not None:  # a VM already forgotten gets no history it could not shed
            ring = self._recent_by_vm.get(event.name)
            if ring is None:
                ring = collections.deque(maxlen=RECENT_EVENTS_PER_VM)
                self._recent_by_vm[event.name] = ring
            ring.append(event)
        unit = machine.unit if machine is not None else ""
        text = f"VM {event.name} {event.event}"
        if event.reason and event.event is EventType.STOPPED:
            text += f" ({event.reason})"
        if event.message:
            text += f": {event.message}"
        journal.send(
            text,
            logging.WARNING
            if event.reason in (Reason.CRASHED, Reason.FAILED) and event.event is EventType.STOPPED
            else logging.INFO,
            MESSAGE_ID=MESSAGE_IDS[event.event],
            VM_NAME=event.name,
            VM_UNIT=unit,
            VM_EVENT=str(event.event),
            VM_STATE=str(event.state),
            VM_REASON=str(event.reason),
        )
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber failed")

    def _on_unit_event(self, event: UnitEvent) -> None:
        machine = self._by_unit.get(event.unit)
        if machine is not None:
            machine.on_unit_event(event)

    # --- exits and restart policy ---------------------------------------------------------------

    def _on_exit(self, machine: Machine, reason: Reason) -> None:
        name = machine.name
        if self._restarts.schedule(machine, reason, self._restart_if_known):
            return
        if machine.transient and self._machines.get(name) is machine:
            self._forget(name)
            self._restarts.forget(name)
            self._state.remove_exit(name)

    async def _restart_if_known(self, machine: Machine) -> None:
        """The restart policy's start: only of a VM still known and still shut off."""
        if self._machines.get(machine.name) is machine and machine.state is State.SHUTOFF:
            await machine.start()

    def _cancel_restart(self, name: str) -> None:
        self._restarts.cancel(name)

    # --- audited operations ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _audit(
        self, operation: str, name: str, caller: Caller | None, **details: object
    ) -> AsyncIterator[None]:
        """One audit journal entry per request: who, what, on which VM, and how it ended."""
        result = "ok"
        try:
            yield
        except SvmError as err:
            result = f"{type(err).__name__}: {err}"
            raise
        except BaseException as err:
            result = f"error: {type(err).__name__}"
            raise
        finally:
            who = f"uid {caller.uid} pid {caller.pid}" if caller is not None else "daemon"
            journal.send(
                f"{operation} {name} by {who}: {result}",
                logging.INFO if result == "ok" else logging.WARNING,
                MESSAGE_ID=AUDIT_MESSAGE_ID,
                VM_NAME=name,
                VM_OPERATION=operation,
                VM_RESULT=result,
                CALLER_UID=caller.uid if caller is not None else None,
                CALLER_PID=caller.pid if caller is not None else None,
                **{f"VM_{key.upper()}": value for key, value in details.items()},
            )

    async def define(self, toml_text: str, caller: Caller | None = None) -> MachineInfo:
        """Store a definition; an existing VM's new definition takes effect on its next start."""
        async with self._audit("define", _named(toml_text), caller), self._definitions_lock:
            defn = parse_definition(toml_text)
            graph = self._autostart_graph()
            graph.pop(defn.name, None)
            autostart_order.check_definition(defn.name, defn.autostart_after, graph, "definition")
            owner = await self._disk_owner(defn, caller)
            # fsync on /etc may take long on a busy disk: not on the event loop. The lock keeps
            # the file and the VM's definition in step when two clients define one name.
            await asyncio.to_thread(self._definitions.save, defn)
            if owner is None:  # root's definition now: after the save (a crash errs narrower)
                await asyncio.to_thread(self._owners.set, defn.name, None)
            machine = self._machines.get(defn.name)
            if machine is None:
                machine = Machine(defn, self._ctx, transient=False)
                self._add(machine)
            else:
                machine.definition = defn
                machine.set_transient(False)
            machine_info = machine.info()
            machine.emit(EventType.DEFINED)
            return machine_info

    async def _disk_owner(self, defn: Definition, caller: Caller | None) -> Credentials | None:
        """Whose rights `defn`'s disks are opened with: None for root (or the daemon itself);
        for a group member, their own — checked now (DiskAccessDenied, nothing opened, nothing
        stored) and recorded before the definition is, so it holds for every later start."""
        if caller is None or caller.uid == 0:
            return None
        owner = await asyncio.to_thread(Credentials.of_caller, caller.uid, caller.groups)
        await disk_access.check_disks(defn, owner)
        await asyncio.to_thread(self._owners.set, defn.name, owner)
        return owner

    async def undefine(self, name: str, caller: Caller | None = None) -> None:
        """Remove the definition; a running VM keeps running as a transient one."""
        async with self._audit("undefine", name, caller), self._definitions_lock:
            machine = self._get(name)
            if machine.transient:
                raise InvalidState(f"VM {name} is transient (not defined); destroy it instead")
            dependents = autostart_order.named_by(name, self._autostart_graph())
            if dependents:
                raise autostart_order.NamedByOthers(
                    f"VM {name} cannot be undefined: VM {', '.join(dependents)} autostart"
                    f"{'s' if len(dependents) == 1 else ''} after it; remove {name!r} from "
                    f"their autostart_after first"
                )
            self._cancel_restart(name)
            await asyncio.to_thread(self._definitions.remove, name)
            if self._machines.get(name) is not machine:
                return  # forgotten meanwhile (a transient run ended): nothing more to do
            machine.emit(EventType.UNDEFINED)
            if machine.state is State.SHUTOFF:
                self._forget(name)
                self._restarts.forget(name)
                self._state.remove_exit(name)
                self._owners.set(name, None)
            else:
                machine.set_transient(True)
                self._registry_changed(name)

    async def create(self, toml_text: str, caller: Caller | None = None) -> MachineInfo:
        """Start a transient VM (no definition file); it is forgotten when it stops."""
        async with self._audit("create", _named(toml_text), caller):
            defn = parse_definition(toml_text)
            if defn.name in self._machines:
                raise MachineExists(f"a VM named {defn.name!r} already exists")
            autostart_order.check_definition(
                defn.name,
                defn.autostart_after,
                {name: m.definition.autostart_after for name, m in self._machines.items()},
                "definition",
            )
            if await self._disk_owner(defn, caller) is None:
                await asyncio.to_thread(self._owners.set, defn.name, None)
            machine = Machine(defn, self._ctx, transient=True)
            self._add(machine)
            await machine.start()
            return machine.info()

    async def start(self, name: str, caller: Caller | None = None) -> MachineInfo:
        async with self._audit("start", name, caller):
            machine = self._get(name)
            self._cancel_restart(name)
            await machine.start()
            return machine.info()

    async def shutdown(
        self,
        name: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed interface
        then_destroy: bool = False,
        caller: Caller | None = None,
    ) -> MachineInfo:
        """Press the ACPI power button and wait for the guest to power off.

        Without a timeout this waits as long as the guest takes, which may be forever: a guest
        that ignores ACPI, or one still booting, never powers off. A press before the guest
        enabled ACPI is lost, as on real hardware (the VM goes back to running only when a
        timeout ends the wait). Give a timeout (OperationTimeout, VM still running) or
        `then_destroy` to bound it.
        """
        async with self._audit(
            "shutdown", name, caller, timeout=timeout, then_destroy=then_destroy
        ):
            machine = self._get(name)
            self._cancel_restart(name)
            await machine.shutdown(timeout, then_destroy)
            return machine.info()

    async def destroy(
        self,
        name: str,
        mode: DestroyMode = DestroyMode.DEFAULT,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed interface
        caller: Caller | None = None,
    ) -> MachineInfo:
        async with self._audit("destroy", name, caller, mode=mode, timeout=timeout):
            machine = self._get(name)
            self._cancel_restart(name)
            await machine.destroy(mode, timeout)
            return machine.info()

    async def kill(self, name: str, signal: int = 15, caller: Caller | None = None) -> None:
        async with self._audit("kill", name, caller, signal=signal):
            machine = self._get(name)
            await machine.kill(signal)

    async def reboot(self, name: str, caller: Caller | None = None) -> None:
        async with self._audit("reboot", name, caller):
            await self._get(name).reboot()

    async def reset(self, name: str, caller: Caller | None = None) -> None:
        async with self._audit("reset", name, caller):
            await self._get(name).reset()

    async def pause(self, name: str, caller: Caller | None = None) -> None:
        async with self._audit("pause", name, caller):
            await self._get(name).pause()

    async def resume(self, name: str, caller: Caller | None = None) -> None:
        async with self._audit("resume", name, caller):
            await self._get(name).resume()

    async def reload(self, caller: Caller | None = None) -> ReloadReport:
        """Re-read the definitions directory; running VMs keep running as they are.

        Like libvirt, a file that is there but fails to load (a hand edit gone wrong) keeps the
        VM's last good definition in effect: the problem is in `errors`, the VM is not removed.
        Only a file that is gone removes its VM (a running one becomes transient).
        """
        async with self._audit("reload", "*", caller), self._definitions_lock:
            # Reading every file (and NFS-mounted /etc on some hosts) is not for the event loop.
            definitions, errors = await asyncio.to_thread(self._definitions.load_all)
            on_disk = await asyncio.to_thread(self._definitions.names_on_disk)
            added: list[str] = []
            removed: list[str] = []
            changed: list[str] = []
            for name, defn in definitions.items():
                machine = self._machines.get(name)
                if machine is None:
                    self._add(Machine(defn, self._ctx, transient=False))
                    added.append(name)
                elif machine.transient:
                    machine.definition = defn
                    machine.set_transient(False)
                    added.append(name)
                elif machine.definition != defn:
                    machine.definition = defn
                    changed.append(name)
                    self._registry_changed(name)
            for name, machine in list(self._machines.items()):
                if machine.transient or name in definitions:
                    continue
                if name in on_disk:
                    errors = _note_kept(errors, self._definitions.path_for(name), name)
                    continue
                removed.append(name)
                self._cancel_restart(name)
                if machine.state is State.SHUTOFF:
                    self._forget(name)
                    self._state.remove_exit(name)
                else:
                    machine.set_transient(True)
                    self._registry_changed(name)
            for name in (*added, *changed):  # root's files now: their disks are root's
                await asyncio.to_thread(self._owners.set, name, None)
            for name in added:
                self._machines[name].emit(EventType.DEFINED)
            errors = [
                *errors,
                *(
                    f"autostart order: {problem}"
                    for problem in autostart_order.graph_problems(self._autostart_graph())
                ),
            ]
            return ReloadReport(sorted(added), sorted(removed), sorted(changed), errors)


def _named(toml_text: str) -> str:
    """The VM name a definition text gives, for the audit record even of a refused one."""
    match = re.search(r'^\s*name\s*=\s*"([A-Za-z0-9._-]{1,64})"', toml_text[:65536], re.MULTILINE)
    return match.group(1) if match else ""


def _note_kept(errors: list[str], path: Path, name: str) -> list[str]:
    """Say in the error about `path` that VM `name` keeps its last good definition."""
    prefix = f"{path}:"
    note = f" (VM {name} keeps its last good definition)"
    if not any(message.startswith(prefix) for message in errors):
        return [*errors, f"{path}: cannot be loaded{note}"]
    return [message + note if message.startswith(prefix) else message for message in errors]


def _is_alive(status: UnitStatus | None) -> bool:
    """A scope that may still hold a QEMU (a stop job in progress still has its processes)."""
    return status is not None and status.active_state in (
        "active",
        "activating",
        "reloading",
        "deactivating",
    )
