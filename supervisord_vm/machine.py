"""One VM: its operations, and classifying (rules: lifecycle.py) and cleaning up its exits.

A Machine owns at most one Run (one QEMU process, run.py) at a time. What is in progress on it
is one value, the run's Pending operation (lifecycle.py), persisted in the runtime record before
the daemon acts. Only starting a run holds the VM's lock for long; every other operation either
runs at once (its QMP commands are bounded), refuses with InvalidState, or joins the operation
already in progress, and waits without the lock. Reattaching to a run a previous daemon started
is reattach.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from supervisord_vm import (
    confinement,
    display,
    hardware,
    launch,
    lifecycle,
    network,
    qemu_journal,
    qemu_log,
)
from supervisord_vm.console import ConsoleManager, PreparedConsole
from supervisord_vm.definition import Definition, definition_to_toml
from supervisord_vm.disk_access import OwnerStore
from supervisord_vm.errors import (
    Busy,
    InvalidState,
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
    QEMU_TERMINATION_SIGNALS,
    Operation,
    Pending,
    PendingOp,
    check_operation,
    check_transition,
    classify_exit,
)
from supervisord_vm.machined import Machined
from supervisord_vm.model import (
    DestroyMode,
    EventType,
    ExitInfo,
    MachineEvent,
    MachineInfo,
    Reason,
    State,
)
from supervisord_vm.qemu import LaunchResources, QmpEvent, QmpSession
from supervisord_vm.run import Run, process_ended
from supervisord_vm.store import Paths, RuntimeRecord, RuntimeStore, StateStore, log_path
from supervisord_vm.systemd import (
    Systemd,
    UnitEvent,
    scope_name,
)

log = logging.getLogger(__name__)


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
    qmp_command_timeout: float = QmpSession.COMMAND_TIMEOUT
    settle_timeout: float = 5.0  # how long an exit waits for QMP EOF / the unit's final state
    force_timeout: float = 40.0  # libvirt's give-up time for SIGKILL
    log_limit: int = qemu_log.DEFAULT_LIMIT  # bytes of QEMU output kept per log generation
    consoles: ConsoleManager | None = None  # every VM's serial console (None: no consoles)
    machined: Machined | None = None  # registers running VMs (None: one made over `systemd`)
    # QEMU's output goes to the journal through this socket if it is there, else to log files.
    journal_stream: Path | None = qemu_journal.STREAM_SOCKET

    def __post_init__(self) -> None:
        if self.machined is None:
            self.machined = Machined(self.systemd)


class Machine:
    """One VM: one run at a time, exactly one cleanup per exit, one pending operation."""

    def __init__(self, definition: Definition, ctx: MachineContext, *, transient: bool) -> None:
        self.definition = definition  # used by the next start
        self.transient = transient
        self.unit = scope_name(definition.name)
        self.state = State.SHUTOFF
        self.reason = Reason.NONE
        self.exit = ExitInfo()
        self.ctx = ctx
        self.lock = asyncio.Lock()  # held to start or adopt a run, and for QMP commands
        self.run: Run | None = None
        self._running_definition = definition
        # The last exit happened during a stop asked through this daemon (destroy, shutdown):
        # the restart policy must not undo it, whatever the reason turned out to be.
        self.stop_requested = False
        self.display = ""  # how to reach the running VM's display (display.py); "" for none

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def pid(self) -> int:
        return self.run.pid if self.run is not None and self.state is not State.SHUTOFF else 0

    @property
    def running_definition(self) -> Definition:
        """What the current run was started with (the definition itself when shut off).

        A redefine or reload of a running VM changes `definition` only; QEMU and its scope keep
        what they were started with until the next start.
        """
        return self._running_definition if self.state is not State.SHUTOFF else self.definition

    @running_definition.setter
    def running_definition(self, definition: Definition) -> None:
        self._running_definition = definition

    @property
    def stop_timeout(self) -> float:
        return float(self.running_definition.stop_timeout)

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
            display=self.display if self.state is not State.SHUTOFF else "",
        )

    def restore_exit(self, reason: Reason, exit_info: ExitInfo) -> None:
        """Take over the last-exit record a previous daemon saved."""
        if self.state is State.SHUTOFF:
            self.reason, self.exit = reason, exit_info

    def set_transient(self, transient: bool) -> None:
        """Mark a running VM (un)defined; the runtime record follows so a reattach knows."""
        self.transient = transient
        run = self.run
        if run is not None and self.state is not State.SHUTOFF:
            self.save_record(run)

    # --- state and events ---------------------------------------------------------------------

    def set_state(self, new: State, event: EventType | None = None, message: str = "") -> None:
        check_transition(self.name, self.state, new)
        changed = new is not self.state
        self.state = new
        if event is not None and (changed or event not in (EventType.PAUSED, EventType.RESUMED)):
            self.emit(event, message)

    def emit(self, event: EventType, message: str = "") -> None:
        """Announce an event about this VM as it is now (the supervisor uses it for define too)."""
        self.ctx.emit(
            MachineEvent(
                time=time.time(),
                name=self.name,
                event=event,
                state=self.state,
                reason=self.reason,
                message=message,
            )
        )

    def _current(self, operation: Operation) -> Run:
        check_operation(self.name, operation, self.state)
        run = self.run
        if run is None:  # the table says a run exists in every state but shutoff
            raise NotRunning(f"VM {self.name} is not running")
        return run

    def _qmp(self, run: Run) -> QmpSession:
        if run.qmp is None or run.qmp.closed:
            if run.exited.is_set() or (run.qmp is not None and process_ended(run.pid)):
                raise NotRunning(f"VM {self.name} has just stopped")
            raise QmpError(f"no QMP connection to VM {self.name}")
        return run.qmp

    async def _command(self, run: Run, command: str) -> None:
        """One QMP command for an operation; a QEMU exiting under it is NotRunning."""
        try:
            await self._qmp(run).execute(command)
        except QmpDisconnected:
            await run.settled_within(self.ctx.settle_timeout)
            raise NotRunning(f"VM {self.name} stopped during {command!r}") from None

    # --- the runtime record and the pending operation -----------------------------------------

    def save_record(self, run: Run) -> None:
        """Write the run's runtime record (in /run: a tmpfs, so the fsync costs nothing)."""
        self.ctx.runtime.save(
            RuntimeRecord(
                name=self.name,
                pid=run.pid,
                unit=self.unit,
                transient=self.transient,
                definition_toml=definition_to_toml(self._running_definition),
                started_at=run.started_at,
                pending=run.pending,
            )
        )

    def set_pending(self, run: Run, pending: Pending) -> None:
        """Make `pending` the run's operation in progress and persist it before anyone acts.

        A failing write is logged, not raised: a destroy must not be refused for a full /run.
        """
        if self.run is not run or run.pending == pending:
            return
        run.pending = pending
        try:
            self.save_record(run)
        except OSError as err:
            log.error("VM %s: cannot record %s in progress: %s", self.name, pending.describe(), err)

    def begin(self, run: Run, asked: Pending) -> None:
        """Begin `asked` (lifecycle's rules: join, escalate, replace or refuse)."""
        self.set_pending(run, run.pending.begin(asked))

    def end(self, run: Run, ended: Pending, restore: Pending | None = None) -> None:
        """`ended` finished or gave up with QEMU running: drop it (not another one)."""
        if not run.settled.done():
            self.set_pending(run, run.pending.end(ended, restore))

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start QEMU inside its scope and its CPUs once QMP is attached; or fail leaving nothing.

        Raises AlreadyRunning/InvalidState when not shut off, StartFailed naming the cause.
        """
        async with self.lock:
            check_operation(self.name, Operation.START, self.state)
            await self._start_locked()

    async def _start_locked(self) -> None:
        defn = self.definition
        try:
            await launch.check_files(defn)
        except launch.LaunchFailed as err:
            await self._fail_without_run(f"cannot start VM {self.name}: {err}")
        self._running_definition = defn
        try:
            # The intent comes first, before anything is announced or spawned: a daemon killed
            # from here on leaves a record (pid 0 until QEMU runs) from which the next one
            # adopts the QEMU or records the cut-off start.
            self.ctx.runtime.save(
                RuntimeRecord(
                    name=self.name,
                    pid=0,
                    unit=self.unit,
                    transient=self.transient,
                    definition_toml=definition_to_toml(defn),
                    started_at=time.time(),
                )
            )
        except OSError as err:
            await self._fail_without_run(
                f"cannot start VM {self.name}: cannot write its runtime record: "
                f"{launch.os_error(err)}"
            )
        self.reason = Reason.NONE
        self.display = ""
        self.set_state(State.STARTING, EventType.STARTING)
        socket_path = self.ctx.runtime.qmp_socket(self.name)
        console: PreparedConsole | None = None
        hardware_fds: list[int] = []
        try:
            await self.clear_scope()
            resources = LaunchResources(qmp_socket=socket_path)
            # Where QEMU, unprivileged, may create files itself (removed by runtime.remove).
            await asyncio.to_thread(confinement.qemu_runtime_dir, self.ctx.paths, self.name)
            # A file read on /var/lib (which may be slow): not on the event loop.
            owner = await asyncio.to_thread(OwnerStore(self.ctx.paths.state_dir).get, self.name)
            console = self._prepare_console(resources)
            hardware_fds = await hardware.prepare(self.ctx.paths, defn, resources)
            launched = await launch.launch(
                defn,
                self.unit,
                systemd=self.ctx.systemd,
                socket_path=socket_path,
                log_file=log_path(self.ctx.paths, self.name),
                log_limit=self.ctx.log_limit,
                slice=self.ctx.slice,
                resources=resources,
                owner=owner,
                journal_stream=self.ctx.journal_stream,
            )
        except (SvmError, launch.LaunchFailed) as err:
            if console is not None:
                console.discard()
            await self._fail_without_run(f"cannot start VM {self.name}: {err}")
        finally:
            hardware.close(hardware_fds)
        if console is not None and self.ctx.consoles is not None:
            await self.ctx.consoles.started(self.name, console)
        run = self.new_run(launched.process.pid, launched.process, time.time())
        try:
            self.save_record(run)
            run.qmp = await self.connect_qmp(run, socket_path)
            run.watch_qmp_eof(run.qmp)
            await run.qmp.execute("cont")
        except (SvmError, OSError) as err:
            run.start_failed = True
            await self._abort_run(run)
            tail = await launched.last_output()
            detail = f"\nQEMU's last output:\n{tail}" if tail else ""
            raise StartFailed(f"QEMU for VM {self.name} failed to start: {err}{detail}") from err
        if self.run is not run:  # it ended right after `cont` and was settled already
            raise StartFailed(f"QEMU for VM {self.name} exited while starting")
        self.display = await display.attach(run.qmp, defn, self.ctx.paths.runtime_dir)
        await self.register_machine(run)
        self.set_state(State.RUNNING, EventType.STARTED, f"pid {run.pid}")

    async def register_machine(self, run: Run) -> None:
        """Have machined list the run (class vm, QEMU as leader, in its own scope): bounded,
        and it never fails the VM (machined.py says why it did not happen, once)."""
        if self.ctx.machined is not None and self.run is run:
            await self.ctx.machined.register(self.name, self.unit, run.pid)

    def _prepare_console(self, resources: LaunchResources) -> PreparedConsole | None:
        """The serial console's listening socket for this start, handed to QEMU as an fd."""
        if self.ctx.consoles is None:
            return None
        try:
            console = self.ctx.consoles.prepare(self.name)
        except OSError as err:
            raise launch.LaunchFailed(
                f"cannot create its console socket: {launch.os_error(err)}"
            ) from err
        resources.console_fd = console.listen_fd
        resources.pass_fds.append(console.listen_fd)
        return console

    def new_run(
        self, pid: int, process: asyncio.subprocess.Process | None, started_at: float
    ) -> Run:
        """Make `pid` this VM's run and start watching for its end."""
        run = Run(self.name, self.unit, pid, process, started_at)
        self.run = run
        run.watch()
        run.spawn(self.settle_when_ended(run))
        return run

    async def _fail_without_run(self, message: str) -> NoReturn:
        """A start that failed before QEMU ran: record `failed`, leave nothing, raise."""
        with contextlib.suppress(SvmError, OSError):
            await self.clear_scope()
        self.ctx.runtime.remove(self.name)
        self.reason = Reason.FAILED
        self.exit = ExitInfo(time=time.time())
        self.stop_requested = False
        if self.state is not State.SHUTOFF:
            self.set_state(State.SHUTOFF)
        await self._record_exit()
        self.emit(EventType.STOPPED, message)
        self.ctx.on_exit(self, Reason.FAILED)
        raise StartFailed(message)

    EXIT_NOTICE = 2.0  # seconds a failed monitor connect waits to see whether QEMU exited

    async def connect_qmp(self, run: Run, socket_path: Path) -> QmpSession:
        """Connect QMP, giving up at once if QEMU exits first (bad extra_args and the like)."""
        connect = asyncio.ensure_future(
            QmpSession.connect(
                socket_path,
                timeout=self.ctx.qmp_connect_timeout,
                on_event=lambda event: self._on_qmp_event(run, event),
                command_timeout=self.ctx.qmp_command_timeout,
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
        error = connect.exception()
        if error is not None and not run.exited.is_set():
            # The daemon listens on the monitor's socket itself (confinement), so a QEMU that
            # dies at start resets the connection instead of never making a socket: give its
            # exit a moment to be seen, and say that rather than "connection reset".
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.EXIT_NOTICE):
                    await run.exited.wait()
        if error is not None and run.exited.is_set():
            raise QmpError("QEMU exited before its monitor was ready") from error
        return connect.result()

    async def _abort_run(self, run: Run) -> None:
        """Kill a run that failed to start and wait for its cleanup."""
        if not run.exited.is_set():
            with contextlib.suppress(SvmError):
                await self.ctx.systemd.kill_unit(self.unit, signal.SIGKILL)
            if run.process is not None and run.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    run.process.kill()
        await asyncio.shield(run.settled)

    async def clear_scope(self) -> None:
        """Make the scope name free: stop a loaded scope, reset a failed one."""
        systemd = self.ctx.systemd
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
        hardware. Use a timeout, and `then_destroy` to end the VM when it runs out. Only the
        press holds the VM's lock (bounded by QMP's timeout; a pause in flight finishes
        first); the wait holds nothing: other operations answer meanwhile, and a second
        shutdown joins this one (each caller with its own timeout; the VM goes back to
        running only when the last waiting caller gives up).
        """
        # Persisted with the shutdown: a restarted daemon still destroys the VM at this deadline.
        deadline = time.time() + timeout if then_destroy and timeout is not None else 0.0
        run = self._run_to_shut_down()
        if run.pending.op is not PendingOp.SHUTDOWN:
            async with self.lock:
                run = self._run_to_shut_down()  # again: it may have changed meanwhile
                if run.pending.op is not PendingOp.SHUTDOWN:
                    await self._press_power_button(run, deadline)
        if deadline and run.pending.op is PendingOp.SHUTDOWN:
            self.set_pending(run, run.pending.destroy_by(deadline))  # joined: the earliest
        if run.press is not None:
            await asyncio.shield(run.press)  # a press in flight, or failed: share its outcome
        run.shutdown_waiters += 1
        try:
            if await run.settled_within(timeout):
                return
        finally:
            run.shutdown_waiters -= 1
        if then_destroy:
            await self.destroy_run(run, DestroyMode.DEFAULT, None)
            return
        assert timeout is not None
        if run.shutdown_waiters == 0 and run.pending.op is PendingOp.SHUTDOWN:
            self.end(run, run.pending)
            self._back_from_stopping(run, "shutdown timed out")
        raise OperationTimeout(
            f"VM {self.name} did not power off within {timeout:g} s; it is still running"
        )

    async def destroy_at_deadline(self, run: Run) -> None:
        """Keep a `--then-destroy` promise a previous daemon made: destroy the VM if it has not
        powered off by the recorded deadline (the shutdown still pending)."""
        deadline = run.pending.destroy_at
        if await run.settled_within(max(deadline - time.time(), 0.0)):
            return
        if run.pending.op is PendingOp.SHUTDOWN and run.pending.destroy_at == deadline:
            log.info("VM %s: not powered off by its shutdown's deadline: destroying it", self.name)
            with contextlib.suppress(SvmError):
                await self.destroy_run(run, DestroyMode.DEFAULT, None)

    def _run_to_shut_down(self) -> Run:
        run = self._current(Operation.SHUTDOWN)
        if run.pending.op is not PendingOp.SHUTDOWN and self.state is State.STOPPING:
            raise InvalidState(f"cannot shut down VM {self.name}: it is being destroyed")
        return run

    async def _press_power_button(self, run: Run, destroy_at: float) -> None:
        """Begin a shutdown: the intent first, then the button (bounded by QMP's timeout)."""
        qmp = self._qmp(run)
        before = run.pending
        asked = lifecycle.shutdown(time.time())
        if destroy_at:
            asked = asked.destroy_by(destroy_at)
        press: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.press = press
        self.begin(run, asked)
        self.set_state(State.STOPPING, EventType.STOPPING, "ACPI power button")
        try:
            if before.op is PendingOp.REBOOT:  # cancel it: this power-off must end QEMU
                await qmp.execute("set-action", {"shutdown": "poweroff"})
            if before.op is PendingOp.REBOOT and before.guest_off:
                # The guest already powered off for the reboot; QEMU waits paused for the
                # reset. That power-off is the one asked for now: let QEMU go.
                await qmp.execute("quit")
                run.shutdown_guest, run.shutdown_reason = True, "guest-shutdown"
            else:
                await qmp.execute("system_powerdown")
        except QmpDisconnected:
            pass  # QEMU is going away anyway: the exit settles the shutdown
        except QmpError as err:
            self.end(run, asked, restore=before)
            self._back_from_stopping(run, f"shutdown failed: {err}")
            press.set_exception(err)
            press.exception()  # the joiners raise it; nobody else needs to
            raise
        press.set_result(None)

    def _back_from_stopping(self, run: Run, message: str) -> None:
        """A stop that did not happen: the VM is back to running, or paused if QEMU's CPUs
        are stopped (a pause that finished meanwhile), and says so.

        Not while another stop is still pending (a destroy in flight keeps it stopping).
        """
        if self.run is run and self.state is State.STOPPING and not run.pending.stopping:
            if run.cpus_stopped:
                self.set_state(State.PAUSED, EventType.PAUSED, message)
            else:
                self.set_state(State.RUNNING, EventType.RESUMED, message)

    async def destroy(
        self,
        mode: DestroyMode = DestroyMode.DEFAULT,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed interface
    ) -> None:
        """End QEMU (see DestroyMode); cuts through other operations on this VM."""
        if self.state is State.STARTING:
            async with self.lock:  # a start is short and bounded: let it finish first
                pass
        run = self._current(Operation.DESTROY)
        await self.destroy_run(run, mode, timeout)

    async def destroy_run(
        self,
        run: Run,
        mode: DestroyMode,
        timeout: float | None,  # noqa: ASYNC109 - the agreed interface
        before: Pending | None = None,
        resumed: Pending | None = None,
    ) -> None:
        """Destroy `run` in `mode`. `before`: what is pending again if a graceful destroy
        answers Busy (default: what was pending when it began). `resumed`: the recorded
        destroy a restarted daemon carries on (it stays the one pending, and ends as one)."""
        if before is None:
            before = run.pending
        asked = resumed if resumed is not None else lifecycle.destroy(mode, time.time())
        self.begin(run, asked)  # a stronger destroy in flight stays what is pending
        if self.state is not State.STOPPING:
            self.set_state(State.STOPPING, EventType.STOPPING, f"destroy ({mode})")
        if mode is DestroyMode.FORCE:
            await self._kill_unit(run, signal.SIGKILL)
            limit = timeout if timeout is not None else self.ctx.force_timeout
            if not await run.settled_within(limit):
                raise OperationTimeout(
                    f"SIGKILL sent, but process {run.pid} of VM {self.name} is still there "
                    f"after {limit:g} s (uninterruptible I/O?)"
                )
        elif mode is DestroyMode.GRACEFUL:
            await self._kill_unit(run, signal.SIGTERM)
            # The caller decides how long to wait; without a word, the VM's stop timeout.
            limit = timeout if timeout is not None else self.stop_timeout
            if not await run.settled_within(limit):
                run.sigterm_sent = True
                # What was pending before is again (a reboot, or a shutdown someone still
                # waits for); a stronger destroy that began meanwhile stays, and its state.
                still_wanted = before.op is PendingOp.REBOOT or (
                    before.op is PendingOp.SHUTDOWN and run.shutdown_waiters > 0
                )
                self.end(run, asked, restore=before if still_wanted else None)
                self._back_from_stopping(run, "graceful destroy: still running")
                raise Busy(
                    f"Failed to terminate process {run.pid} with SIGTERM: VM {self.name} is "
                    f"still running after {limit:g} s; nothing was escalated"
                )
        else:
            with contextlib.suppress(NoSuchUnit):  # already ended: the exit is being settled
                await self.ctx.systemd.stop_unit(self.unit)
            run.exited_if_dead()
            if not run.exited.is_set():
                status = await self.ctx.systemd.unit_status(self.unit)
                if status is None or status.active_state in ("inactive", "failed"):
                    run.stop_behind_ended_scope(self.stop_timeout)
            limit = timeout if timeout is not None else self.ctx.force_timeout
            if not await run.settled_within(limit):
                raise OperationTimeout(
                    f"the scope {self.unit} was stopped, but process {run.pid} of VM {self.name} "
                    f"is still there after {limit:g} s"
                )

    async def _kill_unit(self, run: Run, sig: int) -> None:
        try:
            await self.ctx.systemd.kill_unit(self.unit, sig)
        except NoSuchUnit:
            if not run.exited.is_set():
                run.send_signal(sig)  # scope gone but the process not yet noticed

    async def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to every process of the scope and return at once.

        A signal that may end QEMU is recorded beside whatever else is in progress (it cancels
        no shutdown or reboot) until QEMU ends or the stop timeout passes, and it explains only
        an exit it caused (its exit signal, or QEMU's host-signal shutdown): a signal QEMU
        ignores taints nothing that happens later.
        """
        run = self._current(Operation.KILL)
        since = time.time()
        recorded = sig not in NON_TERMINATING_SIGNALS
        if recorded:
            self.set_pending(run, run.pending.with_kill(sig, since))
        try:
            await self._kill_unit(run, sig)
        except SvmError:
            if recorded:
                self.set_pending(run, run.pending.kill_expired(sig, since))
            raise
        if recorded:
            run.spawn(self.expire_kill(run, sig, since))

    async def expire_kill(self, run: Run, sig: int, since: float) -> None:
        """A kill QEMU outlived for the stop timeout no longer explains a later exit.

        Except a termination signal: QEMU outlives one only while its main loop is wedged
        (stopped, stuck in I/O), and acts on it when it recovers, as on a graceful destroy's.
        """
        remaining = since + self.stop_timeout - time.time()
        if await run.settled_within(max(remaining, 0.0)):
            return
        if sig in QEMU_TERMINATION_SIGNALS:
            run.sigterm_sent = True
        self.set_pending(run, run.pending.kill_expired(sig, since))

    async def reboot(self) -> None:
        """Ask the guest to reboot (ACPI) and return once asked, like `virsh reboot`.

        QMP has no ACPI reboot: this is libvirt's "fake reboot". The reboot becomes the pending
        operation (persisted, so a restarted daemon carries it on), QEMU is set to pause
        instead of exiting when the guest powers off (`set-action shutdown=pause`) and the
        power button is pressed; the call returns then. When the guest later powers off
        (SHUTDOWN with guest=true, then STOP), the daemon resets it in the same QEMU
        (`system_reset`, `cont`), restores `shutdown=poweroff` and emits `rebooted`. A guest
        that ignores the button just keeps running with the reboot pending (reset forces it).
        A later shutdown or destroy cancels the pending reboot: shutdown restores the power-off
        action before it acts, so the guest's next power-off really ends QEMU.
        """
        async with self.lock:
            run = self._current(Operation.REBOOT)
            qmp = self._qmp(run)
            if run.pending.op is PendingOp.SHUTDOWN and run.shutdown_waiters == 0:
                # A shutdown nobody waits for any more (cut off by a daemon restart and
                # pressed again): a reboot asked now replaces it.
                self.end(run, run.pending)
            before = run.pending
            asked = lifecycle.reboot(time.time())
            self.begin(run, asked)
            try:
                await qmp.execute("set-action", {"shutdown": "pause"})
                await qmp.execute("system_powerdown")
            except QmpError as err:
                if run.pending.op is PendingOp.REBOOT:
                    self.end(run, run.pending, restore=before)
                    with contextlib.suppress(QmpError):
                        await qmp.execute("set-action", {"shutdown": "poweroff"})
                if isinstance(err, QmpDisconnected):
                    await run.settled_within(self.ctx.settle_timeout)
                    raise NotRunning(f"VM {self.name} stopped during reboot") from None
                raise

    async def finish_reboot(self, run: Run) -> None:
        """The guest powered off for a requested reboot and QEMU paused: reset and go on."""
        async with self.lock:
            pending = run.pending
            if self.run is not run or pending.op is not PendingOp.REBOOT or not pending.guest_off:
                return  # cancelled meanwhile (shutdown, destroy) or already done
            qmp = self._qmp(run)
            try:
                await qmp.execute("set-action", {"shutdown": "poweroff"})
                await qmp.execute("system_reset")
                await qmp.execute("cont")
            except QmpError as err:
                # The reboot stays pending (QEMU waits paused): a shutdown or destroy ends it.
                log.warning("VM %s: reboot after the guest's power-off failed: %s", self.name, err)
                return
            self.end(run, pending)
            run.events_missed = False  # the power-off a previous daemon may have missed is done
            self.emit(EventType.REBOOTED)

    async def reset(self) -> None:
        """Hard reset (QMP system_reset), like the reset button."""
        async with self.lock:
            run = self._current(Operation.RESET)
            await self._command(run, "system_reset")
            self.emit(EventType.RESET)

    async def pause(self) -> None:
        async with self.lock:
            run = self._current(Operation.PAUSE)
            await self._command(run, "stop")
            if self.run is run and self.state is State.RUNNING:
                self.set_state(State.PAUSED, EventType.PAUSED)

    async def resume(self) -> None:
        async with self.lock:
            run = self._current(Operation.RESUME)
            await self._command(run, "cont")
            if self.run is run and self.state is State.PAUSED:
                self.set_state(State.RUNNING, EventType.RESUMED)

    # --- what QEMU and systemd say ------------------------------------------------------------

    def _on_qmp_event(self, run: Run, event: QmpEvent) -> None:
        if run is not self.run:
            return
        rebooting = run.pending.op is PendingOp.REBOOT
        if event.name == "SHUTDOWN":
            if rebooting and event.data.get("guest") is True:
                # QEMU pauses now (STOP follows) instead of exiting; the reset follows STOP.
                self.set_pending(run, dataclasses.replace(run.pending, guest_off=True))
                return
            run.note_shutdown_event(event)
        elif event.name == "STOP":
            run.cpus_stopped = True
            if rebooting and run.pending.guest_off:
                run.spawn(self.finish_reboot(run))
            elif self.state is State.RUNNING and run.shutdown_guest is None:
                self.set_state(State.PAUSED, EventType.PAUSED)
        elif event.name == "RESUME":
            run.cpus_stopped = False
            if self.state is State.PAUSED:
                self.set_state(State.RUNNING, EventType.RESUMED)

    def on_unit_event(self, event: UnitEvent) -> None:
        """systemd said something about this VM's scope."""
        if self.run is not None:
            self.run.on_unit_event(event, self.stop_timeout)

    # --- the end of a run ---------------------------------------------------------------------

    async def settle_when_ended(self, run: Run) -> None:
        ended = await run.wait_end(self.ctx.systemd, self.ctx.settle_timeout)
        reason = classify_exit(ended.facts)
        # A stop asked through the daemon is never undone by the restart policy (a kill only
        # when it caused the exit, and then the reason is `destroyed`, never restarted).
        requested = ended.facts.pending.stopping
        await self.cleanup(reason, ended.info, ended.detail, run, requested=requested)

    async def cleanup(
        self,
        reason: Reason,
        info: ExitInfo,
        message: str,
        run: Run | None = None,
        *,
        requested: bool = False,
    ) -> None:
        """Everything after an exit, once: scope, files, record, event, hooks.

        `requested`: the exit came during a stop asked through the daemon (no restart).
        """
        try:
            await self.clear_scope()
        except SvmError as err:
            log.warning("VM %s: cannot clear scope %s: %s", self.name, self.unit, err)
        # QEMU is gone with its scope: the taps made for it go now (before a new start can
        # begin), found by name and alias. A run this daemon started says whether it made any;
        # for one it adopted or settles, the definition may not be what ran: always look.
        if run is None or run.process is None or network.makes_taps(self._running_definition):
            await network.remove_vm_taps(self.name)
        if self.ctx.consoles is not None:
            await self.ctx.consoles.release(self.name)  # bounded; its last output logged
        # The exit record, then the event, then the runtime files: a daemon killed before the
        # runtime record is gone leaves it, and the next one finishes this cleanup with the
        # recorded reason and announces the exit (again, at worst, saying it is a replay:
        # never not at all).
        self.reason, self.exit = reason, info
        await self._record_exit()
        if run is None or self.run is run:
            self.run = None
        self.state = State.SHUTOFF  # every state may end in shutoff (TRANSITIONS)
        self.stop_requested = requested
        self.emit(EventType.STOPPED, message)
        try:
            self.ctx.runtime.remove(self.name)
        except OSError as err:
            log.warning("VM %s: cannot remove runtime files: %s", self.name, err)
        if run is not None and not run.settled.done():
            run.settled.set_result(reason)
        self.ctx.on_exit(self, reason)

    async def _record_exit(self) -> None:
        if self.transient:
            return  # a transient VM is forgotten with its exit
        reason, info = self.reason, self.exit
        try:
            # An fsync on /var/lib may take long on a busy disk: not on the event loop.
            await asyncio.to_thread(self.ctx.state_store.save_exit, self.name, reason, info)
        except OSError as err:
            log.error("VM %s: cannot save its exit record: %s", self.name, err)

    async def detach(self) -> None:
        """Let go of the run (QMP, pidfd, watchers) and leave QEMU running."""
        run = self.run
        if run is None:
            return
        await run.detach()
        if self.ctx.consoles is not None:
            await self.ctx.consoles.detach(self.name)
        self.run = None
