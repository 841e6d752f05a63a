"""Registration with machined, against a recorded fake of the calls (the real machined is in
tests/integration/test_machined_journal.py): what is called when, and what is said once."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from sdbus.sd_bus_internals import SdBusUnmappedMessageError

from supervisord_vm import machined
from supervisord_vm.machined import Machined, machine_uuid, name_problem

PATH = "/org/freedesktop/machine1/machine/web"


def bus_error(name: str, message: str = "failed") -> SdBusUnmappedMessageError:
    return SdBusUnmappedMessageError(name, message)


class FakeMachined:
    """Answers machined's methods from a table of machines: name -> (leader, unit, service)."""

    def __init__(self) -> None:
        self.machines: dict[str, tuple[int, str, str]] = {}
        self.calls: list[str] = []
        self.unavailable = ""
        self.refuse_register = ""
        self.hang = False

    async def call_service(
        self, destination: str, path: str, interface: str, method: str, signature: str, *args: Any
    ) -> Any:
        assert destination == "org.freedesktop.machine1"
        self.calls.append(method)
        if self.hang:
            await asyncio.sleep(3600)
        if self.unavailable:
            raise bus_error(self.unavailable, "The name is not activatable")
        if method == "GetMachineByPID":
            for name, (leader, _unit, _service) in self.machines.items():
                if leader == args[0]:
                    return f"/org/freedesktop/machine1/machine/{name}"
            raise bus_error("org.freedesktop.machine1.NoMachineForPID", "no machine")
        if method == "GetMachine":
            if args[0] not in self.machines:
                raise bus_error("org.freedesktop.machine1.NoSuchMachine", "no such machine")
            return f"/org/freedesktop/machine1/machine/{args[0]}"
        if method == "Get":
            name = path.rsplit("/", 1)[1]
            leader, unit, service = self.machines[name]
            value = {"Name": name, "Leader": leader, "Unit": unit, "Service": service}[args[1]]
            return ("u" if isinstance(value, int) else "s", value)
        if method == "RegisterMachine":
            name, ident, service, klass, leader, root = args
            assert (len(ident), service, klass, root) == (16, "supervisord-vm", "vm", "")
            if self.refuse_register:
                raise bus_error("org.freedesktop.DBus.Error.InvalidArgs", self.refuse_register)
            if name in self.machines:
                raise bus_error("org.freedesktop.machine1.MachineExists", "exists")
            self.machines[name] = (leader, f"svm-{name}.scope", service)
            return f"/org/freedesktop/machine1/machine/{name}"
        if method == "UnregisterMachine":
            del self.machines[args[0]]
            return None
        raise AssertionError(f"unexpected call {method}")


def registry(fake: FakeMachined) -> Machined:
    return Machined(fake)  # type: ignore[arg-type]  # the one method Machined calls


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name", ["web", "web1", "a-b", "db.example", "A1", "x" * 64, "1.2-3.c"])
def test_names_machined_takes(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("web_1", "contains '_'"),
        ("x" * 65, "longer than 64"),
        ("a..b", "empty part"),
        ("a.", "empty part"),
        ("a-", "begins or ends with '-'"),
        ("a.-b", "begins or ends with '-'"),
        ("", "is empty"),
        ("wéb", "other than letters"),
    ],
)
def test_names_machined_refuses_say_why(name: str, problem: str) -> None:
    assert problem in (name_problem(name) or "")


def test_machine_uuid_is_stable_and_per_name() -> None:
    assert machine_uuid("web") == machine_uuid("web")
    assert machine_uuid("web") != machine_uuid("db")
    assert machine_uuid("web").version == 5
    assert isinstance(machine_uuid("web"), uuid.UUID)


async def test_a_new_vm_is_registered_after_one_lookup() -> None:
    fake = FakeMachined()
    assert await registry(fake).register("web", "svm-web.scope", 42)
    assert fake.calls == ["GetMachineByPID", "RegisterMachine"]
    assert fake.machines["web"] == (42, "svm-web.scope", "supervisord-vm")


async def test_a_vm_machined_knows_already_is_not_registered_twice() -> None:
    """A leader already registered must never be registered again: on systemd 252 that makes
    machined stop the leader's scope."""
    fake = FakeMachined()
    fake.machines["web"] = (42, "svm-web.scope", "supervisord-vm")
    assert await registry(fake).register("web", "svm-web.scope", 42)
    assert "RegisterMachine" not in fake.calls


async def test_a_leader_known_under_another_name_is_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeMachined()
    fake.machines["other"] = (42, "svm-web.scope", "somebody")
    assert not await registry(fake).register("web", "svm-web.scope", 42)
    assert "RegisterMachine" not in fake.calls and "UnregisterMachine" not in fake.calls
    assert any("as machine 'other'" in text for text in said(caplog))


async def test_an_earlier_runs_registration_is_replaced() -> None:
    fake = FakeMachined()
    fake.machines["web"] = (7, "svm-web.scope", "supervisord-vm")  # its leader is long gone
    assert await registry(fake).register("web", "svm-web.scope", 42)
    assert fake.calls[-2:] == ["UnregisterMachine", "RegisterMachine"]
    assert fake.machines["web"][0] == 42


async def test_someone_elses_machine_of_that_name_stays(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMachined()
    fake.machines["web"] = (7, "machine-web.scope", "nspawn")
    assert not await registry(fake).register("web", "svm-web.scope", 42)
    assert fake.machines["web"] == (7, "machine-web.scope", "nspawn")
    assert any("already has a machine named 'web'" in text for text in said(caplog))


async def test_a_refused_name_is_said_once_per_vm_and_never_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeMachined()
    machines = registry(fake)
    for pid in (42, 43, 44):
        assert not await machines.register("web_1", "svm-web_1.scope", pid)
    assert not await machines.register("db_1", "svm-db_1.scope", 45)
    assert fake.calls == []
    texts = said(caplog)
    assert len(texts) == 2
    assert texts[0] == (
        "VM web_1 is not registered with systemd-machined: its name contains '_', which "
        "machine names (host-name rules) do not allow"
    )


async def test_no_machined_is_said_once_per_daemon_and_the_vm_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeMachined()
    fake.unavailable = "org.freedesktop.DBus.Error.ServiceUnknown"
    machines = registry(fake)
    assert not await machines.register("web", "svm-web.scope", 42)
    assert not await machines.register("db", "svm-db.scope", 43)
    texts = said(caplog)
    assert len(texts) == 1 and "not available on this host" in texts[0]
    fake.unavailable = ""  # installed meanwhile: the next start is registered
    assert await machines.register("db", "svm-db.scope", 44)


async def test_machineds_own_refusal_is_said_with_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeMachined()
    fake.refuse_register = "Invalid machine name"
    assert not await registry(fake).register("web", "svm-web.scope", 42)
    assert said(caplog) == [
        "VM web is not registered with systemd-machined: machined refused it: Invalid machine name"
    ]


async def test_a_machined_that_does_not_answer_costs_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(machined, "REGISTER_TIMEOUT", 0.05)
    fake = FakeMachined()
    fake.hang = True
    machines = registry(fake)
    assert not await machines.register("web", "svm-web.scope", 42)
    assert any("did not answer within" in text for text in said(caplog))
    # The next VMs (a reattach of hundreds) do not each wait for it: not asked for a while.
    calls = len(fake.calls)
    fake.hang = False
    assert not await machines.register("db", "svm-db.scope", 43)
    assert len(fake.calls) == calls
    monkeypatch.setattr(machines, "_paused_until", 0.0)  # the pause is over
    assert await machines.register("db", "svm-db.scope", 43)
