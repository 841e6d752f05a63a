"""Operations that meet on one VM: a kill during a shutdown or a reboot, a pause in flight when a
shutdown presses, a shutdown joining a press that fails, a destroy or shutdown carried over a
daemon restart, a SIGTERM a wedged QEMU acts on late. Each states what README/DESIGN promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest

from supervisord_vm.errors import InvalidState, QmpTimeout
from supervisord_vm.lifecycle import PendingOp
from supervisord_vm.model import DestroyMode, EventType, Reason, State
from tests.integration.lifecycle_env import Env, ptrace_hold
from tests.integration.test_crash_consistency import Case, cpu_status, run_child
from tests.integration.test_pending_operations import (
    PROMPT,
    pending_of,
    run,
    started,
    state_becomes,
    stopped_process,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_kill_during_a_waiting_shutdown_is_destroyed(sig: signal.Signals) -> None:
    """DESIGN: `destroyed` — by this daemon's destroy (any flavour) or kill."""

    async def body(env: Env) -> None:
        supervisor = env.supervisor
        name = f"rks{int(sig)}"
        await started(env, name, "deaf")
        waiting = asyncio.ensure_future(supervisor.shutdown(name))
        await state_becomes(env, name, State.STOPPING)
        await supervisor.kill(name, sig)
        async with asyncio.timeout(PROMPT * 4):
            info = await waiting
        assert info.reason is Reason.DESTROYED, info
        await supervisor.undefine(name)

    run(body)


def test_a_kill_qemu_survives_does_not_cancel_a_reboot_in_progress() -> None:
    """The guest's power-off for the reboot must still end in a reset, not a frozen QEMU."""

    async def body(env: Env) -> None:
        supervisor = env.supervisor
        await started(env, "rkr", stop_timeout=1)
        await asyncio.sleep(1.0)  # the ACPI guest enables its power button after booting
        mark = len(env.events.events)
        machine = supervisor.machine("rkr")
        reboot = asyncio.ensure_future(supervisor.reboot("rkr"))
        async with asyncio.timeout(PROMPT):
            while machine.run is None or machine.run.pending.op is not PendingOp.REBOOT:  # noqa: ASYNC110
                await asyncio.sleep(0)
        await supervisor.kill("rkr", signal.SIGPIPE)  # QEMU ignores it
        await reboot
        try:
            await env.events.wait_for(
                lambda e: e.name == "rkr" and e.event is EventType.REBOOTED,
                timeout=10,
                start=mark,
            )
        finally:
            status = await cpu_status(supervisor, "rkr")
            state = supervisor.get_machine("rkr").state
            print(f"after kill during reboot: listed {state}, QEMU {status}")
        assert await cpu_status(supervisor, "rkr") == "running"
        await supervisor.destroy("rkr", DestroyMode.FORCE)
        await supervisor.undefine("rkr")

    run(body)


def test_a_pause_in_flight_when_shutdown_presses_is_not_lost() -> None:
    """The listed state must agree with QEMU's once the shutdown gives up."""

    async def body(env: Env) -> None:
        supervisor = env.supervisor
        pid = await started(env, "rps", "deaf")
        async with stopped_process(pid):  # both commands wait for QEMU's main loop
            pause = asyncio.ensure_future(supervisor.pause("rps"))
            await asyncio.sleep(0.2)
            shutdown = asyncio.ensure_future(supervisor.shutdown("rps", timeout=2))
            await asyncio.sleep(0.2)
        await pause
        # The press waits for the pause in flight (it holds the VM's lock): then the VM is
        # paused, and a paused VM cannot be shut down.
        with pytest.raises(InvalidState):
            await shutdown
        status = await cpu_status(supervisor, "rps")
        state = supervisor.get_machine("rps").state
        print(f"listed {state}, QEMU {status}")
        assert (state, status) in ((State.PAUSED, "paused"), (State.RUNNING, "running"))
        await supervisor.destroy("rps", DestroyMode.FORCE)
        await supervisor.undefine("rps")

    run(body)


def test_a_shutdown_joining_a_press_that_failed_does_not_wait_for_nothing() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.close()
        supervisor = await env.new_supervisor(qmp_command_timeout=1.0)
        await supervisor.define(env.toml("rjf", "deaf"))
        await supervisor.start("rjf")
        pid = supervisor.get_machine("rjf").pid
        async with stopped_process(pid):
            first = asyncio.ensure_future(supervisor.shutdown("rjf"))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(supervisor.shutdown("rjf"))  # joins
            with pytest.raises(QmpTimeout):
                await first
        await asyncio.sleep(1.0)
        machine = supervisor.get_machine("rjf")
        print(f"after the press failed: {machine.state}, pending {pending_of(env, 'rjf')}")
        try:
            assert second.done(), "the joined shutdown waits with nothing pending"
        finally:
            second.cancel()
            with contextlib.suppress(BaseException):
                await second
            await supervisor.destroy("rjf", DestroyMode.FORCE)
            await supervisor.undefine("rjf")

    run(body)


def test_a_graceful_destroy_redone_at_reattach_that_answers_busy_leaves_the_vm_running() -> None:
    """reattach.adopt's docstring: 'a graceful one that meets a QEMU surviving SIGTERM ends
    Busy as usual: logged, VM running'."""

    async def body(env: Env) -> None:
        pid = await started(env, "rgb", stop_timeout=1)
        await env.supervisor.close()
        async with ptrace_hold(pid):  # SIGTERM stays pending
            assert not await run_child(
                env, Case("destroy-graceful", "rgb", "after:kill_unit"), "rgb"
            )
            supervisor = await env.new_supervisor(qmp_connect_timeout=2)
            state = supervisor.get_machine("rgb").state
            pending = pending_of(env, "rgb")
            print(f"after reattach: {state}, pending {pending}")
            assert state is State.RUNNING
            assert pending["op"] == ""
        stopped = await env.events.stopped("rgb")
        assert stopped.reason is Reason.DESTROYED  # its SIGTERM acted once gdb let go
        await supervisor.undefine("rgb")

    run(body)


def test_a_shutdown_cut_off_by_the_daemon_does_not_refuse_reboot_forever() -> None:
    """Reattached with the shutdown pending and nobody waiting: listed running, so a reboot
    (or pause, which is let through) must not be refused for as long as QEMU runs."""

    async def body(env: Env) -> None:
        await started(env, "rsr", "deaf")
        await env.supervisor.close()
        assert not await run_child(env, Case("shutdown", "rsr", "after:powerdown"), "rsr")
        supervisor = await env.new_supervisor()
        assert supervisor.get_machine("rsr").state is State.RUNNING
        print(f"pending after reattach: {pending_of(env, 'rsr')}")
        try:
            await supervisor.reboot("rsr")  # InvalidState: "the VM is shutting down"
        finally:
            await supervisor.destroy("rsr", DestroyMode.FORCE)
            await supervisor.undefine("rsr")

    run(body)


def test_a_sigterm_kill_that_a_wedged_qemu_acts_on_late_is_still_destroyed() -> None:
    """As graceful destroy's Busy keeps its SIGTERM in mind (sigterm_sent), so must kill."""

    async def body(env: Env) -> None:
        supervisor = env.supervisor
        pid = await started(env, "rkw", stop_timeout=1)
        async with stopped_process(pid):
            await supervisor.kill("rkw", signal.SIGTERM)
            await asyncio.sleep(2.0)  # the kill expires after the stop timeout
            assert pending_of(env, "rkw")["op"] == ""
        stopped = await env.events.stopped("rkw")
        assert stopped.reason is Reason.DESTROYED, stopped
        await supervisor.undefine("rkw")

    run(body)
