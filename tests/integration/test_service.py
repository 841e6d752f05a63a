"""The daemon as users meet it: installed with `make install`, run by systemd as the real
supervisord-vm.service, driven only through svmctl, busctl/gdbus and systemctl."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.guests import write_acpi_guest, write_deaf_guest

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
DEFS = Path("/etc/supervisord-vm/vms")
IMAGES = Path("/var/lib/supervisord-vm/images")
ACPI_IMAGE = IMAGES / "st_acpi.img"
DEAF_IMAGE = IMAGES / "st_deaf.img"
USER = "svmtest"
MEMBER = "svmadmin"
BUS = "org.supervisordvm1"
MANAGER = "/org/supervisordvm1"
IFACE = "org.supervisordvm1.Manager"


def sh(*argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def gdbus(method: str, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """A raw Manager call, the way a management tool would make it (no svmctl in between)."""
    argv = ["gdbus", "call", "--system", "--dest", BUS, "--object-path", MANAGER]
    argv += ["--method", f"{IFACE}.{method}", "--", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return sh(*argv)


def svm(
    *args: str, user: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = ["/usr/local/bin/svmctl", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return sh(*argv, timeout=timeout)


def status(name: str) -> dict[str, object]:
    result = svm("--json", "status", name)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def definition(name: str, image: Path, stop_timeout: int = 5, **extra: str) -> str:
    lines = [
        f'name = "{name}"',
        "memory = 16",
        'accel = "tcg"',
        f"stop_timeout = {stop_timeout}",
        *(f"{key} = {value}" for key, value in extra.items()),
        "[[disks]]",
        f'path = "{image}"',
        'format = "raw"',
        "snapshot = true",
    ]
    return "\n".join(lines) + "\n"


def define(name: str, image: Path = ACPI_IMAGE, stop_timeout: int = 5) -> None:
    path = Path(f"/run/{name}.toml")
    path.write_text(definition(name, image, stop_timeout))
    result = svm("define", str(path))
    assert result.returncode == 0, result.stderr


def main_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "supervisord-vm.service").stdout)


def scope_active(name: str) -> bool:
    return sh("systemctl", "is-active", "--quiet", f"svm-{name}.scope").returncode == 0


@pytest.fixture(scope="module")
def service() -> Iterator[None]:
    """Install with `make install` inside the sandbox and start the real service."""
    result = subprocess.run(
        ["make", "-C", str(CHECKOUT), "install"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    IMAGES.mkdir(parents=True, exist_ok=True)
    write_acpi_guest(ACPI_IMAGE)
    write_deaf_guest(DEAF_IMAGE)
    for user, groups in ((USER, []), (MEMBER, ["supervisord-vm"])):
        if sh("id", user).returncode != 0:
            extra = ["-G", ",".join(groups)] if groups else []
            sh("useradd", "--no-create-home", *extra, user, check=True)
    sh("systemctl", "start", "supervisord-vm.service", check=True)
    yield
    listed = svm("--json", "list", "--all")
    for machine in json.loads(listed.stdout) if listed.returncode == 0 else []:
        if machine["state"] != "shutoff":
            svm("destroy", "--force", str(machine["name"]))
        svm("undefine", str(machine["name"]))
    sh("systemctl", "stop", "supervisord-vm-guests.service", "supervisord-vm.service")


@pytest.fixture
def vm(service: None) -> Iterator[Callable[..., str]]:
    """Define VMs for one test; destroy and undefine them afterwards."""
    names: list[str] = []

    def make(name: str, image: Path = ACPI_IMAGE, stop_timeout: int = 5, start: bool = True) -> str:
        define(name, image, stop_timeout)
        names.append(name)
        if start:
            result = svm("start", name)
            assert result.returncode == 0, result.stderr
        return name

    yield make
    for name in names:
        svm("destroy", "--force", name)
        svm("undefine", name)


# --- svmctl commands and exit codes ------------------------------------------------------------


def test_every_command_has_help(service: None) -> None:
    commands = [
        "list",
        "status",
        "define",
        "undefine",
        "create",
        "start",
        "shutdown",
        "destroy",
        "kill",
        "reboot",
        "reset",
        "pause",
        "resume",
        "events",
        "log",
        "reload",
        "shutdown-all",
        "console",
        "display",
    ]
    for command in commands:
        result = svm(command, "--help")
        assert result.returncode == 0, command
        assert "usage: svmctl" in result.stdout
    assert svm("frobnicate").returncode == 2
    assert svm("start").returncode == 2  # missing NAME


def test_lifecycle_commands_and_json(vm: Callable[..., str]) -> None:
    name = vm("st_life")
    info = status(name)
    for key in (
        "name",
        "state",
        "reason",
        "unit",
        "pid",
        "transient",
        "autostart",
        "restart",
        "stop_timeout",
    ):
        assert key in info
    assert info["state"] == "running" and info["unit"] == "svm-st_life.scope"
    assert isinstance(info["pid"], int) and info["pid"] > 0
    listed = json.loads(svm("--json", "list").stdout)
    assert [m["name"] for m in listed if m["name"] == name] == [name]
    assert "st_life" in svm("list").stdout.splitlines()[1]

    assert svm("start", name).returncode == 1  # AlreadyRunning: a failure, not a special code
    assert svm("pause", name).returncode == 0
    assert status(name)["state"] == "paused"
    assert svm("resume", name).returncode == 0
    assert status(name)["state"] == "running"
    assert svm("reboot", name).returncode == 0  # the ACPI guest powers off; QEMU resets it
    assert status(name)["state"] == "running"
    assert svm("reset", name).returncode == 0
    assert svm("log", name).returncode == 0
    assert svm("--json", "events", name).returncode == 0
    events = [json.loads(line) for line in svm("--json", "events", name).stdout.splitlines()]
    assert {"time", "name", "event", "state", "reason"} <= set(events[0])
    assert [e["event"] for e in events][:3] == ["defined", "starting", "started"]

    # Just reset, the guest may still be booting: a press before it armed its power button is
    # lost, as on real hardware (the VM then stays running). Press until it powers off.
    wait_for(
        lambda: svm("shutdown", name, "--timeout", "3").returncode == 0,
        timeout=60,
        what="the ACPI guest to power off",
    )
    assert status(name)["reason"] == "shutdown"
    assert svm("start", name).returncode == 0
    assert svm("kill", name, "--signal", "SIGKILL").returncode == 0
    wait_for(lambda: status(name)["state"] == "shutoff", what="killed VM to be shut off")
    assert status(name)["reason"] == "destroyed"
    assert svm("start", name).returncode == 0
    assert svm("destroy", name).returncode == 0
    assert status(name)["state"] == "shutoff" and status(name)["reason"] == "destroyed"
    assert svm("undefine", name).returncode == 0
    assert svm("status", name).returncode == 4


def test_create_transient(service: None) -> None:
    path = Path("/run/st-trans.toml")
    path.write_text(definition("st_trans", ACPI_IMAGE))
    result = svm("--json", "create", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["transient"] is True
    assert svm("destroy", "st_trans").returncode == 0
    wait_for(lambda: svm("status", "st_trans").returncode == 4, what="transient VM forgotten")


def test_no_such_machine_is_4(service: None) -> None:
    for command in ("status", "start", "destroy", "shutdown", "pause", "undefine", "log"):
        result = svm(command, "st_nope")
        assert result.returncode == 4, (command, result.stderr)
        assert "st_nope" in result.stderr


def test_shutdown_timeout_is_5_and_graceful_busy_is_3(vm: Callable[..., str]) -> None:
    name = vm("st_deaf", DEAF_IMAGE)
    started = time.monotonic()
    result = svm("shutdown", name, "--timeout", "1")
    assert result.returncode == 5, result.stderr
    assert time.monotonic() - started < 10
    assert status(name)["state"] == "running"
    pid = int(str(status(name)["pid"]))
    os.kill(pid, signal.SIGSTOP)  # QEMU cannot act on SIGTERM while stopped (SANDBOX.md)
    try:
        result = svm("destroy", name, "--graceful", "--timeout", "1")
        assert result.returncode == 3, result.stderr
        assert status(name)["state"] != "shutoff"
        assert Path(f"/proc/{pid}").exists()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: status(name)["state"] == "shutoff", what="the pending SIGTERM to end QEMU")
    assert svm("start", name).returncode == 0
    assert svm("destroy", name, "--force").returncode == 0
    assert status(name)["state"] == "shutoff"


def test_errors_are_named_never_python(service: None) -> None:
    calls = [
        ("Destroy", "ssd", "x", "bogus", "0"),
        ("Kill", "ss", "x", "NOPE"),
        ("Define", "s", "name = 3"),
        ("Start", "s", "st_nope"),
        ("Shutdown", "sdb", "st_nope", "-1", "false"),
    ]
    for method, *args in calls:
        result = sh("busctl", "call", BUS, MANAGER, IFACE, method, *args)
        assert result.returncode != 0
        assert "org.python" not in result.stderr
    result = sh("busctl", "call", BUS, MANAGER, IFACE, "Define", "s", "name = 3")
    assert "invalid" in result.stderr.lower() or "name" in result.stderr
    reply = sh("busctl", "--json=short", "call", BUS, MANAGER, IFACE, "Start", "s", "st_nope")
    assert reply.returncode != 0


def test_error_names_on_the_bus(service: None) -> None:
    """gdbus prints the D-Bus error name: each failure has its own."""

    def error_of(method: str, *args: str) -> str:
        result = gdbus(method, *args)
        assert result.returncode != 0
        return result.stderr

    assert "org.supervisordvm1.Error.NoSuchMachine" in error_of("Start", "st_nope")
    assert "org.supervisordvm1.Error.InvalidDefinition" in error_of("Define", "name = 3")
    assert "org.supervisordvm1.Error.InvalidArgument" in error_of("Kill", "x", "NOPE")


# --- authorization -----------------------------------------------------------------------------


def test_non_root_may_read_but_not_change(vm: Callable[..., str]) -> None:
    name = vm("st_auth", start=False)
    assert svm("list", "--all", user=USER).returncode == 0
    assert svm("--json", "status", name, user=USER).returncode == 0
    assert svm("events", user=USER).returncode == 0
    for args in (
        ("start", name),
        ("destroy", name),
        ("undefine", name),
        ("log", name),
        ("reload",),
    ):
        result = svm(*args, user=USER)
        assert result.returncode == 6, (args, result.stderr)
        assert "svmctl: permission denied: " in result.stderr
        assert "needs root or membership in group 'supervisord-vm'" in result.stderr
        assert "Rejected" not in result.stderr and "matched rules" not in result.stderr
    assert svm("start", name, user=USER).stderr == (
        "svmctl: permission denied: starting VMs needs root or membership in group "
        "'supervisord-vm'\n"
    )
    assert status(name)["state"] == "shutoff"
    # A member of group supervisord-vm may change things.
    assert svm("start", name, user=MEMBER).returncode == 0
    assert svm("destroy", name, user=MEMBER).returncode == 0


def test_daemon_authorizes_even_if_the_bus_policy_allows(vm: Callable[..., str]) -> None:
    """With a permissive extra bus policy, the daemon itself still refuses non-members."""
    name = vm("st_auth2", start=False)
    policy = Path("/etc/dbus-1/system.d/zz-svmtest-open.conf")
    policy.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        '<busconfig><policy context="default">'
        '<allow send_destination="org.supervisordvm1"/></policy></busconfig>\n'
    )
    reload = (
        "busctl",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ReloadConfig",
    )
    try:
        sh(*reload, check=True)
        result = gdbus("Start", name, user=USER)
        assert "org.supervisordvm1.Error.AccessDenied" in result.stderr
        refused = svm("start", name, user=USER)
        assert refused.returncode == 6
        assert refused.stderr == (
            "svmctl: permission denied: starting VMs needs root or membership in group "
            "'supervisord-vm'\n"
        )
    finally:
        policy.unlink()
        sh(*reload, check=True)
    assert status(name)["state"] == "shutoff"
    journal = sh(
        "journalctl", "-u", "supervisord-vm", "--no-pager", "-o", "cat", "SVM_AUDIT_OPERATION=Start"
    ).stdout
    uid = pwd.getpwnam(USER).pw_uid
    assert f"uid={uid}" in journal and "denied" in journal


def test_changing_calls_are_audited(vm: Callable[..., str]) -> None:
    name = vm("st_audit")
    svm("destroy", name)
    entries = sh(
        "journalctl", "-u", "supervisord-vm", "--no-pager", "-o", "json", f"VM_NAME={name}"
    ).stdout.splitlines()
    records = [json.loads(line) for line in entries]
    audited = [r for r in records if r.get("CALLER_UID") == "0" and "VM_OPERATION" in r]
    operations = {r["VM_OPERATION"] for r in audited}
    assert {"start", "destroy"} <= {op.lower() for op in operations}
    assert all(r.get("CALLER_PID") for r in audited)


# --- D-Bus interface ---------------------------------------------------------------------------


def test_introspection_documents_the_interface(service: None) -> None:
    result = sh("busctl", "introspect", BUS, MANAGER)
    assert result.returncode == 0
    for member in (
        "ListMachines",
        "GetMachine",
        "Define",
        "Undefine",
        "Create",
        "Start",
        "Shutdown",
        "Destroy",
        "Kill",
        "Reboot",
        "Reset",
        "Pause",
        "Resume",
        "Reload",
        "MachineEvent",
    ):
        assert f".{member}" in result.stdout
    xml = sh(
        "gdbus", "introspect", "--system", "--xml", "--dest", BUS, "--object-path", MANAGER
    ).stdout
    assert 'name="then_destroy"' in xml and 'name="timeout"' in xml and 'name="mode"' in xml


def test_busctl_start_destroy_and_properties_changed(vm: Callable[..., str]) -> None:
    name = vm("st_bus", start=False)
    path = sh("busctl", "call", BUS, MANAGER, IFACE, "GetMachine", "s", name).stdout.split()[1]
    path = path.strip('"')
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--system", "--dest", BUS, "--object-path", path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # let the monitor's match rule reach the bus
        assert sh("busctl", "call", BUS, MANAGER, IFACE, "Start", "s", name).returncode == 0
        assert status(name)["state"] == "running"
        result = sh("busctl", "call", BUS, MANAGER, IFACE, "Destroy", "ssd", name, "default", "0")
        assert result.returncode == 0, result.stderr
        time.sleep(0.5)
    finally:
        monitor.terminate()
        output, _ = monitor.communicate(timeout=10)
    assert "PropertiesChanged" in output
    assert "'State': <'shutoff'>" in output
    state = sh("busctl", "get-property", BUS, path, "org.supervisordvm1.Machine", "State").stdout
    assert state.strip() == 's "shutoff"'


def test_long_operation_does_not_block_other_clients(vm: Callable[..., str]) -> None:
    name = vm("st_slow", DEAF_IMAGE)
    slow = subprocess.Popen(
        ["/usr/local/bin/svmctl", "shutdown", name, "--timeout", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        started = time.monotonic()
        assert svm("list").returncode == 0
        assert svm("status", name).returncode == 0
        assert time.monotonic() - started < 2
    finally:
        assert slow.wait(timeout=20) == 5


def test_calls_longer_than_the_bus_default_timeout(vm: Callable[..., str]) -> None:
    """sd-bus's default reply timeout is 25 s: svmctl must wait for the daemon's own answer."""
    deaf = vm("st_long1", DEAF_IMAGE)
    stuck = vm("st_long2", DEAF_IMAGE, stop_timeout=60)
    pid = int(str(status(stuck)["pid"]))
    os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending: a graceful destroy must time out
    try:
        started = time.monotonic()
        calls = [
            subprocess.Popen(["/usr/local/bin/svmctl", *args], stderr=subprocess.PIPE, text=True)
            for args in (
                ("shutdown", deaf, "--timeout", "28"),
                ("destroy", stuck, "--graceful", "--timeout", "28"),
            )
        ]
        outcomes = [(call.wait(timeout=90), call.communicate()[1]) for call in calls]
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert outcomes[0][0] == 5, outcomes  # the daemon's Timeout, not a bus NoReply
    assert outcomes[1][0] == 3, outcomes  # the daemon's Busy
    assert all("no reply" not in err.lower() for _, err in outcomes), outcomes
    assert 28 <= elapsed < 45, elapsed


def test_events_follow_shows_other_clients_operations(vm: Callable[..., str]) -> None:
    name = vm("st_follow", start=False)
    follow = subprocess.Popen(
        ["/usr/local/bin/svmctl", "--json", "events", name, "--follow"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        sh("busctl", "call", BUS, MANAGER, IFACE, "Start", "s", name, check=True)
        sh("busctl", "call", BUS, MANAGER, IFACE, "Destroy", "ssd", name, "force", "0", check=True)
        seen: list[str] = []
        assert follow.stdout is not None
        while "stopped" not in seen:
            seen.append(json.loads(follow.stdout.readline())["event"])
        assert "started" in seen
    finally:
        follow.terminate()
        follow.wait(timeout=10)


# --- the daemon process ------------------------------------------------------------------------


def test_restart_and_kill9_leave_vms_running_and_reattach(vm: Callable[..., str]) -> None:
    name = vm("st_keep")
    pid = status(name)["pid"]
    sh("systemctl", "restart", "supervisord-vm.service", check=True)
    # Type=notify: restart returns after READY=1, which comes after reattach.
    assert status(name)["pid"] == pid and status(name)["state"] == "running"
    daemon = main_pid()
    os.kill(daemon, signal.SIGKILL)
    wait_for(
        lambda: (
            main_pid() not in (0, daemon)
            and sh("systemctl", "is-active", "supervisord-vm.service").stdout.strip() == "active"
        ),
        timeout=30,
        what="systemd to restart the killed daemon",
    )
    assert status(name)["pid"] == pid and status(name)["state"] == "running"
    assert Path(f"/proc/{pid}").exists()
    # ... and the reattached VM is controllable.
    assert svm("shutdown", name, "--timeout", "20").returncode == 0
    assert status(name)["reason"] == "shutdown"


def test_stopping_the_daemon_leaves_vms_running(vm: Callable[..., str]) -> None:
    name = vm("st_stop")
    pid = int(str(status(name)["pid"]))
    sh("systemctl", "stop", "supervisord-vm.service", check=True)
    try:
        assert scope_active(name)
        assert Path(f"/proc/{pid}").exists()
        result = svm("list")
        # D-Bus activation starts the daemon again on demand.
        assert result.returncode == 0, result.stderr
    finally:
        sh("systemctl", "start", "supervisord-vm.service", check=True)
    assert status(name)["pid"] == pid


def test_second_instance_refuses(service: None) -> None:
    result = sh("/usr/local/bin/supervisord-vm", timeout=30)
    assert result.returncode != 0
    assert "already running" in result.stderr


def test_reload_picks_up_dropped_definition(service: None) -> None:
    path = DEFS / "st_drop.toml"
    path.write_text(definition("st_drop", ACPI_IMAGE))
    try:
        sh("systemctl", "reload", "supervisord-vm.service", check=True)
        assert "st_drop" in svm("list", "--all").stdout
        assert status("st_drop")["state"] == "shutoff"
        path.unlink()
        result = svm("--json", "reload")
        assert result.returncode == 0
        assert json.loads(result.stdout)["removed"] == ["st_drop"]
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sh("systemctl", "reload", "supervisord-vm.service")


def test_service_status_and_notify(service: None) -> None:
    show = sh("systemctl", "show", "supervisord-vm.service", "-P", "StatusText").stdout.strip()
    assert "running" in show and "defined" in show
    assert sh(
        "systemctl", "show", "-P", "WatchdogUSec", "supervisord-vm.service"
    ).stdout.strip() not in ("", "0", "infinity")

    for unit in ("supervisord-vm.service", "supervisord-vm-guests.service"):
        docs = sh("systemctl", "show", "-P", "Documentation", unit).stdout.split()
        assert docs, unit
        for url in docs:  # no dead references: every one is an installed file
            assert url.startswith("file://") and Path(url.removeprefix("file://")).is_file(), url


class NotifyListener:
    """The receiving end of NOTIFY_SOCKET, as systemd has it: a unix datagram socket."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="svmt-", dir="/run"))
        self.path = self.directory / "notify"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.messages: list[str] = []

    def collect(self, seconds: float) -> list[str]:
        """Every message that arrives within SECONDS."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.socket.settimeout(left)
            try:
                got.append(self.socket.recv(4096).decode())
            except TimeoutError:
                break
        self.messages += got
        return got

    def until(self, field: str, timeout: float = 20) -> list[str]:
        """Messages up to and including the first with FIELD (e.g. READY=1) as one of its lines."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while not got or field not in got[-1].splitlines():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field} within {timeout} s; got {got}")
            self.socket.settimeout(left)
            try:
                got.append(self.socket.recv(4096).decode())
            except TimeoutError:
                continue
        self.messages += got
        return got

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def protocol(messages: list[str]) -> list[str]:
    """The lines that matter for ordering: everything but the watchdog pings and STATUS."""
    return [
        line
        for message in messages
        for line in message.splitlines()
        if line != "WATCHDOG=1" and not line.startswith("STATUS=")
    ]


STATUS_LINE = re.compile(r"^STATUS=(\d+) running, (\d+) defined$")


def test_sd_notify_protocol(vm: Callable[..., str]) -> None:
    """The installed daemon run directly against a NOTIFY_SOCKET this test reads (no systemd
    in between, the service stopped so the bus name is free): READY=1 only after reattach,
    STATUS=, WATCHDOG=1, RELOADING=1/READY=1 around SIGHUP and Reload, STOPPING=1 on SIGTERM."""
    name = vm("st_notify")
    pid = int(str(status(name)["pid"]))
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")]  # QEMU never inherits it
    sh("systemctl", "stop", "supervisord-vm.service", check=True)
    listener = NotifyListener()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NOTIFY_", "WATCHDOG_", "JOURNAL_STREAM", "LISTEN_"))
    }
    env.update(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="400000")
    # QEMU stopped: the daemon's QMP reconnect cannot complete, so neither can reattach.
    os.kill(pid, signal.SIGSTOP)
    daemon = subprocess.Popen(
        ["/bin/sh", "-c", "WATCHDOG_PID=$$ exec /usr/local/bin/supervisord-vm"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        early = listener.collect(3)
        assert "READY=1" not in protocol(early), early
        assert "STATUS=reattaching to running VMs" in early, early
        assert early.count("WATCHDOG=1") >= 5, early  # every 0.2 s, even while reattaching
        os.kill(pid, signal.SIGCONT)
        startup = listener.until("READY=1")
        ready = startup[-1].splitlines()
        statuses = [line for line in ready if line.startswith("STATUS=")]
        assert len(statuses) == 1, ready
        counts = STATUS_LINE.match(statuses[0])
        assert counts is not None, statuses
        assert int(counts[1]) >= 1  # the VM counted as running when READY went out ...
        assert status(name)["pid"] == pid and status(name)["state"] == "running"  # ... and is

        daemon.send_signal(signal.SIGHUP)
        assert protocol(listener.until("READY=1")) == ["RELOADING=1", "READY=1"]
        assert svm("reload").returncode == 0  # the Reload method
        assert protocol(listener.until("READY=1")) == ["RELOADING=1", "READY=1"]

        assert listener.collect(1).count("WATCHDOG=1") >= 3

        daemon.send_signal(signal.SIGTERM)
        stopping = listener.until("STOPPING=1")
        assert protocol(stopping) == ["STOPPING=1"]
        assert daemon.wait(timeout=20) == 0
        assert Path(f"/proc/{pid}").exists() and scope_active(name)  # the VM keeps running
        phases = (
            "reattaching to running VMs",
            "reloading definitions",
            "stopping (VMs keep running)",
        )
        for message in listener.messages:
            for line in message.splitlines():
                if line.startswith("STATUS=") and line[len("STATUS=") :] not in phases:
                    assert STATUS_LINE.match(line), line
    finally:
        os.kill(pid, signal.SIGCONT)
        if daemon.poll() is None:
            daemon.kill()
        _, errors = daemon.communicate(timeout=20)
        listener.close()
        sh("systemctl", "start", "supervisord-vm.service", check=True)
    assert status(name)["pid"] == pid and status(name)["state"] == "running", errors


# --- host shutdown -------------------------------------------------------------------------------


def test_guests_service_shuts_down_all(vm: Callable[..., str]) -> None:
    acpi = [vm("st_g1"), vm("st_g2")]
    deaf = vm("st_g3", DEAF_IMAGE, stop_timeout=3)
    for name in (*acpi, deaf):
        unit = f"svm-{name}.scope"
        before = sh("systemctl", "show", "-P", "Before", unit).stdout
        after = sh("systemctl", "show", "-P", "After", unit).stdout
        assert "supervisord-vm-guests.service" in before
        assert "supervisord-vm.service" in after
    defaults = Path("/etc/default/supervisord-vm")
    saved = defaults.read_text()
    defaults.write_text(saved + "\nSVM_SHUTDOWN_TIMEOUT=3\nSVM_SHUTDOWN_PARALLEL=2\n")
    try:
        sh("systemctl", "start", "supervisord-vm-guests.service", check=True)
        started = time.monotonic()
        sh("systemctl", "stop", "supervisord-vm-guests.service", check=True, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        defaults.write_text(saved)
    for name in acpi:
        assert status(name)["state"] == "shutoff" and status(name)["reason"] == "shutdown"
    assert status(deaf)["state"] == "shutoff" and status(deaf)["reason"] == "destroyed"
    # the deaf VM: 3 s timeout, then a destroy that QEMU answers at once on SIGTERM
    assert 3 <= elapsed < 15, elapsed


def test_daemon_not_running_message(service: None) -> None:
    sh("systemctl", "stop", "supervisord-vm.service", check=True)
    sh("systemctl", "mask", "--runtime", "supervisord-vm.service", check=True)
    try:
        result = svm("list")
        assert result.returncode == 1
        assert "daemon not running: systemctl start supervisord-vm" in result.stderr
    finally:
        sh("systemctl", "unmask", "--runtime", "supervisord-vm.service", check=True)
        sh("systemctl", "start", "supervisord-vm.service", check=True)
