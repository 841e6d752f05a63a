"""The systemd adapter's pure parts: argument building, error mapping, signal decoding, calls
and job tracking (with fake buses), and the spawn trampoline (with a fake scope creator)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from pystemd.dbusexc import DBusError
from pystemd.dbuslib import path_encode
from sdbus.dbus_exceptions import (
    DbusNoReplyError,
    DbusServiceUnknownError,
    DbusUnixProcessIdUnknownError,
)
from sdbus.sd_bus_internals import SdBus, SdBusLibraryError, SdBusUnmappedMessageError

from supervisord_vm import _spawn_trampoline
from supervisord_vm import systemd as systemd_module
from supervisord_vm.errors import NoSuchUnit, ProcessGone, SystemdError, UnitExists
from supervisord_vm.systemd import (
    ScopeProperties,
    Systemd,
    UnitEvent,
    UnitStatus,
    _JobWatch,
    _start_transient_args,
    map_error,
    spawn_in_scope,
    start_done,
    stop_done,
    systemd_away,
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
    unit, mode, properties, aux = _start_transient_args("svm-web1.scope", [123, 456], props)
    assert (unit, mode, aux) == ("svm-web1.scope", "fail", [])
    values = dict(properties)
    assert values["PIDs"] == ("au", [123, 456])
    assert values["TimeoutStopUSec"] == ("t", 1_500_000)
    assert values["KillMode"] == ("s", "control-group")
    assert values["KillSignal"] == ("i", 15)
    assert values["SendSIGKILL"] == ("b", True)
    assert values["After"] == ("as", ["supervisord-vm.service"])
    assert values["Slice"] == ("s", "machine.slice")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("org.freedesktop.systemd1.NoSuchUnit", NoSuchUnit),
        ("org.freedesktop.systemd1.UnitExists", UnitExists),
        ("org.freedesktop.systemd1.NoSuchProcess", ProcessGone),
        ("org.freedesktop.DBus.Error.UnixProcessIdUnknown", ProcessGone),
        ("org.freedesktop.DBus.Error.InvalidArgs", SystemdError),
    ],
)
def test_map_error_by_dbus_error_name(name: str, expected: type[SystemdError]) -> None:
    error = map_error(SdBusUnmappedMessageError(name, "systemd says no"), "doing it")
    assert type(error) is expected
    assert str(error) == "doing it: systemd says no"


def test_map_error_of_an_error_sdbus_maps_to_a_class() -> None:
    error = map_error(DbusUnixProcessIdUnknownError("Process with ID 9 does not exist."), "x")
    assert type(error) is ProcessGone
    assert str(error) == "x: Process with ID 9 does not exist."


@pytest.mark.parametrize(
    ("errno_", "name", "expected"),
    [
        (-2, b"org.freedesktop.systemd1.NoSuchUnit", NoSuchUnit),
        (-3, b"org.freedesktop.DBus.Error.UnixProcessIdUnknown", ProcessGone),
        (-22, b"org.freedesktop.DBus.Error.InvalidArgs", SystemdError),
    ],
)
def test_map_error_of_the_signal_connection(
    errno_: int, name: bytes, expected: type[SystemdError]
) -> None:
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
    bus = FakeBus()
    systemd = Systemd(loop, None, bus, OWNER)
    events: list[UnitEvent] = []
    systemd.subscribe(events.append)
    yield systemd, bus, events
    loop.run_until_complete(close(systemd))
    loop.close()


async def close(systemd: Systemd) -> None:
    """Close, and let the tasks the adapter started (after systemd came back) end."""
    tasks = list(systemd._tasks)
    await systemd.close()
    await asyncio.gather(*tasks, return_exceptions=True)


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


class FakeCallMessage:
    def __init__(self, path: str, interface: str, member: str) -> None:
        self.path, self.interface, self.member = path, interface, member
        self.signature = ""
        self.args: tuple[Any, ...] = ()

    def append_data(self, signature: str, *args: Any) -> None:
        self.signature, self.args = signature, args


class FakeReply:
    def __init__(self, contents: Any) -> None:
        self.contents = contents

    def get_contents(self) -> Any:
        return self.contents


class FakeCallBus:
    """Plays sdbus's call connection: ANSWER gives a call's reply contents, or raises."""

    def __init__(self, answer: Callable[[FakeCallMessage], Any]) -> None:
        self.answer = answer
        self.calls: list[FakeCallMessage] = []
        self.closed = False

    def new_method_call_message(
        self, destination: str, path: str, interface: str, member: str
    ) -> FakeCallMessage:
        assert destination == "org.freedesktop.systemd1"
        message = FakeCallMessage(path, interface, member)
        self.calls.append(message)
        return message

    async def call_async(self, message: FakeCallMessage) -> FakeReply:
        await asyncio.sleep(0)  # the reply comes later, on the loop
        return FakeReply(self.answer(message))

    def close(self) -> None:
        self.closed = True


def use_call_bus(systemd: Systemd, answer: Callable[[FakeCallMessage], Any]) -> FakeCallBus:
    fake = FakeCallBus(answer)
    systemd._call_bus = cast(SdBus, fake)
    return fake


def test_job_result_that_arrives_before_the_reply_is_not_lost(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    job = "/org/freedesktop/systemd1/job/42"
    calls = use_call_bus(systemd, lambda message: job)
    unit = "svm-a.scope"

    async def scenario() -> str:
        stopping = asyncio.ensure_future(systemd.stop_unit(unit))
        await asyncio.sleep(0)  # the watch is registered, the call is in flight
        bus.queue += [
            manager_signal(b"JobRemoved", [41, b"/x/job/41", unit.encode(), b"canceled"]),
            manager_signal(b"JobRemoved", [42, job.encode(), unit.encode(), b"done"]),
        ]
        systemd._drain()  # both JobRemoved before the StopUnit reply reached the loop
        return await stopping

    assert systemd._loop.run_until_complete(scenario()) == "done"
    assert systemd._job_watches == {}
    (call,) = calls.calls
    assert (call.member, call.signature, call.args) == ("StopUnit", "ss", (unit, "replace"))


def test_lost_signal_connection_fails_waiting_jobs(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, _bus, _events = adapter
    use_call_bus(systemd, lambda message: "/org/freedesktop/systemd1/job/1")

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


def unit_answers(
    properties: dict[tuple[str, str], str], errors: dict[str, Exception] | None = None
) -> Callable[[FakeCallMessage], Any]:
    """systemd's answers for GetUnit and Properties.Get (a variant), or an error by member."""

    def answer(message: FakeCallMessage) -> Any:
        if errors and message.member in errors:
            raise errors[message.member]
        if message.member == "GetUnit":
            return "/org/freedesktop/systemd1/unit/svm_2da_2escope"
        assert message.member == "Get"
        assert message.path == "/org/freedesktop/systemd1/unit/svm_2da_2escope"
        return ("s", properties[message.args[0], message.args[1]])

    return answer


UNIT_PROPS = {
    ("org.freedesktop.systemd1.Unit", "LoadState"): "loaded",
    ("org.freedesktop.systemd1.Unit", "ActiveState"): "failed",
    ("org.freedesktop.systemd1.Unit", "SubState"): "failed",
    ("org.freedesktop.systemd1.Scope", "Result"): "timeout",
}


def test_unit_status_reads_the_units_properties(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, _bus, _events = adapter
    use_call_bus(systemd, unit_answers(UNIT_PROPS))
    status = systemd._loop.run_until_complete(systemd.unit_status("svm-a.scope"))
    assert status == UnitStatus("svm-a.scope", "loaded", "failed", "failed", "timeout")


@pytest.mark.parametrize(
    ("member", "name"),
    [
        ("GetUnit", "org.freedesktop.systemd1.NoSuchUnit"),
        ("Get", "org.freedesktop.DBus.Error.UnknownObject"),  # unloaded after GetUnit
    ],
)
def test_unit_status_of_a_unit_that_is_not_loaded_is_none(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]], member: str, name: str
) -> None:
    systemd, _bus, _events = adapter
    gone: dict[str, Exception] = {member: SdBusUnmappedMessageError(name, "gone")}
    use_call_bus(systemd, unit_answers(UNIT_PROPS, gone))
    assert systemd._loop.run_until_complete(systemd.unit_status("svm-a.scope")) is None


def test_call_errors_carry_systemds_message(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, _bus, _events = adapter
    error = SdBusUnmappedMessageError(
        "org.freedesktop.systemd1.NoSuchUnit", "Unit svm-a.scope not loaded."
    )

    def answer(message: FakeCallMessage) -> Any:
        assert (message.member, message.signature) == ("KillUnit", "ssi")
        assert message.args == ("svm-a.scope", "all", 9)
        raise error

    use_call_bus(systemd, answer)
    with pytest.raises(NoSuchUnit, match=r"^killing svm-a.scope: Unit svm-a.scope not loaded.$"):
        systemd._loop.run_until_complete(systemd.kill_unit("svm-a.scope", 9))


def test_lost_call_connection_loses_the_adapter_and_refuses_later_calls(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, _bus, _events = adapter
    error = SdBusLibraryError(
        "File: x Line: 1. sd_bus_call_async(...) in function y returned error number: -107"
    )

    def answer(message: FakeCallMessage) -> Any:
        raise error

    fake = use_call_bus(systemd, answer)
    with pytest.raises(SystemdError):
        systemd._loop.run_until_complete(systemd.reset_failed("svm-a.scope"))
    assert fake.closed
    assert systemd._call_bus is None
    assert systemd.lost.is_set() and "connection gone" in systemd.lost_reason
    # No silent reconnect: its Subscribe went with the old connection.
    with pytest.raises(SystemdError, match="connection to systemd lost"):
        systemd._loop.run_until_complete(systemd.reset_failed("svm-a.scope"))


class DisconnectedMessage(NullMessage):
    """sd-bus's local Disconnected signal: body-less, so pystemd shows it as empty."""

    def is_signal(self, interface: bytes, member: bytes) -> bool:
        return (interface, member) == (b"org.freedesktop.DBus.Local", b"Disconnected")


def test_disconnected_signal_connection_loses_the_adapter_and_fails_waiting_jobs(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    use_call_bus(systemd, lambda message: "/org/freedesktop/systemd1/job/1")

    async def scenario() -> str:
        stopping = asyncio.ensure_future(systemd.stop_unit("svm-a.scope"))
        for _ in range(20):
            await asyncio.sleep(0.01)
            if systemd._job_watches["svm-a.scope"][0].path is not None:
                break
        bus.queue.append(DisconnectedMessage())
        systemd._drain()
        return await stopping

    with pytest.raises(SystemdError, match="connection to systemd lost"):
        systemd._loop.run_until_complete(scenario())
    assert systemd.lost.is_set()
    assert systemd.lost_reason == "the system bus closed the connection for systemd's signals"


# --- systemd re-executing (daemon-reexec) with fake buses --------------------------------------

NEW_OWNER = b":1.2"
NO_REPLY = "Message recipient disconnected from message bus without replying"
JOB = "/org/freedesktop/systemd1/job/9"


def owner_changed(new: bytes = NEW_OWNER, old: bytes = OWNER) -> FakeMessage:
    return FakeMessage(
        b"org.freedesktop.DBus",
        b"NameOwnerChanged",
        b"/org/freedesktop/DBus",
        [b"org.freedesktop.systemd1", old, new],
        sender=b"org.freedesktop.DBus",
    )


def systemd_returns(systemd: Systemd, bus: FakeBus) -> None:
    """The bus daemon names systemd's new unique name (as after `systemctl daemon-reexec`)."""
    bus.queue.append(owner_changed())
    systemd._drain()


def test_errors_of_a_call_systemd_left_unanswered_are_recognised() -> None:
    assert systemd_away(DbusNoReplyError(NO_REPLY))
    assert systemd_away(DbusServiceUnknownError("The name is not activatable"))
    assert systemd_away(SdBusUnmappedMessageError("org.freedesktop.DBus.Error.NameHasNoOwner", ""))
    assert not systemd_away(SdBusUnmappedMessageError("org.freedesktop.systemd1.NoSuchUnit", ""))
    assert not systemd_away(SdBusLibraryError("returned error number: -107"))


def test_unit_states_that_show_a_jobs_effect() -> None:
    def status(active: str) -> UnitStatus:
        return UnitStatus("svm-a.scope", "loaded", active, "x", "success")

    assert start_done(status("active"))
    assert not start_done(status("activating")) and not start_done(None)
    assert stop_done(None) and stop_done(status("inactive")) and stop_done(status("failed"))
    assert not stop_done(status("deactivating")) and not stop_done(status("active"))


def test_job_watch_without_a_known_path_takes_the_units_next_job() -> None:
    loop = asyncio.new_event_loop()
    try:
        seen_before = _JobWatch(loop.create_future(), start_done)
        seen_before.job_removed("/job/5", "done")
        seen_before.expect_any()
        assert seen_before.future.result() == "done"
        later = _JobWatch(loop.create_future(), start_done)
        assert not later.job_known
        later.settle_from(UnitStatus("u", "loaded", "active", "running", "success"))
        assert not later.future.done()  # a job systemd may not have: no state settles it
        later.expect_any()
        later.job_removed("/job/6", "failed")
        assert later.future.result() == "failed"
    finally:
        loop.close()


class Answers:
    """systemd's answers by member; a list answers one call per item (an Exception is raised)."""

    def __init__(self, **by_member: Any) -> None:
        self.by_member = by_member
        self.before_answer: Callable[[FakeCallMessage], None] = lambda message: None

    def __call__(self, message: FakeCallMessage) -> Any:
        self.before_answer(message)
        answer = self.by_member[message.member]
        if isinstance(answer, list):
            answer = answer.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(message) if callable(answer) else answer


def members(calls: FakeCallBus) -> list[str]:
    return [call.member for call in calls.calls]


ALREADY_SUBSCRIBED = SdBusUnmappedMessageError(
    "org.freedesktop.systemd1.AlreadySubscribed", "Client is already subscribed."
)
NOT_LOADED = SdBusUnmappedMessageError("org.freedesktop.systemd1.NoSuchUnit", "not loaded")


def scope_answers(active: str, pids: list[int]) -> dict[str, Any]:
    """GetUnit, the property reads and GetUnitProcesses of a loaded scope."""
    props = {
        "LoadState": "loaded",
        "ActiveState": active,
        "SubState": "running",
        "Result": "success",
    }
    return {
        "GetUnit": "/org/freedesktop/systemd1/unit/svm_2da_2escope",
        "Get": lambda message: ("s", props[message.args[1]]),
        "GetUnitProcesses": [[("/machine.slice/svm-a.scope", pid, "qemu") for pid in pids]],
    }


def test_call_left_unanswered_is_made_again_once_systemd_is_back(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    answers = Answers(KillUnit=[DbusNoReplyError(NO_REPLY), None], Subscribe=ALREADY_SUBSCRIBED)
    calls = use_call_bus(systemd, answers)

    async def scenario() -> None:
        killing = asyncio.ensure_future(systemd.kill_unit("svm-a.scope", 15))
        for _ in range(5):
            await asyncio.sleep(0)
        assert members(calls) == ["KillUnit"] and not killing.done()  # waits for systemd
        systemd_returns(systemd, bus)
        await killing
        await asyncio.gather(*systemd._tasks)

    systemd._loop.run_until_complete(scenario())
    assert members(calls) == ["KillUnit", "KillUnit", "Subscribe"]


def test_call_left_unanswered_after_systemd_came_back_is_made_again_at_once(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    """The bus's NoReply (call connection) may come after NameOwnerChanged (signal connection)."""
    systemd, bus, _events = adapter
    no_reply = DbusNoReplyError(NO_REPLY)
    answers = Answers(ResetFailedUnit=[no_reply, None], Subscribe=ALREADY_SUBSCRIBED)
    answers.before_answer = lambda message: (
        systemd_returns(systemd, bus) if message.member == "ResetFailedUnit" else None
    )
    calls = use_call_bus(systemd, answers)
    systemd._loop.run_until_complete(systemd.reset_failed("svm-a.scope"))
    assert members(calls)[:2] == ["ResetFailedUnit", "ResetFailedUnit"]


def test_call_fails_with_the_bus_error_when_systemd_does_not_come_back(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]], monkeypatch: pytest.MonkeyPatch
) -> None:
    systemd, _bus, _events = adapter
    monkeypatch.setattr(systemd_module, "SYSTEMD_AWAY_TIMEOUT", 0.05)
    calls = use_call_bus(systemd, Answers(KillUnit=DbusNoReplyError(NO_REPLY)))
    with pytest.raises(SystemdError, match=f"^killing svm-a.scope: {NO_REPLY}$"):
        systemd._loop.run_until_complete(systemd.kill_unit("svm-a.scope", 15))
    assert members(calls) == ["KillUnit"]


def test_start_whose_reply_was_lost_is_done_when_the_scope_holds_the_process(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    pid = os.getpid()
    answers = Answers(
        StartTransientUnit=DbusNoReplyError(NO_REPLY),
        Subscribe=ALREADY_SUBSCRIBED,
        **scope_answers("active", [pid]),
    )
    answers.before_answer = lambda message: (
        systemd_returns(systemd, bus) if message.member == "StartTransientUnit" else None
    )
    calls = use_call_bus(systemd, answers)
    systemd._loop.run_until_complete(systemd.start_scope("svm-a.scope", [pid], PROPERTIES))
    assert members(calls).count("StartTransientUnit") == 1  # not created twice
    assert "GetUnitProcesses" in members(calls)
    assert systemd._job_watches == {}


def test_start_whose_reply_was_lost_creates_the_scope_it_did_not_create(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    unit = "svm-a.scope"

    def job_done(message: FakeCallMessage) -> str:
        removed = [9, JOB.encode(), unit.encode(), b"done"]
        bus.queue.append(manager_signal(b"JobRemoved", removed, sender=NEW_OWNER))
        systemd._loop.call_soon(systemd._drain)
        return JOB

    answers = Answers(
        StartTransientUnit=[DbusNoReplyError(NO_REPLY), job_done],
        GetUnit=NOT_LOADED,
        Subscribe=ALREADY_SUBSCRIBED,
    )
    answers.before_answer = lambda message: (
        systemd_returns(systemd, bus) if members(calls) == ["StartTransientUnit"] else None
    )
    calls = use_call_bus(systemd, answers)
    systemd._loop.run_until_complete(systemd.start_scope(unit, [os.getpid()], PROPERTIES))
    assert members(calls).count("StartTransientUnit") == 2


def test_start_whose_reply_was_lost_refuses_a_scope_without_the_process(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    answers = Answers(
        StartTransientUnit=DbusNoReplyError(NO_REPLY),
        Subscribe=ALREADY_SUBSCRIBED,
        **scope_answers("active", [1]),
    )
    answers.before_answer = lambda message: (
        systemd_returns(systemd, bus) if message.member == "StartTransientUnit" else None
    )
    calls = use_call_bus(systemd, answers)
    with pytest.raises(UnitExists, match="does not hold our process"):
        systemd._loop.run_until_complete(
            systemd.start_scope("svm-a.scope", [os.getpid()], PROPERTIES)
        )
    assert "StopUnit" not in members(calls)  # someone else's scope is left alone


def test_stop_whose_reply_was_lost_is_done_when_the_unit_is_gone(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    answers = Answers(
        StopUnit=DbusNoReplyError(NO_REPLY), GetUnit=NOT_LOADED, Subscribe=ALREADY_SUBSCRIBED
    )
    answers.before_answer = lambda message: (
        systemd_returns(systemd, bus) if message.member == "StopUnit" else None
    )
    calls = use_call_bus(systemd, answers)
    assert systemd._loop.run_until_complete(systemd.stop_unit("svm-a.scope")) == "done"
    assert members(calls).count("StopUnit") == 1


def test_job_in_progress_is_settled_from_the_unit_state_once_systemd_is_back(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    """A JobRemoved that the re-execution swallowed must not leave the stop waiting forever."""
    systemd, bus, _events = adapter
    answers = Answers(StopUnit=JOB, Subscribe=ALREADY_SUBSCRIBED, **scope_answers("inactive", []))
    calls = use_call_bus(systemd, answers)

    async def scenario() -> str:
        stopping = asyncio.ensure_future(systemd.stop_unit("svm-a.scope"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert systemd._job_watches["svm-a.scope"][0].path == JOB
        systemd_returns(systemd, bus)
        return await stopping

    assert systemd._loop.run_until_complete(scenario()) == "done"
    assert members(calls)[:3] == ["StopUnit", "Subscribe", "GetUnit"]


def test_subscribe_is_renewed_when_systemd_came_back_without_it(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    systemd, bus, _events = adapter
    calls = use_call_bus(systemd, Answers(Subscribe=None))

    async def scenario() -> None:
        systemd_returns(systemd, bus)
        await asyncio.gather(*systemd._tasks)

    systemd._loop.run_until_complete(scenario())
    assert members(calls) == ["Subscribe"]


def test_scopes_unloaded_by_a_reload_are_reported_removed_only_if_they_stay_gone(
    adapter: tuple[Systemd, FakeBus, list[UnitEvent]],
) -> None:
    """systemd sends UnitRemoved for every unit while it reloads or re-executes."""
    systemd, bus, events = adapter

    loaded = [("svm-kept.scope", "", "loaded", "active", "running", "", "/unit/x", 0, "", "/")]
    calls = use_call_bus(systemd, Answers(ListUnitsByPatterns=[loaded]))

    async def scenario() -> None:
        bus.queue += [
            manager_signal(b"Reloading", True),
            *(
                manager_signal(b"UnitRemoved", [unit.encode(), unit_path(unit)])
                for unit in ("svm-kept.scope", "svm-gone.scope")
            ),
        ]
        systemd._drain()
        assert [event.kind for event in events] == ["reloading"]
        bus.queue.append(manager_signal(b"Reloading", False))
        systemd._drain()
        await asyncio.gather(*systemd._tasks)

    systemd._loop.run_until_complete(scenario())
    assert [(event.kind, event.unit) for event in events] == [
        ("reloading", ""),
        ("reloading", ""),
        ("removed", "svm-gone.scope"),
    ]
    (listing,) = calls.calls  # one listing for all the scopes, however many
    assert listing.args == ([], ["svm-*.scope"])


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
                _spawn_trampoline.UNCONFINED,
                "/bin/touch",
                str(marker),
            ],
            pass_fds=(child_end.fileno(),),
        )
    parent_end.close()  # as if the daemon died
    assert child.wait(timeout=10) == _spawn_trampoline.EXIT_ABANDONED
    assert not marker.exists()
