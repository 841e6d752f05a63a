""" "Nothing lost": a daemon SIGKILLed at any moment of an operation restarts into a consistent
view.

Each case runs a Supervisor in a child process (tests/integration/crash_child.py), lets it start
one operation and SIGKILLs it, either at an exact step of the core (the child kills itself right
before or after a named call) or after a delay swept over the operation's duration. A fresh
Supervisor then starts up here, and `check` proves the view consistent: every svm-* scope is a
VM listed running/paused with the scope's one PID (and never a second QEMU for a VM); every
running VM has its scope, a QMP connection and running CPUs (not left at -S); no failed units,
no runtime files of VMs that do not run, no temp files, every definition file whole; a cut-off
start is running or shut off with a recorded reason; a transient VM is listed or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisord_vm.definition import parse_definition
from supervisord_vm.model import DestroyMode, EventType, Reason, State
from supervisord_vm.restart_policy import RestartPolicyLimits
from supervisord_vm.supervisor import Supervisor
from tests.integration.lifecycle_env import Env, failed_units, lifecycle_env, wait_gone
from tests.integration.processes import qemu_processes

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
LIVE = (State.RUNNING, State.PAUSED)


@dataclass(frozen=True)
class Case:
    op: str  # crash_child operation
    name: str  # the VM it acts on
    kill_at: str = ""  # WHEN:POINT[:N] for an exact cut, or "" for a delay
    delay: float = 0.0  # seconds after `go` (when kill_at is "")
    reasons: frozenset[Reason] | None = None  # if shut off afterwards: the reasons allowed

    @property
    def label(self) -> str:
        cut = self.kill_at or f"{self.delay * 1000:.0f} ms"
        return f"{self.op} {self.name} killed at {cut}"


async def run_child(env: Env, case: Case, arg: str) -> list[str]:
    """Run the case's operation in a child supervisor and SIGKILL it (problems, if any)."""
    argv = [sys.executable, "-m", "tests.integration.crash_child", str(env.base)]
    if case.kill_at:
        argv += ["--kill-at", case.kill_at]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        case.op,
        arg,
        cwd=CHECKOUT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
            if line != b"go\n":
                await proc.wait()
                raise AssertionError(f"{case.label}: child failed: {await proc.stderr.read()!r}")
            if not case.kill_at:
                await asyncio.sleep(case.delay)
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)  # our own unreaped child: its PID is ours
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if case.kill_at and proc.returncode != -signal.SIGKILL:
        return [
            f"{case.label}: the kill point was not reached (exit {proc.returncode}): "
            f"{out!r} {err[-2000:]!r}"
        ]
    return []


async def cpu_status(supervisor: Supervisor, name: str) -> str:
    """QEMU's run state through the daemon's own QMP connection (the monitor takes one)."""
    run = supervisor.machine(name).run
    if run is None or run.qmp is None or run.qmp.closed:
        return "no QMP connection"
    reply = await run.qmp.execute("query-status")
    return str(reply.get("status")) if isinstance(reply, dict) else repr(reply)


async def check(env: Env, supervisor: Supervisor) -> list[str]:
    """Everything that makes the view after a restart consistent; one line per violation."""
    problems: list[str] = []
    machines = {info.name: info for info in supervisor.list_machines()}
    by_unit = {info.unit: info for info in machines.values()}
    for status in await env.systemd.list_scopes("svm-*.scope"):
        info = by_unit.get(status.name)
        if status.active_state != "active" or info is None or info.state not in LIVE:
            state = info.state if info is not None else "not listed"
            problems.append(
                f"scope {status.name} is {status.active_state}/{status.result}, VM {state}"
            )
            continue
        pids = await env.systemd.unit_pids(status.name)
        if pids != [info.pid]:
            problems.append(f"scope {status.name} holds {pids}, VM listed with pid {info.pid}")
    qemus, trampolines = qemu_processes()
    for pid in trampolines:  # held before exec by a daemon that died: must end by itself
        try:
            await wait_gone(pid, 5)
        except TimeoutError:
            problems.append(f"spawn trampoline {pid} still waiting 5 s after the daemon died")
    for name, pids in qemus.items():
        info = machines.get(name)
        if len(pids) > 1 or info is None or info.state not in LIVE or pids != [info.pid]:
            state = f"{info.state} pid {info.pid}" if info is not None else "not listed"
            problems.append(f"QEMU processes {pids} for VM {name} ({state})")
    expected_files: set[str] = set()
    for name, info in machines.items():
        if info.state is State.SHUTOFF:
            continue
        expected_files |= {f"{name}.json", f"{name}.qmp"}
        if info.state not in LIVE:
            problems.append(f"VM {name} is {info.state} after start-up")
            continue
        unit = await env.systemd.unit_status(info.unit)
        if unit is None or unit.active_state != "active":
            problems.append(f"VM {name} listed {info.state} without an active scope: {unit}")
        cpus = await cpu_status(supervisor, name)
        wanted = "running" if info.state is State.RUNNING else "paused"
        if cpus != wanted:
            problems.append(f"VM {name} listed {info.state} but QEMU's status is {cpus!r}")
    runtime = env.paths.runtime_dir
    files = {p.name for p in runtime.iterdir()} if runtime.exists() else set()
    # A live VM may also have its console socket (console.py) and its QEMU directory
    # qemu/NAME (confinement.py; `qemu` goes with the last of them): whether they exist yet
    # depends on where the start was cut off, but no VM that is not live keeps them.
    live = {name for name, info in machines.items() if info.state is not State.SHUTOFF}
    optional = {f"{name}.console" for name in live}
    qemu_dirs = {p.name for p in (runtime / "qemu").iterdir()} if "qemu" in files else set()
    if "qemu" in files and (not qemu_dirs or not qemu_dirs <= live):
        problems.append(f"QEMU directories {sorted(qemu_dirs)}, VMs live: {sorted(live)}")
    files -= optional | {"qemu"}
    if files != expected_files:
        problems.append(f"runtime files {sorted(files)}, expected {sorted(expected_files)}")
    failed = await failed_units()
    if failed:
        problems.append(f"failed units: {failed}")
    for directory in (env.paths.definitions_dir, env.paths.state_dir / "exits"):
        for path in sorted(directory.iterdir()) if directory.exists() else []:
            if path.name.startswith("."):
                problems.append(f"temporary file left: {path}")
                continue
            if directory == env.paths.definitions_dir:
                try:
                    parse_definition(path.read_text(), str(path))
                except Exception as err:
                    problems.append(f"definition {path} unusable: {err}")
    return problems


async def after_kill(
    env: Env, case: Case, *, transient: bool = False, undefine: bool = True
) -> list[str]:
    """A fresh supervisor: check the case's VM and the whole view, then clean the VM up."""
    mark = len(env.events.events)
    supervisor = await env.new_supervisor()
    try:
        if case.op == "shutdown" and supervisor.get_machine(case.name).state is not State.SHUTOFF:
            # A shutdown cut off with QEMU still running was pressed again at start-up: the
            # guest powers off now (the view is checked once it did).
            await env.events.stopped(case.name, start=mark)
        problems = await check(env, supervisor)
        names = {info.name: info for info in supervisor.list_machines()}
        info = names.get(case.name)
        if info is None:
            if not transient:
                problems.append(f"VM {case.name} is not listed")
        elif info.state is State.SHUTOFF:
            if transient:
                problems.append(f"transient VM {case.name} listed while shut off")
            if info.reason is Reason.NONE:
                # Only a start killed before its first durable step (the intent record, then
                # QEMU's log header) may look as if it never began.
                if (env.paths.log_dir / f"{case.name}.log").exists():
                    problems.append(f"VM {case.name} shut off without a recorded reason")
            elif case.reasons is not None and info.reason not in case.reasons:
                problems.append(f"VM {case.name} shut off as {info.reason}")
        elif info.transient != transient:
            problems.append(f"VM {case.name} listed with transient={info.transient}")
        for other in supervisor.list_machines():
            if other.state is not State.SHUTOFF and other.name == case.name:
                await supervisor.destroy(other.name, DestroyMode.FORCE)
        listed = {i.name: i for i in supervisor.list_machines()}
        if undefine and case.name in listed and not listed[case.name].transient:
            await supervisor.undefine(case.name)
        return [f"{case.label}: {problem}" for problem in problems]
    finally:
        await supervisor.close()


def run(body: Callable[[Env], Awaitable[list[str]]]) -> None:
    async def main() -> list[str]:
        async with lifecycle_env() as env:
            await env.supervisor.close()  # only one supervisor at a time touches the VMs
            return await body(env)

    problems = asyncio.run(main())
    assert not problems, "\n".join(problems)


def sweep(op: str, prefix: str, delays_ms: range) -> list[Case]:
    return [Case(op, f"{prefix}{ms}", delay=ms / 1000) for ms in delays_ms]


# --- start and create -------------------------------------------------------------------------

# Every step of a start: before and after the intent record, the scope with the trampoline
# held, QEMU exec'd but unrecorded, recorded but without QMP, QMP attached but CPUs at -S
# (a QEMU left in prelaunch), and started.
START_POINTS = (
    "before:runtime_save:1",
    "after:runtime_save:1",
    "before:start_scope",
    "after:start_scope",
    "before:runtime_save:2",
    "before:qmp_connect",
    "before:cont",
    "after:cont",
)
START_OK = frozenset({Reason.FAILED, Reason.LOST})


def start_cases(op: str, prefix: str, delays_ms: range) -> list[Case]:
    exact = [
        Case(op, f"{prefix}p{i}", kill_at=point, reasons=START_OK)
        for i, point in enumerate(START_POINTS)
    ]
    timed = [
        Case(op, case.name, delay=case.delay, reasons=START_OK)
        for case in sweep(op, prefix, delays_ms)
    ]
    return exact + timed


def test_start_cut_anywhere() -> None:
    async def body(env: Env) -> list[str]:
        problems: list[str] = []
        for case in start_cases("start", "kcst", range(0, 160, 10)):
            supervisor = await env.new_supervisor()
            await supervisor.define(env.toml(case.name))
            await supervisor.close()
            problems += await run_child(env, case, case.name)
            problems += await after_kill(env, case)
        return problems

    run(body)


def test_create_cut_anywhere() -> None:
    async def body(env: Env) -> list[str]:
        problems: list[str] = []
        for case in start_cases("create", "kccr", range(0, 160, 15)):
            toml = env.base / f"{case.name}.toml"
            toml.write_text(env.toml(case.name))
            problems += await run_child(env, case, str(toml))
            problems += await after_kill(env, case, transient=True)
        return problems

    run(body)


# --- stopping and the exit cleanup --------------------------------------------------------------


def lost_or(*reasons: Reason) -> frozenset[Reason]:
    return frozenset({*reasons, Reason.LOST})


def stop_cases() -> list[Case]:
    # Once the stop intent is in the runtime record, the stop ends as asked, never `lost`.
    destroyed, shutdown = frozenset({Reason.DESTROYED}), frozenset({Reason.SHUTDOWN})
    cases = [
        Case("destroy", "kcds0", "after:runtime_save", reasons=destroyed),
        Case("destroy", "kcds1", "before:stop_unit", reasons=destroyed),
        Case("destroy", "kcds2", "after:stop_unit", reasons=destroyed),
        Case("destroy", "kcds3", "before:save_exit", reasons=destroyed),
        Case("destroy", "kcds4", "before:runtime_remove", reasons=destroyed),
        Case("destroy-graceful", "kcdg1", "before:kill_unit", reasons=destroyed),
        Case("destroy-graceful", "kcdg2", "after:kill_unit", reasons=destroyed),
        Case("shutdown", "kcsd0", "after:runtime_save", reasons=shutdown),
        Case("shutdown", "kcsd1", "before:powerdown", reasons=shutdown),
        Case("shutdown", "kcsd2", "after:powerdown", reasons=shutdown),
        Case("shutdown", "kcsd3", "before:save_exit", reasons=shutdown),
        Case("shutdown", "kcsd4", "before:runtime_remove", reasons=shutdown),
        Case("crash", "kccx1", "before:save_exit", reasons=lost_or(Reason.CRASHED)),
        Case("crash", "kccx2", "before:runtime_remove", reasons=frozenset({Reason.CRASHED})),
        Case("crash", "kccx3", "after:runtime_remove", reasons=frozenset({Reason.CRASHED})),
    ]
    cases += [
        Case("destroy", c.name, delay=c.delay, reasons=lost_or(Reason.DESTROYED))
        for c in sweep("destroy", "kcdt", range(0, 100, 20))
    ]
    cases += [
        Case("crash", c.name, delay=c.delay, reasons=lost_or(Reason.CRASHED))
        for c in sweep("crash", "kcct", range(0, 50, 10))
    ]
    return cases


def test_stop_and_exit_cleanup_cut_anywhere() -> None:
    async def body(env: Env) -> list[str]:
        cases = stop_cases()
        supervisor = await env.new_supervisor()
        for case in cases:
            await supervisor.define(env.toml(case.name))
            await supervisor.start(case.name)
        await supervisor.close()
        await asyncio.sleep(1.0)  # the ACPI guests enable their power button after booting
        problems: list[str] = []
        for case in cases:
            problems += await run_child(env, case, case.name)
            problems += await after_kill(env, case)
        return problems

    run(body)


# Kill points of a stop on a VM with restart = "always" (which restarts after `lost`): the
# fresh supervisor finishes the stop, records what was asked for, and restarts nothing. A
# destroy whose QEMU still runs is completed during start-up; a shutdown is pressed again and
# ends with the guest's power-off after start-up.
INTENT_CASES = (
    Case("destroy", "kis0", "after:runtime_save", reasons=frozenset({Reason.DESTROYED})),
    Case("destroy", "kis1", "before:stop_unit", reasons=frozenset({Reason.DESTROYED})),
    Case("destroy", "kis2", "after:stop_unit", reasons=frozenset({Reason.DESTROYED})),
    Case("destroy", "kis3", "before:save_exit", reasons=frozenset({Reason.DESTROYED})),
    Case("destroy-graceful", "kis4", "before:kill_unit", reasons=frozenset({Reason.DESTROYED})),
    Case("destroy-graceful", "kis5", "after:kill_unit", reasons=frozenset({Reason.DESTROYED})),
    Case("shutdown", "kis6", "after:runtime_save", reasons=frozenset({Reason.SHUTDOWN})),
    Case("shutdown", "kis7", "before:powerdown", reasons=frozenset({Reason.SHUTDOWN})),
    Case("shutdown", "kis8", "after:powerdown", reasons=frozenset({Reason.SHUTDOWN})),
    Case("shutdown", "kis9", "before:save_exit", reasons=frozenset({Reason.SHUTDOWN})),
)


def test_stop_cut_off_is_finished_and_not_restarted() -> None:
    async def body(env: Env) -> list[str]:
        limits = RestartPolicyLimits(backoff=0.05)
        supervisor = await env.new_supervisor(limits)
        for case in INTENT_CASES:
            await supervisor.define(env.toml(case.name, restart="always"))
            await supervisor.start(case.name)
        await supervisor.close()
        await asyncio.sleep(1.0)  # the ACPI guests enable their power button after booting
        problems: list[str] = []
        for case in INTENT_CASES:
            problems += await run_child(env, case, case.name)
            mark = len(env.events.events)
            fresh = await env.new_supervisor(limits)
            try:
                info = fresh.get_machine(case.name)
                if case.op.startswith("destroy") and info.state is not State.SHUTOFF:
                    problems.append(f"{case.label}: {info.state} after start-up")
                if info.state is not State.SHUTOFF:
                    await env.events.stopped(case.name, start=mark)
                await asyncio.sleep(0.5)  # ten times the backoff: a restart would have begun
                info = fresh.get_machine(case.name)
                later = [event for event, _ in env.events.of(case.name)[mark:] if event in RESTARTS]
                if info.state is not State.SHUTOFF or later:
                    problems.append(f"{case.label}: restarted ({info.state}, events {later})")
                elif case.reasons is not None and info.reason not in case.reasons:
                    problems.append(f"{case.label}: shut off as {info.reason}")
                problems += [f"{case.label}: {p}" for p in await check(env, fresh)]
                if info.state is not State.SHUTOFF:
                    await fresh.destroy(case.name, DestroyMode.FORCE)
                await fresh.undefine(case.name)
            finally:
                await fresh.close()
        return problems

    run(body)


RESTARTS = (EventType.RESTARTING, EventType.STARTING)


# --- autostart ----------------------------------------------------------------------------------


def test_autostart_cut_off_starts_the_rest_after_a_restart() -> None:
    """A daemon killed while it autostarts two VMs: the next one starts what is missing, and
    each VM runs exactly once (the boot is marked only after every start was attempted)."""

    async def body(env: Env) -> list[str]:
        problems: list[str] = []
        boot_mark = env.paths.state_dir / "autostart-boot-id"
        for i, point in enumerate(("after:cont:1", "before:start_scope:2", "before:cont:2")):
            names = [f"kca{i}a", f"kca{i}b"]
            supervisor = await env.new_supervisor()
            for name in names:
                await supervisor.define(env.toml(name, extra="autostart = true"))
            await supervisor.close()
            boot_mark.unlink(missing_ok=True)  # as after a host reboot
            case = Case("start-up", names[0], point)
            problems += await run_child(env, case, "-")
            fresh = await env.new_supervisor()
            try:
                problems += [f"{case.label}: {p}" for p in await check(env, fresh)]
                for name in names:
                    info = fresh.get_machine(name)
                    if info.state is not State.RUNNING:
                        problems.append(f"{case.label}: VM {name} {info.state} ({info.reason})")
                if not boot_mark.exists():
                    problems.append(f"{case.label}: boot not marked after autostart")
                for name in names:
                    if fresh.get_machine(name).state is not State.SHUTOFF:
                        await fresh.destroy(name, DestroyMode.FORCE)
                    await fresh.undefine(name)
            finally:
                await fresh.close()
        return problems

    run(body)


# --- definitions --------------------------------------------------------------------------------


def test_define_and_undefine_cut_anywhere() -> None:
    async def body(env: Env) -> list[str]:
        problems: list[str] = []
        for i, point in enumerate(("before:fsync", "before:rename", "after:rename")):
            case = Case("define", f"kcdf{i}", point)
            toml = env.base / f"{case.name}.toml"
            toml.write_text(env.toml(case.name))
            problems += await run_child(env, case, str(toml))
            supervisor = await env.new_supervisor()
            try:
                problems += [f"{case.label}: {p}" for p in await check(env, supervisor)]
                defined = env.paths.definitions_dir / f"{case.name}.toml"
                listed = case.name in {i.name for i in supervisor.list_machines()}
                if listed != defined.exists():
                    problems.append(f"{case.label}: listed={listed}, file={defined.exists()}")
                if listed:
                    await supervisor.undefine(case.name)
            finally:
                await supervisor.close()
        for i, point in enumerate(("before:unlink", "after:unlink", "before:runtime_save")):
            case = Case("undefine", f"kcud{i}", point)
            supervisor = await env.new_supervisor()
            await supervisor.define(env.toml(case.name))
            await supervisor.start(case.name)
            pid = supervisor.get_machine(case.name).pid
            await supervisor.close()
            problems += await run_child(env, case, case.name)
            supervisor = await env.new_supervisor()
            try:
                problems += [f"{case.label}: {p}" for p in await check(env, supervisor)]
                info = supervisor.get_machine(case.name)
                has_file = (env.paths.definitions_dir / f"{case.name}.toml").exists()
                if (info.state, info.pid) != (State.RUNNING, pid) or info.transient == has_file:
                    problems.append(f"{case.label}: {info}, definition file: {has_file}")
                await supervisor.destroy(case.name, DestroyMode.FORCE)
                with contextlib.suppress(Exception):
                    await supervisor.undefine(case.name)
            finally:
                await supervisor.close()
        return problems

    run(body)
