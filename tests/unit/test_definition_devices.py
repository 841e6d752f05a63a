"""The hardware and resource keys of a definition: accepted forms, normalization, and a clear
error for each kind of bad value (pure, no disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisord_vm.definition import Definition, definition_to_toml, nic_mac, parse_definition
from supervisord_vm.definition_devices import Nic, Resources
from supervisord_vm.errors import InvalidDefinition


def parse(body: str) -> Definition:
    return parse_definition('name = "web1"\n' + body, "web1.toml")


def error_of(body: str) -> str:
    with pytest.raises(InvalidDefinition) as info:
        parse(body)
    return str(info.value)


def test_a_web_server_definition_parses_and_round_trips() -> None:
    defn = parse(
        'cpu = "host"\nfirmware = "uefi"\ndisplay = "vnc"\nvnc_listen = "127.0.0.1"\n'
        'boot = ["cdrom", "disk"]\nautostart_after = ["db"]\nautostart_delay = 5\n'
        '[resources]\ncpu_weight = 200\ncpu_quota = 150\nmemory_high = "1G"\n'
        'memory_max = 2147483648\nio_weight = 50\ntasks_max = 512\nallowed_cpus = "0-1,3"\n'
        'slice = "tenant-a.slice"\n'
        '[[disks]]\npath = "/img/web1.qcow2"\nformat = "qcow2"\n'
        '[[disks]]\npath = "/img/install.iso"\nmedia = "cdrom"\n'
        '[[nics]]\ntype = "bridge"\nbridge = "br0"\n'
        '[[nics]]\ntype = "user"\nforward = ["tcp::2222-:22", "udp:0.0.0.0:5353-10.0.2.15:53"]\n'
        '[[nics]]\ntype = "tap"\ntap = "tap7"\nmodel = "e1000"\nmac = "52:54:00:AB:CD:EF"\n'
    )
    assert defn.cpu == "host" and defn.firmware == "uefi" and defn.display == "vnc"
    assert defn.vnc_listen == "127.0.0.1" and defn.boot == ("cdrom", "disk")
    assert defn.autostart_after == ("db",) and defn.autostart_delay == 5
    assert defn.resources == Resources(
        cpu_weight=200,
        cpu_quota=150,
        memory_high=1 << 30,
        memory_max=2 << 30,
        io_weight=50,
        tasks_max=512,
        allowed_cpus="0-1,3",
        slice="tenant-a.slice",
    )
    assert defn.disks[1].media == "cdrom" and defn.disks[1].readonly
    assert defn.nics == (
        Nic("bridge", bridge="br0"),
        Nic("user", forward=("tcp:127.0.0.1:2222-:22", "udp:0.0.0.0:5353-10.0.2.15:53")),
        Nic("tap", tap="tap7", model="e1000", mac="52:54:00:ab:cd:ef"),
    )
    assert parse_definition(definition_to_toml(defn)) == defn


def test_defaults_leave_qemu_and_systemd_their_own() -> None:
    defn = parse("")
    assert defn.cpu is None and defn.firmware == "bios" and defn.display == "none"
    assert defn.vnc_listen is None and defn.boot == () and defn.nics == ()
    assert defn.resources.is_default() and "[resources]" not in definition_to_toml(defn)


def test_derived_mac_is_stable_unicast_local_and_differs_by_name_and_index() -> None:
    nic = Nic("user")
    first = nic_mac("web1", 0, nic)
    assert first == nic_mac("web1", 0, nic)
    assert first.startswith("52:54:00:") and len(first) == 17
    assert first != nic_mac("web1", 1, nic) and first != nic_mac("web2", 0, nic)
    assert nic_mac("web1", 0, Nic("user", mac="52:54:00:00:00:01")) == "52:54:00:00:00:01"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('firmware = "efi"', "field 'firmware': must be one of bios, uefi"),
        ('display = "spice"', "field 'display': must be one of none, vnc"),
        ('vnc_listen = "127.0.0.1"', 'only valid with display = "vnc"'),
        ('display = "vnc"\nvnc_listen = "localhost"', "must be an IP address"),
        ('cpu = "host; rm -rf /"', "field 'cpu': must be a QEMU CPU model"),
        ('cpu = ""', "field 'cpu'"),
        ('boot = ["floppy"]', "field 'boot[0]': must be one of disk, cdrom, network"),
        ('boot = ["disk", "disk"]', "lists 'disk' twice"),
        ('autostart_after = ["web1"]', "cannot autostart after itself"),
        ('autostart_after = ["db", "db"]', "names 'db' twice"),
        ('autostart_after = ["a b"]', "is not a valid VM name"),
        ("autostart_delay = -1", "field 'autostart_delay': must be an integer from 0 to 3600"),
        ('[[disks]]\npath = "/x.iso"\nmedia = "tape"', "disks[0].media': must be one of"),
        (
            '[[disks]]\npath = "/x.iso"\nmedia = "cdrom"\nreadonly = false',
            "a cdrom is always read-only",
        ),
        ('[[nics]]\nmodel = "e1000"', "nics[0].type': is required"),
        ('[[nics]]\ntype = "vde"', "must be one of user, bridge, tap"),
        ('[[nics]]\ntype = "bridge"', 'nics[0].bridge\': is required with type = "bridge"'),
        ('[[nics]]\ntype = "user"\nbridge = "br0"', 'only valid with type = "bridge"'),
        ('[[nics]]\ntype = "tap"\ntap = "a-name-too-long-0"', "network interface name"),
        ('[[nics]]\ntype = "tap"\ntap = "tap/0"', "network interface name"),
        ('[[nics]]\ntype = "bridge"\nbridge = "br0"\nforward = []', "only valid with type"),
        ('[[nics]]\ntype = "user"\nforward = ["2222:22"]', "must be a port forward"),
        ('[[nics]]\ntype = "user"\nforward = ["tcp::70000-:22"]', "is not from 1 to 65535"),
        ('[[nics]]\ntype = "user"\nforward = ["tcp:::1:22-:22"]', "must be a port forward"),
        ('[[nics]]\ntype = "user"\nforward = [":22-:22", "tcp::22-:23"]', "forwarded twice"),
        ('[[nics]]\ntype = "user"\nmac = "01:00:5e:00:00:01"', "must be a unicast MAC"),
        ('[[nics]]\ntype = "user"\nmac = "52:54:00:12:34"', "must be a MAC address"),
        ('[[nics]]\ntype = "user"\nmodel = "e1000,romfile="', "network device model"),
        ('[[nics]]\ntype = "user"\nvlan = 3', "nics[0].vlan': is not a known key"),
        (
            '[[nics]]\ntype = "tap"\ntap = "t0"\n[[nics]]\ntype = "tap"\ntap = "t0"',
            "tap device t0 is given to two NICs",
        ),
        ("[resources]\ncpu_weight = 0", "resources.cpu_weight': must be an integer from 1"),
        ("[resources]\nio_weight = 10001", "resources.io_weight'"),
        ("[resources]\ncpu_quota = 0", "resources.cpu_quota'"),
        ('[resources]\nmemory_max = "lots"', "resources.memory_max': must be a size"),
        ("[resources]\nmemory_high = 1024", "from 1048576 bytes"),
        ("[resources]\ntasks_max = true", "resources.tasks_max'"),
        ('[resources]\nallowed_cpus = "3-1"', "not a range of CPUs"),
        ('[resources]\nallowed_cpus = "all"', "must be a list of CPU numbers"),
        ('[resources]\nslice = "tenant"', "must be a slice unit name"),
        ('[resources]\nslice = "a--b.slice"', "must be a slice unit name"),
        ("[resources]\ncpu_weigth = 5", "did you mean 'resources.cpu_weight'"),
        ('resources = "big"', "field 'resources': must be a table"),
    ],
)
def test_bad_values_are_named_definition_errors(body: str, expected: str) -> None:
    assert expected in error_of(body)


def test_sizes_take_systemd_suffixes_in_powers_of_1024() -> None:
    defn = parse('[resources]\nmemory_high = "512M"\nmemory_max = "2G"')
    assert defn.resources.memory_high == 512 << 20 and defn.resources.memory_max == 2 << 30


def test_many_nics_are_bounded() -> None:
    body = '[[nics]]\ntype = "user"\n' * 33
    assert "at most 32 NICs" in error_of(body)


def test_the_shipped_examples_and_the_readmes_web_server_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    for example in sorted((root / "examples").glob("*.toml")):
        parse_definition(example.read_text(encoding="utf-8"), example.name)
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Example: a web server VM", 1)[1]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    defn = parse_definition(text, "README")
    assert defn.firmware == "uefi" and defn.display == "vnc" and defn.nics[0].type == "bridge"
