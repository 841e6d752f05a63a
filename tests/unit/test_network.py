"""network.py's pure parts: tap names, the alias that marks a tap as ours, QEMU's NIC arguments,
and the bounded worker-thread call that undoes work finished after its caller gave up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supervisord_vm import network
from supervisord_vm.definition import Definition, parse_definition
from supervisord_vm.definition_devices import NICS_MAX, Nic, nic_mac
from supervisord_vm.network import (
    IFNAME_MAX,
    OpenedNics,
    nic_argv,
    tap_alias,
    tap_name,
)
from supervisord_vm.qemu import LaunchResources, build_argv

CHECKOUT = Path(__file__).resolve().parents[2]


# --- tap names -----------------------------------------------------------------------------------


def test_short_vm_name_gives_a_readable_tap_name() -> None:
    assert tap_name("web1", 0) == "svm-web1-0"
    assert tap_name("db_2.lan", 31) == "svm-db_2.lan-31"


def test_long_vm_name_gives_a_hashed_name_that_never_changes() -> None:
    # Pinned: a daemon upgraded while VMs run must find the taps the old one made.
    assert tap_name("a-very-long-vm-name.example", 0) == "svmdjjv35pzqd-0"
    assert tap_name("a-very-long-vm-name.example", 11) == "svmdjjv35pzq-11"


def test_tap_names_fit_an_interface_name_for_every_name_length_and_index() -> None:
    for length in range(1, 65):
        for index in range(NICS_MAX):
            name = tap_name("v" * length, index)
            assert 0 < len(name.encode()) <= IFNAME_MAX
            assert "/" not in name and ":" not in name and " " not in name


def test_hashed_names_never_look_like_readable_ones() -> None:
    """A readable name starts with 'svm-', a hashed one never does: the two forms cannot meet."""
    assert tap_name("x" * 40, 0).startswith("svm")
    assert not tap_name("x" * 40, 0).startswith("svm-")


def test_two_vms_never_share_a_tap_name() -> None:
    vm_names = ["web1", "web1-0", "web1-1", "web", "eb1", "w", "w-1", "w-10", "w-1-0"]
    vm_names += [f"long-name-number-{i}" for i in range(50)]
    vm_names += ["x" * n for n in range(1, 65)]
    seen: dict[str, tuple[str, int]] = {}
    for vm in vm_names:
        for index in range(NICS_MAX):
            name = tap_name(vm, index)
            assert seen.setdefault(name, (vm, index)) == (vm, index), name


def test_a_vm_recognizes_only_its_own_tap_names() -> None:
    assert network._is_tap_of("web1", "svm-web1-0")
    assert network._is_tap_of("web1", "svm-web1-31")
    assert not network._is_tap_of("web1", "svm-web1-0-0")  # VM web1-0's
    assert not network._is_tap_of("web1-0", "svm-web1-0")  # VM web1's NIC 0
    assert not network._is_tap_of("web1", "svm-web10-0")
    assert not network._is_tap_of("web1", "svm-web1-00")
    assert not network._is_tap_of("web1", "eth0")
    long = "a-very-long-vm-name.example"
    assert network._is_tap_of(long, "svmdjjv35pzq-11")
    assert not network._is_tap_of("another-very-long-vm-name", "svmdjjv35pzq-11")


def test_alias_names_the_vm_and_the_nic() -> None:
    assert tap_alias("web1", 2) == "supervisord-vm VM web1 NIC 2"


# --- QEMU's arguments ----------------------------------------------------------------------------


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(0, len(argv), 2)]


def test_no_nics_no_arguments() -> None:
    assert nic_argv(Definition(name="a"), {}) == []


def test_user_nic_without_forwards() -> None:
    defn = Definition(name="a", nics=(Nic(type="user"),))
    mac = nic_mac("a", 0, defn.nics[0])
    assert _pairs(nic_argv(defn, {})) == [
        ("-netdev", "user,id=net0"),
        ("-device", f"virtio-net-pci,netdev=net0,mac={mac},id=nic0"),
    ]


def test_user_nic_forwards_are_hostfwd_rules_bound_to_loopback_by_default() -> None:
    defn = parse_definition(
        'name = "a"\n[[nics]]\ntype = "user"\nforward = ["tcp::2222-:22", "udp:0.0.0.0:53-:53"]\n'
    )
    netdev = nic_argv(defn, {})[1]
    assert netdev == ("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:53-:53")


def test_bridge_and_tap_nics_take_the_descriptor_the_daemon_opened() -> None:
    defn = Definition(
        name="a",
        nics=(Nic(type="bridge", bridge="br0"), Nic(type="tap", tap="tap7", model="e1000")),
    )
    argv = nic_argv(defn, {0: 41, 1: 42})
    assert argv[1] == "tap,id=net0,fd=41"
    assert argv[3].startswith("virtio-net-pci,netdev=net0,mac=52:54:00:")
    assert argv[5] == "tap,id=net1,fd=42"
    assert argv[7].startswith("e1000,netdev=net1,mac=52:54:00:")


def test_a_tap_nic_without_a_descriptor_is_a_programming_error() -> None:
    defn = Definition(name="a", nics=(Nic(type="bridge", bridge="br0"),))
    with pytest.raises(ValueError, match="no open tap"):
        nic_argv(defn, {})


def test_explicit_mac_is_used_and_derived_macs_are_stable_and_distinct() -> None:
    explicit = Nic(type="user", mac="02:00:00:00:00:01")
    defn = Definition(name="a", nics=(explicit, Nic(type="user"), Nic(type="user")))
    devices = [arg for kind, arg in _pairs(nic_argv(defn, {})) if kind == "-device"]
    macs = [dict(p.split("=") for p in d.split(",")[1:])["mac"] for d in devices]
    assert macs[0] == "02:00:00:00:00:01"
    assert macs[1:] == [nic_mac("a", 1, Nic(type="user")), nic_mac("a", 2, Nic(type="user"))]
    assert len(set(macs)) == 3
    assert nic_argv(defn, {}) == nic_argv(defn, {})  # derived, never random


def test_nics_keep_guest_order_and_each_device_names_its_own_netdev() -> None:
    defn = Definition(
        name="a",
        nics=(
            Nic(type="tap", tap="t0", model="rtl8139"),
            Nic(type="user"),
            Nic(type="bridge", bridge="br0", model="e1000e"),
        ),
    )
    pairs = _pairs(nic_argv(defn, {0: 10, 2: 12}))
    assert [kind for kind, _ in pairs] == ["-netdev", "-device"] * 3
    assert [value.split(",")[0] for _, value in pairs] == [
        "tap",
        "rtl8139",
        "user",
        "virtio-net-pci",
        "tap",
        "e1000e",
    ]
    for i in range(3):
        assert f"id=net{i}" in pairs[2 * i][1]
        assert f"netdev=net{i}," in pairs[2 * i + 1][1]


def test_virtio_takes_the_vnet_header_and_emulated_cards_do_not() -> None:
    assert network.uses_vnet_hdr(Nic(type="bridge", bridge="b", model="virtio-net-pci"))
    assert not network.uses_vnet_hdr(Nic(type="bridge", bridge="b", model="e1000"))


def test_only_bridge_and_tap_nics_need_host_devices() -> None:
    assert not network.needs_host_devices(Definition(name="a", nics=(Nic(type="user"),)))
    assert network.needs_host_devices(Definition(name="a", nics=(Nic(type="tap", tap="t"),)))


def test_only_bridge_nics_make_taps_to_remove_after_the_exit() -> None:
    assert network.makes_taps(Definition(name="a", nics=(Nic(type="bridge", bridge="b"),)))
    assert not network.makes_taps(Definition(name="a", nics=(Nic(type="tap", tap="t"),)))
    assert not network.makes_taps(Definition(name="a", nics=(Nic(type="user"),)))


def test_build_argv_puts_the_nics_before_extra_args() -> None:
    defn = Definition(name="a", nics=(Nic(type="bridge", bridge="br0"),), extra_args=("-X",))
    resources = LaunchResources(qmp_socket=Path("/run/a.qmp"), nic_fds={0: 9})
    argv = build_argv(defn, Path("/run/a.qmp"), resources)
    assert argv[-5:] == [
        "-netdev",
        "tap,id=net0,fd=9",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={nic_mac('a', 0, defn.nics[0])},id=nic0",
        "-X",
    ]


# --- the daemon's side ---------------------------------------------------------------------------


def test_closing_the_daemons_copies_twice_closes_each_fd_once() -> None:
    read_end, write_end = os.pipe()
    opened = OpenedNics(fds={0: read_end, 1: write_end})
    opened.close_fds()
    opened.close_fds()
    assert opened.fds == {}


async def test_work_finished_after_its_caller_gave_up_is_undone() -> None:
    release = threading.Event()
    undone: list[str] = []
    finished = threading.Event()

    def work() -> str:
        release.wait(30)
        return "tap"

    def undo(result: str) -> None:
        undone.append(result)
        finished.set()

    with pytest.raises(network.NetworkError, match="did not finish within"):
        await network._bounded(work, 0.01, "setting up", late=undo)
    release.set()
    assert await asyncio.to_thread(finished.wait, 30)
    assert undone == ["tap"]


async def test_removing_taps_of_a_vm_without_any_loads_no_netlink_library() -> None:
    """The daemon pays pyroute2's import (~0.4 s) only when there is a tap to look at."""
    code = (
        "import asyncio, sys\n"
        "from supervisord_vm import network\n"
        "assert asyncio.run(network.remove_vm_taps('no-such-vm-here')) == []\n"
        "assert 'pyroute2' not in sys.modules\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
