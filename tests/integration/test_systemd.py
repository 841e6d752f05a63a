"""The systemd adapter against real systemd, the system bus and QEMU (inside the sandbox).

Every test cleans up by PID and unit name in `finally`: scopes are SIGKILLed, stopped and reset,
processes killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from supervisord_vm.errors import NoSuchUnit, ProcessGone, SystemdError, UnitExists
from supervisord_vm.qemu import QmpSession
from supervisord_vm.systemd import (
    ScopeProperties,
    Systemd,
    UnitEvent,
    UnitStatus,
    spawn_in_scope,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")

QEMU = ["/usr/bin/qemu-system-x86_64", "-M", "pc", "-m", "16", "-nodefaults", "-display"]
QEMU += ["none", "-accel", "tcg"]
IGNORES_SIGTERM = ["/bin/sh", "-c", "trap '' TERM; exec sleep 600"]  # sleep inherits SIG_IGN
EVENT_TIMEOUT = 15.0


def new_unit() -> str:
    return f"svm-t{uuid.uuid4().hex[:8]}.scope"


def props(stop_timeout: float = 5) -> ScopeProperties:
    return ScopeProperties(description="supervisord-vm test scope", stop_timeout=stop_timeout)


class Events:
    """Every unit event the adapter delivered, with waiting on a condition (no polling)."""

    def __init__(self) -> None:
        self.events: list[UnitEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: UnitEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, unit: str) -> list[UnitEvent]:
        return [event for event in self.events if event.unit == unit]

    def states(self, unit: str) -> list[tuple[str, str, str]]:
        return [
            (event.status.active_state, event.status.sub_state, event.status.result)
            for event in self.of(unit)
            if event.status is not None
        ]

    async def wait_for(self, predicate: Callable[[UnitEvent], bool]) -> UnitEvent:
        async with asyncio.timeout(EVENT_TIMEOUT):
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                self._changed.clear()
                await self._changed.wait()


def changed_to(unit: str, active: str, result: str | None = None) -> Callable[[UnitEvent], bool]:
    def predicate(event: UnitEvent) -> bool:
        status = event.status
        return (
            event.unit == unit
            and status is not None
            and status.active_state == active
            and (result is None or status.result == result)
        )

    return predicate


@pytest.fixture
async def systemd() -> AsyncIterator[Systemd]:
    adapter = await Systemd.connect()
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest.fixture
def events(systemd: Systemd) -> Iterator[Events]:
    recorder = Events()
    unsubscribe = systemd.subscribe(recorder)
    yield recorder
    unsubscribe()


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="svmt-", dir="/run"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Cleanup:
    """Units and processes a test made; removed in the test's `finally` by name and PID."""

    def __init__(self, systemd: Systemd) -> None:
        self.systemd = systemd
        self.units: list[str] = []
        self.processes: list[asyncio.subprocess.Process] = []

    async def __call__(self) -> None:
        for unit in self.units:
            for step in (
                self.systemd.kill_unit(unit, signal.SIGKILL),
                self.systemd.stop_unit(unit),
                self.systemd.reset_failed(unit),
            ):
                with contextlib.suppress(SystemdError):
                    await step
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


@pytest.fixture
async def cleanup(systemd: Systemd) -> AsyncIterator[Cleanup]:
    tracker = Cleanup(systemd)
    try:
        yield tracker
    finally:
        await tracker()


async def start_process(cleanup: Cleanup, argv: list[str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    cleanup.processes.append(process)
    return process


async def systemctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "systemctl", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, f"systemctl {args} failed"
    return out.decode()


async def bus_owner() -> str:
    """systemd's unique name on the bus, from the bus daemon (it changes on re-execution)."""
    process = await asyncio.create_subprocess_exec(
        "busctl", "--system", "status", "org.freedesktop.systemd1", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    for line in out.decode().splitlines():
        if line.startswith("UniqueName="):
            return line.partition("=")[2]
    raise AssertionError(f"no UniqueName in busctl status: {out!r}")


def with_qmp(socket_path: Path) -> list[str]:
    return [*QEMU, "-qmp", f"unix:{socket_path},server=on,wait=off"]


async def until_ready(socket_path: Path) -> None:
    """QEMU handles SIGTERM gracefully only once it is set up; QMP answering proves that."""
    session = await QmpSession.connect(socket_path, timeout=10, on_event=lambda event: None)
    await session.close()


def exe_of(pid: int) -> str:
    return str(Path(f"/proc/{pid}/exe").readlink())


def cgroup_of(pid: int) -> str:
    """The process's cgroup in systemd's own (unified) hierarchy."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no unified cgroup line for {pid}")


async def test_scope_for_live_qemu_has_requested_properties(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    unit = new_unit()
    qemu = await start_process(cleanup, QEMU)
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [qemu.pid], props(stop_timeout=7))

    shown = await systemctl(
        "show",
        unit,
        "-p",
        "KillSignal,TimeoutStopUSec,Slice,After,Before,KillMode,SendSIGKILL,Description,"
        "ActiveState,CollectMode",
    )
    values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert values["KillSignal"] == "15"
    assert values["TimeoutStopUSec"] == "7s"
    assert values["Slice"] == "machine.slice"
    assert "supervisord-vm.service" in values["After"].split()
    assert "supervisord-vm-guests.service" in values["Before"].split()
    assert values["KillMode"] == "control-group"
    assert values["SendSIGKILL"] == "yes"
    assert values["Description"] == "supervisord-vm test scope"
    assert values["ActiveState"] == "active"
    assert values["CollectMode"] == "inactive"  # a failed scope stays until reset
    assert cgroup_of(qemu.pid) == f"/machine.slice/{unit}"
    assert await systemd.unit_pids(unit) == [qemu.pid]
    status = await systemd.unit_status(unit)
    assert status == UnitStatus(unit, "loaded", "active", "running", "success")
    # listed in one call: a running scope's Result is not read
    assert UnitStatus(unit, "loaded", "active", "running", "") in await systemd.list_scopes()


async def test_kill_sigterm_ends_qemu_inactive_with_success(
    systemd: Systemd, events: Events, cleanup: Cleanup, rundir: Path
) -> None:
    unit = new_unit()
    qemu = await start_process(cleanup, with_qmp(rundir / "qmp"))
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [qemu.pid], props())
    await until_ready(rundir / "qmp")

    await systemd.kill_unit(unit, signal.SIGTERM)
    assert await qemu.wait() == 0  # QEMU exits cleanly on SIGTERM
    await events.wait_for(changed_to(unit, "inactive", "success"))
    await events.wait_for(lambda event: event.unit == unit and event.kind == "removed")
    assert await systemd.unit_status(unit) is None


async def test_stop_of_process_ignoring_sigterm_times_out_then_reset(
    systemd: Systemd, events: Events, cleanup: Cleanup
) -> None:
    unit = new_unit()
    stubborn = await start_process(cleanup, IGNORES_SIGTERM)
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [stubborn.pid], props(stop_timeout=1))
    await events.wait_for(changed_to(unit, "active"))

    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beating = asyncio.ensure_future(heartbeat())
    started = time.monotonic()
    try:
        job_result = await systemd.stop_unit(unit)
    finally:
        beating.cancel()
    elapsed = time.monotonic() - started

    assert job_result == "done"  # a stop job ends "done" even after the kill: read Result
    assert 0.9 <= elapsed < 5, elapsed
    assert ticks >= 40, "the event loop was blocked while the stop job ran"
    assert await stubborn.wait() == -signal.SIGKILL
    assert await systemd.unit_status(unit) == UnitStatus(
        unit, "loaded", "failed", "failed", "timeout"
    )
    states = events.states(unit)
    assert ("deactivating", "stop-sigterm", "success") in states
    assert ("failed", "failed", "timeout") in states
    assert states.index(("deactivating", "stop-sigterm", "success")) < states.index(
        ("failed", "failed", "timeout")
    )

    await systemd.reset_failed(unit)
    await events.wait_for(lambda event: event.unit == unit and event.kind == "removed")
    assert await systemd.unit_status(unit) is None
    assert "job-removed" in [event.kind for event in events.of(unit)]


async def test_systemctl_stop_from_outside_is_seen(
    systemd: Systemd, events: Events, cleanup: Cleanup
) -> None:
    unit = new_unit()
    sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [sleeper.pid], props())

    await systemctl("stop", unit)
    await events.wait_for(changed_to(unit, "inactive"))
    await events.wait_for(lambda event: event.unit == unit and event.kind == "job-removed")
    assert await sleeper.wait() == -signal.SIGTERM


async def test_scope_for_exited_pid_is_refused_and_leaves_no_unit(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    unit = new_unit()
    cleanup.units.append(unit)
    gone = await start_process(cleanup, ["/bin/true"])
    await gone.wait()  # reaped: the PID no longer exists

    with pytest.raises(ProcessGone, match=f"Process with ID {gone.pid} does not exist"):
        await systemd.start_scope(unit, [gone.pid], props())
    assert await systemd.unit_status(unit) is None
    assert unit not in [status.name for status in await systemd.list_scopes()]


async def test_second_scope_with_same_name_is_refused(systemd: Systemd, cleanup: Cleanup) -> None:
    unit = new_unit()
    first = await start_process(cleanup, ["/bin/sleep", "600"])
    second = await start_process(cleanup, ["/bin/sleep", "600"])
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [first.pid], props())

    with pytest.raises(UnitExists):
        await systemd.start_scope(unit, [second.pid], props())
    assert await systemd.unit_pids(unit) == [first.pid]
    assert cgroup_of(second.pid) != f"/machine.slice/{unit}"


async def test_operations_on_unknown_unit_raise_no_such_unit(systemd: Systemd) -> None:
    unit = new_unit()
    assert await systemd.unit_status(unit) is None
    for operation in (
        systemd.kill_unit(unit, signal.SIGTERM),
        systemd.stop_unit(unit),
        systemd.reset_failed(unit),
        systemd.unit_pids(unit),
    ):
        with pytest.raises(NoSuchUnit):
            await operation


async def test_spawned_program_is_in_its_scope_from_its_first_instruction(
    systemd: Systemd, cleanup: Cleanup, rundir: Path
) -> None:
    unit = new_unit()
    cleanup.units.append(unit)
    out_path = rundir / "out"
    with out_path.open("wb") as out:
        process = await spawn_in_scope(
            systemd,
            ["/bin/cat", "/proc/self/cgroup"],  # the exec'd program's first act: read it
            unit,
            props(),
            env={"PATH": "/usr/bin:/bin"},
            stdout=out.fileno(),
            stderr=out.fileno(),
        )
    cleanup.processes.append(process)
    assert await process.wait() == 0
    lines = out_path.read_text().splitlines()
    assert f"0::/machine.slice/{unit}" in lines
    assert f"1:name=systemd:/machine.slice/{unit}" in lines or any(
        line.endswith(f":name=systemd:/machine.slice/{unit}") for line in lines
    )


async def test_spawned_qemu_is_in_its_scope_when_spawn_returns(
    systemd: Systemd, events: Events, cleanup: Cleanup, rundir: Path
) -> None:
    unit = new_unit()
    cleanup.units.append(unit)
    log = rundir / "qemu.log"
    with log.open("wb") as out:
        qemu = await spawn_in_scope(
            systemd,
            with_qmp(rundir / "qmp"),
            unit,
            props(),
            env={"PATH": "/usr/bin:/bin"},
            stdout=out.fileno(),
            stderr=out.fileno(),
        )
    cleanup.processes.append(qemu)
    assert cgroup_of(qemu.pid) == f"/machine.slice/{unit}"
    assert exe_of(qemu.pid) == QEMU[0]  # already exec'd
    assert await systemd.unit_pids(unit) == [qemu.pid]

    await until_ready(rundir / "qmp")
    await systemd.kill_unit(unit, signal.SIGTERM)
    assert await qemu.wait() == 0, log.read_text()
    await events.wait_for(changed_to(unit, "inactive", "success"))


async def test_spawn_never_runs_argv_when_the_scope_cannot_be_created(
    systemd: Systemd, cleanup: Cleanup, rundir: Path
) -> None:
    unit = new_unit()
    holder = await start_process(cleanup, ["/bin/sleep", "600"])
    cleanup.units.append(unit)
    await systemd.start_scope(unit, [holder.pid], props())  # the name is taken

    marker = rundir / "ran"
    qmp = rundir / "qmp.sock"
    for argv in (
        ["/bin/touch", str(marker)],
        [*QEMU, "-qmp", f"unix:{qmp},server=on,wait=off", "-pidfile", str(marker)],
    ):
        children_before = children()
        with pytest.raises(UnitExists):
            await spawn_in_scope(
                systemd,
                argv,
                unit,
                props(),
                env={"PATH": "/usr/bin:/bin"},
                stdout=1,
                stderr=2,
            )
        assert not marker.exists(), f"{argv[0]} ran although its scope was refused"
        assert not qmp.exists()
        assert children() == children_before  # the trampoline was killed and reaped
    assert await systemd.unit_pids(unit) == [holder.pid]


async def test_spawn_of_missing_program_raises_and_leaves_no_unit(
    systemd: Systemd, cleanup: Cleanup, rundir: Path
) -> None:
    unit = new_unit()
    cleanup.units.append(unit)
    with pytest.raises(FileNotFoundError):
        await spawn_in_scope(
            systemd,
            [str(rundir / "missing")],
            unit,
            props(),
            env={"PATH": "/usr/bin:/bin"},
            stdout=1,
            stderr=2,
        )
    assert await systemd.unit_status(unit) is None


async def test_loop_keeps_running_while_the_adapter_works(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    """Calls are answered on the loop (sd_bus_call_async); while one is pending, it ticks on."""
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beating = asyncio.ensure_future(heartbeat())
    try:
        for _ in range(3):
            unit = new_unit()
            cleanup.units.append(unit)
            sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
            await systemd.start_scope(unit, [sleeper.pid], props())
            await asyncio.gather(*(systemd.unit_status(unit) for _ in range(20)))
            assert await systemd.stop_unit(unit) == "done"
            await sleeper.wait()
    finally:
        beating.cancel()
    assert len(gaps) >= 3
    assert max(gaps) < 0.25, f"event loop stalled for {max(gaps):.3f} s"


class Heartbeat:
    """Ticks every 5 ms on the loop and records the gaps: a blocked loop shows as a long gap."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.ticks: list[float] = []
        self._task: asyncio.Future[None] | None = None

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.gaps.append(now - last)
            self.ticks.append(now)
            last = now

    def __enter__(self) -> Heartbeat:
        self._task = asyncio.ensure_future(self._beat())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def test_loop_is_not_blocked_while_systemd_reloads(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    """systemd answers nothing while it reloads. pystemd's call_method held the GIL through
    sd_bus_call, so even a call in a worker thread froze the loop for the whole reload; the
    adapter's calls must wait for systemd without holding the loop up."""
    reloads: list[float] = []
    stopping = asyncio.Event()

    async def reload_repeatedly() -> None:
        while not stopping.is_set():
            began = time.monotonic()
            await systemctl("daemon-reload")
            reloads.append(time.monotonic() - began)

    calls: list[tuple[float, float]] = []  # (began, ended) of each adapter call

    async def timed(awaitable: Awaitable[T]) -> T:
        began = time.monotonic()
        try:
            return await awaitable
        finally:
            calls.append((began, time.monotonic()))

    with Heartbeat() as heartbeat:
        reloader = asyncio.ensure_future(reload_repeatedly())
        try:
            for _ in range(8):
                unit = new_unit()
                cleanup.units.append(unit)
                sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
                await timed(systemd.start_scope(unit, [sleeper.pid], props()))
                status = await timed(systemd.unit_status(unit))
                assert status is not None
                assert status.active_state == "active"
                assert unit in [scope.name for scope in await timed(systemd.list_scopes())]
                assert await timed(systemd.unit_pids(unit)) == [sleeper.pid]
                assert await timed(systemd.stop_unit(unit)) == "done"
                assert await sleeper.wait() == -signal.SIGTERM
        finally:
            stopping.set()
            await reloader

    began, ended = max(calls, key=lambda call: call[1] - call[0])
    slowest = ended - began
    ticks_during = sum(1 for tick in heartbeat.ticks if began < tick < ended)
    print(
        f"\n{len(reloads)} reloads: {min(reloads) * 1000:.0f}-{max(reloads) * 1000:.0f} ms; "
        f"{len(calls)} adapter calls, slowest {slowest * 1000:.0f} ms with {ticks_during} "
        f"heartbeats during it; worst gap {max(heartbeat.gaps) * 1000:.1f} ms"
    )
    assert len(reloads) >= 3
    # The slowest call really waited for reloading systemd, or this test proves nothing ...
    assert slowest > 0.1, f"no adapter call waited for a reload ({slowest:.3f} s)"
    # ... and the loop went on running while it waited. A call that held the loop (pystemd's
    # sd_bus_call keeps the GIL) lets no heartbeat run until it returns. Counting ticks, not
    # bounding a gap, keeps this about behaviour: a loaded machine stretches gaps, not this.
    assert ticks_during >= 3, f"the loop did not run during a {slowest:.3f} s call"


def children() -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


async def test_hundreds_of_scopes_never_exceed_the_bus_limit_on_pending_replies(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    """The system bus refuses more than 128 pending replies per connection (Debian's
    max_replies_per_connection): listing 300 scopes, and 300 status reads at once, must stay
    under it however many the caller asks for together."""
    count = 300
    units = [new_unit() for _ in range(count)]
    sleepers = [await start_process(cleanup, ["/bin/sleep", "600"]) for _ in range(count)]
    cleanup.units.extend(units)
    await asyncio.gather(
        *(
            systemd.start_scope(unit, [sleeper.pid], props())
            for unit, sleeper in zip(units, sleepers, strict=True)
        )
    )
    listed = {scope.name for scope in await systemd.list_scopes()}
    assert set(units) <= listed
    statuses = await asyncio.gather(*(systemd.unit_status(unit) for unit in units))
    assert all(status is not None and status.active_state == "active" for status in statuses)
    await asyncio.gather(*(systemd.kill_unit(unit, signal.SIGKILL) for unit in units))


async def test_calls_made_while_systemd_reexecutes_all_succeed(
    systemd: Systemd, cleanup: Cleanup, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    """`systemctl daemon-reexec` (also run by upgrades of systemd) drops systemd's bus
    connection: calls it had not answered get NoReply from the bus, and systemd comes back under
    a new unique name with its units and jobs. Every call made meanwhile must still succeed with
    the right result, a stop job in progress must end, and no scope may be reported removed."""
    caplog.set_level(logging.INFO, logger="supervisord_vm.systemd")
    reexecs = 5
    owners: list[str] = []

    async def reexec_repeatedly() -> None:
        for _ in range(reexecs):
            await systemctl("daemon-reexec")
            owners.append(await bus_owner())

    steady = new_unit()  # lives through every re-execution
    cleanup.units.append(steady)
    steady_sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
    await systemd.start_scope(steady, [steady_sleeper.pid], props())
    stubborn = new_unit()  # its stop job (2 s stop timeout) runs across re-executions
    cleanup.units.append(stubborn)
    stubborn_process = await start_process(cleanup, IGNORES_SIGTERM)
    await systemd.start_scope(stubborn, [stubborn_process.pid], props(stop_timeout=2))

    async def one_round() -> None:
        unit, killed = new_unit(), new_unit()
        cleanup.units += [unit, killed]
        sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
        victim = await start_process(cleanup, ["/bin/sleep", "600"])
        await asyncio.gather(
            systemd.start_scope(unit, [sleeper.pid], props()),
            systemd.start_scope(killed, [victim.pid], props()),
        )
        status = await systemd.unit_status(unit)
        assert status is not None and status.active_state == "active", status
        assert await systemd.unit_pids(unit) == [sleeper.pid]
        listed = {scope.name: scope.active_state for scope in await systemd.list_scopes()}
        assert listed[unit] == "active" and listed[steady] == "active", listed
        await systemd.kill_unit(killed, signal.SIGKILL)
        assert await victim.wait() == -signal.SIGKILL
        assert await systemd.stop_unit(unit) == "done"
        assert await sleeper.wait() == -signal.SIGTERM

    async def rounds_until(done: asyncio.Future[None]) -> int:
        count = 0
        while not done.done() or count == 0:
            await one_round()
            count += 1
        return count

    async def reads_until(done: asyncio.Future[None]) -> int:
        count = 0
        while not done.done():
            status = await systemd.unit_status(steady)
            assert status is not None and status.active_state == "active", status
            count += 1
        return count

    before = await bus_owner()
    reexecuting = asyncio.ensure_future(reexec_repeatedly())
    try:
        stopping = asyncio.ensure_future(systemd.stop_unit(stubborn))
        counts = await asyncio.gather(
            *(rounds_until(reexecuting) for _ in range(3)), reads_until(reexecuting)
        )
        assert await stopping == "done"
    finally:
        await reexecuting
    stubborn_status = await systemd.unit_status(stubborn)
    assert stubborn_status is not None
    assert (stubborn_status.active_state, stubborn_status.result) == ("failed", "timeout")
    assert len({before, *owners}) == reexecs + 1, owners  # systemd really came back 5 times
    status = await systemd.unit_status(steady)
    assert status is not None and status.active_state == "active"
    assert await systemd.unit_pids(steady) == [steady_sleeper.pid]
    assert "removed" not in [event.kind for event in events.of(steady)]
    went_away = [r.getMessage() for r in caplog.records if "systemd went away" in r.getMessage()]
    print(f"\n{reexecs} re-executions; rounds and reads {counts}; retried: {len(went_away)}")
    for message in went_away[:8]:
        print("  ", message)
    assert went_away, "no call was in flight while systemd re-executed: nothing was tested"


async def test_listing_reads_the_result_of_ended_scopes_only(
    systemd: Systemd, cleanup: Cleanup
) -> None:
    """One call lists the running scopes; an ended (failed) one still comes with its Result."""
    running, failing = new_unit(), new_unit()
    cleanup.units += [running, failing]
    sleeper = await start_process(cleanup, ["/bin/sleep", "600"])
    stubborn = await start_process(
        cleanup, ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
    )
    await systemd.start_scope(running, [sleeper.pid], props())
    await systemd.start_scope(failing, [stubborn.pid], props(stop_timeout=0.5))
    await systemd.stop_unit(failing)  # SIGKILL after 0.5 s: failed, Result timeout
    listed = {status.name: status for status in await systemd.list_scopes()}
    assert listed[running] == UnitStatus(running, "loaded", "active", "running", "")
    assert (listed[failing].active_state, listed[failing].result) == ("failed", "timeout")
