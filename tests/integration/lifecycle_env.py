"""Shared setup for the lifecycle tests: a Supervisor on real systemd with throwaway paths,
an event log to wait on, helpers for `systemctl show`, ptrace holds, and a leak check that
fails a test leaving any svm-* scope, runtime file or QEMU behind (and cleans up by PID)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from supervisord_vm import run as run_module
from supervisord_vm.model import EventType, MachineEvent, Reason
from supervisord_vm.restart_policy import RestartPolicyLimits
from supervisord_vm.store import Paths
from supervisord_vm.supervisor import Supervisor
from supervisord_vm.systemd import Systemd
from tests.guests import write_acpi_guest, write_deaf_guest

WAIT = 20.0


class EventLog:
    """Every MachineEvent a supervisor emitted, with a wait that wakes on each new one."""

    def __init__(self) -> None:
        self.events: list[MachineEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: MachineEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, name: str) -> list[tuple[EventType, Reason]]:
        return [(e.event, e.reason) for e in self.events if e.name == name]

    async def wait_for(
        self,
        predicate: Callable[[MachineEvent], bool],
        timeout: float = WAIT,  # noqa: ASYNC109 - a test helper
        start: int = 0,
    ) -> MachineEvent:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    async def stopped(self, name: str, start: int = 0) -> MachineEvent:
        return await self.wait_for(
            lambda e: e.name == name and e.event is EventType.STOPPED, start=start
        )


@dataclass
class Env:
    base: Path
    paths: Paths
    systemd: Systemd
    images: Path
    events: EventLog = field(default_factory=EventLog)
    supervisors: list[Supervisor] = field(default_factory=list)

    @property
    def supervisor(self) -> Supervisor:
        return self.supervisors[-1]

    async def new_supervisor(
        self,
        limits: RestartPolicyLimits | None = None,
        *,
        qmp_connect_timeout: float = 10.0,
        qmp_command_timeout: float = 10.0,
    ) -> Supervisor:
        supervisor = Supervisor(
            self.paths,
            self.systemd,
            restart_limits=limits,
            qmp_connect_timeout=qmp_connect_timeout,
            qmp_command_timeout=qmp_command_timeout,
        )
        supervisor.subscribe(self.events)
        await supervisor.start_up()
        self.supervisors.append(supervisor)
        return supervisor

    def toml(
        self,
        name: str,
        guest: str = "acpi",
        *,
        stop_timeout: int = 10,
        restart: str = "no",
        extra: str = "",
        disk: str | None = None,
    ) -> str:
        path = disk if disk is not None else str(self.images / f"{guest}.img")
        return (
            f'name = "{name}"\nmemory = 16\naccel = "tcg"\nstop_timeout = {stop_timeout}\n'
            f'restart = "{restart}"\n{extra}\n'
            f'[[disks]]\npath = "{path}"\nformat = "raw"\nsnapshot = true\n'
        )


async def show(unit: str, *props: str) -> dict[str, str]:
    """The unit as `systemctl show` reports it."""
    proc = await asyncio.create_subprocess_exec(
        "systemctl", "show", unit, "-p", ",".join(props), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)


async def run_cmd(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return out.decode()


async def failed_units() -> str:
    return (await run_cmd("systemctl", "list-units", "--failed", "--plain", "--no-legend")).strip()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def proc_bytes(pid: int, name: str) -> bytes:
    """A /proc/PID file (procfs reads never block)."""
    return Path(f"/proc/{pid}/{name}").read_bytes()


def proc_link(pid: int, name: str) -> str:
    return str(Path(f"/proc/{pid}/{name}").readlink())


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


async def wait_gone(pid: int, timeout: float = WAIT) -> None:  # noqa: ASYNC109
    """Wait for a process to exit, woken by its pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(timeout):
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@contextlib.asynccontextmanager
async def ptrace_hold(pid: int) -> AsyncIterator[None]:
    """Hold PID in ptrace stop with gdb: SIGTERM and SIGCONT stay pending, SIGKILL still works."""
    gdb = await asyncio.create_subprocess_exec(
        "gdb",
        "-q",
        "-nx",
        "-p",
        str(pid),
        "-ex",
        "echo svm-attached\\n",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert gdb.stdout is not None
        async with asyncio.timeout(WAIT):
            while True:
                line = await gdb.stdout.readline()
                assert line, "gdb exited without attaching"
                if b"svm-attached" in line:
                    break
        assert proc_state(pid) == "t", "not in ptrace stop"
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            gdb.kill()
        await gdb.wait()


@contextlib.asynccontextmanager
async def lifecycle_env() -> AsyncIterator[Env]:
    """A fresh Supervisor over short temp paths; after the test, proves nothing was left."""
    base = Path(tempfile.mkdtemp(prefix="svmt-", dir="/run"))
    os.chmod(base, 0o711)  # noqa: PTH101 - QEMU's user may pass (to a `qemu` script)
    paths = Paths(
        definitions_dir=base / "defs",
        state_dir=base / "state",
        runtime_dir=base / "run",
        log_dir=base / "log",
    )
    images = base / "img"
    images.mkdir()
    write_acpi_guest(images / "acpi.img")
    write_deaf_guest(images / "deaf.img")
    systemd = await Systemd.connect()
    env = Env(base=base, paths=paths, systemd=systemd, images=images)
    await env.new_supervisor()
    failure: BaseException | None = None
    try:
        yield env
    except BaseException as err:
        failure = err
        raise
    finally:
        leaks = await _collect_and_clean(env)
        shutil.rmtree(base, ignore_errors=True)
        if leaks and failure is None:
            raise AssertionError("test left things behind: " + "; ".join(leaks))


async def _collect_and_clean(env: Env) -> list[str]:
    leaks: list[str] = []
    for supervisor in env.supervisors:
        await supervisor.close()
    # Reap our QEMU children first (a ptrace-held zombie keeps its scope loaded until then).
    reapers = list(run_module._reapers)
    if reapers:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*reapers, return_exceptions=True)
    for status in await env.systemd.list_scopes("svm-*.scope"):
        leaks.append(f"scope {status.name} ({status.active_state}/{status.result})")
        with contextlib.suppress(Exception):
            for pid in await env.systemd.unit_pids(status.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await env.systemd.stop_unit(status.name)
        with contextlib.suppress(Exception):
            await env.systemd.reset_failed(status.name)
    runtime = env.paths.runtime_dir
    if runtime.exists():
        leftovers = sorted(p.name for p in runtime.iterdir())
        if leftovers:
            leaks.append(f"runtime files {leftovers}")
    failed = await failed_units()
    if failed:
        leaks.append(f"failed units: {failed}")
    await env.systemd.close()
    return leaks
