"""The serial console as users meet it: the installed service, a real QEMU whose guest writes to
COM1 and echoes what it reads there, driven only through svmctl (through pipes), gdbus and
systemctl."""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisord_vm.api import MACHINE_INTERFACE, machine_path
from tests.guests import write_serial_guest
from tests.integration.test_service import (
    IMAGES,
    MEMBER,
    USER,
    gdbus,
    main_pid,
    service,
    sh,
    status,
    svm,
    vm,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["service", "vm"]  # test_service's fixtures: the installed service, VMs per test

SVMCTL = "/usr/local/bin/svmctl"
SERIAL_IMAGE = IMAGES / "st_serial.img"
BANNER = b"svm serial guest: hello from COM1"
RUNTIME = Path("/run/supervisord-vm")
CONSOLE_LOGS = Path("/var/log/supervisord-vm/console")
WAIT = 30.0
PERMISSIVE_POLICY = Path("/etc/dbus-1/system.d/zz-svmtest-console-open.conf")
RELOAD_BUS = (
    "busctl",
    "call",
    "org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus",
    "ReloadConfig",
)


@pytest.fixture(scope="module")
def serial_image(service: None) -> Path:
    write_serial_guest(SERIAL_IMAGE, BANNER + b"\r\n")
    return SERIAL_IMAGE


@pytest.fixture
def serial_vm(vm: Callable[..., str], serial_image: Path) -> Callable[[str], str]:
    def make(name: str) -> str:
        return vm(name, serial_image)

    return make


class Attached:
    """`svmctl console NAME` with its standard input and output as pipes."""

    def __init__(self, name: str, *args: str, user: str | None = None) -> None:
        argv = [SVMCTL, "console", *args, name]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.output = b""

    def expect(self, marker: bytes, timeout: float = WAIT) -> bytes:
        """Read the console's output until `marker` has come (or fail after `timeout`)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} did not come; got {self.output[-2000:]!r}"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"svmctl's output ended before {marker!r}: {self.finish()}"
                self.output += chunk
        return self.output

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def finish(self, timeout: float = WAIT) -> tuple[int, str]:
        """Wait for svmctl to exit: its exit code and standard error."""
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.output += out
        return self.process.returncode, err.decode(errors="replace")

    def detach(self) -> tuple[int, str]:
        self.send(b"\x1d")
        return self.finish()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def attach() -> Iterator[Callable[..., Attached]]:
    sessions: list[Attached] = []

    def make(name: str, *args: str, user: str | None = None) -> Attached:
        session = Attached(name, *args, user=user)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.kill()


def console_log(name: str, *args: str) -> bytes:
    result = subprocess.run(
        [SVMCTL, "console", "--log", *args, name], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_logged(name: str, marker: bytes, after: int = 0) -> bytes:
    """The console log once `marker` is in it (at least `after` + 1 times): written behind."""
    logged = b""

    def present() -> bool:
        nonlocal logged
        logged = console_log(name)
        return logged.count(marker) > after

    wait_for(present, timeout=WAIT, what=f"{marker!r} in the console log of {name}")
    return logged


def machine_call(name: str, method: str) -> subprocess.CompletedProcess[str]:
    """A call on the VM's own object, the way a management tool would make it."""
    argv = ["gdbus", "call", "--system", "--dest", "org.supervisordvm1"]
    argv += ["--object-path", machine_path(name), "--method", f"{MACHINE_INTERFACE}.{method}"]
    return sh(*argv)


def daemon_fds() -> int:
    return len(list(Path(f"/proc/{main_pid()}/fd").iterdir()))


# --- tests ----------------------------------------------------------------------------------------


def test_the_guests_output_reaches_svmctl_console_and_its_log(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con")
    pid = int(str(status(name)["pid"]))
    # QEMU got a listening socket (an fd), not a path it would have to open itself.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    chardev = next(arg for arg in cmdline if arg.startswith(b"socket,id=serial0,"))
    fd = int(chardev.split(b"fd=")[1].split(b",")[0])
    assert Path(f"/proc/{pid}/fd/{fd}").readlink().name.startswith("socket:")
    # ... which is why the console works with QEMU unprivileged (the default).
    uids = next(
        line
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert uids.split()[1:] != ["0", "0", "0", "0"], uids
    assert (RUNTIME / f"{name}.console").is_socket()
    # What it wrote while nobody was attached is in the log (the daemon reads from the start).
    logged = wait_logged(name, BANNER)
    assert b"VM st_con started" in logged
    session = attach(name)
    # A reset reboots the guest: its banner again, live this time.
    assert svm("reset", name).returncode == 0
    session.expect(BANNER)
    code, err = session.detach()
    assert code == 0, err
    assert err.startswith(f"Connected to {name}; escape character is ^]\n")
    assert session.output.count(BANNER) == 1  # a client sees what comes after it attached
    assert wait_logged(name, BANNER, after=1).count(BANNER) == 2
    assert console_log(name, "--lines", "1") == BANNER + b"\r\n"
    as_json = json.loads(
        subprocess.run(
            [SVMCTL, "--json", "console", "--log", name], capture_output=True, check=True
        ).stdout
    )
    assert as_json["name"] == name and BANNER.decode() in as_json["log"]


def test_input_typed_into_the_console_reaches_the_guest(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_in")
    wait_logged(name, BANNER)  # booted: its echo loop runs
    session = attach(name)
    session.send(b"hello, guest\r")
    session.expect(b"HELLO, GUEST\r")  # the guest's echo, upper-cased: it read the input
    code, err = session.detach()
    assert code == 0, err
    # The input typed after Ctrl-] never reached the guest; another client attaches at once.
    second = attach(name)
    second.send(b"again\r")
    second.expect(b"AGAIN\r")
    assert second.detach()[0] == 0


def test_the_console_survives_a_daemon_restart(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_restart")
    wait_logged(name, BANNER)
    session = attach(name)
    session.send(b"before\r")
    session.expect(b"BEFORE\r")
    sh("systemctl", "restart", "supervisord-vm.service", check=True)
    # The attached client's connection ended with the old daemon.
    code, err = session.finish()
    assert code == 0 and "the console of st_con_restart was closed" in err
    # The new daemon reconnected: the log still has the output, and the console works.
    logged = console_log(name)
    assert BANNER in logged and b"supervisord-vm reconnected" in logged
    again = attach(name)
    again.send(b"after\r")
    again.expect(b"AFTER\r")
    assert svm("reset", name).returncode == 0
    again.expect(BANNER)
    assert again.detach()[0] == 0
    wait_logged(name, BANNER, after=1)
    # After the VM has stopped the log is still there; its socket is not.
    assert svm("destroy", name).returncode == 0
    assert not (RUNTIME / f"{name}.console").exists()
    assert console_log(name).count(BANNER) == 2
    assert (CONSOLE_LOGS / f"{name}.log").stat().st_mode & 0o777 == 0o640


def test_one_client_at_a_time_unless_forced(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_busy")
    wait_logged(name, BANNER)
    first = attach(name)
    first.send(b"one\r")
    first.expect(b"ONE\r")
    busy = svm("console", name)
    assert busy.returncode == 3, busy.stderr
    assert "is in use by another client (uid 0, pid " in busy.stderr
    # The VM's own object (like machined's Machine.OpenPTY) opens the same console.
    on_object = machine_call(name, "OpenConsole")
    assert "org.supervisordvm1.Error.Busy" in on_object.stderr, on_object.stderr
    forced = attach(name, "--force")
    forced.send(b"two\r")
    forced.expect(b"TWO\r")
    code, err = first.finish()
    assert code == 0 and b"console taken over by uid 0" in first.output, err
    assert forced.detach()[0] == 0
    free = machine_call(name, "OpenConsole")  # gdbus takes the descriptor and exits
    assert free.returncode == 0 and "handle" in free.stdout, free.stderr


def test_attaching_leaks_no_descriptor_in_the_daemon(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_fds")
    wait_logged(name, BANNER)
    session = attach(name)
    session.send(b"x\r")
    session.expect(b"X\r")
    assert session.detach()[0] == 0
    wait_for(lambda: svm("console", name, "--log").returncode == 0, what="daemon answers")
    before = daemon_fds()
    for index in range(5):
        session = attach(name)
        session.send(f"n{index}\r".encode())
        session.expect(f"N{index}\r".encode())
        assert session.detach()[0] == 0
    # The daemon closes its end when it sees the client's EOF (asynchronously).
    wait_for(lambda: daemon_fds() <= before, what=f"daemon fds back to {before}")


def test_open_console_of_a_shut_off_vm_is_not_running(
    vm: Callable[..., str], serial_image: Path
) -> None:
    name = vm("st_con_off", serial_image, start=False)
    result = gdbus("OpenConsole", name)
    assert "org.supervisordvm1.Error.NotRunning" in result.stderr, result.stderr
    refused = svm("console", name)
    assert refused.returncode == 1 and refused.stderr == f"svmctl: VM {name} is not running\n"
    missing = svm("console", "st_con_nosuch")
    assert missing.returncode == 4, missing.stderr
    assert svm("console", "--log", "st_con_nosuch").returncode == 4
    flags = gdbus("OpenConsoleWithFlags", name, "2")
    assert "org.supervisordvm1.Error.InvalidArgument" in flags.stderr, flags.stderr


def test_non_members_are_refused(serial_vm: Callable[[str], str]) -> None:
    name = serial_vm("st_con_auth")
    for command in (("console", name), ("console", "--log", name)):
        result = svm(*command, user=USER)
        assert result.returncode == 6, (command, result.stderr)
        assert "svmctl: permission denied: " in result.stderr
    # The daemon refuses too when a permissive bus policy lets the call through.
    PERMISSIVE_POLICY.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        '<busconfig><policy context="default">'
        '<allow send_destination="org.supervisordvm1"/></policy></busconfig>\n'
    )
    try:
        sh(*RELOAD_BUS, check=True)
        calls: list[tuple[str, ...]] = [("OpenConsole", name), ("GetConsoleLog", name, "0")]
        for method, *args in calls:
            result = gdbus(method, *args, user=USER)
            assert "org.supervisordvm1.Error.AccessDenied" in result.stderr, result.stderr
    finally:
        PERMISSIVE_POLICY.unlink()
        sh(*RELOAD_BUS, check=True)


def test_a_member_may_attach(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_member")
    wait_logged(name, BANNER)
    session = attach(name, user=MEMBER)
    session.send(b"member\r")
    session.expect(b"MEMBER\r")
    assert session.detach()[0] == 0
    result = svm("console", "--log", name, user=MEMBER)
    assert result.returncode == 0 and BANNER.decode() in result.stdout
    # Attaching is audited with who did it.
    audit = sh(
        "journalctl",
        "-u",
        "supervisord-vm",
        "--no-pager",
        "-o",
        "json",
        f"VM_NAME={name}",
        "VM_OPERATION=open-console",
    ).stdout.splitlines()
    uids = {json.loads(line).get("CALLER_UID") for line in audit}
    assert str(pwd.getpwnam(MEMBER).pw_uid) in uids, audit


def test_svmctl_restores_itself_when_killed(
    serial_vm: Callable[[str], str], attach: Callable[..., Attached]
) -> None:
    name = serial_vm("st_con_term")
    wait_logged(name, BANNER)
    session = attach(name)
    session.send(b"t\r")
    session.expect(b"T\r")
    session.process.send_signal(signal.SIGTERM)
    code, _err = session.finish()
    assert code == 128 + signal.SIGTERM
    # The daemon noticed: the console is free again.
    second = attach(name)
    second.send(b"u\r")
    second.expect(b"U\r")
    assert second.detach()[0] == 0
