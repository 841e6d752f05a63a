"""Load: many concurrent D-Bus clients reading and changing VMs of the installed service get only
answers or documented refusals, the final state agrees with the answers and with systemd, and the
daemon's open fds and asyncio tasks come back to where they were.

Clients are in-process sdbus connections on one asyncio loop (a subprocess per call would spend
the 2 cores on Python start-up, not on the daemon), each with its own bus connection: readers
(ListMachines; GetMachine + Properties.GetAll; GetEvents of all and of one VM), one svmctl
client (list / status in subprocesses, the CLI path), and changers that start and destroy VMs in
every destroy mode, two changers per VM so that starts and destroys race. AlreadyRunning,
NotRunning and InvalidState are the documented refusals of such races and are counted apart.

SVM_LOAD_SECONDS (default 20; `make reliability` runs 60) sets how long the load lasts. The task
count comes from the daemon's SIGUSR1 journal line ("resources: N asyncio tasks, M open fds").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdbus import SdBus, SdBusBaseError, sd_bus_open_system
from sdbus.sd_bus_internals import SdBusUnmappedMessageError

from tests.integration.test_chaos import FALLBACK_ENTRY, journal_cursor
from tests.integration.test_service import (
    ACPI_IMAGE,
    BUS,
    IFACE,
    MANAGER,
    define,
    main_pid,
    service,
    sh,
    svm,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture, shared with test_service (make install + start)

LOAD_SECONDS = float(os.environ.get("SVM_LOAD_SECONDS", "20"))
VMS = ("ld_0", "ld_1", "ld_2")
READERS = 10
CHANGERS_PER_VM = 2
MACHINE_IFACE = "org.supervisordvm1.Machine"
PROPERTIES = "org.freedesktop.DBus.Properties"
ERROR = "org.supervisordvm1.Error."
REFUSALS = {ERROR + "AlreadyRunning", ERROR + "NotRunning", ERROR + "InvalidState"}
MODES = ("default", "graceful", "force")
RESOURCES = re.compile(r"resources: (\d+) asyncio tasks, (\d+) open fds")


class Stats:
    """Every answer, by method and outcome ("ok" or the D-Bus error name)."""

    def __init__(self) -> None:
        self.answers: collections.Counter[tuple[str, str]] = collections.Counter()
        self.problems: list[str] = []

    def outcome(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.answers.items() if o == outcome)

    @property
    def calls(self) -> int:
        return sum(self.answers.values())

    @property
    def refusals(self) -> int:
        return sum(n for (_, o), n in self.answers.items() if o in REFUSALS)

    @property
    def failures(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter(
            {key: n for key, n in self.answers.items() if key[1] != "ok" and key[1] not in REFUSALS}
        )


def error_name(exc: SdBusBaseError) -> str:
    if isinstance(exc, SdBusUnmappedMessageError) and exc.args:
        return str(exc.args[0])
    return str(getattr(exc, "dbus_error_name", "") or type(exc).__name__)


class Client:
    """One client: its own system bus connection; every answer counted into STATS."""

    def __init__(self, stats: Stats) -> None:
        self.bus: SdBus = sd_bus_open_system()
        self.stats = stats

    async def call(
        self, path: str, iface: str, method: str, sig: str = "", *args: Any
    ) -> tuple[bool, Any]:
        """(True, contents) or (False, error name)."""
        message = self.bus.new_method_call_message(BUS, path, iface, method)
        if sig:
            message.append_data(sig, *args)
        try:
            reply = await self.bus.call_async(message)
        except SdBusBaseError as exc:
            name = error_name(exc)
            self.stats.answers[(method, name)] += 1
            return False, name
        self.stats.answers[(method, "ok")] += 1
        return True, reply.get_contents()

    async def manager(self, method: str, sig: str = "", *args: Any) -> tuple[bool, Any]:
        return await self.call(MANAGER, IFACE, method, sig, *args)


def check_snapshot(stats: Stats, props: dict[str, tuple[str, Any]]) -> None:
    """One GetAll answer is one consistent snapshot: a PID exactly while QEMU runs."""
    state, pid = props["State"][1], props["MainPID"][1]
    if state not in ("shutoff", "starting", "running", "paused", "stopping"):
        stats.problems.append(f"unknown state {state!r}")
    elif (state in ("running", "paused")) != (pid > 0) and state not in ("starting", "stopping"):
        stats.problems.append(f"{props['Name'][1]} answered {state} with MainPID {pid}")


async def reader(index: int, stats: Stats, deadline: float) -> None:
    client = Client(stats)
    try:
        for turn in itertools.count(index):
            if time.monotonic() > deadline:
                return
            name = VMS[turn % len(VMS)]
            kind = turn % 4
            if kind == 0:
                ok, rows = await client.manager("ListMachines")
                if ok and not set(VMS) <= {row[0] for row in rows}:
                    stats.problems.append(f"ListMachines lacks VMs: {rows}")
            elif kind == 1:
                ok, path = await client.manager("GetMachine", "s", name)
                if ok:
                    ok, props = await client.call(path, PROPERTIES, "GetAll", "s", MACHINE_IFACE)
                    if ok:
                        check_snapshot(stats, props)
            else:
                await client.manager("GetEvents", "s", name if kind == 3 else "")
    finally:
        client.bus.close()


async def svmctl_reader(stats: Stats, deadline: float) -> None:
    """The CLI path too: svmctl list / status, one subprocess at a time."""
    for turn in itertools.count():
        if time.monotonic() > deadline:
            return
        args = ["--json", "list", "--all"] if turn % 2 else ["--json", "status", VMS[turn % 3]]
        process = await asyncio.create_subprocess_exec(
            "/usr/local/bin/svmctl",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        outcome = "ok" if process.returncode == 0 else f"svmctl exit {process.returncode}"
        stats.answers[(f"svmctl {args[1]}", outcome)] += 1
        if process.returncode:
            stats.problems.append(f"svmctl {args}: {err.decode().strip()}")


async def changer(name: str, first_mode: int, stats: Stats, deadline: float) -> None:
    """Start/destroy cycles on one VM, the destroy modes in turn; ends with a destroy.

    A random pause (seeded by the VM and mode, up to 50 ms) before each call keeps two changers
    of one VM from falling into lock step, so their calls meet in every order."""
    client = Client(stats)
    pause = random.Random(f"{name}-{first_mode}")
    try:
        for mode in itertools.islice(itertools.cycle(MODES), first_mode, None):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(pause.uniform(0, 0.05))
            await client.manager("Start", "s", name)
            await asyncio.sleep(pause.uniform(0, 0.05))
            await client.manager("Destroy", "ssd", name, mode, 0.0)
    finally:
        client.bus.close()


def journal_after(cursor: str) -> list[dict[str, Any]]:
    """Entries after CURSOR, filtered here (systemd 252's --after-cursor with a match prints
    nothing when the cursor's own entry does not match)."""
    sh("journalctl", "--sync")
    out = sh("journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}").stdout
    return [json.loads(line) for line in out.splitlines()]


def daemon_resources() -> tuple[int, int]:
    """(asyncio tasks, open fds) as the daemon itself counts them on SIGUSR1."""
    pid = main_pid()
    cursor = journal_cursor()
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for entry in journal_after(cursor):
            found = RESOURCES.search(str(entry.get("MESSAGE", "")))
            if found and entry.get("_PID") == str(pid):
                return int(found[1]), int(found[2])
        time.sleep(0.3)
    raise AssertionError("no 'resources:' journal line after SIGUSR1")


def fd_count(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def fd_targets(pid: int) -> dict[str, str]:
    """What each open fd of `pid` is (a leak report names it: socket, file, anon_inode...)."""
    found: dict[str, str] = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            found[entry.name] = str(entry.readlink())
    return found


@pytest.fixture
def load_vms(service: None) -> Iterator[None]:
    for name in VMS:
        define(name, ACPI_IMAGE, stop_timeout=10)
    yield
    for name in VMS:
        svm("destroy", "--force", name)
        svm("undefine", name)


async def run_load(seconds: float) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + seconds
    clients = [reader(i, stats, deadline) for i in range(READERS)]
    clients.append(svmctl_reader(stats, deadline))
    clients += [
        changer(name, (index + copy) % len(MODES), stats, deadline)
        for index, name in enumerate(VMS)
        for copy in range(CHANGERS_PER_VM)
    ]
    await asyncio.gather(*clients)
    return stats


def test_concurrent_clients_get_answers_and_leave_no_leak(
    load_vms: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Warm-up: one cycle per VM, so lazily made connections count in the baseline.
    for name in VMS:
        assert svm("start", name).returncode == 0
        assert svm("destroy", name).returncode == 0
    daemon = main_pid()
    tasks_before, fds_before = daemon_resources()
    fds_outside_before = fd_count(daemon)
    targets_before = fd_targets(daemon)
    cursor = journal_cursor()

    started = time.monotonic()
    stats = asyncio.run(run_load(LOAD_SECONDS))
    elapsed = time.monotonic() - started

    # The final state agrees with the answers: every changer ended with a destroy, so each
    # VM is shut off as destroyed; each successful Start began exactly one run, and every run
    # that began (`starting`) ended exactly once.
    problems = list(stats.problems)
    events: collections.Counter[tuple[str, str]] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    without_fields = 0  # entries journald's full native queue sent through stderr (test_chaos)
    for entry in journal_after(cursor):
        if entry.get("SYSLOG_IDENTIFIER") != "supervisord-vm":
            continue
        fields = [entry.get("VM_NAME"), entry.get("VM_EVENT"), entry.get("VM_REASON")]
        found = FALLBACK_ENTRY.match(str(entry.get("MESSAGE"))) if fields[1] is None else None
        if found is not None:
            fields = [found[1], found[2], found[3] or ""]
            without_fields += 1
        name, event, reason = (str(field) for field in fields)
        if fields[1] is not None:
            events[(name, event)] += 1
            if event == "stopped":
                reasons[reason] += 1
    listing = {m["name"]: m for m in json.loads(svm("--json", "list", "--all").stdout)}
    for name in VMS:
        machine = listing[name]
        if (machine["state"], machine["reason"]) != ("shutoff", "destroyed"):
            problems.append(f"{name} ended {machine['state']}/{machine['reason']}")
        if events[(name, "starting")] != events[(name, "stopped")]:
            problems.append(
                f"{name}: {events[(name, 'starting')]} runs began, "
                f"{events[(name, 'stopped')]} stopped events"
            )
    if set(reasons) - {"destroyed"}:
        problems.append(f"stop reasons {dict(reasons)}")
    ok_starts = stats.answers[("Start", "ok")]
    started_events = sum(events[(name, "started")] for name in VMS)
    if ok_starts != started_events:
        problems.append(f"{ok_starts} Start calls succeeded, {started_events} started events")
    scopes = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "svm-ld*").stdout
    if scopes.strip():
        problems.append(f"scopes left: {scopes}")
    failed = sh("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
    if failed:
        problems.append(f"failed units: {failed}")
    if main_pid() != daemon:
        problems.append(f"the daemon restarted ({daemon} -> {main_pid()})")

    # Nothing leaked: tasks and fds come back (bounded wait for in-flight cleanup to finish).
    deadline = time.monotonic() + 30
    while True:
        tasks_after, fds_after = daemon_resources()
        fds_outside_after = fd_count(daemon)
        back = tasks_after <= tasks_before and fds_outside_after <= fds_outside_before
        if back or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not back:
        targets_after = fd_targets(daemon)
        new = {fd: what for fd, what in targets_after.items() if targets_before.get(fd) != what}
        problems.append(
            f"daemon resources: tasks {tasks_before} -> {tasks_after}, fds {fds_before} -> "
            f"{fds_after} (/proc: {fds_outside_before} -> {fds_outside_after}; new: {new})"
        )

    failures = stats.failures
    refusals = ", ".join(f"{o.removeprefix(ERROR)} {stats.outcome(o)}" for o in sorted(REFUSALS))
    with capsys.disabled():
        print(
            f"\nload summary: {READERS + 1 + len(VMS) * CHANGERS_PER_VM} clients, "
            f"{elapsed:.1f} s, {stats.calls} calls, {stats.calls / elapsed:.0f} calls/s; "
            f"ok {stats.outcome('ok')}, documented refusals {stats.refusals} "
            f"({refusals}), "
            f"failed {sum(failures.values())} {dict(failures)}; starts ok {ok_starts}; "
            f"tasks {tasks_before} -> {tasks_after}, fds {fds_outside_before} -> "
            f"{fds_outside_after}; lifecycle entries without fields {without_fields}; "
            f"problems {len(problems)}",
            flush=True,
        )
    assert not failures, f"failed calls: {dict(failures)}"
    assert not problems, "\n".join(problems[:50])
