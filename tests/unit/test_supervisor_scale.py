"""The supervisor's per-event work does not grow with the number of VMs, and each VM keeps its
own bounded event history (issue 8).

A Supervisor over temporary directories, driven through define/undefine/reload (which need no
systemd); unit signals are handed to it as the systemd adapter would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from supervisord_vm.machine import Machine
from supervisord_vm.model import EventType
from supervisord_vm.store import Paths
from supervisord_vm.supervisor import RECENT_EVENTS, RECENT_EVENTS_PER_VM, Supervisor
from supervisord_vm.systemd import UnitEvent


def definition(name: str, memory: int = 16) -> str:
    return f'name = "{name}"\nmemory = {memory}\naccel = "tcg"\n'


@pytest.fixture
def sup(tmp_path: Path) -> Supervisor:
    paths = Paths(
        definitions_dir=tmp_path / "vms",
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        log_dir=tmp_path / "log",
    )
    for directory in (paths.definitions_dir, paths.state_dir, paths.runtime_dir, paths.log_dir):
        directory.mkdir()
    return Supervisor(paths, cast(Any, object()))  # no call here reaches systemd


class CountingDict(dict[str, Machine]):
    """A registry that counts every walk over it."""

    walks = 0

    def values(self) -> Any:
        CountingDict.walks += 1
        return super().values()

    def items(self) -> Any:
        CountingDict.walks += 1
        return super().items()

    def __iter__(self) -> Iterator[str]:
        CountingDict.walks += 1
        return super().__iter__()


def record_unit_events(machines: list[Machine]) -> dict[str, list[UnitEvent]]:
    seen: dict[str, list[UnitEvent]] = {m.name: [] for m in machines}
    for machine in machines:
        machine.on_unit_event = seen[machine.name].append  # type: ignore[method-assign,assignment]
    return seen


async def test_a_unit_signal_reaches_its_vm_without_walking_the_others(sup: Supervisor) -> None:
    for i in range(50):
        await sup.define(definition(f"vm{i}"))
    machines = [sup.machine(f"vm{i}") for i in range(50)]
    seen = record_unit_events(machines)
    sup._machines = CountingDict(sup._machines)
    CountingDict.walks = 0

    event = UnitEvent(kind="job-removed", unit=sup.machine("vm17").unit, job_result="done")
    sup._on_unit_event(event)
    sup._on_unit_event(UnitEvent(kind="removed", unit="svm-nobody.scope"))

    assert seen["vm17"] == [event]
    assert all(not events for name, events in seen.items() if name != "vm17")
    assert CountingDict.walks == 0


async def test_unit_signals_follow_the_registry_through_undefine_and_redefine(
    sup: Supervisor,
) -> None:
    await sup.define(definition("web-1"))
    old = sup.machine("web-1")
    unit = old.unit
    await sup.undefine("web-1")
    old_seen = record_unit_events([old])
    sup._on_unit_event(UnitEvent(kind="removed", unit=unit))
    assert old_seen["web-1"] == []  # a forgotten VM hears nothing more

    await sup.define(definition("web-1"))
    new = sup.machine("web-1")
    assert new is not old
    new_seen = record_unit_events([new])
    sup._on_unit_event(UnitEvent(kind="removed", unit=unit))
    assert len(new_seen["web-1"]) == 1

    sup.paths.definitions_dir.joinpath("web-1.toml").unlink()
    sup.paths.definitions_dir.joinpath("added.toml").write_text(definition("added"))
    await sup.reload()
    added = sup.machine("added")
    added_seen = record_unit_events([added])
    sup._on_unit_event(UnitEvent(kind="removed", unit=unit))
    sup._on_unit_event(UnitEvent(kind="removed", unit=added.unit))
    assert len(new_seen["web-1"]) == 1  # removed by the reload: no longer reached
    assert len(added_seen["added"]) == 1


async def test_a_busy_vm_does_not_evict_a_quiet_ones_history(sup: Supervisor) -> None:
    await sup.define(definition("quiet"))
    await sup.define(definition("busy"))
    busy = sup.machine("busy")
    for i in range(RECENT_EVENTS + RECENT_EVENTS_PER_VM):
        busy.emit(EventType.RESET, f"reset {i}")

    quiet = sup.recent_events("quiet")
    assert [e.event for e in quiet] == [EventType.DEFINED]
    own = sup.recent_events("busy")
    assert len(own) == RECENT_EVENTS_PER_VM
    assert own[-1].message == f"reset {RECENT_EVENTS + RECENT_EVENTS_PER_VM - 1}"
    assert own[0].message == f"reset {RECENT_EVENTS}"  # the newest, oldest first
    everyone = sup.recent_events()
    assert len(everyone) == RECENT_EVENTS
    assert everyone[-1] is own[-1]


async def test_a_forgotten_vms_history_is_dropped(sup: Supervisor) -> None:
    for round_ in range(3):
        for i in range(20):
            await sup.define(definition(f"vm{i}", memory=16 + round_))
            sup.machine(f"vm{i}").emit(EventType.RESET)
        for i in range(20):
            await sup.undefine(f"vm{i}")
    await sup.define(definition("vm0"))
    assert [e.event for e in sup.recent_events("vm0")] == [EventType.DEFINED]
    assert set(sup._recent_by_vm) == {"vm0"}  # memory bounded by the VMs that exist
    assert len(sup.recent_events()) <= RECENT_EVENTS


async def test_registry_watchers_hear_every_change_without_an_event(sup: Supervisor) -> None:
    heard: list[str] = []
    unwatch = sup.watch_registry(heard.append)
    await sup.define(definition("a"))
    await sup.define(definition("b"))
    assert heard == ["a", "b"]
    heard.clear()

    sup.paths.definitions_dir.joinpath("a.toml").write_text(definition("a", memory=32))
    sup.paths.definitions_dir.joinpath("b.toml").unlink()
    await sup.reload()
    assert sorted(heard) == ["a", "b"]  # a's definition changed (no event), b was forgotten
    heard.clear()

    await sup.undefine("a")
    assert heard == ["a"]
    unwatch()
    await sup.define(definition("c"))
    assert heard == ["a"]
