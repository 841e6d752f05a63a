"""One operation in progress per VM, and what may happen meanwhile (real systemd and QEMU).

A waiting shutdown holds nothing; a graceful destroy waits as long as its caller says; a signal
QEMU survives covers no later exit; a Busy answer never undoes a stronger destroy in flight; a
reboot in progress survives a daemon restart; a wedged QEMU answers with bounded errors and
never blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from supervisord_vm.errors import Busy, InvalidState, OperationTimeout, QmpTimeout
from supervisord_vm.model import DestroyMode, EventType, Reason, State
from supervisord_vm.shutdown_all import shutdown_all
from tests.integration.lifecycle_env import (
    Env,
    lifecycle_env,
    ptrace_hold,
    run_cmd,
    wait_gone,
)
from tests.integration.test_crash_consistency import Case, cpu_status, run_child

pytestmark = pytest.mark.integration

# Generous bounds for "answers at once": they catch a call that waits on another, not speed.
PROMPT = 5.0


def run(body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        async with lifecycle_env() as env:
            await body(env)

    asyncio.run(main())


async def started(env: Env, name: str, guest: str = "acpi", **options: object) -> int:
    supervisor = env.supervisor
    await supervisor.define(env.toml(name, guest, **options))  # type: ignore[arg-type]
    await supervisor.start(name)
    return supervisor.get_machine(name).pid


async def state_becomes(env: Env, name: str, state: State) -> None:
    if env.supervisor.get_machine(name).state is not state:
        await env.events.wait_for(lambda e: e.name == name and e.state is state, timeout=PROMPT)


@contextlib.asynccontextmanager
async def stopped_process(pid: int) -> AsyncIterator[None]:
    """QEMU's whole process stopped (SIGSTOP): its main loop answers nothing until SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def pending_of(env: Env, name: str) -> dict[str, object]:
    record = json.loads((env.paths.runtime_dir / f"{name}.json").read_text())
    pending: dict[str, object] = record["pending"]
    return pending


# --- a waiting shutdown ---------------------------------------------------------------------------


def test_a_waiting_shutdown_blocks_neither_the_vm_nor_shutdown_all() -> None:
    async def body(env: Env) -> None:
        supervisor = env.supervisor
        await started(env, "deaf1", "deaf")
        waiting = asyncio.ensure_future(supervisor.shutdown("deaf1"))  # no timeout: forever
        await state_becomes(env, "deaf1", State.STOPPING)
        async with asyncio.timeout(PROMPT):
            with pytest.raises(InvalidState):
                await supervisor.pause("deaf1")
            # a second shutdown joins the first: its own timeout ends its own wait only
            with pytest.raises(OperationTimeout):
                await supervisor.shutdown("deaf1", timeout=0.3)
        assert supervisor.get_machine("deaf1").state is State.STOPPING
        assert not waiting.done()
        # The host-shutdown policy does not queue behind the client's shutdown: it ends the VM.
        async with asyncio.timeout(30):
            results = await shutdown_all(supervisor, 0.5, 0)
        assert results == {"deaf1": "destroyed"}
        async with asyncio.timeout(PROMPT):
            await waiting  # the client's wait ends with the VM
        assert supervisor.get_machine("deaf1").reason is Reason.DESTROYED
        await supervisor.undefine("deaf1")

    run(body)


def test_the_last_shutdown_to_give_up_puts_the_vm_back_to_running() -> None:
    async def body(env: Env) -> None:
        supervisor = env.supervisor
        await started(env, "deaf2", "deaf")
        longer = asyncio.ensure_future(supervisor.shutdown("deaf2", timeout=1.5))
        await state_becomes(env, "deaf2", State.STOPPING)
        with pytest.raises(OperationTimeout):
            await supervisor.shutdown("deaf2", timeout=0.2)
        assert supervisor.get_machine("deaf2").state is State.STOPPING
        with pytest.raises(OperationTimeout):
            await longer
        assert supervisor.get_machine("deaf2").state is State.RUNNING
        assert pending_of(env, "deaf2")["op"] == ""
        await supervisor.destroy("deaf2", DestroyMode.FORCE)
        await supervisor.undefine("deaf2")

    run(body)


# --- graceful destroy -----------------------------------------------------------------------------


def test_graceful_destroy_waits_as_long_as_the_caller_says() -> None:
    """stop_timeout 1, --timeout 6: a QEMU that takes ~2.5 s to act on SIGTERM is not Busy."""

    async def body(env: Env) -> None:
        supervisor = env.supervisor
        pid = await started(env, "grace1", stop_timeout=1)
        async with stopped_process(pid):  # SIGTERM stays pending while it is stopped
            destroy = asyncio.ensure_future(
                supervisor.destroy("grace1", DestroyMode.GRACEFUL, timeout=6)
            )
            await asyncio.sleep(2.5)  # well past the stop timeout
            assert not destroy.done(), destroy
        async with asyncio.timeout(PROMPT):
            info = await destroy
        assert info.reason is Reason.DESTROYED
        await supervisor.undefine("grace1")

    run(body)


def test_graceful_busy_during_a_default_destroy_leaves_that_destroy_in_charge() -> None:
    async def body(env: Env) -> None:
        supervisor = env.supervisor
        pid = await started(env, "grace2", stop_timeout=4)
        async with ptrace_hold(pid):  # SIGTERM stays pending; SIGKILL after 4 s still works
            default = asyncio.ensure_future(supervisor.destroy("grace2"))
            await state_becomes(env, "grace2", State.STOPPING)
            with pytest.raises(Busy):
                await supervisor.destroy("grace2", DestroyMode.GRACEFUL, timeout=0.5)
            assert supervisor.get_machine("grace2").state is State.STOPPING
            pending = pending_of(env, "grace2")
            assert (pending["op"], pending["mode"]) == ("destroy", "default")
            async with asyncio.timeout(30):
                info = await default
        assert info.reason is Reason.DESTROYED
        assert info.exit.result == "timeout"
        await supervisor.undefine("grace2")

    run(body)


# --- kill -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGWINCH, signal.SIGPIPE])
def test_a_signal_qemu_survives_does_not_taint_the_next_exit(sig: signal.Signals) -> None:
    async def body(env: Env) -> None:
        supervisor = env.supervisor
        name = f"kill{int(sig)}"
        pid = await started(env, name)
        await asyncio.sleep(1.0)  # the ACPI guest enables its power button after booting
        await supervisor.kill(name, sig)
        await asyncio.sleep(0.3)
        assert supervisor.get_machine(name).pid == pid  # QEMU ignored it
        info = await supervisor.shutdown(name, timeout=20)
        assert info.reason is Reason.SHUTDOWN
        await supervisor.undefine(name)

    run(body)


def test_a_kill_qemu_survives_expires_after_the_stop_timeout() -> None:
    async def body(env: Env) -> None:
        supervisor = env.supervisor
        await started(env, "kexp", stop_timeout=1)
        await supervisor.kill("kexp", signal.SIGPIPE)
        assert pending_of(env, "kexp")["signal"] == signal.SIGPIPE
        async with asyncio.timeout(PROMPT):
            while pending_of(env, "kexp")["signal"]:  # noqa: ASYNC110 - a file, no event
                await asyncio.sleep(0.05)
        # ... and a kill that ends QEMU is `destroyed`
        await supervisor.kill("kexp", signal.SIGKILL)
        stopped = await env.events.stopped("kexp")
        assert stopped.reason is Reason.DESTROYED
        await supervisor.undefine("kexp")

    run(body)


# --- reboot across a daemon restart ---------------------------------------------------------------


def test_a_reboot_cut_off_by_the_daemon_finishes_after_its_restart() -> None:
    """Killed right after pressing the button: the guest powers off with QEMU set to pause,
    and the next daemon resets it instead of listing a frozen QEMU as running."""

    async def body(env: Env) -> None:
        await started(env, "rbt1")
        await env.supervisor.close()
        await asyncio.sleep(1.0)  # the ACPI guest enables its power button after booting
        assert not await run_child(env, Case("reboot", "rbt1", "after:powerdown"), "rbt1")
        mark = len(env.events.events)
        supervisor = await env.new_supervisor()
        await env.events.wait_for(
            lambda e: e.name == "rbt1" and e.event is EventType.REBOOTED, start=mark
        )
        assert await cpu_status(supervisor, "rbt1") == "running"
        assert pending_of(env, "rbt1")["op"] == ""
        # QEMU powers off again on the guest's power-off: the reboot's pause is gone
        await asyncio.sleep(1.5)  # the rebooted guest enables its power button again
        info = await supervisor.shutdown("rbt1", timeout=20)
        assert info.reason is Reason.SHUTDOWN
        await supervisor.undefine("rbt1")

    run(body)


def test_a_reboot_pending_over_a_daemon_restart_is_still_cancelled_by_shutdown() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "rbt2", "deaf")
        await env.supervisor.close()
        assert not await run_child(env, Case("reboot", "rbt2", "after:powerdown"), "rbt2")
        supervisor = await env.new_supervisor()
        assert supervisor.get_machine("rbt2").pid == pid
        assert pending_of(env, "rbt2")["op"] == "reboot"
        with pytest.raises(OperationTimeout):
            await supervisor.shutdown("rbt2", timeout=0.5)  # a deaf guest: nothing happens
        assert pending_of(env, "rbt2")["op"] == ""  # the reboot was cancelled by the shutdown
        await supervisor.destroy("rbt2", DestroyMode.FORCE)
        await supervisor.undefine("rbt2")

    run(body)


# --- reattach of a scope being stopped from outside -----------------------------------------------


def test_reattach_of_a_scope_stopped_from_outside_meanwhile_is_stopped_externally() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "ext1", stop_timeout=60, restart="on-crash")
        await env.supervisor.close()
        async with ptrace_hold(pid):  # QEMU cannot act on the stop's SIGTERM yet
            await run_cmd("systemctl", "stop", "--no-block", "svm-ext1.scope")
            async with asyncio.timeout(PROMPT):
                while "deactivating" not in await run_cmd(  # noqa: ASYNC110 - no bus here
                    "systemctl", "show", "-p", "ActiveState", "svm-ext1.scope"
                ):
                    await asyncio.sleep(0.05)
            mark = len(env.events.events)
            starting = asyncio.ensure_future(env.new_supervisor(qmp_connect_timeout=2))
            await asyncio.sleep(0.5)
        # gdb lets go: QEMU acts on SIGTERM and exits
        supervisor = await starting
        stopped = await env.events.stopped("ext1", start=mark)
        assert stopped.reason is Reason.STOPPED_EXTERNALLY
        await wait_gone(pid)
        await asyncio.sleep(0.3)
        assert supervisor.get_machine("ext1").state is State.SHUTOFF  # on-crash: not restarted
        await supervisor.undefine("ext1")

    run(body)


# --- a wedged QEMU --------------------------------------------------------------------------------


def test_a_wedged_qemu_answers_with_bounded_errors_and_can_be_destroyed() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.close()
        supervisor = await env.new_supervisor(qmp_command_timeout=1.0)
        await supervisor.define(env.toml("wedge1", stop_timeout=1))
        await supervisor.start("wedge1")
        pid = supervisor.get_machine("wedge1").pid
        async with stopped_process(pid):
            started_at = time.monotonic()
            with pytest.raises(QmpTimeout):
                await supervisor.pause("wedge1")
            with pytest.raises(QmpTimeout):
                await supervisor.reset("wedge1")  # the lock was let go: not stuck behind pause
            assert time.monotonic() - started_at < 2 * PROMPT
            assert supervisor.get_machine("wedge1").state is State.RUNNING
            # host shutdown: the power button cannot be pressed, so the VM is destroyed
            async with asyncio.timeout(30):
                results = await shutdown_all(supervisor, 0.5, 0)
        assert results == {"wedge1": "destroyed"}
        await supervisor.undefine("wedge1")

    run(body)


def test_a_wedged_qemu_does_not_hold_up_reattaching_the_others() -> None:
    async def body(env: Env) -> None:
        wedged = await started(env, "wedge2")
        healthy = await started(env, "fine2")
        await env.supervisor.close()
        async with stopped_process(wedged):
            async with asyncio.timeout(20):
                supervisor = await env.new_supervisor(qmp_connect_timeout=2)
            assert supervisor.get_machine("fine2").pid == healthy
            assert supervisor.get_machine("fine2").state is State.RUNNING
            assert await cpu_status(supervisor, "fine2") == "running"
            assert supervisor.get_machine("wedge2").pid == wedged  # listed, without QMP
            await supervisor.destroy("wedge2", DestroyMode.FORCE)
        await supervisor.destroy("fine2", DestroyMode.FORCE)
        await supervisor.undefine("wedge2")
        await supervisor.undefine("fine2")

    run(body)


def test_a_then_destroy_deadline_is_kept_by_the_next_daemon() -> None:
    """`shutdown --timeout 3 --then-destroy` cut off by a daemon kill: the next daemon destroys
    the VM that ignores the power button once the deadline passes."""

    async def body(env: Env) -> None:
        pid = await started(env, "std1", "deaf")
        await env.supervisor.close()
        case = Case("shutdown-then-destroy", "std1", "after:powerdown")
        assert not await run_child(env, case, "std1")
        assert pending_of(env, "std1")["destroy_at"] != 0.0
        mark = len(env.events.events)
        supervisor = await env.new_supervisor()
        assert supervisor.get_machine("std1").pid == pid
        stopped = await env.events.stopped("std1", start=mark)
        assert stopped.reason is Reason.DESTROYED
        await wait_gone(pid)
        await supervisor.undefine("std1")

    run(body)
