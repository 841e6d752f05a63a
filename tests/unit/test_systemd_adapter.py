"""The systemd adapter's pure parts: argument encoding, error mapping, signal decoding and
job tracking (with a fake bus), and the spawn trampoline (with a fake scope creator)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pystemd.dbusexc import DBusError
from pystemd.dbuslib import path_encode

from supervisord_vm import _spawn_trampoline
from supervisord_vm.errors import NoSuchUnit, ProcessGone, SystemdError, UnitExists
from supervisord_vm.systemd import (
    ScopeProperties,
    Systemd,
    UnitEvent,
    _start_transient_args,
    map_error,
    spawn_in_scope,
    unit_name_from_path,
)

OWNER = b":1.1"
UNIT_PREFIX = b"/org/freedesktop/systemd1/unit"
PROPS = b"org.freedesktop.DBus.Properties"
MANAGER = b"org.freedesktop.systemd1.Manager"


@pytest.mark.parametrize(
    "name", ["svm-web1.scope", "svm-acc\\x2da.scope", "a_b.service", "-.slice", "é.scope"]
)
def test_unit_name_from_path_inverts_sd_bus_path_encode(name: str) -> None:
    path = path_encode(UNIT_PREFIX, name.encode()).decode()
    assert unit_name_from_path(path) == name


def test_unit_name_from_path_rejects_other_objects() -> None:
    assert unit_name_from_path("/org/freedesktop/systemd1") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/job/12") is None


def test_start_transient_args_carry_pids_as_au() -> None:
    props = ScopeProperties(description="VM web1", stop_timeout=1.5)
    args = _start_transient_args("svm-web1.scope", [123, 456], props)
    pids_at = args.index((ord("s"), b"PIDs"))
    assert args[pids_at - 1 : pids_at + 7] == [
        (ord("r"), b"sv"),
        (ord("s"), b"PIDs"),
        (ord("v"), b"au"),
        (ord("a"), b"u"),
        (ord("u"), 123),
        (ord("u"), 456),
        (-1, None),
        (-1, None),
    ]
    assert (ord("t"), 1_500_000) in args
    assert args[:3] == [(ord("s"), b"svm-web1.scope"), (ord("s"), b"fail"), (ord("a"), b"(sv)")]
    assert args[-3:] == [(-1, None), (ord("a"), b"(sa(sv))"), (-1, None)]


@pytest.mark.parametrize(
    ("errno_", "name", "expected"),
    [
        (-2, b"org.freedesktop.systemd1.NoSuchUnit", NoSuchUnit),
        (-17, b"org.freedesktop.systemd1.UnitExists", UnitExists),
        (-3, b"org.freedesktop.systemd1.NoSuchProcess", ProcessGone),
        (-3, b"org.freedesktop.DBus.Error.UnixProcessIdUnknown", ProcessGone),
        (-22, b"org.freedesktop.DBus.Error.InvalidArgs", SystemdError),
    ],
)
def test_map_error(errno_: int, name: bytes, expected: type[SystemdError]) -> None:
    error = map_error(DBusError(errno_, name, b"systemd says no"), "doing it")
    assert type(error) is expected
    assert str(error) == "doing it: systemd says no"


# --- signals with a fake bus -------------------------------------------------------------------


class FakeMessage:
    def __init__(
        self, interface: bytes, member: bytes, path: bytes, body: Any, sender: bytes = OWNER
    ) -> None:
        self._interface, self._member, self._path, self._sender = interface, member, path, sender
        self._body = body
        self.body: Any = None

    def is_empty(self) -> bool:
        return False

    def is_signal(self, interface: bytes, member: bytes) -> bool:
        return (interface, member) == (self._interface, self._member)

    def get_sender(self) -> bytes:
        return self._sender

    def get_path(self) -> bytes:
        return self._path

    def process_reply(self, with_headers: bool) -> None:
        self.body = self._body


class NullMessage:
    def is_empty(self) -> bool:
        return True

    def is_signal(self, interface: bytes, member: bytes) -> bool:
        return False


class FakeBus:
    """Plays the signal connection: process() hands out queued messages, then NULL ones."""

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.process_calls = 0

    def process(self) -> Any:
        self.process_calls += 1
        return self.queue.pop(0) if self.queue else NullMessage()

    def close(self) -> None:
        pass


def unit_path(unit: str) -> bytes:
    return bytes(path_encode(UNIT_PREFIX, unit.encode()))


def changed(unit: str, interface: bytes, props: dict[bytes, Any]) -> FakeMessage:
    return FakeMessage(PROPS, b"PropertiesChanged", unit_path(unit), [interface, props, []])


def manager_signal(member: bytes, body: Any, sender: bytes = OWNER) -> FakeMessage:
    return FakeMessage(MANAGER, member, b"/org/freedesktop/systemd1", body, sender)


@pytest.fixture
def adapter() -> Iterator[tuple[Systemd, FakeBus, list[UnitEvent]]]:
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    bus = FakeBus()
    systemd = Systemd(loop, executor, bus, OWNER)
    events: list[UnitEvent] = []
    systemd.subscribe(events.append)
    yield systemd, bus, events
    executor.shutdown()
    loop.close()


def test_scope_state_changes_become_events(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, events = adapter
    unit = "svm-web1.scope"
    bus.queue += [
        changed(unit, b"org.freedesktop.systemd1.Scope", {b"Result": b"timeout"}),
        changed(
            unit,
            b"org.freedesktop.systemd1.Unit",
            {b"LoadState": b"loaded", b"ActiveState": b"failed", b"SubState": b"failed"},
        ),
        changed("other.scope", b"org.freedesktop.systemd1.Unit", {b"ActiveState": b"active"}),
        manager_signal(
            b"JobRemoved", [7, b"/org/freedesktop/systemd1/job/7", unit.encode(), b"done"]
        ),
        manager_signal(b"UnitRemoved", [unit.encode(), unit_path(unit)]),
        manager_signal(b"Reloading", True),
    ]
    systemd._drain()
    assert [event.kind for event in events] == ["changed", "job-removed", "removed", "reloading"]
    status = events[0].status
    assert status is not None
    assert (status.active_state, status.sub_state, status.result) == ("failed", "failed", "timeout")
    assert events[1].job_result == "done"
    assert events[3].reloading is True
    assert not bus.queue
    assert bus.process_calls == 8  # six messages, then two empty results


def test_signals_from_other_senders_are_ignored(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, events = adapter
    bus.queue.append(manager_signal(b"Reloading", True, sender=b":1.666"))
    systemd._drain()
    assert events == []
    # After systemd re-executes under a new unique name, its signals count again.
    owner_change = FakeMessage(
        b"org.freedesktop.DBus",
        b"NameOwnerChanged",
        b"/org/freedesktop/DBus",
        [b"org.freedesktop.systemd1", OWNER, b":1.666"],
        sender=b"org.freedesktop.DBus",
    )
    bus.queue += [owner_change, manager_signal(b"Reloading", False, sender=b":1.666")]
    systemd._drain()
    assert [event.kind for event in events] == ["reloading"]


class FakeCallBus:
    """Plays the call connection: StopUnit answers with a job path."""

    def __init__(self, path: bytes) -> None:
        self.path = path

    def call_method(
        self, destination: bytes, path: bytes, interface: bytes, method: bytes, args: Any
    ) -> Any:
        reply = FakeMessage(b"", b"", b"", None)
        reply.body = self.path
        return reply


def test_job_result_that_arrives_before_the_reply_is_not_lost(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    job = b"/org/freedesktop/systemd1/job/42"
    systemd._call_bus = FakeCallBus(job)
    unit = "svm-a.scope"

    async def scenario() -> str:
        stopping = asyncio.ensure_future(systemd.stop_unit(unit))
        await asyncio.sleep(0)  # the watch is registered, the call is in flight
        bus.queue += [
            manager_signal(b"JobRemoved", [41, b"/x/job/41", unit.encode(), b"canceled"]),
            manager_signal(b"JobRemoved", [42, job, unit.encode(), b"done"]),
        ]
        systemd._drain()  # both JobRemoved before the StopUnit reply reached the loop
        return await stopping

    assert systemd._loop.run_until_complete(scenario()) == "done"
    assert systemd._job_watches == {}


def test_lost_signal_connection_fails_waiting_jobs(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, _bus, _events = adapter
    systemd._call_bus = FakeCallBus(b"/org/freedesktop/systemd1/job/1")

    async def scenario() -> str:
        stopping = asyncio.ensure_future(systemd.stop_unit("svm-a.scope"))
        for _ in range(20):
            await asyncio.sleep(0.01)
            if systemd._job_watches["svm-a.scope"][0].path is not None:
                break
        systemd._stop_signals(SystemdError("gone"))
        return await stopping

    with pytest.raises(SystemdError, match="gone"):
        systemd._loop.run_until_complete(scenario())


# --- spawn trampoline with a fake scope creator ------------------------------------------------


class FakeSystemd(Systemd):
    """Records the PID it was asked to put in a scope; fails when told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.pids: list[int] = []
        self.stopped: list[str] = []

    async def start_scope(self, unit: str, pids: Sequence[int], props: ScopeProperties) -> None:
        self.pids += pids
        await asyncio.sleep(0.05)  # the child must still be waiting meanwhile
        if self.error is not None:
            raise self.error

    async def stop_unit(self, unit: str) -> str:
        self.stopped.append(unit)
        return "done"


PROPERTIES = ScopeProperties(description="test", stop_timeout=1)


def spawn(fake: FakeSystemd, argv: list[str], out: Path) -> asyncio.subprocess.Process:
    async def run() -> asyncio.subprocess.Process:
        with out.open("wb") as sink:
            process = await spawn_in_scope(
                fake,
                argv,
                "svm-t.scope",
                PROPERTIES,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdout=sink.fileno(),
                stderr=sink.fileno(),
            )
        await process.wait()
        return process

    return asyncio.run(run())


def test_spawn_execs_argv_after_the_scope_exists(tmp_path: Path) -> None:
    fake = FakeSystemd()
    out = tmp_path / "out"
    script = 'echo "$$ $PPID [$0] [$1]"; exec grep ^SigIgn: /proc/self/status'
    process = spawn(fake, ["/bin/sh", "-c", script, "x y", ""], out)
    assert process.returncode == 0
    pid_line, ignored = out.read_text().splitlines()
    assert pid_line == f"{process.pid} {os.getpid()} [x y] []"
    assert fake.pids == [process.pid]  # the same process: exec, no extra fork
    ignored = ignored.split()[1]
    assert int(ignored, 16) & (1 << (signal.SIGPIPE - 1)) == 0  # SIGPIPE not inherited ignored


def test_spawn_never_runs_argv_when_the_scope_fails(tmp_path: Path) -> None:
    fake = FakeSystemd(UnitExists("already there"))
    marker = tmp_path / "ran"
    with pytest.raises(UnitExists):
        spawn(fake, ["/bin/touch", str(marker)], tmp_path / "out")
    assert len(fake.pids) == 1
    assert not marker.exists()
    assert not Path(f"/proc/{fake.pids[0]}").exists()  # killed and reaped


def test_spawn_reports_exec_failure(tmp_path: Path) -> None:
    fake = FakeSystemd()
    with pytest.raises(FileNotFoundError):
        spawn(fake, [str(tmp_path / "missing")], tmp_path / "out")
    assert fake.stopped == ["svm-t.scope"]
    assert not Path(f"/proc/{fake.pids[0]}").exists()


def test_trampoline_exits_without_exec_when_the_parent_goes_away(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    parent_end, child_end = socket.socketpair()
    with child_end:
        child = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                _spawn_trampoline.__file__,
                str(child_end.fileno()),
                "/bin/touch",
                str(marker),
            ],
            pass_fds=(child_end.fileno(),),
        )
    parent_end.close()  # as if the daemon died
    assert child.wait(timeout=10) == _spawn_trampoline.EXIT_ABANDONED
    assert not marker.exists()
