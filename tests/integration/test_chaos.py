"""Daemon kills under systemd: the installed service, SIGKILLed at a random moment of a random
operation, comes back (Restart=on-failure) to a view that agrees with systemd and the processes,
and every exit is reported once with the reason of what was done.

Each seeded iteration picks one operation on one of three VMs (start; destroy default, graceful,
force; kill; shutdown --then-destroy --timeout; `systemctl stop` of the scope; QEMU SIGKILLed by
PID from outside), sets it off without waiting for it, SIGKILLs the daemon after a random 0-1.5 s
(half of them within 0.3 s), waits for systemd's restart (READY) and for the VM to settle, and
checks:
- every VM listed running/paused has exactly one QEMU, in its scope, with the listed PID; no QEMU
  of a VM that is shut off or not listed; every svm-*.scope is a live VM's; no failed unit;
- no VM stays starting/stopping;
- the other VMs are untouched (same state, same PID, no exit);
- the target's exit, if it ended, is in the journal exactly once (the event ring of
  `svmctl events` lives in the daemon's memory and starts empty after a restart: the journal's
  VM_EVENT=stopped entries are the record across restarts; `svmctl --json events` must agree
  with them for what the new daemon saw), with the status's reason, and that
  reason is the one the operation implies. `lost` is accepted only for exits from outside
  (`systemctl stop`, SIGKILL of QEMU) that happened while no daemon could watch them (from
  GRACE before the kill until the new daemon was ready); an operation that did not take effect
  is accepted only if its client was told it failed.

SVM_CHAOS_ITERATIONS (default 20; `make reliability` runs 60) and SVM_CHAOS_SEED (default: a
new one, printed) reproduce a run: the plan of each iteration is printed before it runs.
SVM_CHAOS_OPS=op,... draws only those operations.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.processes import qemu_processes
from tests.integration.test_service import (
    ACPI_IMAGE,
    DEAF_IMAGE,
    define,
    main_pid,
    service,
    sh,
    svm,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture, shared with test_service (make install + start)

ITERATIONS = int(os.environ.get("SVM_CHAOS_ITERATIONS", "20"))
SEED = int(os.environ.get("SVM_CHAOS_SEED", "") or random.SystemRandom().randrange(2**31))
SVMCTL = "/usr/local/bin/svmctl"
SERVICE = "supervisord-vm.service"
STOP_TIMEOUT = 3
# An exit this close before the kill may not have been recorded by the old daemon yet; one
# earlier than that (a QEMU SIGKILLed 1-1.5 s before the daemon) must be `crashed`, not `lost`.
GRACE = 1.0
LIVE = ("running", "paused")
VMS = {"ch_a": ACPI_IMAGE, "ch_b": ACPI_IMAGE, "ch_d": DEAF_IMAGE}
OPS = (
    "start",
    "destroy",
    "destroy-graceful",
    "destroy-force",
    "kill",
    "shutdown-then-destroy",
    "systemctl-stop",
    "qemu-sigkill",
)
# A lifecycle entry that went to stderr (journal.py's fallback): "VM NAME EVENT (REASON)".
FALLBACK_ENTRY = re.compile(r"^supervisord_vm\.journal: VM (\S+) (\w+)(?: \(([^)]*)\))?")
# SVM_CHAOS_OPS=op,op draws only these (to chase one bug); the default is all of them.
CHOSEN_OPS = (
    tuple(os.environ.get("SVM_CHAOS_OPS", "").split(",")) if "SVM_CHAOS_OPS" in os.environ else OPS
)
assert set(CHOSEN_OPS) <= set(OPS), f"SVM_CHAOS_OPS: choose from {OPS}"
# The operations that go through svmctl, as its arguments after the VM's name.
SVMCTL_ARGS = {
    "start": ["start"],
    "destroy": ["destroy"],
    "destroy-graceful": ["destroy", "--graceful"],
    "destroy-force": ["destroy", "--force"],
    "kill": ["kill"],
    "shutdown-then-destroy": ["shutdown", "--timeout", "1", "--then-destroy"],
}
FROM_OUTSIDE = {"systemctl-stop": "stopped-externally", "qemu-sigkill": "crashed"}


@dataclass
class Tally:
    """What the summary line reports; the first group must stay at zero."""

    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    vms_lost: int = 0  # a VM no longer listed, or its QEMU running untracked
    duplicates: int = 0  # two QEMUs for one VM, or one exit reported twice
    wrong_reasons: int = 0
    unreported: int = 0  # an exit with no stopped entry
    leaks: int = 0  # QEMU outside a scope / of a shut-off VM, stray scope, failed unit
    stuck: int = 0  # starting/stopping after the bounded wait
    other: int = 0  # anything else (the daemon not back, a broken precondition)
    # Accepted outcomes, counted so the figures show what the run exercised.
    reason_lost: int = 0  # `lost` for an exit from outside while no daemon watched
    no_effect: int = 0  # the daemon died before acting; its client was told so
    shutdown_left_pending: int = 0  # a deaf guest's shutdown --then-destroy cut off
    start_limit_resets: int = 0
    reported_without_fields: int = 0  # a stopped entry that came through stderr
    notes: list[str] = field(default_factory=list)  # printed after the iteration

    def line(self) -> str:
        ops = " ".join(f"{op}={self.ops[op]}" for op in OPS)
        return (
            f"chaos summary: seed={SEED} iterations={sum(self.ops.values())} ops: {ops} | "
            f"vms_lost={self.vms_lost} duplicates={self.duplicates} "
            f"wrong_reasons={self.wrong_reasons} unreported={self.unreported} "
            f"leaks={self.leaks} stuck={self.stuck} other={self.other} | accepted: "
            f"lost_while_down={self.reason_lost} no_effect={self.no_effect} "
            f"shutdown_left_pending={self.shutdown_left_pending} "
            f"start_limit_resets={self.start_limit_resets} "
            f"reported_without_fields={self.reported_without_fields}"
        )


class ExitClock:
    """When each watched QEMU ended (CLOCK_MONOTONIC, like systemd's timestamps), from pidfds
    waited on in a thread: the test must know whether an exit happened while no daemon ran."""

    def __init__(self, pids: list[int]) -> None:
        self.times: dict[int, float] = {}
        self._fds: dict[int, int] = {}
        for pid in pids:
            try:
                self._fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                self.times[pid] = time.monotonic()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self._fds:
            readable, _, _ = select.select([*self._fds, self._wake_r], [], [])
            now = time.monotonic()
            if self._wake_r in readable:
                return
            for fd in readable:
                self.times[self._fds.pop(fd)] = now
                os.close(fd)

    def close(self) -> dict[int, float]:
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        for fd in self._fds:
            os.close(fd)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return self.times


def listed() -> dict[str, dict[str, object]]:
    result = svm("--json", "list", "--all")
    assert result.returncode == 0, result.stderr
    return {str(m["name"]): m for m in json.loads(result.stdout)}


def journal_cursor() -> str:
    entry = sh("journalctl", "-n", "1", "-o", "json", "--no-pager").stdout.strip()
    return str(json.loads(entry.splitlines()[-1])["__CURSOR"])


def lifecycle_entries(cursor: str, event: str, tally: Tally | None = None) -> dict[str, list[str]]:
    """VM name -> reasons of its EVENT (`stopped`, `stopping`) journal entries after CURSOR.

    Filtered here, not by journalctl: systemd 252's journalctl --after-cursor with a field
    match prints nothing when the cursor's own entry does not match. An entry journald's
    native socket did not take (its queue is full: in the sandbox net.unix.max_dgram_qlen is
    10, as systemd-sysctl does not run in a container) reaches the journal through the
    daemon's stderr, without its fields: it counts as reported, and TALLY counts it apart.
    """
    sh("journalctl", "--sync")
    out = sh("journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}").stdout
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for line in out.splitlines():
        entry = json.loads(line)
        if entry.get("SYSLOG_IDENTIFIER") != "supervisord-vm":
            continue
        if entry.get("VM_EVENT") == event:
            reasons[str(entry.get("VM_NAME"))].append(str(entry.get("VM_REASON")))
        elif (found := FALLBACK_ENTRY.match(str(entry.get("MESSAGE")))) and found[2] == event:
            reasons[found[1]].append(found[3] or "")
            if tally is not None:
                tally.reported_without_fields += 1
    return reasons


def daemon_journal(cursor: str) -> str:
    """Everything the daemons and systemd said of the service after CURSOR (filtered here)."""
    out = sh("journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}").stdout
    lines = []
    for entry in map(json.loads, out.splitlines()):
        ours = entry.get("SYSLOG_IDENTIFIER") == "supervisord-vm"
        if ours or SERVICE in (entry.get("UNIT"), entry.get("_SYSTEMD_UNIT")):
            when = int(entry.get("__MONOTONIC_TIMESTAMP", 0)) / 1e6
            fields = {k: v for k, v in entry.items() if k.startswith("VM_")}
            lines.append(f"[{when:.6f}] {entry.get('_PID')}: {entry.get('MESSAGE')} {fields}")
    return "\n".join(lines)


def active_since() -> float:
    """When the service last entered `active` (READY=1), CLOCK_MONOTONIC seconds."""
    usec = sh("systemctl", "show", "-P", "ActiveEnterTimestampMonotonic", SERVICE).stdout
    return int(usec.strip() or 0) / 1e6


def wait_daemon_back(old_pid: int, tally: Tally) -> float:
    """Wait (bounded) until systemd restarted the daemon and it answers; its READY time."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = sh("systemctl", "show", "-P", "ActiveState", SERVICE).stdout.strip()
        if state == "failed":
            # The unit's start limit stopped systemd's restarts (systemd 252 then keeps the
            # first failure's Result, `signal`, not `start-limit-hit`): counted and printed.
            show = sh("systemctl", "show", SERVICE, "-p", "Result,NRestarts,StartLimitBurst")
            limit = sh("systemctl", "show", "-P", "StartLimitIntervalUSec", SERVICE).stdout
            tally.notes.append(
                f"the service stayed failed ({' '.join(show.stdout.split())}, "
                f"StartLimitIntervalSec={limit.strip()}): systemctl reset-failed and start"
            )
            tally.start_limit_resets += 1
            sh("systemctl", "reset-failed", SERVICE)
            sh("systemctl", "start", "--no-block", SERVICE)
        pid = main_pid()
        if state == "active" and pid not in (0, old_pid) and svm("list").returncode == 0:
            return active_since()
        time.sleep(0.2)
    raise AssertionError("the daemon did not come back within 90 s")


def in_scope(pid: int, unit: str) -> bool:
    """True if PID is in UNIT's cgroup and is the only process there."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    paths = {
        line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] in ("", "name=systemd")
    }
    if not paths or not all(path.endswith("/" + unit) for path in paths):
        return False
    for path in paths:
        for root in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            procs = Path(root + path) / "cgroup.procs"
            if procs.exists():
                return procs.read_text().split() == [str(pid)]
    return False


def view_problems(tally: Tally | None) -> list[str]:
    """The daemon's list against systemd and /proc; counts into TALLY when given."""

    def count(kind: str) -> None:
        if tally is not None:
            setattr(tally, kind, getattr(tally, kind) + 1)

    problems: list[str] = []
    machines = listed()
    for name in VMS:
        if name not in machines:
            count("vms_lost")
            problems.append(f"VM {name} is no longer listed")
    for name, machine in machines.items():
        if machine["state"] not in ("shutoff", *LIVE):
            count("stuck")
            problems.append(f"VM {name} is {machine['state']}")
    qemus, trampolines = qemu_processes()
    for name, pids in qemus.items():
        owner = machines.get(name)
        if owner is None or owner["state"] not in LIVE:
            count("vms_lost" if owner is None else "leaks")
            problems.append(f"QEMU {pids} of VM {name}, which is {owner and owner['state']}")
        elif len(pids) > 1:
            count("duplicates")
            problems.append(f"VM {name} has {len(pids)} QEMUs: {pids}")
    if trampolines:
        count("leaks")
        problems.append(f"spawn trampolines left: {trampolines}")
    for name, machine in machines.items():
        if machine["state"] not in LIVE:
            continue
        pid = int(str(machine["pid"]))
        if qemus.get(name) != [pid]:
            count("vms_lost")
            problems.append(
                f"VM {name} listed {machine['state']} pid {pid}; QEMUs {qemus.get(name)}"
            )
        elif not in_scope(pid, str(machine["unit"])):
            count("leaks")
            problems.append(f"QEMU {pid} of VM {name} is not alone in {machine['unit']}")
    live_units = {str(m["unit"]) for m in machines.values() if m["state"] in LIVE}
    scopes = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "svm-*.scope").stdout
    for line in scopes.splitlines():
        unit, _load, active, sub = line.split()[:4]
        if unit not in live_units or active != "active":
            count("leaks")
            problems.append(f"scope {unit} is {active}/{sub}, not a live VM's")
    failed = sh("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
    if failed:
        count("leaks")
        problems.append(f"failed units: {failed}")
    return problems


def settled_view(tally: Tally | None) -> list[str]:
    """The view once nothing is in flight: retried for a bounded time, then counted."""
    deadline = time.monotonic() + 30
    while view_problems(None) and time.monotonic() < deadline:
        time.sleep(0.5)
    return view_problems(tally)


def allowed_reasons(
    op: str, image: Path, exit_time: float | None, unwatched: tuple[float, float]
) -> set[str]:
    if op in FROM_OUTSIDE:
        reasons = {FROM_OUTSIDE[op]}
        if exit_time is None or unwatched[0] - GRACE <= exit_time <= unwatched[1]:
            reasons.add("lost")
        return reasons
    if op == "shutdown-then-destroy":
        return {"shutdown", "destroyed"} if image == ACPI_IMAGE else {"destroyed"}
    if op == "start":
        return {"failed"}
    return {"destroyed"}


@dataclass
class Plan:
    index: int
    op: str
    name: str
    delay: float

    def __str__(self) -> str:
        kill = f"daemon SIGKILL after {self.delay:.3f} s"
        return f"iteration {self.index}: {self.op} {self.name}, {kill}"


def prepare(plan: Plan) -> None:
    """Bring the target into the state the operation needs (not part of the fault)."""
    state = listed()[plan.name]["state"]
    if plan.op == "start" and state != "shutoff":
        result = svm("destroy", "--force", plan.name)
        assert result.returncode == 0, f"{plan}: preparing: {result.stderr}"
    elif plan.op != "start" and state == "shutoff":
        result = svm("start", plan.name)
        assert result.returncode == 0, f"{plan}: preparing: {result.stderr}"


def launch(plan: Plan, pid: int) -> subprocess.Popen[str] | None:
    if plan.op == "qemu-sigkill":
        os.kill(pid, signal.SIGKILL)
        return None
    if plan.op == "systemctl-stop":
        argv = ["systemctl", "stop", f"svm-{plan.name}.scope"]
    else:
        args = SVMCTL_ARGS[plan.op]
        argv = [SVMCTL, args[0], plan.name, *args[1:]]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def iteration(plan: Plan, tally: Tally) -> tuple[str, list[str]]:
    """One fault: what became of the target, and the problems found (none when all held)."""
    prepare(plan)
    settled_view(None)  # violations left by the previous iteration were counted there
    before = listed()
    target = before[plan.name]
    cursor = journal_cursor()
    began = time.time()
    clock = ExitClock([int(str(m["pid"])) for m in before.values() if m["state"] in LIVE])
    client: subprocess.Popen[str] | None = None
    client_rc, client_err = 0, ""
    try:
        client = launch(plan, int(str(target["pid"])))
        time.sleep(plan.delay)
        daemon = main_pid()
        assert daemon > 0, "the daemon is not running before the kill"
        killed_at = time.monotonic()
        os.kill(daemon, signal.SIGKILL)
        ready_at = wait_daemon_back(daemon, tally)
        if client is not None:
            _, client_err = client.communicate(timeout=120)
            client_rc = client.returncode
        # The target settles: a cut-off ACPI shutdown is pressed again at start-up.
        deadline = time.monotonic() + 15
        while listed()[plan.name]["state"] not in ("shutoff", "running", "paused"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if plan.op == "shutdown-then-destroy" and VMS[plan.name] == ACPI_IMAGE:
            while listed()[plan.name]["state"] in LIVE and time.monotonic() < deadline:
                time.sleep(0.2)
        problems = settled_view(tally)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.communicate()
        exits = clock.close()
    after = listed()
    stopped = lifecycle_entries(cursor, "stopped", tally)
    note = f"client exit {client_rc}" + (f" ({client_err.strip()})" if client_err.strip() else "")
    for name, machine in after.items():
        was = before.get(name)
        if name == plan.name or was is None:
            continue
        if (machine["state"], machine["pid"]) != (was["state"], was["pid"]) or stopped.get(name):
            tally.other += 1
            problems.append(
                f"bystander VM {name} changed: {was['state']}/{was['pid']} -> "
                f"{machine['state']}/{machine['pid']}, stopped entries {stopped.get(name)}"
            )
    now = after.get(plan.name)
    if now is None:
        return "not listed", problems  # counted as lost by the view check
    reasons = stopped.get(plan.name, [])
    events = [json.loads(line) for line in svm("--json", "events", plan.name).stdout.splitlines()]
    seen = [e["reason"] for e in events if e["event"] == "stopped" and e["time"] >= began]
    if collections.Counter(seen) - collections.Counter(reasons):
        tally.other += 1
        problems.append(f"svmctl events has stopped {seen}, the journal {reasons}")
    ran = target["state"] in LIVE
    old_pid = int(str(target["pid"]))
    same_run = ran and now["state"] in LIVE and now["pid"] == target["pid"]
    if same_run or (not ran and now["state"] == "shutoff" and not reasons):
        if plan.op in FROM_OUTSIDE or client_rc == 0:
            tally.other += 1
            problems.append(f"{plan.op} had no effect, yet it did not fail ({note})")
        elif plan.op == "shutdown-then-destroy" and old_pid not in exits:
            tally.shutdown_left_pending += 1  # pressed again at start-up; nobody destroys
        elif plan.name in lifecycle_entries(cursor, "stopping"):
            tally.wrong_reasons += 1  # a stop that began must end as asked
            problems.append(f"{plan.op} began (a `stopping` entry) but the VM runs on ({note})")
        else:
            tally.no_effect += 1
        if reasons:
            tally.other += 1
            problems.append(f"stopped entries {reasons} while the run goes on")
    elif not ran:  # a start: running now, or a failed start reported once
        if now["state"] == "shutoff" and (reasons != ["failed"] or now["reason"] != "failed"):
            tally.wrong_reasons += 1
            problems.append(f"start ended shutoff/{now['reason']}, stopped entries {reasons}")
        elif now["state"] in LIVE and reasons:
            tally.other += 1
            problems.append(f"start left it {now['state']} but stopped entries {reasons}")
    elif now["state"] == "shutoff":
        allowed = allowed_reasons(
            plan.op, VMS[plan.name], exits.get(old_pid), (killed_at, ready_at)
        )
        if not reasons:
            tally.unreported += 1
            problems.append(f"the exit was not reported (status reason {now['reason']})")
        elif len(reasons) > 1:
            tally.duplicates += 1
            problems.append(f"the exit was reported {len(reasons)} times: {reasons}")
        if reasons and (reasons[-1] != now["reason"] or now["reason"] not in allowed):
            tally.wrong_reasons += 1
            exit_at = exits.get(old_pid)
            when = f"{exit_at - killed_at:+.3f} s from the kill" if exit_at else "unknown"
            problems.append(
                f"reason {now['reason']} (journal {reasons}), expected one of {sorted(allowed)}; "
                f"QEMU ended {when}, new daemon ready {ready_at - killed_at:+.3f} s"
            )
        if now["reason"] == "lost" and "lost" in allowed:
            tally.reason_lost += 1
    else:
        tally.other += 1
        problems.append(f"pid {target['pid']} -> {now['state']} pid {now['pid']} ({note})")
    outcome = f"{now['state']}/{now['reason'] or '-'}, stopped entries {reasons}, {note}"
    return outcome, [f"{plan}: {problem}" for problem in problems] + (
        [f"{plan}: {note}; daemon journal:\n{daemon_journal(cursor)}"] if problems else []
    )


def recover() -> None:
    """After a violation: kill stray QEMUs by PID and clear failed units, then carry on."""
    machines = listed()
    qemus, _ = qemu_processes()
    for name, pids in qemus.items():
        machine = machines.get(name)
        for pid in pids:
            if machine is None or machine["state"] not in LIVE or int(str(machine["pid"])) != pid:
                os.kill(pid, signal.SIGKILL)
    sh("systemctl", "reset-failed")


@pytest.fixture
def chaos_vms(service: None) -> Iterator[None]:
    for name, image in VMS.items():
        define(name, image, stop_timeout=STOP_TIMEOUT)
    yield
    for name in VMS:
        svm("destroy", "--force", name)
        svm("undefine", name)


def test_daemon_sigkilled_during_operations_comes_back_consistent(
    chaos_vms: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    problems: list[str] = []
    reproduce = (
        f"SVM_CHAOS_SEED={SEED} SVM_CHAOS_ITERATIONS={ITERATIONS} .venv/bin/python -m "
        "tests.sandbox -- -q -p no:cacheprovider tests/integration/test_chaos.py"
    )
    with capsys.disabled():
        print(f"\nchaos: seed {SEED}, {ITERATIONS} iterations; reproduce: {reproduce}")
    started = time.monotonic()
    for index in range(1, ITERATIONS + 1):
        # Half the kills land in the first 0.3 s, where most operations are still in flight.
        delay = rng.uniform(0, 0.3) if rng.random() < 0.5 else rng.uniform(0, 1.5)
        plan = Plan(index, rng.choice(CHOSEN_OPS), rng.choice(sorted(VMS)), delay)
        with capsys.disabled():
            print(f"chaos: {plan}", flush=True)
        tally.ops[plan.op] += 1
        outcome, found = iteration(plan, tally)
        with capsys.disabled():
            print("".join(f"chaos:   note: {note}\n" for note in tally.notes), end="")
            print(f"chaos:   -> {outcome}", flush=True)
        tally.notes.clear()
        if found:
            with capsys.disabled():
                print("\n".join(f"chaos: PROBLEM {p}" for p in found), flush=True)
            problems += found
            recover()
    with capsys.disabled():
        print(f"{tally.line()} ({time.monotonic() - started:.0f} s)", flush=True)
    assert not problems, f"seed {SEED} ({reproduce}):\n" + "\n".join(problems)
