"""The lifecycle core against real systemd and QEMU (issue 3, scenarios 1-11).

Every test asserts state and reason, the unit as `systemctl show` reports it, the events, and
(through lifecycle_env) that no scope, runtime file or QEMU process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from supervisord_vm.errors import (
    AlreadyRunning,
    Busy,
    InvalidDefinition,
    InvalidState,
    NoSuchMachine,
    NotRunning,
    OperationTimeout,
    StartFailed,
)
from supervisord_vm.model import DestroyMode, EventType, Reason, State
from supervisord_vm.restart_policy import RestartPolicyLimits
from supervisord_vm.systemd import UnitEvent
from tests.integration.lifecycle_env import (
    WAIT,
    Env,
    alive,
    failed_units,
    lifecycle_env,
    proc_bytes,
    proc_link,
    proc_state,
    ptrace_hold,
    run_cmd,
    show,
    wait_gone,
)

pytestmark = pytest.mark.integration

GONE = {"LoadState": "not-found", "ActiveState": "inactive"}


def run(body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        async with lifecycle_env() as env:
            await body(env)

    asyncio.run(main())


async def assert_gone(env: Env, name: str) -> None:
    unit = f"svm-{name}.scope"
    assert await show(unit, "LoadState", "ActiveState") == GONE
    assert not env.supervisor.paths.runtime_dir.joinpath(f"{name}.json").exists()
    assert not env.supervisor.paths.runtime_dir.joinpath(f"{name}.qmp").exists()


async def guest_booted() -> None:
    """Give SeaBIOS time to hand over to the boot sector, which only then enables the power
    button (a button pressed earlier is lost, as with a real OS that is still booting)."""
    await asyncio.sleep(1.0)


async def started(env: Env, name: str, guest: str = "acpi", **kw: object) -> int:
    await env.supervisor.define(env.toml(name, guest, **kw))  # type: ignore[arg-type]
    info = await env.supervisor.start(name)
    assert info.state is State.RUNNING
    assert info.pid > 0
    return info.pid


# --- 1. start ---------------------------------------------------------------------------------


def test_start_runs_qemu_inside_its_scope() -> None:
    async def body(env: Env) -> None:
        os.environ["NOTIFY_SOCKET"] = "/run/svmt-not-a-socket"
        try:
            pid = await started(env, "web1", stop_timeout=7)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        unit = "svm-web1.scope"
        cgroup = proc_bytes(pid, "cgroup").decode()
        assert f"/machine.slice/{unit}" in cgroup
        assert "qemu-system" in proc_link(pid, "exe")
        props = await show(
            unit,
            "ActiveState",
            "Slice",
            "Description",
            "KillMode",
            "KillSignal",
            "SendSIGKILL",
            "TimeoutStopUSec",
            "After",
            "Before",
        )
        assert props["ActiveState"] == "active"
        assert props["Slice"] == "machine.slice"
        assert "web1" in props["Description"]
        assert props["KillMode"] == "control-group"
        assert props["KillSignal"] == "15"
        assert props["SendSIGKILL"] == "yes"
        assert props["TimeoutStopUSec"] == "7s"
        assert "supervisord-vm.service" in props["After"].split()
        assert "supervisord-vm-guests.service" in props["Before"].split()
        assert await env.systemd.unit_pids(unit) == [pid]
        environ = proc_bytes(pid, "environ").split(b"\0")
        assert not any(item.startswith(b"NOTIFY_SOCKET=") for item in environ)
        assert proc_link(pid, "fd/0") == "/dev/null"
        # QEMU's stdout and stderr are journald streams (opened in the scope), not a log file.
        assert proc_link(pid, "fd/1").startswith("socket:")
        assert proc_link(pid, "fd/2").startswith("socket:")
        assert not env.paths.log_dir.joinpath("web1.log").exists()
        assert env.supervisor.paths.runtime_dir.joinpath("web1.json").exists()
        assert env.events.of("web1") == [
            (EventType.DEFINED, Reason.NONE),
            (EventType.STARTING, Reason.NONE),
            (EventType.STARTED, Reason.NONE),
        ]
        with pytest.raises(AlreadyRunning):
            await env.supervisor.start("web1")
        await env.supervisor.pause("web1")
        assert env.supervisor.get_machine("web1").state is State.PAUSED
        assert (await env.systemd.unit_status(unit)) is not None
        await env.supervisor.resume("web1")
        assert env.supervisor.get_machine("web1").state is State.RUNNING
        await env.supervisor.reset("web1")
        await env.supervisor.destroy("web1")
        await assert_gone(env, "web1")

    run(body)


# --- 2. shutdown ------------------------------------------------------------------------------


def test_shutdown_of_acpi_guest() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "acpi")
        await guest_booted()
        info = await env.supervisor.shutdown("acpi", timeout=30)
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.SHUTDOWN)
        assert info.exit.exit_status == 0
        assert info.pid == 0
        assert not alive(pid)
        events = env.events.of("acpi")
        assert events[-2:] == [
            (EventType.STOPPING, Reason.NONE),
            (EventType.STOPPED, Reason.SHUTDOWN),
        ]
        await assert_gone(env, "acpi")
        # the reason survives a daemon restart
        await env.supervisor.close()
        fresh = await env.new_supervisor()
        assert fresh.get_machine("acpi").reason is Reason.SHUTDOWN

    run(body)


def test_shutdown_timeout_then_destroy_of_deaf_guest() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "deaf", "deaf")
        begin = time.monotonic()
        with pytest.raises(OperationTimeout, match="still running"):
            await env.supervisor.shutdown("deaf", timeout=2)
        assert 1.9 < time.monotonic() - begin < 3.5
        info = env.supervisor.get_machine("deaf")
        assert (info.state, info.pid) == (State.RUNNING, pid)
        assert alive(pid)
        assert (await show("svm-deaf.scope", "ActiveState"))["ActiveState"] == "active"
        info = await env.supervisor.shutdown("deaf", timeout=1, then_destroy=True)
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
        assert env.events.of("deaf")[-1] == (EventType.STOPPED, Reason.DESTROYED)
        await assert_gone(env, "deaf")

    run(body)


# --- 3. destroy -------------------------------------------------------------------------------


def test_destroy_sends_sigterm_qemu_exits_cleanly() -> None:
    async def body(env: Env) -> None:
        await started(env, "d1")
        info = await env.supervisor.destroy("d1")
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
        assert info.exit.exit_status == 0
        stopped = await env.events.stopped("d1")
        assert "QEMU shutdown reason host-signal" in stopped.message
        await assert_gone(env, "d1")
        with pytest.raises(NotRunning):
            await env.supervisor.destroy("d1")

    run(body)


def test_destroy_of_qemu_surviving_sigterm_kills_after_stop_timeout() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "stuck", stop_timeout=3)
        async with ptrace_hold(pid):
            begin = time.monotonic()
            info = await env.supervisor.destroy("stuck")
            elapsed = time.monotonic() - begin
            assert 2.8 < elapsed < 5.0, elapsed
            assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
            assert info.exit.result == "timeout"
            assert await failed_units() == ""
            await assert_gone(env, "stuck")

    run(body)


def _move_out_of_scope(pid: int) -> None:
    """Take QEMU out of its scope behind systemd's back, so the scope ends with QEMU alive (as
    when systemd 252 fails to read the scope's cgroup.procs during a stop: EIO, nobody is
    signalled, the scope ends `inactive`/`success`)."""
    for hierarchy in ("unified", "systemd"):
        procs = Path(f"/sys/fs/cgroup/{hierarchy}/machine.slice/cgroup.procs")
        if procs.exists():
            procs.write_text(f"{pid}\n")


def test_destroy_when_the_scope_ended_but_qemu_survives() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "orph", stop_timeout=3)
        async with ptrace_hold(pid):
            ended = asyncio.Event()

            def on_unit(event: UnitEvent) -> None:
                status = event.status
                if event.kind == "removed" or (
                    status is not None and status.active_state != "active"
                ):
                    ended.set()

            unsubscribe = env.systemd.subscribe(on_unit)
            try:
                _move_out_of_scope(pid)
                async with asyncio.timeout(WAIT):  # the empty scope ends; QEMU is still there
                    await ended.wait()
            finally:
                unsubscribe()
            assert proc_state(pid) == "t"
            begin = time.monotonic()
            info = await env.supervisor.destroy("orph")
            elapsed = time.monotonic() - begin
            assert 2.8 < elapsed < 5.0, elapsed  # SIGTERM, then SIGKILL after the stop timeout
            assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
            assert info.exit.result == "timeout"
            assert not alive(pid)
            await assert_gone(env, "orph")

    run(body)


# --- 4. graceful destroy ----------------------------------------------------------------------


def test_graceful_destroy_of_sigstopped_qemu_is_busy() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "g1")
        os.kill(pid, signal.SIGSTOP)
        begin = time.monotonic()
        with pytest.raises(Busy, match=f"Failed to terminate process {pid} with SIGTERM"):
            await env.supervisor.destroy("g1", DestroyMode.GRACEFUL, timeout=2)
        assert 1.9 < time.monotonic() - begin < 3.5
        assert alive(pid)  # no SIGKILL was sent: that would have killed it even stopped
        assert proc_state(pid) == "T"
        assert env.supervisor.get_machine("g1").state is State.RUNNING
        assert (await show("svm-g1.scope", "ActiveState"))["ActiveState"] == "active"
        info = await env.supervisor.destroy("g1")  # StopUnit: SIGCONT + SIGTERM
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
        await assert_gone(env, "g1")

    run(body)


def test_graceful_destroy_of_ptrace_held_qemu_is_busy() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "g2", stop_timeout=3)
        async with ptrace_hold(pid):
            begin = time.monotonic()
            with pytest.raises(Busy):
                await env.supervisor.destroy("g2", DestroyMode.GRACEFUL, timeout=2)
            assert 1.9 < time.monotonic() - begin < 3.5
            assert alive(pid)
            assert env.supervisor.get_machine("g2").state is State.RUNNING
            info = await env.supervisor.destroy("g2")
            assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
            await assert_gone(env, "g2")

    run(body)


# --- 5. force ---------------------------------------------------------------------------------


async def force_while(env: Env, name: str, waiting: asyncio.Task[object]) -> float:
    await asyncio.sleep(0.3)  # let the other operation send its request and wait
    assert not waiting.done()
    begin = time.monotonic()
    info = await env.supervisor.destroy(name, DestroyMode.FORCE)
    elapsed = time.monotonic() - begin
    assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
    await asyncio.wait_for(waiting, 2)
    return elapsed


def test_force_destroy_cuts_through_graceful_destroy() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "f1", stop_timeout=30)
        async with ptrace_hold(pid):
            graceful = asyncio.ensure_future(
                env.supervisor.destroy("f1", DestroyMode.GRACEFUL, timeout=20)
            )
            assert await force_while(env, "f1", graceful) < 0.5
            await assert_gone(env, "f1")

    run(body)


def test_force_destroy_cuts_through_default_destroy() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "f2", stop_timeout=30)
        async with ptrace_hold(pid):
            stopping = asyncio.ensure_future(env.supervisor.destroy("f2"))
            assert await force_while(env, "f2", stopping) < 0.5
            assert await failed_units() == ""
            await assert_gone(env, "f2")

    run(body)


def test_force_destroy_cuts_through_shutdown() -> None:
    async def body(env: Env) -> None:
        await started(env, "f3", "deaf")
        shutdown = asyncio.ensure_future(env.supervisor.shutdown("f3", timeout=30))
        assert await force_while(env, "f3", shutdown) < 0.5
        await assert_gone(env, "f3")

    run(body)


# --- 6. systemctl stop from outside -----------------------------------------------------------


def test_systemctl_stop_is_stopped_externally() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "ext")
        mark = len(env.events.events)
        await run_cmd("systemctl", "stop", "svm-ext.scope")
        event = await env.events.stopped("ext", start=mark)
        assert event.reason is Reason.STOPPED_EXTERNALLY
        assert not alive(pid)
        info = env.supervisor.get_machine("ext")
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.STOPPED_EXTERNALLY)
        await assert_gone(env, "ext")

    run(body)


# --- 7. crash and restart policy --------------------------------------------------------------


def test_kill_9_is_crashed() -> None:
    async def body(env: Env) -> None:
        pid = await started(env, "c1")
        os.kill(pid, signal.SIGKILL)
        event = await env.events.stopped("c1")
        assert event.reason is Reason.CRASHED
        info = env.supervisor.get_machine("c1")
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.CRASHED)
        assert info.exit.exit_signal == signal.SIGKILL
        await assert_gone(env, "c1")

    run(body)


def test_on_crash_restarts_until_the_limit() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.close()
        supervisor = await env.new_supervisor(RestartPolicyLimits(backoff=0.1, limit=2))
        pid = await started(env, "loop", restart="on-crash")
        pids = [pid]
        for _ in range(2):
            mark = len(env.events.events)
            os.kill(pids[-1], signal.SIGKILL)
            await env.events.wait_for(
                lambda e: e.name == "loop" and e.event is EventType.STARTED, start=mark
            )
            info = supervisor.get_machine("loop")
            assert info.state is State.RUNNING
            assert info.pid not in pids
            pids.append(info.pid)
        mark = len(env.events.events)
        os.kill(pids[-1], signal.SIGKILL)
        event = await env.events.stopped("loop", start=mark)
        assert event.reason is Reason.CRASHED
        await asyncio.sleep(0.5)  # longer than the backoff: no restart may follow
        info = supervisor.get_machine("loop")
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.CRASHED)
        kinds = [e for e, _ in env.events.of("loop")]
        assert kinds.count(EventType.RESTARTING) == 2
        assert kinds.count(EventType.STARTED) == 3
        await assert_gone(env, "loop")

    run(body)


# --- 8. transient -----------------------------------------------------------------------------


def test_transient_vm_is_forgotten_after_it_stops() -> None:
    async def body(env: Env) -> None:
        info = await env.supervisor.create(env.toml("tr"))
        assert info.transient
        assert info.state is State.RUNNING
        assert not env.paths.definitions_dir.joinpath("tr.toml").exists()
        await guest_booted()
        with pytest.raises(InvalidState):
            await env.supervisor.undefine("tr")
        await env.supervisor.shutdown("tr", timeout=30)
        with pytest.raises(NoSuchMachine):
            env.supervisor.get_machine("tr")
        assert env.events.of("tr")[-1] == (EventType.STOPPED, Reason.SHUTDOWN)
        assert not env.paths.state_dir.joinpath("exits", "tr.json").exists()
        await assert_gone(env, "tr")
        # undefine of a running VM makes it transient; it is forgotten when it stops
        await started(env, "und")
        await env.supervisor.undefine("und")
        assert env.supervisor.get_machine("und").transient
        await env.supervisor.destroy("und")
        with pytest.raises(NoSuchMachine):
            env.supervisor.get_machine("und")
        await assert_gone(env, "und")

    run(body)


# --- 9. reattach ------------------------------------------------------------------------------


def test_new_supervisor_reattaches_and_settles_lost() -> None:
    async def body(env: Env) -> None:
        pid_a = await started(env, "ra")
        pid_b = await started(env, "rb", "deaf")
        await env.supervisor.create(env.toml("rt"))
        pid_c = await started(env, "rc")
        pid_t = env.supervisor.get_machine("rt").pid
        await env.supervisor.pause("rb")
        await env.supervisor.close()
        os.kill(pid_c, signal.SIGKILL)  # dies while no supervisor runs
        await wait_gone(pid_c)
        fresh = await env.new_supervisor()
        assert fresh.get_machine("ra").pid == pid_a
        assert fresh.get_machine("ra").state is State.RUNNING
        assert (fresh.get_machine("rb").pid, fresh.get_machine("rb").state) == (
            pid_b,
            State.PAUSED,
        )
        transient = fresh.get_machine("rt")
        assert (transient.pid, transient.transient) == (pid_t, True)
        lost = fresh.get_machine("rc")
        assert lost.state is State.SHUTOFF
        assert lost.reason in (Reason.LOST, Reason.CRASHED)
        await assert_gone(env, "rc")
        assert await env.systemd.unit_pids("svm-ra.scope") == [pid_a]  # no second QEMU
        # operations work on the reattached VMs
        await fresh.resume("rb")
        await guest_booted()
        info = await fresh.shutdown("ra", timeout=30)
        assert info.reason is Reason.SHUTDOWN
        info = await fresh.destroy("rb")
        assert info.reason is Reason.DESTROYED
        await fresh.destroy("rt")
        with pytest.raises(NoSuchMachine):
            fresh.get_machine("rt")
        for name in ("ra", "rb", "rt"):
            await assert_gone(env, name)
        # the lost record persists
        await fresh.close()
        again = await env.new_supervisor()
        assert again.get_machine("rc").reason is lost.reason

    run(body)


# --- 10. bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "x" * 65, "", "a b", "a\nb", "-a", "x.service"])
def test_bad_names_are_refused(name: str) -> None:
    async def body(env: Env) -> None:
        toml = env.toml("placeholder").replace('"placeholder"', repr(name).replace("'", '"'))
        with pytest.raises(InvalidDefinition, match="name"):
            await env.supervisor.define(toml)
        with pytest.raises(InvalidDefinition, match="name"):
            await env.supervisor.create(toml)
        assert (
            list(env.paths.definitions_dir.glob("*")) == []
            if env.paths.definitions_dir.exists()
            else True
        )
        assert env.supervisor.list_machines() == []

    run(body)


def test_bad_definitions_are_refused() -> None:
    async def body(env: Env) -> None:
        with pytest.raises(InvalidDefinition, match="memroy"):
            await env.supervisor.define(env.toml("k", extra="memroy = 32"))
        with pytest.raises(InvalidDefinition, match="path"):
            await env.supervisor.define(env.toml("k", disk="relative.img"))
        assert env.supervisor.list_machines() == []

    run(body)


async def assert_failed_start(env: Env, name: str, transient: bool) -> None:
    if transient:
        with pytest.raises(NoSuchMachine):
            env.supervisor.get_machine(name)
        assert not env.paths.definitions_dir.joinpath(f"{name}.toml").exists()
        assert not env.paths.state_dir.joinpath("exits", f"{name}.json").exists()
    else:
        info = env.supervisor.get_machine(name)
        assert (info.state, info.reason) == (State.SHUTOFF, Reason.FAILED)
    assert env.events.of(name)[-1] == (EventType.STOPPED, Reason.FAILED)
    await assert_gone(env, name)
    assert await failed_units() == ""


def test_start_failures_leave_nothing() -> None:
    async def body(env: Env) -> None:
        missing = str(env.images / "missing.img")
        await env.supervisor.define(env.toml("nodisk", disk=missing))
        with pytest.raises(StartFailed, match=f"disk {missing} does not exist"):
            await env.supervisor.start("nodisk")
        await assert_failed_start(env, "nodisk", transient=False)

        with pytest.raises(StartFailed, match="/nonexistent/qemu does not exist"):
            await env.supervisor.create(env.toml("noqemu", extra='qemu = "/nonexistent/qemu"'))
        await assert_failed_start(env, "noqemu", transient=True)

        bad = 'extra_args = ["-bogus-option"]'
        with pytest.raises(StartFailed, match="bogus-option") as caught:
            await env.supervisor.create(env.toml("badargs", extra=bad))
        assert "QEMU's last output" in str(caught.value)
        await assert_failed_start(env, "badargs", transient=True)

        await env.supervisor.define(env.toml("badargs2", extra=bad))
        with pytest.raises(StartFailed, match="bogus-option"):
            await env.supervisor.start("badargs2")
        await assert_failed_start(env, "badargs2", transient=False)
        assert not list(env.paths.runtime_dir.glob("*"))

    run(body)


# --- 11. concurrency --------------------------------------------------------------------------


def test_ten_concurrent_starts_make_one_qemu() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.define(env.toml("conc"))
        results = await asyncio.gather(
            *(env.supervisor.start("conc") for _ in range(10)), return_exceptions=True
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 1
        assert all(isinstance(e, AlreadyRunning) for e in errors), errors
        pid = env.supervisor.get_machine("conc").pid
        assert await env.systemd.unit_pids("svm-conc.scope") == [pid]
        kinds = [e for e, _ in env.events.of("conc")]
        assert kinds.count(EventType.STARTED) == 1
        await env.supervisor.destroy("conc")
        await assert_gone(env, "conc")

    run(body)


def test_interleaved_start_and_destroy() -> None:
    async def body(env: Env) -> None:
        await env.supervisor.define(env.toml("mix"))
        allowed = (AlreadyRunning, NotRunning, InvalidState)
        for round_number in range(20):
            calls = [env.supervisor.start("mix"), env.supervisor.destroy("mix")]
            if round_number % 2:
                calls.reverse()
            results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    assert isinstance(result, allowed), result
            info = env.supervisor.get_machine("mix")
            scopes = await env.systemd.list_scopes("svm-mix.scope")
            if info.state is State.RUNNING:
                assert await env.systemd.unit_pids("svm-mix.scope") == [info.pid]
            else:
                assert info.state is State.SHUTOFF
                assert scopes == []
        if env.supervisor.get_machine("mix").state is not State.SHUTOFF:
            await env.supervisor.destroy("mix")
        await assert_gone(env, "mix")

    run(body)
