"""NICs on real QEMU under the installed service: taps on a bridge, made and removed by the
daemon after every kind of exit, administrators' taps, and user-mode port forwards.

Every network device lives in a network namespace this module makes, and the service is moved
into it with a drop-in `NetworkNamespacePath=` (SANDBOX.md), so the daemon, its netlink calls
and every QEMU it starts see only that namespace. The sandbox container shares the host's
network namespace and has no CAP_NET_ADMIN (systemd-nspawn keeps it only with
--private-network), so the namespace is made owned by a new user namespace (`unshare --user
--map-root-user --net`, then `ip netns attach`): root, which owns that user namespace, has every
capability over it and over nothing else (the kernel's owner rule), so bridges and taps can be
made there and cannot be made on the host's interfaces even by mistake. The tests also check
that no tap appears in the sandbox's own namespace. The namespace has no link to the outside
(only lo, the test's bridge and taps, no route): no traffic leaves it, user-mode NAT included.

The in-process Supervisor of lifecycle_env was not used: setns() moves only the calling thread,
while the daemon's netlink calls run in worker threads (and QEMU is forked from whichever thread
spawns it), so moving the test process would be neither complete nor safe for the rest of the
run. The namespace is removed after the module, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisord_vm.network import tap_alias, tap_name
from tests.guests import write_acpi_guest
from tests.integration.test_service import (
    ACPI_IMAGE,
    CHECKOUT,
    IMAGES,
    definition,
    gdbus,
    sh,
    status,
    svm,
    wait_for,
)

pytestmark = pytest.mark.integration

NETNS = f"svmtest-{secrets.token_hex(4)}"
NETNS_PATH = Path("/run/netns") / NETNS
DROPIN = Path("/run/systemd/system/supervisord-vm.service.d/50-svmtest-netns.conf")
BRIDGE = "svmtbr0"
SERVICE = "supervisord-vm.service"


def in_ns(*argv: str) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net={NETNS_PATH}", "--", *argv)


def link(name: str) -> dict[str, object] | None:
    """The interface `name` in the test's namespace as `ip -d -j link` shows it, or None."""
    result = sh("ip", "-n", NETNS, "-d", "-j", "link", "show", "dev", name)
    if result.returncode != 0:
        return None
    links: list[dict[str, object]] = json.loads(result.stdout)
    return links[0] if links else None


def host_has_link(name: str) -> bool:
    """Whether `name` exists in the sandbox's own namespace (the host's): it never may."""
    return sh("ip", "link", "show", "dev", name).returncode == 0


def netns_inode(path: str) -> int:
    return Path(path).stat().st_ino


def taps_held(pid: int) -> set[str]:
    """The tap devices process `pid` holds open (tun fdinfo names its interface)."""
    names: set[str] = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in fdinfo.read_text().splitlines():
                if line.startswith("iff:"):
                    names.add(line.split(":", 1)[1].strip())
    return names


def qemu_pid(name: str) -> int:
    info = status(name)
    assert info["state"] == "running", info
    pid = info["pid"]
    assert isinstance(pid, int) and pid > 0
    return pid


def qemu_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def make_netns() -> None:
    """/run/netns/NETNS: a network namespace owned by a new user namespace (see the top)."""
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "sleep", "600"])
    try:
        own = netns_inode("/proc/self/ns/net")
        wait_for(
            lambda: netns_inode(f"/proc/{holder.pid}/ns/net") != own,
            what="unshare to make the namespace",
        )
        sh("ip", "netns", "attach", NETNS, str(holder.pid), check=True)
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="module")
def netns_service() -> Iterator[None]:
    """The installed service, moved into a network namespace with a bridge in it."""
    try:
        make_netns()
        assert in_ns("ip", "link", "set", "lo", "up").returncode == 0
        made = sh("ip", "-n", NETNS, "link", "add", BRIDGE, "type", "bridge")
        assert made.returncode == 0, made.stderr
        installed = subprocess.run(
            ["make", "-C", str(CHECKOUT), "install"],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
        IMAGES.mkdir(parents=True, exist_ok=True)
        write_acpi_guest(ACPI_IMAGE)
        DROPIN.parent.mkdir(parents=True, exist_ok=True)
        DROPIN.write_text(f"[Service]\nNetworkNamespacePath={NETNS_PATH}\n")
        sh("systemctl", "daemon-reload", check=True)
        sh("systemctl", "restart", SERVICE, check=True)
        main_pid = int(sh("systemctl", "show", "-P", "MainPID", SERVICE).stdout)
        assert netns_inode(f"/proc/{main_pid}/ns/net") == netns_inode(str(NETNS_PATH))
        yield
    finally:
        installed_svmctl = Path("/usr/local/bin/svmctl").exists()
        listed = svm("--json", "list", "--all") if installed_svmctl else None
        machines = json.loads(listed.stdout) if listed and listed.returncode == 0 else []
        for machine in machines:
            if str(machine["name"]).startswith("nt"):
                svm("destroy", "--force", str(machine["name"]))
                svm("undefine", str(machine["name"]))
        sh("systemctl", "stop", SERVICE)
        DROPIN.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")
        if NETNS_PATH.exists():
            sh("ip", "netns", "delete", NETNS)


@pytest.fixture
def vm(netns_service: None) -> Iterator[Callable[..., str]]:
    """Define a VM with the given [[nics]] tables; destroyed and undefined afterwards."""
    names: list[str] = []

    def make(name: str, nics: str, **extra: str) -> str:
        path = Path(f"/run/{name}.toml")
        path.write_text(definition(name, ACPI_IMAGE, 5, **extra) + nics)
        result = svm("define", str(path))
        path.unlink()
        assert result.returncode == 0, result.stderr
        names.append(name)
        return name

    yield make
    for name in names:
        svm("destroy", "--force", name)
        svm("undefine", name)


def bridge_nic(bridge: str = BRIDGE, model: str = "virtio-net-pci") -> str:
    return f'[[nics]]\ntype = "bridge"\nbridge = "{bridge}"\nmodel = "{model}"\n'


def assert_tap_on_bridge(vm_name: str, index: int = 0) -> str:
    tap = tap_name(vm_name, index)
    info = link(tap)
    assert info is not None, f"no tap {tap}"
    assert info.get("master") == BRIDGE
    assert info.get("ifalias") == tap_alias(vm_name, index)
    assert "UP" in str(info.get("flags"))
    linkinfo = info.get("linkinfo")
    assert isinstance(linkinfo, dict) and linkinfo.get("info_kind") == "tun"
    assert not host_has_link(tap)
    return tap


# --- bridge NICs ---------------------------------------------------------------------------------


def test_bridge_nic_tap_is_on_the_bridge_held_by_qemu_and_gone_after_destroy(
    vm: Callable[..., str],
) -> None:
    name = vm("nt_br", bridge_nic() + bridge_nic(model="e1000"))
    assert svm("start", name).returncode == 0
    pid = qemu_pid(name)
    assert netns_inode(f"/proc/{pid}/ns/net") == netns_inode(str(NETNS_PATH))
    taps = {assert_tap_on_bridge(name, 0), assert_tap_on_bridge(name, 1)}
    assert taps_held(pid) == taps  # handed over as descriptors, in QEMU since the exec
    assert qemu_uid(pid) != 0  # confined: QEMU could not have opened a tap by itself
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-netdev" in argv and not any(b"ifname=" in arg for arg in argv)

    assert svm("destroy", name).returncode == 0
    assert [tap for tap in taps if link(tap) is not None] == []  # removed before destroy returned
    assert link(BRIDGE) is not None


def power_off(name: str) -> bool:
    """Press the power button (again: a press before the guest armed it is lost)."""
    svm("shutdown", name, "--timeout", "2")
    return status(name)["state"] == "shutoff"


@pytest.mark.parametrize("reason", ["crashed", "stopped-externally", "shutdown", "destroyed"])
def test_tap_is_gone_after_every_kind_of_exit(vm: Callable[..., str], reason: str) -> None:
    name = vm(f"nt_{reason.replace('-', '_')}", bridge_nic())
    assert svm("start", name).returncode == 0
    tap = assert_tap_on_bridge(name)
    if reason == "crashed":
        os.kill(qemu_pid(name), signal.SIGKILL)
    elif reason == "stopped-externally":
        sh("systemctl", "stop", f"svm-{name}.scope", check=True)
    elif reason == "shutdown":
        wait_for(lambda: power_off(name), timeout=60, what="the guest to power off")
    else:
        assert svm("destroy", "--force", name).returncode == 0
    wait_for(lambda: status(name)["state"] == "shutoff", what="the exit to be settled")
    assert status(name)["reason"] == reason
    assert link(tap) is None


@pytest.mark.parametrize(
    ("qemu", "reason"),
    [
        ("/bin/false", "failed to start"),
        (str(IMAGES / "nt-not-a-program"), "is not an executable program"),
    ],
)
def test_a_start_that_fails_after_the_taps_were_made_leaves_no_tap(
    vm: Callable[..., str], qemu: str, reason: str
) -> None:
    """QEMU that exits at once (the run's cleanup), or cannot be executed (launch's own undo)."""
    fake = IMAGES / "nt-not-a-program"
    fake.write_bytes(b"\x00garbage, not an ELF file\n")
    fake.chmod(0o755)
    try:
        name = vm(f"nt_fail{len(qemu)}", bridge_nic(), qemu=f'"{qemu}"')
        result = svm("start", name)
        assert result.returncode == 1
        assert reason in result.stderr
        assert link(tap_name(name, 0)) is None
        assert status(name)["reason"] == "failed"
    finally:
        fake.unlink()


def test_tap_survives_a_daemon_restart_and_goes_with_the_next_destroy(
    vm: Callable[..., str],
) -> None:
    name = vm("nt-restart-with-a-long-name", bridge_nic())  # a hashed tap name
    assert svm("start", name).returncode == 0
    pid = qemu_pid(name)
    tap = assert_tap_on_bridge(name)
    assert not tap.startswith("svm-")
    sh("systemctl", "restart", SERVICE, check=True)
    assert qemu_pid(name) == pid
    assert assert_tap_on_bridge(name) == tap
    assert tap in taps_held(pid)
    assert svm("destroy", name).returncode == 0
    assert link(tap) is None


def test_tap_of_a_vm_that_ended_while_the_daemon_was_down_is_removed_at_its_start(
    vm: Callable[..., str],
) -> None:
    name = vm("nt_lost", bridge_nic())
    assert svm("start", name).returncode == 0
    pid = qemu_pid(name)
    tap = assert_tap_on_bridge(name)
    sh("systemctl", "stop", SERVICE, check=True)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), what="QEMU to be reaped")
        assert link(tap) is not None  # persistent: only the daemon's cleanup removes it
    finally:
        sh("systemctl", "start", SERVICE, check=True)  # READY=1 only after settling
    assert status(name)["state"] == "shutoff"
    assert link(tap) is None


def test_missing_bridge_is_a_clear_start_error_that_leaves_nothing(
    vm: Callable[..., str],
) -> None:
    name = vm("nt_nobr", bridge_nic() + bridge_nic(bridge="svmtnobr0"))
    result = svm("start", name)
    assert result.returncode == 1
    assert "NIC 1: bridge svmtnobr0 does not exist" in result.stderr
    called = gdbus("Start", name)  # the error's name on the bus, as a management tool sees it
    assert "org.supervisordvm1.Error.StartFailed" in called.stderr, called.stderr
    assert link(tap_name(name, 0)) is None  # NIC 0's tap, made before NIC 1 failed
    assert link(tap_name(name, 1)) is None
    info = status(name)
    assert (info["state"], info["reason"]) == ("shutoff", "failed")
    units = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", f"svm-{name}.scope")
    assert units.stdout.strip() == ""


def test_a_device_that_is_not_a_bridge_is_refused(vm: Callable[..., str]) -> None:
    plain = "svmtplain0"
    assert sh("ip", "-n", NETNS, "tuntap", "add", "mode", "tap", "name", plain).returncode == 0
    try:
        name = vm("nt_notbr", bridge_nic(bridge=plain))
        result = svm("start", name)
        assert result.returncode == 1
        assert f"NIC 0: {plain} is not a bridge (it is a tun device)" in result.stderr
        assert link(tap_name(name, 0)) is None
    finally:
        sh("ip", "-n", NETNS, "link", "delete", plain)


def test_an_interface_under_the_taps_name_made_by_someone_else_is_refused_and_kept(
    vm: Callable[..., str],
) -> None:
    name = vm("nt_taken", bridge_nic())
    foreign = tap_name(name, 0)
    assert sh("ip", "-n", NETNS, "link", "add", foreign, "type", "bridge").returncode == 0
    try:
        result = svm("start", name)
        assert result.returncode == 1
        assert f"a network interface named {foreign} already exists" in result.stderr
        info = link(foreign)
        assert info is not None and info.get("ifalias") is None  # untouched
        linkinfo = info.get("linkinfo")
        assert isinstance(linkinfo, dict) and linkinfo.get("info_kind") == "bridge"
    finally:
        sh("ip", "-n", NETNS, "link", "delete", foreign)


def test_a_tap_left_by_an_earlier_run_of_the_same_vm_is_replaced(vm: Callable[..., str]) -> None:
    name = vm("nt_stale", bridge_nic())
    stale = tap_name(name, 0)
    assert sh("ip", "-n", NETNS, "tuntap", "add", "mode", "tap", "name", stale).returncode == 0
    marked = sh("ip", "-n", NETNS, "link", "set", stale, "alias", tap_alias(name, 0))
    assert marked.returncode == 0, marked.stderr
    assert svm("start", name).returncode == 0
    assert assert_tap_on_bridge(name) == stale
    assert stale in taps_held(qemu_pid(name))
    assert svm("destroy", name).returncode == 0
    assert link(stale) is None


# --- administrators' taps ------------------------------------------------------------------------


def test_administrators_tap_is_handed_to_qemu_and_kept_after_destroy(
    vm: Callable[..., str],
) -> None:
    tap = "svmtadm0"
    assert sh("ip", "-n", NETNS, "tuntap", "add", "mode", "tap", "name", tap).returncode == 0
    try:
        name = vm("nt_admtap", f'[[nics]]\ntype = "tap"\ntap = "{tap}"\nmodel = "e1000"\n')
        assert svm("start", name).returncode == 0
        assert tap in taps_held(qemu_pid(name))
        assert svm("destroy", name).returncode == 0
        assert link(tap) is not None  # the administrator's: never removed by the daemon
    finally:
        sh("ip", "-n", NETNS, "link", "delete", tap)


def test_missing_administrators_tap_is_a_clear_start_error(vm: Callable[..., str]) -> None:
    name = vm("nt_notap", '[[nics]]\ntype = "tap"\ntap = "svmtnotap0"\n')
    result = svm("start", name)
    assert result.returncode == 1
    assert "NIC 0: tap device svmtnotap0 does not exist" in result.stderr
    assert link("svmtnotap0") is None  # opening it did not make one


# --- user-mode networking ------------------------------------------------------------------------


def test_user_nic_forward_listens_on_loopback_inside_the_namespace(
    vm: Callable[..., str],
) -> None:
    port = 47222
    name = vm("nt_user", f'[[nics]]\ntype = "user"\nforward = ["tcp::{port}-:22"]\n')
    assert svm("start", name).returncode == 0
    pid = qemu_pid(name)
    # /proc/PID/net/tcp lists the sockets of PID's network namespace: QEMU's listener.
    listening = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
            listening.add(fields[1])
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, the parser's default
    assert f"00000000:{port:04X}" not in listening
    connect = in_ns(
        "python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 10)"
    )
    assert connect.returncode == 0, connect.stderr
    assert svm("destroy", name).returncode == 0
