"""One QEMU process of a VM: noticing that it ended, and gathering what is known about the end.

A Run is watched from the process itself (a pidfd, and the asyncio child for a QEMU this daemon
spawned), from QMP (SHUTDOWN events, EOF) and from systemd (the scope's state and Result). It
decides nothing: lifecycle.py classifies the facts it gathers, machine.py cleans up. Nothing
here polls: every wait is on an event, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisord_vm.errors import SvmError
from supervisord_vm.lifecycle import NO_PENDING, ExitFacts, Pending
from supervisord_vm.model import ExitInfo, Reason
from supervisord_vm.qemu import QmpEvent, QmpSession
from supervisord_vm.signals import signal_name
from supervisord_vm.systemd import Systemd, UnitEvent, UnitStatus

log = logging.getLogger(__name__)

# Linux's PF_EXITING task flag (/proc/PID/task/TID/stat field 9): set when a thread begins to
# exit, before it drops its files (QMP EOF) and leaves its cgroup (the scope empties).
_PF_EXITING = 0x4

# Tasks that reap children after their run was settled (a ptrace-held zombie is reaped late).
_reapers: set[asyncio.Task[int]] = set()


class OwnStop(enum.Enum):
    """The daemon's own stop of a QEMU whose scope ended without ending it (systemd 252 bug)."""

    NONE = enum.auto()
    SIGTERM_SENT = enum.auto()
    KILLED = enum.auto()  # SIGKILL after the stop timeout: the end counts as Result timeout


@dataclass(frozen=True)
class EndedRun:
    """What was learned about a run's end: the facts to classify and the record to keep."""

    facts: ExitFacts
    info: ExitInfo
    detail: str  # for the `stopped` event: pid, result, QEMU's reason, status or signal


@dataclass(eq=False)
class Run:
    """One QEMU process and what was learned about it while it ran."""

    name: str
    unit: str
    pid: int
    process: asyncio.subprocess.Process | None  # set when this daemon spawned it
    started_at: float
    pending: Pending = NO_PENDING
    qmp: QmpSession | None = None
    pidfd: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Future[Reason] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    unit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    unit_status: UnitStatus | None = None
    # Facts observed while it ran (never reset; the pending operation is the only intent).
    start_failed: bool = False
    sigterm_sent: bool = False  # a graceful destroy answered Busy: its SIGTERM may still act
    external_stop: bool = False  # the scope went deactivating with no stop of ours pending
    events_missed: bool = False  # adopted while QEMU was not running: events may be unseen
    shutdown_guest: bool | None = None  # SHUTDOWN event's guest flag; None while none came
    shutdown_reason: str = ""
    own_stop: OwnStop = OwnStop.NONE
    shutdown_waiters: int = 0  # callers waiting for the pending shutdown (each its own timeout)
    press: asyncio.Future[None] | None = None  # the last power-button press: joiners share it
    cpus_stopped: bool = False  # QEMU's last STOP/RESUME (or its status when adopted)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # --- watching ------------------------------------------------------------------------------

    def watch(self) -> None:
        """Start noticing the process's end (pidfd; the child's exit for a spawned QEMU)."""
        loop = asyncio.get_running_loop()
        if self.pidfd is None:
            with contextlib.suppress(ProcessLookupError):
                self.pidfd = os.pidfd_open(self.pid)
        if self.pidfd is not None:
            loop.add_reader(self.pidfd, self._on_pidfd)
        if self.process is not None:
            reaper = asyncio.ensure_future(self.process.wait())
            _reapers.add(reaper)
            reaper.add_done_callback(_reapers.discard)
            reaper.add_done_callback(lambda _task: self.exited.set())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a task that belongs to this run (cancelled when the daemon lets go of it)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_pidfd(self) -> None:
        self._unwatch_pidfd()
        self.exited.set()

    def _unwatch_pidfd(self) -> None:
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    async def detach(self) -> None:
        """Let go (QMP, pidfd, tasks) and leave QEMU running."""
        self._unwatch_pidfd()
        for task in list(self.tasks):
            task.cancel()
        if self.qmp is not None:
            await self.qmp.close()

    def watch_qmp_eof(self, session: QmpSession) -> None:
        async def on_eof() -> None:
            await session.wait_closed()
            self.exited_if_dead()

        self.spawn(on_eof())

    def note_shutdown_event(self, event: QmpEvent) -> None:
        """QMP SHUTDOWN: a guest power-off stays one even if a `quit` or signal follows."""
        if self.shutdown_guest is not True:
            self.shutdown_guest = event.data.get("guest") is True
            self.shutdown_reason = str(event.data.get("reason", ""))

    def on_unit_event(self, event: UnitEvent, stop_timeout: float) -> None:
        """systemd said something about the scope."""
        if event.kind == "changed" and event.status is not None:
            self.unit_status = event.status
            if event.status.active_state == "deactivating" and not self.stop_is_ours():
                self.external_stop = True
        self.unit_changed.set()
        if event.kind == "removed" or (
            event.status is not None and event.status.active_state in ("inactive", "failed")
        ):
            # Normally the cgroup is empty now. A QEMU whose threads are held by a ptrace tracer
            # is then a zombie that neither its pidfd nor waitpid reports until the tracer lets
            # go, so the threads' own state decides.
            self.exited_if_dead()
            if not self.exited.is_set() and (self.stop_is_ours() or self.external_stop):
                self.stop_behind_ended_scope(stop_timeout)

    def stop_is_ours(self) -> bool:
        """A stop of the scope now would be the daemon's doing (a stop, a kill, a failed
        start)."""
        return self.pending.stopping or bool(self.pending.signal) or self.start_failed

    def exited_if_dead(self) -> None:
        """Take an exit hint (unit ended, QMP EOF) as the exit once every thread is exiting.

        Hints may be stale (a previous run's scope, a dropped connection) or wrong (systemd can
        end a scope whose process it failed to signal): the threads' own state decides. A
        thread sets PF_EXITING before it drops its files or leaves its cgroup, so when either
        hint is true this check already sees it: no second look is needed.
        """
        if not self.exited.is_set() and process_ended(self.pid):
            self.exited.set()

    def stop_behind_ended_scope(self, stop_timeout: float) -> None:
        """The scope was stopped and ended, yet QEMU runs on: do the stop systemd did not.

        Seen with systemd 252: when reading the scope's cgroup.procs fails (EIO) its stop
        signals nobody, and the scope still ends `inactive`/`success` with QEMU inside.
        """
        if self.own_stop is not OwnStop.NONE:
            return
        self.own_stop = OwnStop.SIGTERM_SENT
        log.warning(
            "VM %s: scope %s ended but QEMU (pid %d) is still running; stopping it directly",
            self.name,
            self.unit,
            self.pid,
        )
        self.spawn(self._stop_process(stop_timeout))

    async def _stop_process(self, stop_timeout: float) -> None:
        """SIGTERM (with SIGCONT), SIGKILL after the stop timeout: the scope's own stop."""
        self.send_signal(signal.SIGTERM)
        self.send_signal(signal.SIGCONT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited.wait()), stop_timeout)
            return
        self.own_stop = OwnStop.KILLED
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        """Signal QEMU through its pidfd (never a recycled PID); gone already is fine."""
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def settled_within(self, limit: float | None) -> bool:
        """Wait up to `limit` seconds (None: without end) for the exit to be settled."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.settled), limit)
        return self.settled.done()

    # --- the end ---------------------------------------------------------------------------------

    async def wait_end(self, systemd: Systemd, settle_timeout: float) -> EndedRun:
        """Wait for the process to end, then gather the facts: QMP, exit status, unit Result."""
        await self.exited.wait()
        self._unwatch_pidfd()
        exit_status: int | None = None
        exit_signal: int | None = None
        # QMP EOF comes after every event QEMU wrote, so the SHUTDOWN event is in by then.
        if self.qmp is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settle_timeout):
                    await self.qmp.wait_closed()
            await self.qmp.close()
        if self.process is not None and not _traced(self.pid):
            # Reaped at once normally; a zombie held by a ptrace tracer only once it lets go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(self.process.wait())
            code = self.process.returncode
            if code is not None:
                exit_status, exit_signal = (None, -code) if code < 0 else (code, None)
        result = await self._final_unit_result(systemd, settle_timeout)
        if self.own_stop is OwnStop.KILLED:
            result = "timeout"  # our stop behind the ended scope had to SIGKILL
        facts = ExitFacts(
            pending=self.pending,
            start_failed=self.start_failed,
            sigterm_sent=self.sigterm_sent,
            shutdown_guest=self.shutdown_guest,
            shutdown_reason=self.shutdown_reason,
            external_stop=self.external_stop,
            unit_result=result,
            exit_signal=exit_signal,
            exit_status=exit_status,
            events_missed=self.events_missed,
            monitored=self.qmp is not None,
        )
        detail = [f"pid {self.pid}", f"result {result or 'unknown'}"]
        if self.shutdown_reason:
            detail.append(f"QEMU shutdown reason {self.shutdown_reason}")
        if exit_signal is not None:
            detail.append(f"signal {signal_name(exit_signal)}")
        elif exit_status is not None:
            detail.append(f"exit status {exit_status}")
        info = ExitInfo(result, exit_status, exit_signal, time.time())
        return EndedRun(facts, info, ", ".join(detail))

    async def _final_unit_result(self, systemd: Systemd, settle_timeout: float) -> str:
        """Wait (on unit signals, bounded) for the scope to end and return its Result."""
        try:
            async with asyncio.timeout(settle_timeout):
                while True:
                    self.unit_changed.clear()
                    status = await systemd.unit_status(self.unit)
                    if status is None:
                        last = self.unit_status
                        return last.result if last is not None and last.result else "success"
                    if status.active_state in ("inactive", "failed"):
                        return status.result
                    await self.unit_changed.wait()
        except TimeoutError:
            log.warning("VM %s: scope %s did not end with its process", self.name, self.unit)
        except SvmError as err:
            log.warning("VM %s: cannot read the state of %s: %s", self.name, self.unit, err)
        return self.unit_status.result if self.unit_status is not None else ""


def process_ended(pid: int) -> bool:
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
