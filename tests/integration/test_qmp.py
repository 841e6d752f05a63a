"""QmpSession and build_argv against real QEMU processes (TCG, 16 MiB, tiny boot-sector guests)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from supervisord_vm.definition import Definition, Disk
from supervisord_vm.errors import QmpDisconnected, QmpError
from supervisord_vm.qemu import QmpEvent, QmpSession, build_argv
from tests.guests import write_acpi_guest, write_deaf_guest

pytestmark = pytest.mark.integration

QEMU = "/usr/bin/qemu-system-x86_64"
CONNECT_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await coro_fn()

    asyncio.run(main())


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short directory for sockets (unix socket paths must stay under 108 bytes)."""
    base = "/run" if os.access("/run", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="svmt-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Vm:
    """One QEMU process plus its QMP session and every event it reported."""

    def __init__(self, process: asyncio.subprocess.Process, socket_path: Path) -> None:
        self.process = process
        self.socket_path = socket_path
        self.events: list[QmpEvent] = []
        self._session: QmpSession | None = None

    @property
    def session(self) -> QmpSession:
        assert self._session is not None
        return self._session

    async def connect(self) -> QmpSession:
        self._session = await QmpSession.connect(
            self.socket_path, timeout=CONNECT_TIMEOUT, on_event=self.events.append
        )
        return self._session

    def named(self, name: str) -> list[QmpEvent]:
        return [event for event in self.events if event.name == name]

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)


def guest_definition(image: Path, name: str = "t") -> Definition:
    return Definition(
        name=name,
        memory=16,
        accel=("tcg",),
        qemu=QEMU,
        disks=(Disk(path=str(image), format="raw", snapshot=True),),
    )


async def spawn(defn: Definition, socket_path: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            *build_argv(defn, socket_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )


async def reap(process: asyncio.subprocess.Process) -> None:
    """Kill by PID (if still there) and reap, so no test leaves a QEMU behind."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        await process.wait()


@asynccontextmanager
async def running_vm(rundir: Path, guest: str = "acpi", *, cont: bool = True) -> AsyncIterator[Vm]:
    image = rundir / f"{guest}.img"
    (write_acpi_guest if guest == "acpi" else write_deaf_guest)(image)
    socket_path = rundir / "q.sock"
    process = await spawn(guest_definition(image), socket_path, rundir / "qemu.log")
    vm = Vm(process, socket_path)
    try:
        session = await vm.connect()
        if cont:
            await session.execute("cont")
        yield vm
    finally:
        if vm._session is not None:
            await vm._session.close()
        await reap(process)


def test_connect_cont_and_query_status(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir, cont=False) as vm:
            status: Any = await vm.session.execute("query-status")
            assert status["status"] == "prelaunch"  # -S: CPUs wait for `cont`
            assert await vm.session.execute("cont") == {}
            status = await vm.session.execute("query-status")
            assert status["status"] == "running"
            assert status["running"] is True
            assert [event.name for event in vm.events] == ["RESUME"]
            assert not vm.session.closed

    run(body)


def test_acpi_guest_powers_off_on_system_powerdown(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir, "acpi") as vm:
            await asyncio.sleep(0.3)  # let SeaBIOS hand over to the boot sector
            await vm.session.execute("system_powerdown")
            await asyncio.wait_for(vm.session.wait_closed(), EXIT_TIMEOUT)
            assert vm.session.closed
            assert await vm.exit_code() == 0
            assert vm.named("POWERDOWN")
            shutdown = vm.named("SHUTDOWN")
            assert len(shutdown) == 1
            assert shutdown[0].data == {"guest": True, "reason": "guest-shutdown"}
            assert shutdown[0].timestamp > 0

    run(body)


def test_deaf_guest_survives_system_powerdown(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir, "deaf") as vm:
            await asyncio.sleep(0.3)
            await vm.session.execute("system_powerdown")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(vm.session.wait_closed(), 2.0)
            assert vm.process.returncode is None
            assert not vm.session.closed
            assert vm.named("POWERDOWN")
            assert not vm.named("SHUTDOWN")
            status: Any = await vm.session.execute("query-status")
            assert status["status"] == "running"

    run(body)


def test_sigterm_gives_host_signal_shutdown_and_exit_0(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir, "deaf") as vm:
            os.kill(vm.process.pid, signal.SIGTERM)
            await asyncio.wait_for(vm.session.wait_closed(), EXIT_TIMEOUT)
            assert await vm.exit_code() == 0
            shutdown = vm.named("SHUTDOWN")
            assert [event.data for event in shutdown] == [{"guest": False, "reason": "host-signal"}]

    run(body)


def test_error_reply_is_qmp_error_with_class_and_description(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir) as vm:
            with pytest.raises(QmpError) as info:
                await vm.session.execute("no-such-command")
            assert not isinstance(info.value, QmpDisconnected)
            assert str(info.value).startswith(
                "QMP command 'no-such-command' failed: CommandNotFound: "
            )
            with pytest.raises(QmpError, match="GenericError"):
                await vm.session.execute("query-status", {"bogus": 1})
            # The session is still usable after error replies.
            status: Any = await vm.session.execute("query-status")
            assert status["running"] is True

    run(body)


def test_execute_after_qemu_death_raises_disconnected(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir) as vm:
            os.kill(vm.process.pid, signal.SIGKILL)
            await asyncio.wait_for(vm.session.wait_closed(), EXIT_TIMEOUT)
            assert vm.session.closed
            assert await vm.exit_code() == -signal.SIGKILL
            with pytest.raises(QmpDisconnected):
                await vm.session.execute("query-status")
            await vm.session.close()
            await vm.session.close()  # idempotent, never raises

    run(body)


def test_command_in_flight_when_qemu_quits_raises_disconnected(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir) as vm:

            async def hammer() -> None:
                while True:
                    await vm.session.execute("query-status")

            task = asyncio.create_task(hammer())
            await asyncio.sleep(0.05)
            os.kill(vm.process.pid, signal.SIGKILL)
            with pytest.raises(QmpDisconnected):
                await asyncio.wait_for(task, EXIT_TIMEOUT)

    run(body)


def test_listener_memory_stays_bounded(rundir: Path) -> None:
    async def body() -> None:
        async with running_vm(rundir, "deaf") as vm:
            for _ in range(1000):
                await vm.session.execute("stop")
                await vm.session.execute("cont")
            assert len(vm.named("STOP")) == 1000
            assert len(vm.named("RESUME")) == 1001  # plus the first `cont`
            client = vm.session._client
            listeners = client._listeners
            assert listeners == [client.events]  # the library's hoarding default is gone
            assert all(len(listener.history) == 0 for listener in listeners)
            assert all(listener.empty() for listener in listeners)
            assert not client._pending

    run(body)


def test_event_callback_error_does_not_break_the_session(rundir: Path) -> None:
    async def body() -> None:
        image = rundir / "deaf.img"
        write_deaf_guest(image)
        socket_path = rundir / "q.sock"
        process = await spawn(guest_definition(image), socket_path, rundir / "qemu.log")
        seen: list[str] = []

        def fragile(event: QmpEvent) -> None:
            seen.append(event.name)
            raise RuntimeError("consumer bug")

        session: QmpSession | None = None
        try:
            session = await QmpSession.connect(
                socket_path, timeout=CONNECT_TIMEOUT, on_event=fragile
            )
            await session.execute("cont")
            await session.execute("stop")
            status: Any = await session.execute("query-status")
            assert status["status"] == "paused"
            assert seen == ["RESUME", "STOP"]
        finally:
            if session is not None:
                await session.close()
            await reap(process)

    run(body)


def test_connect_waits_for_the_socket_to_appear(
    rundir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="supervisord_vm.qemu")

    async def body() -> None:
        image = rundir / "deaf.img"
        write_deaf_guest(image)
        socket_path = rundir / "late.sock"
        connecting = asyncio.create_task(
            QmpSession.connect(socket_path, timeout=CONNECT_TIMEOUT, on_event=lambda _e: None)
        )
        await asyncio.sleep(0.3)
        assert not connecting.done()
        process = await spawn(guest_definition(image), socket_path, rundir / "qemu.log")
        try:
            session = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
            status: Any = await session.execute("query-status")
            assert status["status"] == "prelaunch"
            await session.close()
            assert session.closed
        finally:
            connecting.cancel()
            await reap(process)

    run(body)
    assert "cannot watch" not in caplog.text  # woken by inotify, not the backoff fallback


def test_connect_times_out_on_missing_socket(rundir: Path) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(QmpError, match=r"not ready within 0\.3 s"):
            await QmpSession.connect(rundir / "none.sock", timeout=0.3, on_event=lambda _e: None)
        assert loop.time() - started < 2.0

    run(body)


def test_connect_times_out_on_refusing_socket(rundir: Path) -> None:
    async def body() -> None:
        stale = rundir / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(stale))  # bound, never listening: connect() is refused
            with pytest.raises(QmpError, match="refused"):
                await QmpSession.connect(stale, timeout=0.3, on_event=lambda _e: None)

    run(body)


def test_commas_in_socket_and_disk_paths_reach_qemu_intact(rundir: Path) -> None:
    async def body() -> None:
        image = rundir / "a,b.img"
        write_acpi_guest(image)
        socket_path = rundir / "q,s.sock"
        process = await spawn(guest_definition(image), socket_path, rundir / "qemu.log")
        session: QmpSession | None = None
        try:
            session = await QmpSession.connect(
                socket_path, timeout=CONNECT_TIMEOUT, on_event=lambda _e: None
            )
            blocks: Any = await session.execute("query-block")
            files = [block["inserted"]["file"] for block in blocks if "inserted" in block]
            assert len(files) == 1
            assert "a,b.img" in files[0]
        finally:
            if session is not None:
                await session.close()
            await reap(process)

    run(body)
