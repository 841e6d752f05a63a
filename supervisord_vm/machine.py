"""One VM: its operations, and noticing, classifying (rules: lifecycle.py) and cleaning up exits.

A Machine owns at most one *run* (one QEMU process) at a time. Every exit of a run is noticed
from the process itself (a pidfd, and the asyncio child for QEMUs this daemon spawned), enriched
with what QMP (SHUTDOWN event, EOF) and systemd (unit state, Result) said, classified once into a
Reason, and cleaned up once. Nothing here polls: every wait is on an event, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, NoReturn

from supervisord_vm.definition import Definition, definition_to_toml
from supervisord_vm.errors import (
    Busy,
    NoSuchUnit,
    NotRunning,
    OperationTimeout,
    QmpDisconnected,
    QmpError,
    StartFailed,
    SvmError,
)
from supervisord_vm.lifecycle import (
    NON_TERMINATING_SIGNALS,
    ExitFacts,
    Operation,
    check_operation,
    check_transition,
    classify_exit,
    classify_lost,
    classify_settled,
    destroy_intent,
    intent_mode,
)
from supervisord_vm.model import (
    DestroyMode,
    EventType,
    ExitInfo,
    MachineEvent,
    MachineInfo,
    Reason,
    State,
)
from supervisord_vm.qemu import QmpEvent, QmpSession, build_argv
from supervisord_vm.signals import signal_name
from supervisord_vm.store import Paths, RuntimeRecord, RuntimeStore, StateStore, log_path
from supervisord_vm.systemd import (
    ScopeProperties,
    Systemd,
    UnitEvent,
    UnitStatus,
    scope_name,
    spawn_in_scope,
)

log = logging.getLogger(__name__)


# Linux's PF_EXITING task flag (/proc/PID/task/TID/stat field 9): set when a thread begins to
# exit, before it drops its files (QMP EOF) and leaves its cgroup (the scope empties).
_PF_EXITING = 0x4


# Environment variables a service manager hands to the daemon that QEMU must never see.
PRIVATE_ENVIRONMENT = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"}
)


@dataclass
class MachineContext:
    """What every Machine shares: the stores, systemd, and the supervisor's hooks."""

    paths: Paths
    systemd: Systemd
    runtime: RuntimeStore
    state_store: StateStore
    emit: Callable[[MachineEvent], None]
    on_exit: Callable[[Machine, Reason], None]
    slice: str = "machine.slice"
    qmp_connect_timeout: float = 10.0
    settle_timeout: float = 5.0  # how long an exit waits for QMP EOF / the unit's final state
    force_timeout: float = 40.0  # libvirt's give-up time for SIGKILL


@dataclass
class _Run:
    """One QEMU process and what was learned about it while it ran."""

    pid: int
    process: asyncio.subprocess.Process | None  # set when this daemon spawned it
    started_at: float
    qmp: QmpSession | None = None
    pidfd: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Future[Reason] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    unit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    unit_status: UnitStatus | None = None
    unit_removed: bool = False
    start_failed: bool = False
    destroy_requested: bool = False
    our_sigterm_pending: bool = False
    external_stop: bool = False
    shutdown_guest: bool | None = None
    shutdown_reason: str = ""
    rebooting: bool = False  # set-action shutdown=pause is in force for a requested reboot
    reboot_guest_off: bool = False  # ... and the guest powered off: reset it when QEMU paused
    stopping_itself: bool = False  # the scope ended with QEMU alive: the daemon stops it
    stop_timed_out: bool = False  # ... and had to SIGKILL it after the stop timeout
    stop_intent: str = ""  # the stop in progress, as the runtime record carries it
    stop_at: float = 0.0
    shutdown_unseen: bool = False  # adopted with a shutdown intent, SHUTDOWN maybe missed
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


# Tasks that reap children after their run was settled (a ptrace-held zombie is reaped late).
_reapers: set[asyncio.Task[int]] = set()


class Machine:
    """One VM: serialized operations, one run at a time, exactly one cleanup per exit."""

    def __init__(self, definition: Definition, ctx: MachineContext, *, transient: bool) -> None:
        self.definition = definition  # used by the next start
        self.transient = transient
        self.unit = scope_name(definition.name)
        self.state = State.SHUTOFF
        self.reason = Reason.NONE
        self.exit = ExitInfo()
        self._ctx = ctx
        self._lock = asyncio.Lock()
        self._run: _Run | None = None
        self._running_definition = definition
        # The last exit happened during a stop asked through this daemon (destroy, shutdown):
        # the restart policy must not undo it, whatever the reason turned out to be.
        self.stop_requested = False

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def pid(self) -> int:
        return self._run.pid if self._run is not None and self.state is not State.SHUTOFF else 0

    @property
    def running_definition(self) -> Definition:
        """What the current run was started with (the definition itself when shut off).

        A redefine or reload of a running VM changes `definition` only; QEMU and its scope keep
        what they were started with until the next start.
        """
        return self._running_definition if self.state is not State.SHUTOFF else self.definition

    def info(self) -> MachineInfo:
        """The VM as clients see it; per field, see MachineInfo for which definition it shows."""
        return MachineInfo(
            name=self.name,
            state=self.state,
            reason=self.reason,
            unit=self.unit,
            pid=self.pid,
            transient=self.transient,
            autostart=self.definition.autostart,
            restart=self.definition.restart,
            stop_timeout=self.running_definition.stop_timeout,
            exit=self.exit,
        )

    def restore_exit(self, reason: Reason, exit_info: ExitInfo) -> None:
        """Take over the last-exit record a previous daemon saved."""
        if self.state is State.SHUTOFF:
            self.reason, self.exit = reason, exit_info

    def set_transient(self, transient: bool) -> None:
        """Mark a running VM (un)defined; the runtime record follows so a reattach knows."""
        self.transient = transient
        run = self._run
        if run is not None and self.state is not State.SHUTOFF:
            self._save_record(run)

    # --- state and events ---------------------------------------------------------------------

    def _set_state(self, new: State, event: EventType | None = None, message: str = "") -> None:
        check_transition(self.name, self.state, new)
        changed = new is not self.state
        self.state = new
        if event is not None and (changed or event not in (EventType.PAUSED, EventType.RESUMED)):
            self.emit(event, message)

    def emit(self, event: EventType, message: str = "") -> None:
        """Announce an event about this VM as it is now (the supervisor uses it for define too)."""
        self._ctx.emit(
            MachineEvent(
                time=time.time(),
                name=self.name,
                event=event,
                state=self.state,
                reason=self.reason,
                message=message,
            )
        )

    def _current(self, operation: Operation) -> _Run:
        check_operation(self.name, operation, self.state)
        run = self._run
        if run is None:  # the table says a run exists in every state but shutoff
            raise NotRunning(f"VM {self.name} is not running")
        return run

    def _qmp(self, run: _Run) -> QmpSession:
        if run.qmp is None or run.qmp.closed:
            raise QmpError(f"no QMP connection to VM {self.name}")
        return run.qmp

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start QEMU inside its scope and its CPUs once QMP is attached; or fail leaving nothing.

        Raises AlreadyRunning/InvalidState when not shut off, StartFailed naming the cause.
        """
        async with self._lock:
            check_operation(self.name, Operation.START, self.state)
            await self._start_locked()

    def _check_files(self, defn: Definition) -> str | None:
        try:
            mode = Path(defn.qemu).stat().st_mode
        except OSError as err:
            return f"QEMU binary {_path_problem(defn.qemu, err)}"
        if S_ISDIR(mode):
            return f"QEMU binary {defn.qemu} is a directory, not an executable program"
        if not S_ISREG(mode):
            return f"QEMU binary {defn.qemu} is not a regular file"
        if not os.access(defn.qemu, os.X_OK):
            return f"QEMU binary {defn.qemu} is not executable (no permission to execute it)"
        for disk in defn.disks:
            try:
                Path(disk.path).stat()
            except OSError as err:
                return f"disk {_path_problem(disk.path, err)}"
        return None

    async def _start_locked(self) -> None:
        defn = self.definition
        problem = self._check_files(defn)
        if problem is not None:
            await self._fail_without_run(f"cannot start VM {self.name}: {problem}")
        self._running_definition = defn
        try:
            # The intent comes first, before anything is announced or spawned: a daemon killed
            # from here on leaves a record (pid 0 until QEMU runs) from which the next one
            # adopts the QEMU or records the cut-off start.
            self._save_record(_Run(pid=0, process=None, started_at=time.time()))
        except OSError as err:
            await self._fail_without_run(
                f"cannot start VM {self.name}: cannot write its runtime record: {_os_error(err)}"
            )
        self.reason = Reason.NONE
        self._set_state(State.STARTING, EventType.STARTING)
        runtime = self._ctx.runtime
        socket_path = runtime.qmp_socket(self.name)
        log_file = log_path(self._ctx.paths, self.name)
        log_created = False  # by this start: removed again if QEMU never runs
        try:
            await self._clear_scope()
            socket_path.unlink(missing_ok=True)
            log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            log_fd, log_created = _open_log(log_file)
            try:
                log_offset = os.lseek(log_fd, 0, os.SEEK_END)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
                header = f"--- {stamp}: supervisord-vm starts VM {self.name} ({self.unit}) ---\n"
                os.write(log_fd, header.encode())
                log_offset += len(header.encode())
                env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENVIRONMENT}
                props = ScopeProperties(
                    description=f"QEMU virtual machine {self.name} (supervisord-vm)",
                    stop_timeout=float(defn.stop_timeout),
                    slice=self._ctx.slice,
                )
                process = await spawn_in_scope(
                    self._ctx.systemd,
                    build_argv(defn, socket_path),
                    self.unit,
                    props,
                    env=env,
                    stdout=log_fd,
                    stderr=log_fd,
                )
            except OSError as err:
                # spawn_in_scope's OSError for a failed execve of QEMU carries execve's errno
                # and no file name; others (fork, the trampoline itself) name their file.
                if err.filename is None and (err.strerror or "").startswith("cannot execute"):
                    raise _ExecFailed(_exec_problem(defn.qemu, err)) from err
                raise
            finally:
                os.close(log_fd)
        except (SvmError, OSError, _ExecFailed) as err:
            if log_created:  # QEMU never ran: no log of a run that never was
                with contextlib.suppress(OSError):
                    log_file.unlink()
            text = str(err) if isinstance(err, SvmError | _ExecFailed) else _os_error(err)
            await self._fail_without_run(f"cannot start VM {self.name}: {text}")
        run = _Run(pid=process.pid, process=process, started_at=time.time())
        self._run = run
        self._watch(run)
        try:
            self._save_record(run)
            run.qmp = await self._connect_qmp(run, socket_path)
            self._spawn(run, self._exit_on_qmp_eof(run, run.qmp))
            await run.qmp.execute("cont")
        except (SvmError, OSError) as err:
            run.start_failed = True
            await self._abort_run(run)
            tail = _log_tail(log_file, log_offset)
            detail = f"\nQEMU's last output:\n{tail}" if tail else ""
            raise StartFailed(f"QEMU for VM {self.name} failed to start: {err}{detail}") from err
        if self._run is not run:  # it ended right after `cont` and was settled already
            raise StartFailed(f"QEMU for VM {self.name} exited while starting")
        self._set_state(State.RUNNING, EventType.STARTED, f"pid {run.pid}")

    async def _fail_without_run(self, message: str) -> NoReturn:
        """A start that failed before QEMU ran: record `failed`, leave nothing, raise."""
        with contextlib.suppress(SvmError, OSError):
            await self._clear_scope()
        self._ctx.runtime.remove(self.name)
        self.reason = Reason.FAILED
        self.exit = ExitInfo(time=time.time())
        self.stop_requested = False
        if self.state is not State.SHUTOFF:
            self._set_state(State.SHUTOFF)
        self._record_exit()
        self.emit(EventType.STOPPED, message)
        self._ctx.on_exit(self, Reason.FAILED)
        raise StartFailed(message)

    async def _connect_qmp(self, run: _Run, socket_path: Path) -> QmpSession:
        """Connect QMP, giving up at once if QEMU exits first (bad extra_args and the like)."""
        connect = asyncio.ensure_future(
            QmpSession.connect(
                socket_path,
                timeout=self._ctx.qmp_connect_timeout,
                on_event=lambda event: self._on_qmp_event(run, event),
            )
        )
        exited = asyncio.ensure_future(run.exited.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError, SvmError):
                await connect
            raise QmpError("QEMU exited before its monitor was ready")
        return connect.result()

    async def _abort_run(self, run: _Run) -> None:
        """Kill a run that failed to start and wait for its cleanup."""
        run.destroy_requested = True
        if not run.exited.is_set():
            with contextlib.suppress(SvmError):
                await self._ctx.systemd.kill_unit(self.unit, signal.SIGKILL)
            if run.process is not None and run.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    run.process.kill()
        await asyncio.shield(run.settled)

    def _save_record(self, run: _Run) -> None:
        self._ctx.runtime.save(
            RuntimeRecord(
                name=self.name,
                pid=run.pid,
                unit=self.unit,
                transient=self.transient,
                definition_toml=definition_to_toml(self._running_definition),
                started_at=run.started_at,
                stop=run.stop_intent,
                stop_at=run.stop_at,
            )
        )

    def _record_intent(self, run: _Run, stop: str) -> None:
        """Persist the stop about to begin ("" when it ended without ending QEMU).

        Written before the daemon acts, so a daemon killed mid-stop leaves the intent and the
        next one settles the exit as asked (not `lost`) and does not restart it. A failing write
        is logged, not raised: a destroy must not be refused for a full /run.
        """
        if self._run is not run or run.stop_intent == stop:
            return
        run.stop_intent, run.stop_at = stop, time.time() if stop else 0.0
        try:
            self._save_record(run)
        except OSError as err:
            log.error("VM %s: cannot record the stop intent %r: %s", self.name, stop, err)

    # --- reattach -----------------------------------------------------------------------------

    async def adopt(
        self,
        pid: int,
        started_at: float,
        running_definition: Definition,
        *,
        starting: bool = False,
        stop: str = "",
        stop_at: float = 0.0,
    ) -> bool:
        """Take over a QEMU a previous daemon started; False if the process is already gone.

        `starting`: the previous daemon died before it recorded QEMU's PID, so PID may still be
        the spawn trampoline that exits without ever running QEMU: that ends as `failed`.

        `stop`: the previous daemon died during a stop (its runtime record's intent). The stop
        is completed, not dropped: the user's last word was to stop the VM, and the restart
        policy must not bring it back. A destroy is done again in its mode before this returns
        (so start-up settles it before READY; a graceful one that meets a QEMU surviving
        SIGTERM ends Busy as usual: logged, intent dropped, VM running). A shutdown presses
        the power button again (pressed once or not at all before the kill; a guest already
        powering off ignores a second press) and leaves the VM running with the shutdown
        pending, as `reboot` does: nobody waits for it any more, but the guest's power-off then
        counts as the shutdown asked for (`shutdown`, not restarted).
        """
        destroy_mode = intent_mode(stop)
        async with self._lock:
            run = _Run(pid=pid, process=None, started_at=started_at)
            run.stop_intent, run.stop_at = stop, stop_at
            run.destroy_requested = destroy_mode is not None
            run.shutdown_unseen = stop == "shutdown"
            try:
                run.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
            self._running_definition = running_definition
            self._run = run
            self._watch(run)
            self._set_state(State.STARTING)
            socket_path = self._ctx.runtime.qmp_socket(self.name)
            status: object = None
            try:
                run.qmp = await self._connect_qmp(run, socket_path)
                self._spawn(run, self._exit_on_qmp_eof(run, run.qmp))
                status = await run.qmp.execute("query-status")
                if isinstance(status, dict) and status.get("status") == "prelaunch":
                    await run.qmp.execute("cont")  # the previous daemon died mid-start
            except SvmError as err:
                log.warning("VM %s: reattached without QMP: %s", self.name, err)
            if run.exited.is_set():
                run.start_failed = starting and run.qmp is None
                await asyncio.shield(run.settled)  # settled before start-up says it is ready
                return True
            self._save_record(run)
            self._set_state(State.RUNNING)
            if isinstance(status, dict) and status.get("status") == "paused":
                self._set_state(State.PAUSED)
            log.info("VM %s: reattached to pid %d", self.name, pid)
            if stop == "shutdown" and run.qmp is not None:
                if isinstance(status, dict) and status.get("status") == "running":
                    run.shutdown_unseen = False  # QEMU runs: its SHUTDOWN is still to come
                try:
                    await run.qmp.execute("system_powerdown")
                    log.info("VM %s: shutdown cut off by a daemon exit pressed again", self.name)
                except SvmError as err:
                    log.warning("VM %s: cannot press the power button again: %s", self.name, err)
        if destroy_mode is not None and self._run is run and not run.settled.done():
            log.info("VM %s: completing the %s cut off by a daemon exit", self.name, stop)
            try:
                await self._destroy_now(run, destroy_mode, None)
            except SvmError as err:
                log.warning("VM %s: completing the %s failed: %s", self.name, stop, err)
        return True

    async def settle_ended(
        self,
        status: UnitStatus | None,
        started_at: float | None = None,
        *,
        start_cut: bool = False,
        stop: str = "",
    ) -> Reason:
        """Settle a run that ended while no daemon watched (found at start-up).

        `started_at`: when the run began (from its runtime record). An exit record written
        after that is this run's, saved by a daemon killed before it finished the cleanup:
        its reason stands. `start_cut`: the daemon died before QEMU was known to run.
        `stop`: the stop intent the record carried (classify_settled); such an exit was asked
        for, so the restart policy leaves it alone.
        """
        self._running_definition = self.definition
        requested = bool(stop)
        recorded = self.reason is not Reason.NONE
        if started_at is not None and recorded and self.exit.time >= started_at:
            await self._cleanup(
                self.reason, self.exit, "cleanup finished after a restart", requested=requested
            )
            return self.reason
        result = status.result if status is not None else ""
        if start_cut:
            reason, message = Reason.FAILED, "start cut off: the daemon exited before QEMU ran"
        elif stop:
            reason = classify_settled(stop, result)
            message = f"ended during a {stop} while the daemon was not running"
        else:
            reason, message = classify_lost(result), "ended while the daemon was not running"
        info = ExitInfo(result=result, time=time.time())
        await self._cleanup(reason, info, message, requested=requested)
        return reason

    async def detach(self) -> None:
        """Let go of the run (QMP, pidfd, watchers) and leave QEMU running."""
        run = self._run
        if run is None:
            return
        self._unwatch_pidfd(run)
        for task in list(run.tasks):
            task.cancel()
        if run.qmp is not None:
            await run.qmp.close()
        self._run = None

    # --- exit detection, classification, cleanup ----------------------------------------------

    def _watch(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        if run.pidfd is None:
            try:
                run.pidfd = os.pidfd_open(run.pid)
            except ProcessLookupError:
                run.pidfd = None
        if run.pidfd is not None:
            loop.add_reader(run.pidfd, self._on_pidfd, run)
        if run.process is not None:
            reaper = asyncio.ensure_future(run.process.wait())
            _reapers.add(reaper)
            reaper.add_done_callback(_reapers.discard)
            reaper.add_done_callback(lambda _task: run.exited.set())
        self._spawn(run, self._watch_exit(run))

    def _spawn(self, run: _Run, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)

    def _on_pidfd(self, run: _Run) -> None:
        self._unwatch_pidfd(run)
        run.exited.set()

    def _unwatch_pidfd(self, run: _Run) -> None:
        if run.pidfd is not None:
            asyncio.get_running_loop().remove_reader(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None

    def on_unit_event(self, event: UnitEvent) -> None:
        """systemd said something about this VM's scope."""
        run = self._run
        if run is None:
            return
        if event.kind == "changed" and event.status is not None:
            run.unit_status = event.status
            if (
                event.status.active_state == "deactivating"
                and not run.destroy_requested
                and not run.start_failed
            ):
                run.external_stop = True
        elif event.kind == "removed":
            run.unit_removed = True
        run.unit_changed.set()
        if event.kind == "removed" or (
            event.status is not None and event.status.active_state in ("inactive", "failed")
        ):
            # Normally the cgroup is empty now. A QEMU whose threads are held by a ptrace tracer
            # is then a zombie that neither its pidfd nor waitpid reports until the tracer lets
            # go, so the threads' own state decides.
            self._exited_if_dead(run)
            if not run.exited.is_set() and (run.destroy_requested or run.external_stop):
                self._stop_behind_ended_scope(run)

    def _exited_if_dead(self, run: _Run) -> None:
        """Take an exit hint (unit ended, QMP EOF) as the exit once every thread is exiting.

        Hints may be stale (a previous run's scope, a dropped connection) or wrong (systemd can
        end a scope whose process it failed to signal): the threads' own state decides. A
        thread sets PF_EXITING before it drops its files or leaves its cgroup, so when either
        hint is true this check already sees it: no second look is needed.
        """
        if not run.exited.is_set() and _process_ended(run.pid):
            run.exited.set()

    def _stop_behind_ended_scope(self, run: _Run) -> None:
        """The scope was stopped and ended, yet QEMU runs on: do the stop systemd did not.

        Seen with systemd 252: when reading the scope's cgroup.procs fails (EIO) its stop
        signals nobody, and the scope still ends `inactive`/`success` with QEMU inside.
        """
        if run.stopping_itself:
            return
        run.stopping_itself = True
        log.warning(
            "VM %s: scope %s ended but QEMU (pid %d) is still running; stopping it directly",
            self.name,
            self.unit,
            run.pid,
        )
        self._spawn(run, self._stop_process(run))

    async def _stop_process(self, run: _Run) -> None:
        """SIGTERM (with SIGCONT), SIGKILL after the stop timeout: the scope's own stop."""
        _signal_run(run, signal.SIGTERM)
        _signal_run(run, signal.SIGCONT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(run.exited.wait()), float(self._running_definition.stop_timeout)
            )
            return
        run.stop_timed_out = True
        _signal_run(run, signal.SIGKILL)

    async def _exit_on_qmp_eof(self, run: _Run, session: QmpSession) -> None:
        await session.wait_closed()
        self._exited_if_dead(run)

    def _on_qmp_event(self, run: _Run, event: QmpEvent) -> None:
        if run is not self._run:
            return
        if event.name == "SHUTDOWN":
            guest = event.data.get("guest") is True
            if run.rebooting and guest:
                run.reboot_guest_off = True  # QEMU pauses now (STOP follows) instead of exiting
                return
            if run.shutdown_guest is not True:  # a guest power-off stays one (quit after it)
                run.shutdown_guest = guest
                run.shutdown_reason = str(event.data.get("reason", ""))
        elif event.name == "STOP":
            if run.reboot_guest_off:
                self._spawn(run, self._finish_reboot(run))
            elif self.state is State.RUNNING and run.shutdown_guest is None:
                self._set_state(State.PAUSED, EventType.PAUSED)
        elif event.name == "RESUME" and self.state is State.PAUSED and not run.reboot_guest_off:
            self._set_state(State.RUNNING, EventType.RESUMED)

    async def _watch_exit(self, run: _Run) -> None:
        await run.exited.wait()
        self._unwatch_pidfd(run)
        exit_status: int | None = None
        exit_signal: int | None = None
        # QMP EOF comes after every event QEMU wrote, so the SHUTDOWN event is in by then.
        if run.qmp is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ctx.settle_timeout):
                    await run.qmp.wait_closed()
            await run.qmp.close()
        if run.process is not None and not _traced(run.pid):
            # Reaped at once normally; a zombie held by a ptrace tracer only once it lets go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(run.process.wait())
            code = run.process.returncode
            if code is not None:
                exit_status, exit_signal = (None, -code) if code < 0 else (code, None)
        result = await self._final_unit_result(run)
        if run.stop_timed_out:
            result = "timeout"  # our stop behind the ended scope had to SIGKILL
        facts = ExitFacts(
            start_failed=run.start_failed,
            destroy_requested=run.destroy_requested,
            our_sigterm_pending=run.our_sigterm_pending,
            shutdown_guest=run.shutdown_guest,
            shutdown_reason=run.shutdown_reason,
            external_stop=run.external_stop,
            unit_result=result,
            shutdown_unseen=run.shutdown_unseen,
        )
        reason = classify_exit(facts)
        info = ExitInfo(result, exit_status, exit_signal, time.time())
        detail = [f"pid {run.pid}", f"result {result or 'unknown'}"]
        if run.shutdown_reason:
            detail.append(f"QEMU shutdown reason {run.shutdown_reason}")
        if exit_signal is not None:
            detail.append(f"signal {signal_name(exit_signal)}")
        elif exit_status is not None:
            detail.append(f"exit status {exit_status}")
        requested = run.destroy_requested or bool(run.stop_intent)
        await self._cleanup(reason, info, ", ".join(detail), run, requested=requested)

    async def _final_unit_result(self, run: _Run) -> str:
        """Wait (on unit signals, bounded) for the scope to end and return its Result."""
        try:
            async with asyncio.timeout(self._ctx.settle_timeout):
                while True:
                    run.unit_changed.clear()
                    status = await self._ctx.systemd.unit_status(self.unit)
                    if status is None:
                        last = run.unit_status
                        return last.result if last is not None and last.result else "success"
                    if status.active_state in ("inactive", "failed"):
                        return status.result
                    await run.unit_changed.wait()
        except TimeoutError:
            log.warning("VM %s: scope %s did not end with its process", self.name, self.unit)
        except SvmError as err:
            log.warning("VM %s: cannot read the state of %s: %s", self.name, self.unit, err)
        return run.unit_status.result if run.unit_status is not None else ""

    async def _cleanup(
        self,
        reason: Reason,
        info: ExitInfo,
        message: str,
        run: _Run | None = None,
        *,
        requested: bool = False,
    ) -> None:
        """Everything after an exit, once: scope, files, record, event, hooks.

        `requested`: the exit came during a stop asked through the daemon (no restart).
        """
        try:
            await self._clear_scope()
        except SvmError as err:
            log.warning("VM %s: cannot clear scope %s: %s", self.name, self.unit, err)
        # The exit record before the runtime files: a daemon killed in between leaves the
        # runtime record, and the next one finishes this cleanup with the recorded reason.
        self.reason, self.exit = reason, info
        self._record_exit()
        try:
            self._ctx.runtime.remove(self.name)
        except OSError as err:
            log.warning("VM %s: cannot remove runtime files: %s", self.name, err)
        if run is None or self._run is run:
            self._run = None
        self.state = State.SHUTOFF  # every state may end in shutoff (TRANSITIONS)
        self.stop_requested = requested
        self.emit(EventType.STOPPED, message)
        if run is not None and not run.settled.done():
            run.settled.set_result(reason)
        self._ctx.on_exit(self, reason)

    def _record_exit(self) -> None:
        if self.transient:
            return  # a transient VM is forgotten with its exit
        try:
            self._ctx.state_store.save_exit(self.name, self.reason, self.exit)
        except OSError as err:
            log.error("VM %s: cannot save its exit record: %s", self.name, err)

    async def _clear_scope(self) -> None:
        """Make the scope name free: stop a loaded scope, reset a failed one."""
        systemd = self._ctx.systemd
        status = await systemd.unit_status(self.unit)
        if status is None:
            return
        if status.active_state not in ("inactive", "failed"):
            await systemd.stop_unit(self.unit)
        with contextlib.suppress(NoSuchUnit):
            await systemd.reset_failed(self.unit)

    # --- operations on a running VM -----------------------------------------------------------

    async def shutdown(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - bounds the guest, not the call
        then_destroy: bool = False,
    ) -> None:
        """ACPI power button; wait for the guest to power off (bounded by `timeout`).

        Without a timeout the wait lasts as long as the guest takes, forever for a guest that
        ignores ACPI; a press before the guest enabled ACPI (early boot) is lost as on real
        hardware. Use a timeout, and `then_destroy` to end the VM when it runs out.
        """
        async with self._lock:
            run = self._current(Operation.SHUTDOWN)
            qmp = self._qmp(run)
            self._record_intent(run, "shutdown")
            self._set_state(State.STOPPING, EventType.STOPPING, "ACPI power button")
            try:
                if run.rebooting:  # cancel the pending reboot: a power-off must end QEMU
                    run.rebooting = False
                    await qmp.execute("set-action", {"shutdown": "poweroff"})
                if run.reboot_guest_off:
                    # The guest already powered off for the reboot; QEMU waits paused for the
                    # reset. That power-off is the one asked for now: let QEMU go.
                    run.reboot_guest_off = False
                    run.shutdown_guest, run.shutdown_reason = True, "guest-shutdown"
                    await qmp.execute("quit")
                else:
                    await qmp.execute("system_powerdown")
            except QmpDisconnected:
                pass  # QEMU is going away anyway: wait for the exit below
            except QmpError as err:
                self._drop_intent(run, "shutdown")
                self._back_from_stopping(run, State.RUNNING, f"shutdown failed: {err}")
                raise
            try:
                await asyncio.wait_for(asyncio.shield(run.settled), timeout)
            except TimeoutError:
                if then_destroy:
                    await self._destroy_now(run, DestroyMode.DEFAULT, None)
                    return
                self._drop_intent(run, "shutdown")
                self._back_from_stopping(run, State.RUNNING, "shutdown timed out")
                raise OperationTimeout(
                    f"VM {self.name} did not power off within {timeout:g} s; it is still running"
                ) from None

    def _drop_intent(self, run: _Run, stop: str) -> None:
        """A stop that gave up with QEMU still running: forget its intent (not a later one)."""
        if run.stop_intent == stop and not run.settled.done():
            self._record_intent(run, "")

    def _back_from_stopping(self, run: _Run, previous: State, message: str) -> None:
        """A stop that did not happen: the VM is back in the state it was in, and says so."""
        if self._run is run and self.state is State.STOPPING and previous is not State.STOPPING:
            event = EventType.RESUMED if previous is State.RUNNING else EventType.PAUSED
            self._set_state(previous, event, message)

    async def destroy(
        self,
        mode: DestroyMode = DestroyMode.DEFAULT,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed interface
    ) -> None:
        """End QEMU (see DestroyMode); cuts through other operations waiting on this VM."""
        if self.state is State.STARTING:
            async with self._lock:  # a start is short and bounded: let it finish first
                pass
        run = self._current(Operation.DESTROY)
        await self._destroy_now(run, mode, timeout)

    async def _destroy_now(
        self,
        run: _Run,
        mode: DestroyMode,
        timeout: float | None,  # noqa: ASYNC109 - the agreed interface
    ) -> None:
        systemd = self._ctx.systemd
        previous = self.state
        run.destroy_requested = True
        self._record_intent(run, destroy_intent(mode))
        run.rebooting = run.reboot_guest_off = False  # a pending reboot is cancelled
        if self.state is not State.STOPPING:
            self._set_state(State.STOPPING, EventType.STOPPING, f"destroy ({mode})")
        if mode is DestroyMode.FORCE:
            await self._kill_unit(run, signal.SIGKILL)
            limit = timeout if timeout is not None else self._ctx.force_timeout
            if not await self._settled_within(run, limit):
                raise OperationTimeout(
                    f"SIGKILL sent, but process {run.pid} of VM {self.name} is still there "
                    f"after {limit:g} s (uninterruptible I/O?)"
                )
        elif mode is DestroyMode.GRACEFUL:
            await self._kill_unit(run, signal.SIGTERM)
            stop_timeout = float(self._running_definition.stop_timeout)
            limit = min(timeout, stop_timeout) if timeout is not None else stop_timeout
            if not await self._settled_within(run, limit):
                run.destroy_requested = False
                run.our_sigterm_pending = True
                self._drop_intent(run, destroy_intent(mode))
                self._back_from_stopping(run, previous, "graceful destroy: still running")
                raise Busy(
                    f"Failed to terminate process {run.pid} with SIGTERM: VM {self.name} is "
                    f"still running after {limit:g} s; nothing was escalated"
                )
        else:
            with contextlib.suppress(NoSuchUnit):  # already ended: the exit is being settled
                await systemd.stop_unit(self.unit)
            self._exited_if_dead(run)
            if not run.exited.is_set():
                status = await systemd.unit_status(self.unit)
                if status is None or status.active_state in ("inactive", "failed"):
                    self._stop_behind_ended_scope(run)
            limit = timeout if timeout is not None else self._ctx.force_timeout
            if not await self._settled_within(run, limit):
                raise OperationTimeout(
                    f"the scope {self.unit} was stopped, but process {run.pid} of VM {self.name} "
                    f"is still there after {limit:g} s"
                )

    @staticmethod
    async def _settled_within(run: _Run, limit: float) -> bool:
        """Wait up to `limit` seconds for the run's exit to be settled; whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.settled), limit)
        return run.settled.done()

    async def _kill_unit(self, run: _Run, sig: int) -> None:
        try:
            await self._ctx.systemd.kill_unit(self.unit, sig)
        except NoSuchUnit:
            if not run.exited.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, sig)  # scope gone but the process not yet noticed

    async def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to every process of the scope and return at once."""
        run = self._current(Operation.KILL)
        if sig not in NON_TERMINATING_SIGNALS:
            run.destroy_requested = True
        await self._kill_unit(run, sig)

    async def reboot(self) -> None:
        """Ask the guest to reboot (ACPI) and return once asked, like `virsh reboot`.

        QMP has no ACPI reboot: this is libvirt's "fake reboot". QEMU is set to pause instead
        of exiting when the guest powers off (`set-action shutdown=pause`) and the power button
        is pressed; the call returns then. When the guest later powers off (SHUTDOWN with
        guest=true, then STOP), the daemon resets it in the same QEMU (`system_reset`, `cont`),
        restores `shutdown=poweroff` and emits `rebooted`. A guest that ignores the button just
        keeps running with the reboot pending (reset forces it). A later shutdown or destroy
        cancels the pending reboot: shutdown restores the power-off action before it acts, so
        the guest's next power-off really ends QEMU.
        """
        async with self._lock:
            run = self._current(Operation.REBOOT)
            qmp = self._qmp(run)
            await qmp.execute("set-action", {"shutdown": "pause"})
            run.rebooting = True
            try:
                await qmp.execute("system_powerdown")
            except QmpError:
                run.rebooting = False
                with contextlib.suppress(QmpError):
                    await qmp.execute("set-action", {"shutdown": "poweroff"})
                raise

    async def _finish_reboot(self, run: _Run) -> None:
        """The guest powered off for a requested reboot and QEMU paused: reset and go on."""
        async with self._lock:
            if self._run is not run or not run.rebooting or not run.reboot_guest_off:
                return  # cancelled meanwhile (shutdown, destroy) or already done
            qmp = self._qmp(run)
            try:
                await qmp.execute("set-action", {"shutdown": "poweroff"})
                await qmp.execute("system_reset")
                await qmp.execute("cont")
            except QmpError as err:
                log.warning("VM %s: reboot after the guest's power-off failed: %s", self.name, err)
                return
            finally:
                run.rebooting = run.reboot_guest_off = False
            self.emit(EventType.REBOOTED)

    async def reset(self) -> None:
        """Hard reset (QMP system_reset), like the reset button."""
        async with self._lock:
            run = self._current(Operation.RESET)
            await self._qmp(run).execute("system_reset")
            self.emit(EventType.RESET)

    async def pause(self) -> None:
        async with self._lock:
            run = self._current(Operation.PAUSE)
            await self._qmp(run).execute("stop")
            if self._run is run and self.state is State.RUNNING:
                self._set_state(State.PAUSED, EventType.PAUSED)

    async def resume(self) -> None:
        async with self._lock:
            run = self._current(Operation.RESUME)
            await self._qmp(run).execute("cont")
            if self._run is run and self.state is State.PAUSED:
                self._set_state(State.RUNNING, EventType.RESUMED)


class _ExecFailed(Exception):
    """QEMU's binary could not be executed (the message says why, for a person)."""


def _open_log(path: Path) -> tuple[int, bool]:
    """Open QEMU's log for appending; True if this call created it."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o640), True
    except FileExistsError:
        return os.open(path, flags), False


def _os_error(err: OSError) -> str:
    """An OSError for a person: "PATH: Permission denied", not "[Errno 13] ..."."""
    text = err.strerror or str(err)
    return f"{err.filename}: {text}" if err.filename else text


def _path_problem(path: str, err: OSError) -> str:
    """Why `path` cannot be used, from stat's error, starting with the path."""
    if isinstance(err, FileNotFoundError):
        return f"{path} does not exist"
    if isinstance(err, PermissionError):
        return f"{path} cannot be reached (permission denied)"
    if isinstance(err, NotADirectoryError):
        return f"{path} does not exist (a part of the path is not a directory)"
    return f"{path} cannot be used ({os.strerror(err.errno) if err.errno else err})"


# execve's errors, said about the program (the errno's own text follows in parentheses).
_EXEC_PROBLEMS: Mapping[int, str] = {
    errno.ENOEXEC: "is not an executable program",
    errno.EACCES: "cannot be executed (permission denied",
    errno.ENOENT: "does not exist, or the interpreter it names does not",
    errno.EISDIR: "is a directory, not an executable program",
    errno.ETXTBSY: "is being written to and cannot be executed now",
    errno.ELIBBAD: "is not an executable program",
    errno.ENOMEM: "cannot be executed: not enough memory",
    errno.E2BIG: "cannot be executed: its command line is too long",
}


def _exec_problem(program: str, err: OSError) -> str:
    """Why execve of `program` failed, said about the program: no raw "[Errno N]"."""
    code = err.errno or 0
    reason = os.strerror(code) if code else str(err)
    problem = _EXEC_PROBLEMS.get(code)
    if problem is None:
        return f"QEMU binary {program} cannot be executed ({reason})"
    if problem.endswith("(permission denied"):
        return f"QEMU binary {program} {problem})"
    return f"QEMU binary {program} {problem} ({reason})"


def _process_ended(pid: int) -> bool:
    """True once every thread of PID is exiting or dead (or the process is gone).

    The leader alone does not tell: after SIGKILL it is a zombie while other threads may still
    be stuck (uninterruptible I/O), and before SIGKILL a scope may end with all of them alive.
    """
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for thread in threads:
        try:
            with (thread / "stat").open("rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # this thread is gone
        if len(fields) < 7:
            continue
        if fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING:
            return False
    return True


def _signal_run(run: _Run, sig: int) -> None:
    """Signal QEMU through its pidfd (never a recycled PID); gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        if run.pidfd is not None:
            signal.pidfd_send_signal(run.pidfd, sig)
        else:
            os.kill(run.pid, sig)


def _traced(pid: int) -> bool:
    """True while another process ptraces PID (its exit status then is not ours to read yet)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"TracerPid:"):
                    return line.split()[1] != b"0"
    except OSError:
        pass
    return False


def _log_tail(path: Path, offset: int, lines: int = 8) -> str:
    """The last lines QEMU wrote to its log since `offset` (this start's header)."""
    try:
        with path.open("rb") as stream:
            stream.seek(offset)
            data = stream.read()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").strip().splitlines()[-lines:])
