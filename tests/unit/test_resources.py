"""[resources] to scope properties and back (the encodings checked on systemd 252)."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from supervisord_vm import cli
from supervisord_vm.definition import parse_definition
from supervisord_vm.definition_devices import Resources
from supervisord_vm.resources import (
    UNSET,
    ResourcesInForce,
    bus_values,
    cpu_list,
    cpu_mask,
    in_force,
    resource_control,
)


def test_no_resources_set_no_properties() -> None:
    assert resource_control(Resources()) == ()


def test_every_key_maps_to_its_property_in_systemd_units() -> None:
    text = (
        'name = "r1"\n[resources]\ncpu_weight = 200\ncpu_quota = 50\nmemory_high = "256M"\n'
        'memory_max = "512M"\nio_weight = 300\ntasks_max = 64\nallowed_cpus = "0-1"\n'
        'slice = "tenant-a.slice"\n'
    )
    props = dict(
        (name, (signature, value))
        for name, signature, value in resource_control(parse_definition(text).resources)
    )
    assert props == {
        "CPUWeight": ("t", 200),
        "CPUQuotaPerSecUSec": ("t", 500_000),
        "MemoryHigh": ("t", 256 << 20),
        "MemoryMax": ("t", 512 << 20),
        "IOWeight": ("t", 300),
        "TasksMax": ("t", 64),
        "AllowedCPUs": ("ay", b"\x03"),
    }  # Slice is the launcher's: the definition's or the daemon's default


def test_cpu_mask_is_systemds_bit_order() -> None:
    assert cpu_mask("0") == b"\x01"
    assert cpu_mask("0-3,6") == b"\x4f"
    assert cpu_mask("8") == b"\x00\x01"
    assert cpu_mask("120") == bytes(15) + b"\x01"


def test_cpu_list_reads_systemds_padded_mask() -> None:
    assert cpu_list(b"\x03\x00\x00\x00\x00\x00\x00\x00") == "0-1"
    assert cpu_list(b"\x4f\x01") == "0-3,6,8"
    assert cpu_list(b"") == ""
    assert cpu_list(bytes(8)) == ""


def test_cpu_lists_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(500):
        cpus = sorted(rng.sample(range(200), rng.randrange(1, 30)))
        text = ",".join(map(str, cpus))
        back = cpu_list(cpu_mask(text))
        expanded = sorted(
            cpu
            for part in back.split(",")
            for cpu in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)
        )
        assert expanded == cpus


def test_in_force_reads_what_systemd_reports() -> None:
    found = in_force(
        {
            "Slice": "tenant-a-web.slice",
            "ControlGroup": "/tenant.slice/tenant-a.slice/tenant-a-web.slice/svm-x.scope",
            "CPUWeight": 333,
            "CPUQuotaPerSecUSec": 500_000,
            "MemoryHigh": UNSET,
            "MemoryMax": 1 << 30,
            "IOWeight": UNSET,
            "TasksMax": 4915,
            "AllowedCPUs": b"\x03" + bytes(7),
            "Other": "ignored",
        }
    )
    assert found == ResourcesInForce(
        slice="tenant-a-web.slice",
        control_group="/tenant.slice/tenant-a.slice/tenant-a-web.slice/svm-x.scope",
        cpu_weight=333,
        cpu_quota_per_sec_usec=500_000,
        memory_max=1 << 30,
        tasks_max=4915,
        allowed_cpus="0-1",
    )
    assert bus_values(found) == {
        "Slice": ("s", "tenant-a-web.slice"),
        "ControlGroup": ("s", found.control_group),
        "CPUWeight": ("t", 333),
        "CPUQuotaPerSecUSec": ("t", 500_000),
        "MemoryMax": ("t", 1 << 30),
        "TasksMax": ("t", 4915),
        "AllowedCPUs": ("s", "0-1"),
    }


def test_nothing_set_is_left_out_of_the_bus_answer() -> None:
    found = in_force({"Slice": "machine.slice", "ControlGroup": "", "AllowedCPUs": bytes(8)})
    assert bus_values(found) == {"Slice": ("s", "machine.slice"), "ControlGroup": ("s", "")}


# --- svmctl's presentation --------------------------------------------------------------------


class FakeClient:
    """Answers svmctl's two status calls as the daemon would for a running VM."""

    def __init__(self, resources: dict[str, tuple[str, object]], state: str = "running") -> None:
        self.resources = resources
        self.state = state
        self.calls: list[str] = []

    def status(self, name: str) -> dict[str, object]:
        self.calls.append("GetAll")
        return {
            "name": name,
            "state": self.state,
            "reason": "",
            "unit": f"svm-{name}.scope",
            "pid": 42 if self.state == "running" else 0,
            "transient": False,
            "autostart": False,
            "restart": "no",
            "stop_timeout": 10,
            "exit_result": "",
            "exit_status": -1,
            "exit_signal": 0,
            "exit_time": 0.0,
            "path": f"/org/supervisordvm1/machine/{name}",
        }

    def call(self, path: str, interface: str, method: str) -> dict[str, tuple[str, object]]:
        self.calls.append(method)
        return self.resources


def status_output(client: FakeClient, as_json: bool, capsys: pytest.CaptureFixture[str]) -> str:
    args = argparse.Namespace(name="web1", json=as_json)
    assert cli.cmd_status(client, args) == 0  # type: ignore[arg-type]
    return capsys.readouterr().out


def test_status_shows_the_limits_in_the_definitions_terms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = FakeClient(
        {
            "Slice": ("s", "tenant-a.slice"),
            "ControlGroup": ("s", "/tenant.slice/tenant-a.slice/svm-web1.scope"),
            "CPUWeight": ("t", 333),
            "CPUQuotaPerSecUSec": ("t", 1_250_000),
            "MemoryMax": ("t", 1 << 30),
            "MemoryHigh": ("t", 123_456_789),
            "TasksMax": ("t", 77),
            "AllowedCPUs": ("s", "0-1"),
        }
    )
    shown = json.loads(status_output(client, True, capsys))["resources"]
    assert shown == {
        "slice": "tenant-a.slice",
        "control_group": "/tenant.slice/tenant-a.slice/svm-web1.scope",
        "cpu_weight": 333,
        "cpu_quota": 125,
        "memory_high": 123_456_789,
        "memory_max": 1 << 30,
        "io_weight": None,
        "tasks_max": 77,
        "allowed_cpus": "0-1",
    }
    text = status_output(client, False, capsys)
    for line in (
        "Slice: tenant-a.slice",
        "CPU weight: 333",
        "CPU quota: 125%",
        "Memory high: 123456789",
        "Memory max: 1G",
        "IO weight: -",
        "Tasks max: 77",
        "Allowed CPUs: 0-1",
    ):
        assert line in text


def test_a_fractional_quota_set_by_an_administrator_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = FakeClient({"CPUQuotaPerSecUSec": ("t", 125_000)})  # CPUQuota=12.5%
    assert json.loads(status_output(client, True, capsys))["resources"]["cpu_quota"] == 12.5


def test_status_of_a_shut_off_vm_makes_one_call_and_shows_no_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = FakeClient({}, state="shutoff")
    assert json.loads(status_output(client, True, capsys))["resources"] is None
    assert client.calls == ["GetAll"]
    assert "CPU weight" not in status_output(client, False, capsys)
