"""The D-Bus objects follow the supervisor one VM at a time: an event or a change of one VM
costs the same with 500 VMs as with one (issue 8).

The objects are not exported here (no bus): exporting is replaced by a recorder, and a stand-in
supervisor counts how the adapter reads it. The same objects on the real bus, with
GetManagedObjects and InterfacesAdded/Removed, are in tests/integration/test_service_edges.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import pytest

from supervisord_vm import bus, errors
from supervisord_vm.model import (
    Caller,
    EventType,
    ExitInfo,
    MachineEvent,
    MachineInfo,
    Reason,
    State,
)
from tests.unit.test_bus_authorization import FakeAuthorizer

VMS = 500


def info(name: str, state: State = State.SHUTOFF) -> MachineInfo:
    return MachineInfo(
        name=name,
        state=state,
        reason=Reason.NONE,
        unit=f"svm-{name}.scope",
        pid=0,
        transient=False,
        autostart=False,
        restart="no",
        stop_timeout=5,
        exit=ExitInfo(),
    )


class CountingSupervisor:
    """Every VM's MachineInfo; counts full listings and single look-ups."""

    def __init__(self, count: int) -> None:
        self.infos = {f"vm{i}": info(f"vm{i}") for i in range(count)}
        self.listings = 0
        self.lookups: list[str] = []

    def list_machines(self) -> list[MachineInfo]:
        self.listings += 1
        return [self.infos[name] for name in sorted(self.infos)]

    def get_machine(self, name: str) -> MachineInfo:
        self.lookups.append(name)
        if name not in self.infos:
            raise errors.NoSuchMachine(f"no VM named {name!r}")
        return self.infos[name]

    async def start(self, name: str, caller: Caller | None = None) -> MachineInfo:
        self.infos[name] = dataclasses.replace(self.infos[name], state=State.RUNNING)
        return self.infos[name]

    def subscribe(self, callback: Callable[[MachineEvent], None]) -> Callable[[], None]:
        return lambda: None

    def watch_registry(self, callback: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths exported (+) and removed (-), in order."""
    log: list[str] = []

    def export(self: bus.MachineObject, *where: object) -> None:  # (manager, bus)
        log.append("+" + self.path)

    def unexport(self: bus.MachineObject) -> None:
        log.append("-" + self.path)

    monkeypatch.setattr(bus.MachineObject, "export", export)
    monkeypatch.setattr(bus.MachineObject, "unexport", unexport)
    return log


async def no_reload(caller: Caller) -> tuple[list[str], ...]:
    return [], [], [], []


def service(sup: CountingSupervisor) -> bus.BusService:
    svc = bus.BusService(cast(Any, object()), cast(Any, sup), no_reload)
    svc.registry.sync()  # what export() does at start-up
    sup.listings, sup.lookups = 0, []
    return svc


def event(name: str, kind: EventType, state: State) -> MachineEvent:
    return MachineEvent(time=1.0, name=name, event=kind, state=state, reason=Reason.NONE)


def test_an_event_updates_only_its_vms_object(exported: list[str]) -> None:
    sup = CountingSupervisor(VMS)
    svc = service(sup)
    assert len(exported) == VMS

    sup.infos["vm7"] = info("vm7", State.RUNNING)
    svc._on_event(event("vm7", EventType.STARTED, State.RUNNING))

    assert sup.listings == 0
    assert sup.lookups == ["vm7"]
    assert svc.registry._objects["vm7"]._info.state is State.RUNNING
    assert len(exported) == VMS  # nothing exported or removed


def test_a_vm_forgotten_or_added_changes_only_its_object(exported: list[str]) -> None:
    sup = CountingSupervisor(VMS)
    svc = service(sup)
    exported.clear()

    del sup.infos["vm3"]  # e.g. a transient VM forgotten after its STOPPED event
    svc._on_registry_change("vm3")
    sup.infos["new"] = info("new")
    svc._on_event(event("new", EventType.DEFINED, State.SHUTOFF))

    assert exported == ["-" + bus.machine_path("vm3"), "+" + bus.machine_path("new")]
    assert sup.listings == 0
    assert sup.lookups == ["vm3", "new"]
    assert "vm3" not in svc.registry._objects


async def test_an_operation_on_one_vm_does_not_rescan_them_all(exported: list[str]) -> None:
    sup = CountingSupervisor(VMS)
    svc = service(sup)
    svc._service.authorizer = FakeAuthorizer(Caller(uid=0, pid=1), {0})

    await svc.manager.start("vm9")

    assert sup.listings == 0
