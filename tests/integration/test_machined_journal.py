"""VMs as systemd sees them: registered with the real systemd-machined (class vm, in their own
scope, again after a daemon restart, gone after they end; what each machinectl verb does to
one), and their whole story in the real journal under their scope (the daemon's entries and
QEMU's own output, written from inside the scope), read back by svmctl log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisord_vm import qemu_journal
from supervisord_vm.machined import machine_uuid
from supervisord_vm.model import State
from tests.guests import write_debugcon_guest
from tests.integration.lifecycle_env import lifecycle_env
from tests.integration.test_service import (
    ACPI_IMAGE,
    DEAF_IMAGE,
    IMAGES,
    definition,
    service,
    sh,
    status,
    svm,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture, shared with test_service (make install + start)

DEBUGCON_IMAGE = IMAGES / "mj_debugcon.img"
GUEST_MESSAGE = "mj-guest-says-hello"
DEBUGCON_ARGS = '["-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]'
DAEMON = "supervisord-vm.service"


@pytest.fixture
def vm(service: None) -> Iterator[Callable[..., str]]:
    """Define (and start) VMs for one test; destroy and undefine them afterwards."""
    names: list[str] = []

    def make(name: str, image: Path = ACPI_IMAGE, start: bool = True, **extra: str) -> str:
        path = Path(f"/run/{name}.toml")
        path.write_text(definition(name, image, 5, **extra))
        result = svm("define", str(path))
        assert result.returncode == 0, result.stderr
        names.append(name)
        if start:
            started = svm("start", name)
            assert started.returncode == 0, started.stderr
        return name

    yield make
    for name in names:
        svm("destroy", "--force", name)
        svm("undefine", name)
        Path(f"/run/{name}.toml").unlink(missing_ok=True)


def machine(name: str) -> dict[str, str]:
    """`machinectl show NAME` as a dict ({} when machined does not know NAME)."""
    result = sh("machinectl", "show", name)
    if result.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def listed(name: str) -> bool:
    rows = sh("machinectl", "list", "--no-legend", "--no-pager").stdout.splitlines()
    return any(row.split()[:1] == [name] for row in rows)


def scope_of(pid: int) -> str:
    """The unit whose cgroup holds PID (the last path component of its cgroup)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    unified = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    return (unified or [line.split(":", 2)[2] for line in lines])[0].rsplit("/", 1)[-1]


def cursor(unit: str) -> str:
    """Where the journal of `unit` ends now (for the entries written after this point)."""
    sh("journalctl", "--sync")
    out = sh("journalctl", "-u", unit, "-n", "0", "--show-cursor", "--no-pager").stdout
    marks = [line for line in out.splitlines() if line.startswith("-- cursor: ")]
    return marks[-1].removeprefix("-- cursor: ") if marks else ""


def entries(*args: str) -> list[dict[str, object]]:
    sh("journalctl", "--sync")
    out = sh("journalctl", "-o", "json", "--all", "--no-pager", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def daemon_says(after: str, text: str) -> int:
    """How many of the daemon's own log lines since `after` contain `text`."""
    args = ["-u", DAEMON] + ([f"--after-cursor={after}"] if after else [])
    return sum(text in str(entry.get("MESSAGE", "")) for entry in entries(*args))


def shut_off(name: str) -> bool:
    return status(name)["state"] == "shutoff"


# --- machined ------------------------------------------------------------------------------------


def test_running_vm_is_a_machined_vm_in_its_own_scope(vm: Callable[..., str]) -> None:
    name = vm("mjweb")
    pid = int(str(status(name)["pid"]))
    shown = machine(name)
    assert shown["Class"] == "vm"
    assert shown["Unit"] == "svm-mjweb.scope"
    assert shown["Leader"] == str(pid)
    assert shown["Service"] == "supervisord-vm"
    assert shown["Id"] == machine_uuid(name).hex
    assert listed(name)
    # RegisterMachine took the scope QEMU runs in: no second scope was made for it.
    assert scope_of(pid) == "svm-mjweb.scope"
    scopes = sh("systemctl", "list-units", "--type=scope", "--all", "--no-legend", "--plain")
    assert [row.split()[0] for row in scopes.stdout.splitlines() if "mjweb" in row] == [
        "svm-mjweb.scope"
    ]
    assert "svm-mjweb.scope" in sh("machinectl", "status", name, "--no-pager").stdout


def test_registered_again_after_a_daemon_restart_and_gone_after_destroy(
    vm: Callable[..., str],
) -> None:
    name = vm("mjrestart")
    pid = int(str(status(name)["pid"]))
    sh("systemctl", "restart", DAEMON, check=True)
    assert machine(name).get("Leader") == str(pid)  # machined kept it; nothing registered twice
    # While the daemon is away, machined forgets the VM (UnregisterMachine leaves it running);
    # the next daemon registers it again when it reattaches.
    sh("systemctl", "stop", DAEMON, check=True)
    sh(
        "busctl", "call", "org.freedesktop.machine1", "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager", "UnregisterMachine", "s", name, check=True,
    )  # fmt: skip
    assert not listed(name) and Path(f"/proc/{pid}").exists()
    sh("systemctl", "start", DAEMON, check=True)  # Type=notify: after reattach
    shown = machine(name)
    assert (shown.get("Leader"), shown.get("Unit")) == (str(pid), "svm-mjrestart.scope")
    assert svm("destroy", name).returncode == 0
    wait_for(lambda: not listed(name), what="machined to drop the destroyed VM")
    assert svm("start", name).returncode == 0  # a new run is registered with its new leader
    assert machine(name).get("Leader") == str(status(name)["pid"])


def test_machinectl_terminate_is_stopped_externally(vm: Callable[..., str]) -> None:
    name = vm("mjterm")
    result = sh("machinectl", "terminate", name)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: shut_off(name), what="the terminated VM to be shut off")
    assert status(name)["reason"] == "stopped-externally"
    wait_for(lambda: not listed(name), what="machined to drop the terminated VM")


def test_what_machinectl_poweroff_reboot_and_kill_do_to_a_vm(vm: Callable[..., str]) -> None:
    name = vm("mjverbs", DEAF_IMAGE)
    pid = int(str(status(name)["pid"]))
    # poweroff sends SIGRTMIN+4 to the leader (machined's kill(2), done when machinectl
    # returns): QEMU, started with it ignored, runs on instead of dying like a pulled plug.
    ignored = Path(f"/proc/{pid}/status").read_text().split("SigIgn:")[1].split()[0]
    assert int(ignored, 16) & (1 << (signal.SIGRTMIN + 4 - 1))
    assert sh("machinectl", "poweroff", name).returncode == 0
    assert status(name)["state"] == "running" and status(name)["pid"] == pid
    assert Path(f"/proc/{pid}").exists()
    # reboot sends SIGINT to the leader: QEMU stops the guest and exits (host-signal).
    assert sh("machinectl", "reboot", name).returncode == 0
    wait_for(lambda: shut_off(name), what="QEMU to exit on machinectl reboot's SIGINT")
    assert status(name)["reason"] == "stopped-externally"
    # kill: SIGTERM to every process of the scope (systemd's KillUnit), a stop from outside.
    assert svm("start", name).returncode == 0
    assert sh("machinectl", "kill", name).returncode == 0
    wait_for(lambda: shut_off(name), what="QEMU to exit on machinectl kill's SIGTERM")
    assert status(name)["reason"] == "stopped-externally"
    # kill --signal=SIGKILL: QEMU dies without a word, as in a crash.
    assert svm("start", name).returncode == 0
    assert sh("machinectl", "kill", name, "--signal=SIGKILL").returncode == 0
    wait_for(lambda: shut_off(name), what="QEMU to die on SIGKILL")
    assert status(name)["reason"] == "crashed"


def test_a_name_machined_refuses_runs_unregistered_said_once(vm: Callable[..., str]) -> None:
    mark = cursor(DAEMON)
    name = vm("mj_refused")
    assert status(name)["state"] == "running"
    assert not listed(name) and machine(name) == {}
    assert svm("destroy", name).returncode == 0
    assert svm("start", name).returncode == 0
    assert status(name)["state"] == "running"
    said = "VM mj_refused is not registered with systemd-machined: its name contains '_'"
    assert daemon_says(mark, said) == 1


# --- the journal ---------------------------------------------------------------------------------


def test_unit_journal_has_the_daemons_entries_and_qemus_output(vm: Callable[..., str]) -> None:
    write_debugcon_guest(DEBUGCON_IMAGE, f"{GUEST_MESSAGE}\n".encode())
    name = vm("mjlog", DEBUGCON_IMAGE, extra_args=DEBUGCON_ARGS)
    unit = "svm-mjlog.scope"
    pid = int(str(status(name)["pid"]))

    def guest_lines() -> list[dict[str, object]]:
        return [e for e in entries("-u", unit) if e.get("MESSAGE") == GUEST_MESSAGE]

    wait_for(lambda: bool(guest_lines()), timeout=60, what="the guest's line in the journal")
    [line] = guest_lines()
    assert line["_SYSTEMD_UNIT"] == unit  # written from inside the scope, by QEMU itself
    assert line["SYSLOG_IDENTIFIER"] == "qemu-mjlog"
    assert line["_PID"] == str(pid)
    assert line["PRIORITY"] == "6"
    assert svm("destroy", name).returncode == 0
    story = [str(e.get("MESSAGE", "")) for e in entries("-u", unit)]
    assert "VM mjlog started: pid " + str(pid) in story
    assert GUEST_MESSAGE in story
    assert any(m.startswith("VM mjlog stopped (destroyed)") for m in story)
    assert "start mjlog by uid 0" in "\n".join(story)  # the audit record of the request, too
    assert story.index("VM mjlog started: pid " + str(pid)) < story.index(GUEST_MESSAGE)
    shown = svm("log", name)
    assert shown.returncode == 0, shown.stderr
    assert f"qemu-mjlog[{pid}]: {GUEST_MESSAGE}" in shown.stdout
    assert "VM mjlog started" not in shown.stdout  # QEMU's own output only
    assert svm("log", name, "--lines", "1").stdout.count("\n") == 1
    assert svm("log", "mj-never-was").returncode == 4  # no VM, no output of one


def test_failed_start_quotes_qemus_output_from_the_journal(vm: Callable[..., str]) -> None:
    name = vm("mjfail", start=False, extra_args='["-frobnicate"]')
    result = svm("start", name)
    assert result.returncode != 0
    assert "QEMU's last output" in result.stderr
    assert "-frobnicate: invalid option" in result.stderr
    assert not Path(f"/var/log/supervisord-vm/{name}.log").exists()  # no log file any more
    assert "-frobnicate" in svm("log", name).stdout


# --- without journald's stream socket, without machined (a Supervisor in this process) -----------


async def test_without_journald_qemus_output_goes_to_its_log_file(tmp_path: Path) -> None:
    async with lifecycle_env() as env:
        image = env.images / "debugcon.img"
        write_debugcon_guest(image, f"{GUEST_MESSAGE}-file\n".encode())
        # As on a host whose journald's stream socket is missing (MachineContext's switch).
        env.supervisor._ctx.journal_stream = None
        extra = f"extra_args = {DEBUGCON_ARGS}"
        await env.supervisor.define(env.toml("mjfile", extra=extra, disk=str(image)))
        await env.supervisor.start("mjfile")
        log_file = env.paths.log_dir / "mjfile.log"

        def written() -> bool:
            return f"{GUEST_MESSAGE}-file" in log_file.read_text(errors="replace")

        async with asyncio.timeout(60):
            while not written():  # noqa: ASYNC110 - the guest boots through SeaBIOS first
                await asyncio.sleep(0.1)
        text = env.supervisor.read_log("mjfile", 1 << 20).decode()
        assert f"{GUEST_MESSAGE}-file" in text
        assert not entries(f"SYSLOG_IDENTIFIER={qemu_journal.identifier('mjfile')}")
        await env.supervisor.destroy("mjfile")
        await env.supervisor.undefine("mjfile")


@pytest.fixture
def no_machined() -> Iterator[None]:
    """machined masked and stopped, as on a host without systemd-container; back afterwards."""
    sh("systemctl", "mask", "--runtime", "systemd-machined.service", check=True)
    sh("systemctl", "stop", "systemd-machined.service", check=True)
    try:
        yield
    finally:
        sh("systemctl", "unmask", "--runtime", "systemd-machined.service")
        sh("systemctl", "start", "systemd-machined.service")


async def test_without_machined_vms_run_and_the_daemon_says_so_once(
    no_machined: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="supervisord_vm.machined")
    async with lifecycle_env() as env:
        for name in ("mjnomd1", "mjnomd2"):
            await env.supervisor.define(env.toml(name))
            await env.supervisor.start(name)
            assert env.supervisor.get_machine(name).state is State.RUNNING
        said = [r.getMessage() for r in caplog.records if r.name == "supervisord_vm.machined"]
        assert len(said) == 1, said
        assert "not available on this host" in said[0]
        for name in ("mjnomd1", "mjnomd2"):
            await env.supervisor.destroy(name)
            await env.supervisor.undefine(name)
