"""The D-Bus edge authorizes before it looks at arguments, audits every refusal it makes, and
keeps blocking work (NSS group lookups, log reading) off the event loop.

The bus objects' methods are called directly here (sdbus runs a local object's method body as
is); the caller's credentials come from a stand-in for the bus driver, the group database from
stand-ins for the NSS lookups. The same behaviour through the real bus is in
tests/integration/test_hostile_input.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from supervisord_vm import bus, errors
from supervisord_vm.model import Caller, ExitInfo, MachineInfo, Reason, State

ADMIN_GID = 4242
MEMBER = Caller(uid=1001, pid=11)
OUTSIDER = Caller(uid=1002, pid=12)


class FakeAuthorizer(bus.Authorizer):
    """The real decision (Authorizer.allowed); only the bus driver's answer is made up."""

    def __init__(self, caller: Caller, groups: set[int] | None) -> None:
        self._caller = caller
        self._groups = groups

    async def caller(self) -> tuple[Caller, set[int] | None]:
        return self._caller, self._groups


class RecordingSupervisor:
    """Records what reaches the core; any call reaching it fails the refusal tests."""

    def __init__(self, log_file: Path | None = None) -> None:
        self.calls: list[str] = []
        self.log_file = log_file
        self.threads: list[str] = []

    def __getattr__(self, operation: str) -> Callable[..., Awaitable[None]]:
        async def record(*args: object) -> None:
            self.calls.append(operation)

        return record

    def log_path(self, name: str) -> Path:
        self.threads.append(threading.current_thread().name)
        if self.log_file is None:
            raise errors.NoSuchMachine(f"no VM named {name!r} and no log of one")
        return self.log_file

    def read_log(self, name: str, max_bytes: int, lines: int = 0) -> bytes:
        return self.log_path(name).read_bytes()[-max_bytes:]

    def list_machines(self) -> list[object]:
        return []


class NoRegistry:
    def sync(self) -> None:
        pass


Audits = list[tuple[int, str, str, str]]


@pytest.fixture
def audits(monkeypatch: pytest.MonkeyPatch) -> Audits:
    records: Audits = []

    def record(caller: Caller, operation: str, target: str, result: str) -> None:
        records.append((caller.uid, operation, target, result))

    monkeypatch.setattr(bus, "audit", record)
    return records


@pytest.fixture
def group_database(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Group supervisord-vm with MEMBER in it; the list names the threads that asked."""
    threads: list[str] = []

    def admin_gid() -> int:
        threads.append(threading.current_thread().name)
        return ADMIN_GID

    def user_groups(uid: int) -> set[int]:
        threads.append(threading.current_thread().name)
        return {uid, ADMIN_GID} if uid == MEMBER.uid else {uid}

    monkeypatch.setattr(bus, "_admin_gid", admin_gid)
    monkeypatch.setattr(bus, "_user_groups", user_groups)
    return threads


def objects(
    caller: Caller, supervisor: RecordingSupervisor, groups: set[int] | None = None
) -> tuple[bus.ManagerObject, bus.MachineObject]:
    service = bus._Service(cast(Any, supervisor), FakeAuthorizer(caller, groups))

    async def on_reload(caller: Caller) -> tuple[list[str], ...]:
        supervisor.calls.append("reload")
        return [], [], [], []

    manager = bus.ManagerObject(service, cast(Any, NoRegistry()), on_reload)
    info = MachineInfo(
        name="vm1",
        state=State.RUNNING,
        reason=Reason.NONE,
        unit="svm-vm1.scope",
        pid=100,
        transient=False,
        autostart=False,
        restart="no",
        stop_timeout=5,
        exit=ExitInfo(),
    )
    return manager, bus.MachineObject(service, info)  # not exported: no bus needed


def malformed_calls(
    manager: bus.ManagerObject, machine: bus.MachineObject
) -> dict[str, Callable[[], Awaitable[object]]]:
    """Every changing call whose arguments the edge parses, with arguments it must refuse."""
    nan, inf = math.nan, math.inf
    return {
        "Manager.Shutdown": lambda: manager.shutdown("vm1", nan, False),
        "Manager.Destroy": lambda: manager.destroy("vm1", "gentle", -1.0),
        "Manager.Destroy(timeout)": lambda: manager.destroy("vm1", "force", inf),
        "Manager.Kill": lambda: manager.kill("vm1", "SIGNOPE"),
        "Manager.ShutdownAll": lambda: manager.shutdown_all(-5.0, 0),
        "Machine.Shutdown": lambda: machine.shutdown(1e308, True),
        "Machine.Destroy": lambda: machine.destroy("", nan),
        "Machine.Kill": lambda: machine.kill("99999"),
    }


async def test_outsider_gets_access_denied_whatever_the_arguments_and_is_audited(
    audits: Audits, group_database: list[str]
) -> None:
    supervisor = RecordingSupervisor()
    manager, machine = objects(OUTSIDER, supervisor, groups={OUTSIDER.uid})
    for label, call in malformed_calls(manager, machine).items():
        with pytest.raises(bus.AccessDeniedError):
            await call()
        assert audits[-1][0] == OUTSIDER.uid and audits[-1][3] == "denied", label
    assert len(audits) == len(malformed_calls(manager, machine))
    assert supervisor.calls == []


async def test_outsider_refused_on_valid_arguments_too_with_the_operation_audited(
    audits: Audits, group_database: list[str]
) -> None:
    supervisor = RecordingSupervisor()
    manager, machine = objects(OUTSIDER, supervisor, groups={OUTSIDER.uid})
    with pytest.raises(bus.AccessDeniedError):
        await manager.destroy("vm1", "graceful", 3.0)
    with pytest.raises(bus.AccessDeniedError):
        await machine.kill("TERM")
    with pytest.raises(bus.AccessDeniedError):
        await manager.get_log("vm1", 10)
    assert audits == [
        (OUTSIDER.uid, "Destroy", "vm1", "denied"),
        (OUTSIDER.uid, "Kill", "vm1", "denied"),
        (OUTSIDER.uid, "GetLog", "vm1", "denied"),
    ]
    assert supervisor.calls == []


async def test_member_with_bad_arguments_gets_invalid_argument_audited_core_untouched(
    audits: Audits, group_database: list[str]
) -> None:
    supervisor = RecordingSupervisor()
    manager, machine = objects(MEMBER, supervisor, groups={MEMBER.uid, ADMIN_GID})
    calls = malformed_calls(manager, machine)
    for label, call in calls.items():
        with pytest.raises(bus.InvalidArgumentError):
            await call()
        uid, operation, _target, result = audits[-1]
        assert uid == MEMBER.uid and result.startswith("InvalidArgument: "), label
        assert operation == label.split(".")[1].split("(")[0]
    assert len(audits) == len(calls)
    assert supervisor.calls == []


async def test_member_with_good_arguments_reaches_the_core_without_an_edge_audit(
    audits: Audits, group_database: list[str]
) -> None:
    supervisor = RecordingSupervisor()
    manager, machine = objects(MEMBER, supervisor, groups={MEMBER.uid, ADMIN_GID})
    await manager.destroy("vm1", "graceful", 3.0)
    await manager.kill("vm1", "15")
    await machine.shutdown(0.0, False)
    await manager.shutdown_all(0.0, 2)
    assert supervisor.calls == ["destroy", "kill", "shutdown"]  # no VM runs: ShutdownAll is a no-op
    assert audits == []  # the core audits what it receives


async def test_group_lookups_run_in_worker_threads_not_on_the_event_loop(
    audits: Audits, group_database: list[str]
) -> None:
    supervisor = RecordingSupervisor()
    loop_thread = threading.current_thread().name
    # No groups from the bus: the fallback reads the user database too.
    manager, _ = objects(MEMBER, supervisor, groups=None)
    await manager.start("vm1")
    assert supervisor.calls == ["start"]
    assert len(group_database) == 2
    assert loop_thread not in group_database


async def test_get_log_reads_the_file_in_a_worker_thread(
    tmp_path: Path, audits: Audits, group_database: list[str]
) -> None:
    log_file = tmp_path / "vm1.log"
    log_file.write_text("".join(f"line {n}\n" for n in range(10)))
    supervisor = RecordingSupervisor(log_file)
    manager, _ = objects(MEMBER, supervisor, groups={ADMIN_GID})
    assert await manager.get_log("vm1", 2) == "line 8\nline 9\n"
    assert supervisor.threads and threading.current_thread().name not in supervisor.threads
    missing = RecordingSupervisor(None)
    manager, _ = objects(MEMBER, missing, groups={ADMIN_GID})
    with pytest.raises(bus.NoSuchMachineError):
        await manager.get_log("nope", 0)
