"""Taking over what a previous daemon left: running QEMUs to adopt, ended runs to settle.

A daemon can stop, crash or be killed at any moment while VMs run on in their scopes. The next
one finds each VM's runtime record (its pending operation included) and scope, and either
adopts the QEMU — reconnecting QMP, putting QEMU's settings back the way the pending operation
needs them, and finishing what was cut off — or settles the exit it missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from supervisord_vm import display
from supervisord_vm.definition import Definition
from supervisord_vm.errors import SvmError
from supervisord_vm.lifecycle import NO_PENDING, Pending, PendingOp, classify_lost, classify_settled
from supervisord_vm.machine import Machine
from supervisord_vm.model import ExitInfo, Reason, State
from supervisord_vm.run import Run
from supervisord_vm.systemd import UnitStatus

log = logging.getLogger(__name__)


async def adopt(
    machine: Machine,
    pid: int,
    started_at: float,
    running_definition: Definition,
    *,
    unit: UnitStatus | None = None,
    starting: bool = False,
    pending: Pending | None = None,
) -> bool:
    """Take over a QEMU a previous daemon started; False if the process is already gone.

    `unit`: the scope as systemd shows it now. A scope already `deactivating` with no stop of
    ours pending was stopped from outside while no daemon watched (`stopped-externally`).

    `starting`: the previous daemon died before it recorded QEMU's PID, so PID may still be
    the spawn trampoline that exits without ever running QEMU: that ends as `failed`.

    `pending`: the operation the previous daemon had in progress. It is carried on, not
    dropped. A destroy is done again in its mode before this returns (so start-up settles it
    before READY; a graceful one that meets a QEMU surviving SIGTERM ends Busy as usual:
    logged, VM running). A shutdown presses the power button again (pressed once or not at all
    before the kill; a guest already powering off ignores a second press) and leaves the VM
    running with the shutdown pending: nobody waits for it any more, but the guest's
    power-off then counts as the shutdown asked for. A reboot keeps QEMU set to pause on
    power-off and finishes when the guest powers off (at once if it already did); with no
    reboot pending QEMU is set back to power off, whatever an older daemon left. A kill that
    QEMU survived so far is expected for one more stop timeout.
    """
    pending = pending or Pending()
    async with machine.lock:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        machine.running_definition = running_definition
        run = Run(machine.name, machine.unit, pid, None, started_at, pending=pending, pidfd=pidfd)
        # Until QEMU is seen running, a SHUTDOWN it sent while no daemon listened may be unseen.
        run.events_missed = True
        machine.run = run
        run.watch()
        run.spawn(machine.settle_when_ended(run))
        # Unit signals reach the run from now on; what happened before is read now, since the
        # list of scopes start-up began with may be seconds old.
        with contextlib.suppress(SvmError):
            unit = await machine.ctx.systemd.unit_status(machine.unit)
        if unit is not None and unit.active_state == "deactivating" and not run.stop_is_ours():
            run.external_stop = True
        machine.set_state(State.STARTING)
        socket_path = machine.ctx.runtime.qmp_socket(machine.name)
        status = ""
        try:
            run.qmp = await machine.connect_qmp(run, socket_path)
            run.watch_qmp_eof(run.qmp)
            reply = await run.qmp.execute("query-status")
            status = str(reply.get("status", "")) if isinstance(reply, dict) else ""
            if status == "prelaunch":
                await run.qmp.execute("cont")  # the previous daemon died mid-start
                status = "running"
            await _restore_qemu_actions(machine, run, status)
        except SvmError as err:
            log.warning("VM %s: reattached without QMP: %s", machine.name, err)
        if run.exited.is_set():
            run.start_failed = starting and run.qmp is None
            await run.settled_within(None)  # settled before start-up says it is ready
            return True
        # QEMU runs on: its SHUTDOWN, if any, is still to come and will be seen.
        run.events_missed = status not in ("running", "paused")
        run.cpus_stopped = status not in ("running", "")
        try:
            machine.save_record(run)
        except OSError as err:
            log.error("VM %s: cannot write its runtime record: %s", machine.name, err)
        # Derived again, not stored: the socket's place, or the port QEMU says it listens on.
        machine.display = await display.attach(
            run.qmp, running_definition, machine.ctx.paths.runtime_dir
        )
        machine.set_state(State.RUNNING)
        if status == "paused":
            machine.set_state(State.PAUSED)
        if machine.ctx.consoles is not None:
            await machine.ctx.consoles.reconnect(machine.name)  # bounded; never raises
        log.info("VM %s: reattached to pid %d", machine.name, pid)
        await machine.register_machine(run)  # machined may have lost it meanwhile (restarted)
        if run.pending.op is PendingOp.SHUTDOWN and run.qmp is not None:
            try:
                await run.qmp.execute("system_powerdown")
                log.info("VM %s: shutdown cut off by a daemon exit pressed again", machine.name)
            except SvmError as err:
                log.warning("VM %s: cannot press the power button again: %s", machine.name, err)
        if run.pending.op is PendingOp.SHUTDOWN and run.pending.destroy_at:
            run.spawn(machine.destroy_at_deadline(run))
        if run.pending.signal:
            run.spawn(machine.expire_kill(run, run.pending.signal, run.pending.signal_since))
    destroy = run.pending
    if destroy.op is PendingOp.DESTROY and destroy.mode is not None and not run.settled.done():
        log.info(
            "VM %s: completing the %s cut off by a daemon exit", machine.name, destroy.describe()
        )
        try:
            # A graceful one that meets a QEMU surviving SIGTERM answers Busy as usual and
            # leaves the VM running with nothing pending: nobody waits for it any more.
            await machine.destroy_run(run, destroy.mode, None, before=NO_PENDING, resumed=destroy)
        except SvmError as err:
            log.warning(
                "VM %s: completing the %s failed: %s", machine.name, destroy.describe(), err
            )
    return True


async def _restore_qemu_actions(machine: Machine, run: Run, status: str) -> None:
    """Put QEMU's power-off action back the way the pending operation needs it.

    QEMU's runstate `shutdown` means the guest powered off while QEMU was set to pause: for a
    pending reboot that is the moment to reset it; otherwise it is a power-off to let through.
    """
    assert run.qmp is not None
    if run.pending.op is PendingOp.REBOOT:
        await run.qmp.execute("set-action", {"shutdown": "pause"})
        if status == "shutdown":
            machine.set_pending(run, dataclasses.replace(run.pending, guest_off=True))
        if run.pending.guest_off:
            run.spawn(machine.finish_reboot(run))  # takes the lock once adopt lets go of it
        return
    await run.qmp.execute("set-action", {"shutdown": "poweroff"})
    if status == "shutdown":
        run.shutdown_guest, run.shutdown_reason = True, "guest-shutdown"
        await run.qmp.execute("quit")


async def settle_ended(
    machine: Machine,
    status: UnitStatus | None,
    started_at: float | None = None,
    *,
    start_cut: bool = False,
    pending: Pending | None = None,
) -> Reason:
    """Settle a run that ended while no daemon watched (found at start-up).

    `started_at`: when the run began (from its runtime record). An exit record written
    after that is this run's, saved by a daemon killed before it finished the cleanup:
    its reason stands. `start_cut`: the daemon died before QEMU was known to run.
    `pending`: the operation the record carried (classify_settled); an exit during a stop
    asked for is left alone by the restart policy.
    """
    pending = pending or Pending()
    machine.running_definition = machine.definition
    requested = pending.stopping or bool(pending.signal)
    recorded = machine.reason is not Reason.NONE
    if started_at is not None and recorded and machine.exit.time >= started_at:
        await machine.cleanup(
            machine.reason,
            machine.exit,
            "cleanup finished after a restart",
            requested=requested,
        )
        return machine.reason
    result = status.result if status is not None else ""
    if start_cut:
        reason, message = Reason.FAILED, "start cut off: the daemon exited before QEMU ran"
    elif pending.op is not PendingOp.NONE or pending.signal:  # a kill alone counts too
        reason = classify_settled(pending, result)
        message = f"ended during a {pending.describe()} while the daemon was not running"
    else:
        reason, message = classify_lost(result), "ended while the daemon was not running"
    info = ExitInfo(result=result, time=time.time())
    await machine.cleanup(reason, info, message, requested=requested)
    return reason
