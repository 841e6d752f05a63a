"""Faults of the host's infrastructure under the installed service: the system bus restarting,
one of the daemon's bus connections dropped, systemd re-executing or reloading — while VMs run
and while operations are in flight — a full definitions directory, and corrupt records or temp
files of interrupted writes found at start-up. Whatever happens, the daemon answers again, no VM
is lost or duplicated, every state agrees with systemd, and later exits are still recorded with
the right reason.

SVM_INFRA_REPEAT=N repeats the bus restart N times (default 3); each repetition prints how long
the daemon took to answer again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_service import (
    ACPI_IMAGE,
    DEAF_IMAGE,
    DEFS,
    define,
    definition,
    gdbus,
    main_pid,
    scope_active,
    service,
    sh,
    status,
    svm,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture, shared with test_service (make install + start)

REPEAT = int(os.environ.get("SVM_INFRA_REPEAT", "3"))
ANSWER_TIMEOUT = 90.0  # generous: a loaded 2-core machine; the figure is printed, not asserted


@pytest.fixture
def vms(service: None) -> Iterator[Callable[..., str]]:
    """Define and start VMs for one test; destroy and undefine them afterwards."""
    names: list[str] = []

    def make(name: str, image: Path = ACPI_IMAGE, stop_timeout: int = 5) -> str:
        define(name, image, stop_timeout)
        names.append(name)
        result = svm("start", name)
        assert result.returncode == 0, result.stderr
        return name

    yield make
    wait_answering()
    for name in names:
        svm("destroy", "--force", name)
        svm("undefine", name)


def answering() -> bool:
    try:
        return svm("list", "--all", timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def wait_answering() -> float:
    start = time.monotonic()
    wait_for(answering, ANSWER_TIMEOUT, "the daemon to answer again")
    return time.monotonic() - start


def journal_since(cursor: str) -> str:
    return sh(
        "journalctl", "-u", "supervisord-vm", "--no-pager", "-o", "cat", "--after-cursor", cursor
    ).stdout


def journal_cursor() -> str:
    out = sh("journalctl", "-u", "supervisord-vm", "-n", "0", "--show-cursor", "--no-pager").stdout
    found = re.search(r"-- cursor: (\S+)", out)
    assert found, out
    return found.group(1)


def no_failed_units() -> None:
    failed = sh("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
    ours = [line for line in failed.splitlines() if "svm-" in line or "supervisord-vm" in line]
    assert not ours, failed


def agrees_with_systemd(name: str) -> dict[str, object]:
    """The daemon's view of NAME matches its scope and its process."""
    info = status(name)
    if info["state"] == "running":
        assert scope_active(name)
        pid = info["pid"]
        assert isinstance(pid, int) and Path(f"/proc/{pid}").exists()
        assert f"svm-{name}.scope" in Path(f"/proc/{pid}/cgroup").read_text()
    else:
        assert info["state"] == "shutoff", info
        assert not scope_active(name)
    return info


def restart_dbus() -> None:
    """The test's own connections die too: every call below is a new process (svmctl,
    systemctl), so each reconnects on its own."""
    sh("systemctl", "restart", "dbus.service", check=True)


def qemu_pids() -> set[int]:
    out = sh("pgrep", "-f", "qemu-system").stdout
    return {int(pid) for pid in out.split()}


def pending_sigterm(pid: int) -> bool:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^ShdPnd:\s*([0-9a-f]+)", text, re.M)
    return found is not None and int(found.group(1), 16) & (1 << (signal.SIGTERM - 1)) != 0


# --- the system bus restarting ------------------------------------------------------------------


def test_bus_restart_leaves_vms_running_and_the_daemon_answers_again(
    vms: Callable[..., str],
) -> None:
    names = [vms("if_bus1"), vms("if_bus2")]
    before = {name: status(name)["pid"] for name in names}
    qemus = qemu_pids()
    figures = []
    for _ in range(REPEAT):
        daemon = main_pid()
        cursor = journal_cursor()
        restart_dbus()
        figures.append(wait_answering())
        assert main_pid() != daemon  # it exited to be restarted, and it was
        assert "exiting with status 75" in journal_since(cursor)
        for name in names:
            info = agrees_with_systemd(name)
            assert info["state"] == "running" and info["pid"] == before[name]
        assert qemu_pids() == qemus  # none lost, none duplicated
        no_failed_units()
    assert sh("systemctl", "is-active", "supervisord-vm.service").stdout.strip() == "active"
    print(f"\nanswering again after a dbus restart: {', '.join(f'{t:.2f} s' for t in figures)}")


def test_bus_restart_during_a_graceful_destroy_settles_it_as_destroyed(
    vms: Callable[..., str],
) -> None:
    """QEMU stopped (SIGSTOP) holds the SIGTERM of a graceful destroy pending; the bus restarts
    meanwhile. The restarted daemon finishes the destroy it finds recorded."""
    name = vms("if_grace", stop_timeout=30)
    pid = status(name)["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    client = subprocess.Popen(
        ["/usr/local/bin/svmctl", "destroy", "--graceful", "--timeout", "120", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: pending_sigterm(pid), 30, "the graceful destroy's SIGTERM")
        daemon = main_pid()
        restart_dbus()
        wait_for(lambda: not Path(f"/proc/{daemon}").exists(), 30, "the old daemon to exit")
    finally:
        os.kill(pid, signal.SIGCONT)
        client.wait(timeout=60)
    wait_answering()
    wait_for(lambda: status(name)["state"] == "shutoff", 60, f"{name} to be shut off")
    info = agrees_with_systemd(name)
    assert info["reason"] == "destroyed", info
    no_failed_units()


def test_bus_restart_during_a_shutdown_of_a_deaf_guest_keeps_it_running_and_pending(
    vms: Callable[..., str],
) -> None:
    name = vms("if_deaf", image=DEAF_IMAGE)
    pid = status(name)["pid"]
    client = subprocess.Popen(
        ["/usr/local/bin/svmctl", "shutdown", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)  # the power button is pressed; the deaf guest ignores it
        assert client.poll() is None
        restart_dbus()
        client.wait(timeout=60)  # its connection is gone with the bus
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    wait_answering()
    info = agrees_with_systemd(name)
    assert info["state"] == "running" and info["pid"] == pid
    assert svm("destroy", name).returncode == 0
    info = agrees_with_systemd(name)
    assert info["state"] == "shutoff" and info["reason"] == "destroyed", info
    no_failed_units()


# --- one connection dropped -----------------------------------------------------------------------


def bus_sockets_of(pid: int) -> list[int]:
    """The fds of PID connected to the bus daemon, in fd order.

    The daemon opens them in a fixed order: its own connection (main), then the systemd
    adapter's signal connection (pystemd) and its call connection (sdbus).
    """
    dbus_pid = int(sh("systemctl", "show", "-P", "MainPID", "dbus.service").stdout)
    out = sh("ss", "-xpH").stdout
    dbus_inodes: set[str] = set()
    ours: dict[str, int] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 9:
            continue
        local, peer = fields[5], fields[7]
        for owner, fd in re.findall(r"pid=(\d+),fd=(\d+)", line):
            if int(owner) == dbus_pid:
                dbus_inodes.add(local)
            elif int(owner) == pid:
                ours[peer] = int(fd)
    return sorted(fd for peer, fd in ours.items() if peer in dbus_inodes)


def drop_connection(pid: int, fd: int) -> None:
    """Cut one connection as the bus daemon dropping it looks to the client: the socket shuts
    down under sd-bus (dbus-daemon has no call that disconnects another client)."""
    result = sh("gdb", "-p", str(pid), "-batch", "-ex", f"call (int)shutdown({fd}, 2)", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("index", "which"),
    [(1, "connection for systemd's signals"), (2, "connection for calls to systemd")],
    ids=["signals", "calls"],
)
def test_dropped_systemd_connection_restarts_the_daemon_which_reattaches(
    vms: Callable[..., str], index: int, which: str
) -> None:
    name = vms(f"if_drop{index}")
    before = status(name)["pid"]
    daemon = main_pid()
    sockets = bus_sockets_of(daemon)
    assert len(sockets) == 3, sockets
    cursor = journal_cursor()
    drop_connection(daemon, sockets[index])
    wait_for(lambda: main_pid() != daemon, 60, "the daemon to exit and be restarted")
    wait_answering()
    log = journal_since(cursor)
    assert which in log and "exiting with status 75" in log, log
    info = agrees_with_systemd(name)
    assert info["state"] == "running" and info["pid"] == before
    # The restarted daemon sees exits again: systemd's signals reach it.
    sh("systemctl", "stop", f"svm-{name}.scope", check=True)
    wait_for(lambda: status(name)["state"] == "shutoff", 30, f"{name} to be shut off")
    assert status(name)["reason"] == "stopped-externally"
    no_failed_units()


# --- systemd re-executing and reloading --------------------------------------------------------


@pytest.mark.parametrize("operation", ["daemon-reexec", "daemon-reload"])
def test_systemd_reexec_or_reload_keeps_states_and_later_exits_are_recorded(
    vms: Callable[..., str], operation: str
) -> None:
    stopped, powered_off = vms("if_ext"), vms("if_off")
    daemon = main_pid()
    sh("systemctl", operation, check=True)
    assert answering()
    assert main_pid() == daemon  # nothing made the daemon restart
    for name in (stopped, powered_off):
        assert agrees_with_systemd(name)["state"] == "running"
    sh("systemctl", "stop", f"svm-{stopped}.scope", check=True)
    wait_for(lambda: status(stopped)["state"] == "shutoff", 30, f"{stopped} to be shut off")
    assert agrees_with_systemd(stopped)["reason"] == "stopped-externally"
    assert svm("shutdown", powered_off, "--timeout", "30").returncode == 0
    assert agrees_with_systemd(powered_off)["reason"] == "shutdown"
    no_failed_units()


@pytest.mark.parametrize("operation", ["daemon-reexec", "daemon-reload"])
def test_systemd_reexec_or_reload_during_start_and_destroy(
    vms: Callable[..., str], operation: str
) -> None:
    doomed = vms("if_doomed")
    define("if_late", ACPI_IMAGE)
    starting = subprocess.Popen(["/usr/local/bin/svmctl", "start", "if_late"])
    destroying = subprocess.Popen(["/usr/local/bin/svmctl", "destroy", doomed])
    try:
        sh("systemctl", operation, check=True)
        assert starting.wait(timeout=60) == 0
        assert destroying.wait(timeout=60) == 0
    finally:
        for client in (starting, destroying):
            if client.poll() is None:
                client.kill()
                client.wait()
        assert answering()
        late = status("if_late")
        if late["state"] != "shutoff":
            svm("destroy", "--force", "if_late")
        svm("undefine", "if_late")
    assert late["state"] == "running"
    info = agrees_with_systemd(doomed)
    assert info["state"] == "shutoff" and info["reason"] == "destroyed", info
    no_failed_units()


# --- the definitions directory full -------------------------------------------------------------


@pytest.fixture
def tiny_definitions_dir(service: None) -> Iterator[Path]:
    """A 64 KiB tmpfs over the definitions directory, with the files it had.

    Mounted in the container's namespace before the service restarts: ProtectSystem=full with
    ReadWritePaths= builds the service's own mount namespace at start, from what is mounted
    then, so a mount made later would not be seen by the running daemon.
    """
    saved = {path.name: path.read_bytes() for path in DEFS.iterdir() if path.is_file()}
    sh("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(DEFS), check=True)
    try:
        for name, data in saved.items():
            (DEFS / name).write_bytes(data)
        sh("systemctl", "restart", "supervisord-vm.service", check=True)
        yield DEFS
    finally:
        sh("umount", str(DEFS))
        sh("systemctl", "restart", "supervisord-vm.service")


def test_define_into_a_full_directory_says_so_and_changes_nothing(
    tiny_definitions_dir: Path, tmp_path: Path
) -> None:
    define("if_full", ACPI_IMAGE)
    old = (tiny_definitions_dir / "if_full.toml").read_bytes()
    filler = tiny_definitions_dir / "filler"
    with filler.open("wb") as sink, contextlib.suppress(OSError):
        sink.write(b"\0" * 1024 * 1024)  # ENOSPC once the tmpfs is full
    before = sorted(path.name for path in tiny_definitions_dir.iterdir())
    daemon, listed = main_pid(), svm("--json", "list", "--all").stdout
    new_vm, changed = tmp_path / "if_new.toml", tmp_path / "if_full.toml"
    new_vm.write_text(definition("if_new", ACPI_IMAGE))
    changed.write_text(definition("if_full", ACPI_IMAGE, stop_timeout=9))
    for path in (new_vm, changed):
        result = svm("define", str(path))
        assert result.returncode == 1
        assert "No space left on device; nothing was changed" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    raw = gdbus("Define", json.dumps(new_vm.read_text()))
    assert "org.supervisordvm1.Error.NoSpace" in raw.stderr, raw.stderr
    assert (tiny_definitions_dir / "if_full.toml").read_bytes() == old
    assert sorted(path.name for path in tiny_definitions_dir.iterdir()) == before  # no temp file
    assert main_pid() == daemon and svm("--json", "list", "--all").stdout == listed
    filler.unlink()
    assert svm("undefine", "if_full").returncode == 0


# --- corrupt, truncated and half-written records at start-up ------------------------------------

RUNTIME_DIR = Path("/run/supervisord-vm")
EXITS_DIR = Path("/var/lib/supervisord-vm/exits")
TEMP_TAG = "0123456789abcdef"  # the 16 hex digits atomic_write puts in a temp file's name


def restart_service() -> str:
    """`systemctl restart` (Type=notify: it returns once the new daemon sent READY=1); fails
    with the journal if the new daemon did not come up, crashed or printed a traceback."""
    cursor, daemon = journal_cursor(), main_pid()
    result = sh("systemctl", "restart", "supervisord-vm.service", timeout=120)
    assert result.returncode == 0, result.stderr + journal_since(cursor)[-4000:]
    assert sh("systemctl", "is-active", "supervisord-vm.service").stdout.strip() == "active"
    assert main_pid() != daemon
    assert answering()
    log = journal_since(cursor)
    assert "Traceback" not in log, log
    return cursor


def journal_says(cursor: str, *texts: str) -> None:
    """Wait for the daemon's journal since CURSOR to hold every text (journald reads the
    daemon's stderr asynchronously: READY=1 may come before the lines before it are stored)."""
    wait_for(
        lambda: all(text in journal_since(cursor) for text in texts),
        20,
        f"the journal to say {texts}",
    )


def with_field(key: str, value: object) -> Callable[[bytes], bytes]:
    def corrupt(data: bytes) -> bytes:
        record = json.loads(data)
        record[key] = value
        return json.dumps(record).encode()

    return corrupt


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def garbage(_data: bytes) -> bytes:
    return b"\x00\xff\xfe\x9c garbage\n" * 7


def nested(_data: bytes) -> bytes:
    return b"[" * 100_000  # json.loads raises RecursionError, not ValueError


# Each: how the file is spoilt, what the journal must say about why it was ignored.
RECORD_CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (truncated, "unusable runtime record: "),
    "garbage": (garbage, "unusable runtime record: "),
    "nested": (nested, "unusable runtime record: nested too deeply to be a record"),
    "wrong_type": (with_field("pid", "1234"), "unusable runtime record: field 'pid' has the wrong"),
    "huge_number": (with_field("started_at", 10**400), "field 'started_at' is out of range"),
    "other_unit": (with_field("unit", "svm-if_other.scope"), "field 'unit' is not the scope of"),
    "unknown_pending": (
        with_field("pending", {"op": "explode", "since": 1.0}),
        "unusable runtime record: field 'pending.op' is not a known operation",
    ),
}
EXIT_CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (truncated, "ignoring unusable exit record: "),
    "garbage": (garbage, "ignoring unusable exit record: "),
    "nested": (nested, "ignoring unusable exit record: nested too deeply to be a record"),
    "wrong_type": (with_field("result", 5), "ignoring unusable exit record: field 'result' has"),
    "unknown_reason": (with_field("reason", "vaporised"), "'vaporised' is not a valid Reason"),
    "status_out_of_range": (with_field("exit_status", 2**40), "'exit_status' is out of range"),
    "huge_time": (with_field("time", 10**400), "field 'time' is out of range"),
}


@pytest.mark.parametrize("corruption", sorted(RECORD_CORRUPTIONS))
def test_unusable_runtime_record_is_reported_and_the_running_vm_reattached_from_its_scope(
    vms: Callable[..., str], corruption: str
) -> None:
    """The record is ignored (its pending operation with it) and the VM adopted as a scope of
    a defined VM: same PID, running, and then fully under control (QMP and systemd)."""
    name = vms(f"if_rec_{corruption}")
    pid = status(name)["pid"]
    record = RUNTIME_DIR / f"{name}.json"
    spoil, why = RECORD_CORRUPTIONS[corruption]
    record.write_bytes(spoil(record.read_bytes()))
    qemus = qemu_pids()
    cursor = restart_service()
    journal_says(cursor, f"{record}: unusable runtime record: ", why)
    journal_says(cursor, f"VM {name}: reattached to pid {pid}")
    info = agrees_with_systemd(name)
    assert info["state"] == "running" and info["pid"] == pid, info
    assert qemu_pids() == qemus  # none lost, none started twice
    assert json.loads(record.read_bytes())["pid"] == pid  # the new daemon wrote a good one
    # QMP answers (the guest powers off on ACPI), and a destroy goes through systemd.
    if corruption in ("truncated", "nested", "unknown_pending"):
        assert svm("shutdown", name, "--timeout", "30").returncode == 0
        expected = "shutdown"
    else:
        assert svm("destroy", name).returncode == 0
        expected = "destroyed"
    info = agrees_with_systemd(name)
    assert info["state"] == "shutoff" and info["reason"] == expected, info
    assert not record.exists()
    no_failed_units()


def test_a_record_naming_another_pid_than_its_scope_holds_adopts_the_scopes_qemu(
    vms: Callable[..., str],
) -> None:
    """A record that loads but names a process outside the scope: the scope is the truth about
    what runs; the VM is adopted, never stopped for a damaged record."""
    name = vms("if_rec_pid_elsewhere")
    pid = status(name)["pid"]
    record = RUNTIME_DIR / f"{name}.json"
    record.write_bytes(with_field("pid", 1)(record.read_bytes()))
    qemus = qemu_pids()
    cursor = restart_service()
    journal_says(cursor, f"VM {name}: its runtime record names pid 1, but ")
    journal_says(cursor, f"VM {name}: reattached to pid {pid}")
    info = agrees_with_systemd(name)
    assert info["state"] == "running" and info["pid"] == pid, info
    assert qemu_pids() == qemus
    assert json.loads(record.read_bytes())["pid"] == pid
    assert svm("destroy", name).returncode == 0
    assert agrees_with_systemd(name)["reason"] == "destroyed"
    no_failed_units()


@pytest.mark.parametrize("corruption", sorted(EXIT_CORRUPTIONS))
def test_unusable_exit_record_is_reported_and_the_next_exit_recorded(
    vms: Callable[..., str], corruption: str
) -> None:
    name = vms(f"if_exit_{corruption}")
    assert svm("destroy", name).returncode == 0
    record = EXITS_DIR / f"{name}.json"
    assert json.loads(record.read_bytes())["reason"] == "destroyed"
    spoil, why = EXIT_CORRUPTIONS[corruption]
    record.write_bytes(spoil(record.read_bytes()))
    cursor = restart_service()
    journal_says(cursor, f"{record}: ignoring unusable exit record: ", why)
    info = agrees_with_systemd(name)
    assert info["state"] == "shutoff" and info["reason"] == "", info
    listed = json.loads(svm("--json", "list", "--all").stdout)
    assert name in [machine["name"] for machine in listed]
    assert svm("start", name).returncode == 0
    assert agrees_with_systemd(name)["state"] == "running"
    sh("systemctl", "stop", f"svm-{name}.scope", check=True)
    wait_for(lambda: status(name)["state"] == "shutoff", 30, f"{name} to be shut off")
    assert agrees_with_systemd(name)["reason"] == "stopped-externally"
    assert json.loads(record.read_bytes())["reason"] == "stopped-externally"
    no_failed_units()


def test_temp_files_of_interrupted_writes_are_removed_at_start(vms: Callable[..., str]) -> None:
    """Only atomic_write's own temp files go (a dotfile NAME.<16 hex>.tmp); the running VM and
    its record are untouched, and a look-alike file is left alone."""
    name = vms("if_tmp")
    pid = status(name)["pid"]
    record = RUNTIME_DIR / f"{name}.json"
    good = record.read_bytes()
    EXITS_DIR.mkdir(parents=True, exist_ok=True)
    leftovers = [
        RUNTIME_DIR / f".{name}.json.{TEMP_TAG}.tmp",
        EXITS_DIR / f".{name}.json.{TEMP_TAG}.tmp",
    ]
    bystander = RUNTIME_DIR / f".{name}.json.not-hex.tmp"
    try:
        for path in [*leftovers, bystander]:
            path.write_bytes(truncated(good))
        cursor = restart_service()
        journal_says(
            cursor, *(f"removed {path}, left by an interrupted write" for path in leftovers)
        )
        assert not any(path.exists() for path in leftovers)
        assert bystander.exists()
        assert f"removed {bystander}" not in journal_since(cursor)
    finally:
        bystander.unlink(missing_ok=True)
        for path in leftovers:
            path.unlink(missing_ok=True)
    info = agrees_with_systemd(name)
    assert info["state"] == "running" and info["pid"] == pid, info
    assert json.loads(record.read_bytes())["pid"] == pid
    no_failed_units()
