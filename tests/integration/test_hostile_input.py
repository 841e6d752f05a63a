"""Hostile input on the D-Bus API, against the installed service (as test_service.py).

Every Manager and Machine method is called with random and malformed arguments — well-typed
values chosen to hurt (bad names, NaN, huge strings, broken TOML, unknown signals), wrong
signatures, unknown members and objects — as root and, at the same time, as a non-member (first
under the shipped bus policy, then under a permissive one so that the daemon's own check is
what answers), and as a member. Names include VMs that exist and run (tiny guests), so the
calls reach start, stop and QMP paths.

Held after every run: the daemon kept its PID and still answers; every error is a documented
org.supervisordvm1.Error.* (never Failed, never org.python.*) or a D-Bus-level signature/object
error where the call itself was malformed; nothing timed out; every well-typed changing call
from the non-member got AccessDenied, and the daemon audited each of its own refusals; and once
the test's own VMs are removed, nothing is left: no definition file, scope, runtime file or
failed unit beyond what was there before.

    SVM_FUZZ_CALLS=N   calls in total (default 2000; the split is printed)
    SVM_FUZZ_SEED=S    replay a run (the seed is printed, and named in every failure)
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import pwd
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import sdbus
from sdbus import sd_bus_internals

from supervisord_vm.bus import MACHINE_INTERFACE, machine_path
from tests.integration.test_service import (
    ACPI_IMAGE,
    BUS,
    DEFS,
    IFACE,
    MANAGER,
    MEMBER,
    USER,
    definition,
    main_pid,
    service,
    sh,
    svm,
)

pytestmark = pytest.mark.integration

__all__ = ["service"]  # the installed service fixture, shared with test_service.py

TOTAL_CALLS = int(os.environ.get("SVM_FUZZ_CALLS", "2000"))
SEED = int(os.environ.get("SVM_FUZZ_SEED", str(random.SystemRandom().randrange(2**32))))
CALL_TIMEOUT_USEC = 60 * 1_000_000  # anything slower than this counts as "no reply"
RUNTIME = Path("/run/supervisord-vm")
POLICY = Path("/etc/dbus-1/system.d/zz-svmfuzz-open.conf")

DOCUMENTED = {
    f"org.supervisordvm1.Error.{name}"
    for name in (
        "NoSuchMachine",
        "MachineExists",
        "AlreadyRunning",
        "NotRunning",
        "InvalidState",
        "Busy",
        "Timeout",
        "InvalidDefinition",
        "InvalidArgument",
        "AccessDenied",
        "DiskAccessDenied",  # a member's disk outside the image dirs they cannot open
        "ConsoleUnavailable",  # a running VM whose serial console the daemon does not hold
        "StartFailed",
        "SystemdError",
        "QmpError",
        "NoSpace",
    )
}
# Answers of sd-bus or dbus-daemon to a call that is malformed as a D-Bus message.
SIGNATURE_ERRORS = {
    "org.freedesktop.DBus.Error.InvalidArgs",
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
}
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
BUS_POLICY_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DAEMON_DENIED = "org.supervisordvm1.Error.AccessDenied"
CLIENT_SIDE = "client-side-refusal"  # sd-bus would not even build the message

# The test's own VMs: two defined (one running at the start), one name for transient VMs.
POOL = ("hz1", "hz-2", "hzt")
STOP_TIMEOUT = 2

MANAGER_METHODS: dict[str, str] = {
    "ListMachines": "",
    "GetMachine": "s",
    "GetDefinition": "s",
    "Define": "s",
    "Undefine": "s",
    "Create": "s",
    "Start": "s",
    "Shutdown": "sdb",
    "Destroy": "ssd",
    "Kill": "ss",
    "Reboot": "s",
    "Reset": "s",
    "Pause": "s",
    "Resume": "s",
    "Reload": "",
    "ShutdownAll": "du",
    "GetEvents": "s",
    "GetLog": "su",
    "OpenConsole": "s",
    "OpenConsoleWithFlags": "st",
    "GetConsoleLog": "su",
}
MACHINE_METHODS: dict[str, str] = {
    "Start": "",
    "Shutdown": "db",
    "Destroy": "sd",
    "Kill": "s",
    "Reboot": "",
    "Reset": "",
    "Pause": "",
    "Resume": "",
    "GetDefinition": "",
    "OpenConsole": "",
    "GetResources": "",
}
# How often each method is drawn: the ones that start, stop and drive VMs most, the ones that
# sweep everything away (ShutdownAll, Undefine, Reload) rarely, so the run stays deep in the
# lifecycle instead of mostly meeting VMs that are gone.
MANAGER_WEIGHTS = {
    "ListMachines": 2,
    "GetMachine": 2,
    "GetDefinition": 2,
    "Define": 6,
    "Undefine": 1,
    "Create": 3,
    "Start": 9,
    "Shutdown": 4,
    "Destroy": 5,
    "Kill": 4,
    "Reboot": 3,
    "Reset": 3,
    "Pause": 4,
    "Resume": 4,
    "Reload": 1,
    "ShutdownAll": 1,
    "GetEvents": 2,
    "GetLog": 2,
    "OpenConsole": 2,
    "OpenConsoleWithFlags": 1,
    "GetConsoleLog": 2,
}
MACHINE_WEIGHTS = {method: 4 if method == "Start" else 2 for method in MACHINE_METHODS}
# Methods whose audit records name the operation they share with another method.
AUDITED_AS = {"OpenConsoleWithFlags": "OpenConsole"}
READ_ONLY = {"ListMachines", "GetMachine", "GetDefinition", "GetEvents", "GetResources"}
PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass
class Call:
    who: str
    interface: str
    member: str
    path: str
    signature: str
    args: list[Any]
    well_typed: bool
    outcome: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        shown = [
            a if not isinstance(a, str) or len(a) < 200 else a[:200] + "..." for a in self.args
        ]
        return (
            f"{self.who}: {self.interface}.{self.member}({self.signature}) on {self.path} "
            f"args={shown!r} -> {self.outcome} in {self.seconds:.2f}s"
        )


# --- argument generators: each takes the random source, returns one value ------------------


def hostile_name(rng: random.Random) -> str:
    choices: list[Callable[[], str]] = [
        *([lambda: rng.choice(POOL)] * 10),
        lambda: "",
        lambda: rng.choice(["/", "..", "../../etc/passwd", ".", "-", "*", "%s%n", "svm-x.scope"]),
        lambda: rng.choice(["hz1 ", " hz1", "HZ1", "hz1\n", "hz1/", "hz1.toml", "hz1.service"]),
        lambda: "a" * rng.choice([64, 65, 255, 4096, 100_000]),
        lambda: "-".join("a" for _ in range(rng.randrange(2, 60))),
        lambda: "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 20))),
        lambda: "".join(rng.choice("abc.-_019") for _ in range(rng.randrange(1, 12))),
        lambda: "\u00fcn\u00efc\u00f6de-\u2603",
        lambda: "\x01\x1b[31mred\x7f",
    ]
    return rng.choice(choices)()


def hostile_timeout(rng: random.Random, zero_ok: bool) -> float:
    """Invalid timeouts, and valid ones short enough that no call legitimately waits long.

    Shutdown without a timeout (0) waits as long as the guest takes, by design: 0 is only
    offered where it means "the VM's stop timeout" (Destroy, ShutdownAll).
    """
    bad = [-1.0, -1e-9, math.nan, math.inf, -math.inf, 1e308, 604800.5, -604800.0, 2.0**63]
    good = [0.001, 0.05, 0.5, 1.0, rng.uniform(0.0, 2.0)]
    if zero_ok:
        good += [0.0, -0.0]
    return rng.choice(bad) if rng.random() < 0.4 else rng.choice(good)


# Signals that leave QEMU stopped are left out: a wedged QEMU is a separate reliability item
# (bounded QMP commands, issue #7); here they would only turn the run into a wait.
STOP_SIGNALS = {"STOP", "SIGSTOP", "TSTP", "SIGTSTP", "TTIN", "SIGTTIN", "TTOU", "SIGTTOU"}
STOP_NUMBERS = {19, 20, 21, 22}


def hostile_signal(rng: random.Random) -> str:
    choices: list[Callable[[], str]] = [
        lambda: rng.choice(["TERM", "SIGTERM", "15", "KILL", "9", "HUP", "sigint", "USR1", "0"]),
        lambda: rng.choice(["WINCH", "PIPE", "CHLD", "SIGRTMIN+3", "RTMAX-1", "SIGRTMIN", "64"]),
        lambda: str(rng.choice([n for n in range(0, 70) if n not in STOP_NUMBERS])),
        lambda: rng.choice(["", "-9", "999", "SIGFOO", "1e3", "0x9", "nan", " 15", "15 ", "+15"]),
        lambda: rng.choice(["RTMIN+99", "SIGRTMAX+1", "RTMIN-1", "SIG", "SIGSIGTERM", "TERM\n"]),
        lambda: "9" * rng.choice([20, 400, 5000]),
    ]
    return rng.choice(choices)()


def hostile_mode(rng: random.Random) -> str:
    return rng.choice(["default", "graceful", "force", "", "FORCE", "gentle", "force ", "x" * 9999])


def pool_definition(name: str, rng: random.Random) -> str:
    extra: dict[str, str] = {}
    if rng.random() < 0.3:
        extra["restart"] = rng.choice(['"no"', '"on-crash"', '"always"'])
    return definition(name, ACPI_IMAGE, STOP_TIMEOUT, **extra)


def hostile_definition(rng: random.Random) -> str:
    name = rng.choice(POOL)
    good = pool_definition(name, rng)
    choices: list[Callable[[], str]] = [
        lambda: good,
        lambda: good,
        lambda: good.replace(str(ACPI_IMAGE), "/nonexistent/disk.img"),
        lambda: good + 'qemu = "/bin/false"\n',
        lambda: good.replace("memory = 16", "memory = 99999999"),
        lambda: good.replace('accel = "tcg"', 'accel = "tcg:tcg"'),
        lambda: good + "unknown_key = 1\n",
        lambda: good[: rng.randrange(len(good))],
        lambda: "".join(rng.choice(good) for _ in range(rng.randrange(0, 200))),
        lambda: "",
        lambda: "[[[[",
        lambda: "name = " + "[" * 5000,
        lambda: 'name = "' + "x" * (1 << 20) + '"',
        lambda: "a = {" * 300,
        lambda: f'name = "{name}"\nextra_args = ["-device", "nonexistent-device"]\n',
        lambda: "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(0, 300))),
    ]
    return rng.choice(choices)()


def hostile_uint(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 10, 1000, 2**31, 2**32 - 1, rng.randrange(2**32)])


def typed_args(method: str, rng: random.Random, machine: bool) -> list[Any]:
    """Arguments of the method's own signature, with hostile values."""
    name = [] if machine else [hostile_name(rng)]
    if method in ("Define", "Create"):
        return [hostile_definition(rng)]
    if method == "Shutdown":
        return [*name, hostile_timeout(rng, zero_ok=False), rng.random() < 0.5]
    if method == "Destroy":
        return [*name, hostile_mode(rng), hostile_timeout(rng, zero_ok=True)]
    if method == "Kill":
        return [*name, hostile_signal(rng)]
    if method == "ShutdownAll":
        return [hostile_timeout(rng, zero_ok=True), hostile_uint(rng)]
    if method in ("GetLog", "GetConsoleLog"):
        return [*name, hostile_uint(rng)]
    if method == "OpenConsoleWithFlags":
        return [*name, rng.choice([0, 1, 2, 2**63, 2**64 - 1])]
    if method in ("GetEvents",) and rng.random() < 0.3:
        return [""]
    return name


WRONG_SIGNATURES: list[tuple[str, list[Any]]] = [
    ("", []),
    ("s", ["hz1"]),
    ("i", [-1]),
    ("u", [7]),
    ("d", [math.nan]),
    ("b", [True]),
    ("x", [2**62]),
    ("ss", ["hz1", "force"]),
    ("sd", ["hz1", 1.0]),
    ("as", [["hz1", "hz-2"]]),
    ("sdbs", ["hz1", 1.0, True, "extra"]),
    ("ssd", ["hz1", "force", 0.0]),
    ("o", ["/org/supervisordvm1"]),
    ("y", [255]),
    ("a{ss}", [{"name": "hz1"}]),
]


def plan_call(who: str, rng: random.Random) -> Call:
    """One random call: mostly well typed, some malformed as D-Bus messages."""
    roll = rng.random()
    if roll < 0.62:
        member = rng.choices(list(MANAGER_WEIGHTS), list(MANAGER_WEIGHTS.values()))[0]
        return Call(
            who,
            IFACE,
            member,
            MANAGER,
            MANAGER_METHODS[member],
            typed_args(member, rng, machine=False),
            True,
        )
    if roll < 0.84:
        member = rng.choices(list(MACHINE_WEIGHTS), list(MACHINE_WEIGHTS.values()))[0]
        target = rng.choice(POOL) if rng.random() < 0.8 else hostile_name(rng)
        return Call(
            who,
            MACHINE_INTERFACE,
            member,
            machine_path(target),
            MACHINE_METHODS[member],
            typed_args(member, rng, machine=True),
            True,
        )
    if roll < 0.88:
        path = machine_path(rng.choice(POOL))
        prop = rng.choice(["State", "Name", "MainPID", "Nope", "", "ExitTime"])
        property_calls: list[tuple[str, str, list[Any]]] = [
            ("Get", "ss", [MACHINE_INTERFACE, prop]),
            ("GetAll", "s", [rng.choice([MACHINE_INTERFACE, "x.y", ""])]),
            ("Set", "ssv", [MACHINE_INTERFACE, "State", ("s", "running")]),
        ]
        member, signature, args = rng.choice(property_calls)
        return Call(who, PROPERTIES, member, path, signature, args, False)
    interface, methods, path = rng.choice(
        [
            (IFACE, MANAGER_METHODS, MANAGER),
            (MACHINE_INTERFACE, MACHINE_METHODS, machine_path(rng.choice(POOL))),
        ]
    )
    if roll < 0.96:
        member = rng.choice(list(methods))
        candidates = [w for w in WRONG_SIGNATURES if w[0] != methods[member]]
        signature, args = rng.choice(candidates)
        return Call(who, interface, member, path, signature, list(args), False)
    member = rng.choice(["Frobnicate", "start", "Start ", "ListMachines2", "Introspect"])
    return Call(who, interface, member, path, "", [], False)


# --- one D-Bus client --------------------------------------------------------------------------


def error_name(error: BaseException) -> str:
    name = getattr(type(error), "dbus_error_name", None)
    if isinstance(name, str):
        return name
    if isinstance(error, sd_bus_internals.SdBusUnmappedMessageError) and error.args:
        first = error.args[0]
        if isinstance(first, tuple) and first:
            return str(first[0])
        return str(first)
    return f"client-exception:{type(error).__name__}:{error}"


def perform(bus: Any, call: Call) -> None:
    started = time.monotonic()
    try:
        message = bus.new_method_call_message(BUS, call.path, call.interface, call.member)
        if call.signature:
            message.append_data(call.signature, *call.args)
    except Exception:  # the client library refuses to build it: nothing was sent
        call.outcome = CLIENT_SIDE
        return
    try:
        bus.call(message)
        call.outcome = "ok"
    except Exception as error:
        call.outcome = error_name(error)
    finally:
        call.seconds = time.monotonic() - started


def run_calls(who: str, seed: int, count: int) -> list[Call]:
    """Make ``count`` calls, one after the other, on a new system-bus connection."""
    rng = random.Random(seed)
    bus = sdbus.sd_bus_open_system()
    bus.method_call_timeout_usec = CALL_TIMEOUT_USEC
    calls: list[Call] = []
    for _ in range(count):
        call = plan_call(who, rng)
        perform(bus, call)
        calls.append(call)
    bus.close()
    return calls


def as_user_in_child(user: str, seed: int, count: int, out: Path) -> int:
    """Fork a child that becomes ``user``, makes its calls on its own connection and writes
    them to ``out`` (a file root opened for it); the checkout need not be readable by ``user``."""
    entry = pwd.getpwnam(user)
    stream = out.open("w")
    pid = os.fork()
    if pid == 0:  # child: only os._exit leaves
        status = 1
        try:
            os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            for call in run_calls(user, seed, count):
                stream.write(json.dumps(asdict(call)) + "\n")
            stream.flush()
            status = 0
        except BaseException as error:
            stream.write(json.dumps({"child-error": repr(error)}) + "\n")
            stream.flush()
        finally:
            os._exit(status)
    stream.close()
    return pid


def run_as(user: str, seed: int, count: int, out: Path) -> list[Call]:
    child = as_user_in_child(user, seed, count, out)
    _, status = os.waitpid(child, 0)
    assert status == 0, f"seed {SEED}: client of {user} exited with {status}"
    return read_calls(out)


def read_calls(out: Path) -> list[Call]:
    calls = []
    for line in out.read_text().splitlines():
        record = json.loads(line)
        assert "child-error" not in record, f"seed {SEED}: client child failed: {record}"
        calls.append(Call(**record))
    return calls


def reload_bus_config() -> None:
    sh(
        "busctl",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ReloadConfig",
        check=True,
    )


def open_bus_policy() -> None:
    """Let everyone send to the daemon, so its own authorization is what answers."""
    POLICY.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        '<busconfig><policy context="default">'
        '<allow send_destination="org.supervisordvm1"/></policy></busconfig>\n'
    )
    reload_bus_config()


# --- what must hold ---------------------------------------------------------------------------


def changing(call: Call) -> bool:
    return call.member not in READ_ONLY


def problems_of(call: Call, policy_open: bool) -> list[str]:
    """Why ``call``'s outcome breaks the rules (empty when it is fine)."""
    outcome = call.outcome
    if outcome == CLIENT_SIDE:
        return []
    no_reply = outcome.startswith("client-exception") or "NoReply" in outcome
    if no_reply or outcome.endswith(("DBus.Error.Timeout", "DBus.Error.TimedOut")):
        return [f"no proper reply: {call.describe()}"]
    if outcome == "org.supervisordvm1.Error.Failed" or outcome.startswith("org.python"):
        return [f"undocumented error: {call.describe()}"]
    if outcome.startswith("org.supervisordvm1.Error.") and outcome not in DOCUMENTED:
        return [f"undocumented error: {call.describe()}"]
    if outcome.startswith("org.freedesktop.DBus.Error."):
        allowed = set(SIGNATURE_ERRORS) if not call.well_typed else set()
        if call.interface in (MACHINE_INTERFACE, PROPERTIES):
            allowed.add(UNKNOWN_OBJECT)  # a VM undefined meanwhile, or a made-up name
        if call.who == USER and not policy_open:
            allowed.add(BUS_POLICY_DENIED)
        if outcome not in allowed:
            return [f"unexpected D-Bus error: {call.describe()}"]
    if call.who == USER and call.well_typed and changing(call) and outcome != UNKNOWN_OBJECT:
        expected = DAEMON_DENIED if policy_open else BUS_POLICY_DENIED
        if outcome != expected:
            return [f"non-member not refused with {expected}: {call.describe()}"]
    return []


def leftovers() -> dict[str, list[str]]:
    scopes = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "svm-*").stdout
    failed = sh("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
    return {
        "definitions": sorted(p.name for p in DEFS.iterdir()),
        "scopes": sorted(line.split()[0] for line in scopes.splitlines() if line.strip()),
        "runtime": sorted(
            str(p.relative_to(RUNTIME)) for p in RUNTIME.rglob("*") if not p.is_dir()
        ),
        "failed": sorted(line.split()[0] for line in failed.splitlines() if line.strip()),
    }


def remove_vms_not_in(baseline: set[str]) -> None:
    listed = svm("--json", "list", "--all")
    assert listed.returncode == 0, listed.stderr
    for machine in json.loads(listed.stdout):
        name = str(machine["name"])
        if name in baseline:
            continue
        if machine["state"] != "shutoff":
            svm("destroy", "--force", name)
        svm("undefine", name)


def denied_audit_records(uid: int, since: str) -> collections.Counter[str]:
    """The daemon's refusals of `uid` since `since`, by operation (VM_OPERATION)."""
    entries = sh(
        "journalctl",
        "-u",
        "supervisord-vm",
        "--no-pager",
        "-o",
        "cat",
        "--output-fields=VM_OPERATION",
        "--since",
        since,
        f"CALLER_UID={uid}",
        "VM_RESULT=denied",
        timeout=120,
    ).stdout
    return collections.Counter(line.strip() for line in entries.splitlines() if line.strip())


@dataclass
class Baseline:
    """What was there before the test's VMs: the VMs known and the files and units."""

    vms: set[str]
    leftovers: dict[str, list[str]]


@pytest.fixture
def hostile_pool(service: None) -> Iterator[Baseline]:
    """The pool's VMs (one running); afterwards whatever the run left is removed."""
    listed = json.loads(svm("--json", "list", "--all").stdout)
    known = {str(machine["name"]) for machine in listed}
    before = Baseline(known, leftovers())
    for name in POOL[:2]:
        path = Path(f"/run/{name}.toml")
        path.write_text(definition(name, ACPI_IMAGE, STOP_TIMEOUT))
        result = svm("define", str(path))
        path.unlink()
        assert result.returncode == 0, result.stderr
    assert svm("start", POOL[0]).returncode == 0
    try:
        yield before
    finally:
        with contextlib.suppress(OSError):
            POLICY.unlink()
            reload_bus_config()
        remove_vms_not_in(known)


def test_hostile_calls_get_documented_answers_and_leave_nothing_behind(
    hostile_pool: Baseline,
) -> None:
    print(f"hostile input: seed {SEED} (replay: SVM_FUZZ_SEED={SEED}), {TOTAL_CALLS} calls")
    pid_before = main_pid()
    since = sh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    time.sleep(1)  # journalctl --since has a resolution of one second
    non_member_calls = TOTAL_CALLS * 2 // 5
    member_calls = TOTAL_CALLS // 10
    root_calls = TOTAL_CALLS - non_member_calls - member_calls
    started = time.monotonic()
    scratch = Path("/run/svm-hostile")
    scratch.mkdir(exist_ok=True)
    # The non-member first under the shipped bus policy (dbus-daemon refuses), then under a
    # permissive one, so that the daemon's own check answers — while root's calls run.
    shut = run_as(USER, SEED + 1, non_member_calls // 4, scratch / "non-member-shut.jsonl")
    open_bus_policy()
    child_out = scratch / "non-member-open.jsonl"
    child = as_user_in_child(USER, SEED + 2, non_member_calls - len(shut), child_out)
    try:
        root = run_calls("root", SEED, root_calls)
    finally:
        _, status = os.waitpid(child, 0)
    assert status == 0, f"seed {SEED}: non-member client exited with {status}"
    opened = read_calls(child_out)
    member = run_as(MEMBER, SEED + 3, member_calls, scratch / "member.jsonl")
    elapsed = time.monotonic() - started
    non_member = shut + opened

    problems: list[str] = []
    for call in root + member + opened:
        problems += problems_of(call, policy_open=True)
    for call in shut:
        problems += problems_of(call, policy_open=False)

    everyone = root + non_member + member
    counts: dict[str, collections.Counter[str]] = {}
    for call in everyone:
        counts.setdefault(call.who, collections.Counter())[call.outcome] += 1
    sent = [call for call in everyone if call.outcome != CLIENT_SIDE]
    slowest = max(everyone, key=lambda c: c.seconds)
    print(
        f"hostile input: {len(sent)} calls sent in {elapsed:.1f} s; slowest: {slowest.describe()}"
    )
    unsent = collections.Counter(f"{c.member}({c.signature})" for c in everyone if c not in sent)
    print(f"  not sent (refused by the client library): {dict(unsent)}")
    succeeded = collections.Counter(
        f"{c.interface.rsplit('.', 1)[1]}.{c.member}" for c in root if c.outcome == "ok"
    )
    print(f"  root's successful calls: {dict(sorted(succeeded.items()))}")
    rare = ("QmpError", "SystemdError", "Busy")
    for call in everyone:
        if call.outcome.endswith(rare):
            print(f"  rare answer: {call.describe()}")
    for who, counter in counts.items():
        print(f"  {who}: {sum(counter.values())} calls")
        for outcome, number in counter.most_common():
            print(f"    {number:5d}  {outcome}")

    assert main_pid() == pid_before, f"seed {SEED}: the daemon restarted"
    assert svm("list", "--all").returncode == 0, f"seed {SEED}: the daemon does not answer"
    assert not problems, f"seed {SEED}: {len(problems)} problems:\n" + "\n".join(problems[:40])

    assert succeeded["Manager.Start"] + succeeded["Machine.Start"] > 0, (
        f"seed {SEED}: no VM started"
    )
    daemon_refusals = sum(1 for c in non_member if c.outcome == DAEMON_DENIED)
    assert daemon_refusals > 0, f"seed {SEED}: the daemon's own check was never reached"
    uid = pwd.getpwnam(USER).pw_uid
    audited = denied_audit_records(uid, since)
    refused = collections.Counter(
        AUDITED_AS.get(c.member, c.member).lower() for c in non_member if c.outcome == DAEMON_DENIED
    )
    assert audited == refused, (
        f"seed {SEED}: audit records (journal - client): {dict(audited - refused)}, "
        f"(client - journal): {dict(refused - audited)}"
    )

    POLICY.unlink()
    reload_bus_config()
    remove_vms_not_in(hostile_pool.vms)
    assert leftovers() == hostile_pool.leftovers, f"seed {SEED}: left behind"
