"""[resources] to scope properties and back (the encodings checked on systemd 252)."""

from __future__ import annotations

import random

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
