"""Edges of the installed service as a bus client, an admin and a script would probe them: bad
input over D-Bus leaves a specific error and nothing behind; broken hand-edited files are
reported on reload; svmctl never shows a traceback; parallel clients get only named errors."""

from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_service import (
    ACPI_IMAGE,
    BUS,
    DEFS,
    IFACE,
    MANAGER,
    definition,
    gdbus,
    service,
    sh,
    status,
    svm,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # the module fixture, shared with test_service (make install + start)

RUNTIME = Path("/run/supervisord-vm")
STATE_EXITS = Path("/var/lib/supervisord-vm/exits")


def gvariant_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GVariant string literal


def snapshot() -> tuple[set[str], set[str], set[str], str]:
    """Everything a failed call could leave behind."""
    scopes = sh("systemctl", "list-units", "--all", "--plain", "--no-legend", "svm-*").stdout
    runtime = {p.name for p in RUNTIME.iterdir()} if RUNTIME.exists() else set()
    exits = {p.name for p in STATE_EXITS.iterdir()} if STATE_EXITS.exists() else set()
    return {p.name for p in DEFS.iterdir()}, runtime, exits, scopes


def healthy() -> None:
    assert sh("systemctl", "is-active", "supervisord-vm.service").stdout.strip() == "active"
    assert svm("list", "--all").returncode == 0


def test_kill_with_a_realtime_signal(clean: None, tmp_path: Path) -> None:
    """`systemctl kill --signal SIGRTMIN+3` works on scopes; so does svmctl kill."""
    path = tmp_path / "se_rt.toml"
    path.write_text(definition("se_rt", ACPI_IMAGE))
    assert svm("define", str(path)).returncode == 0
    try:
        assert svm("start", "se_rt").returncode == 0
        result = svm("kill", "se_rt", "--signal", "SIGRTMIN+3")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 20
        while status("se_rt")["state"] != "shutoff" and time.monotonic() < deadline:
            time.sleep(0.1)
        info = status("se_rt")
        assert (info["state"], info["reason"]) == ("shutoff", "destroyed")
        assert info["exit_signal"] == signal.SIGRTMIN + 3
        assert "signal=SIGRTMIN+3" in svm("status", "se_rt").stdout
    finally:
        svm("destroy", "--force", "se_rt")
        svm("undefine", "se_rt")


@pytest.fixture
def clean(service: None) -> Iterator[None]:
    """Assert the test left no definition, runtime file, exit record or scope behind."""
    before = snapshot()
    yield
    healthy()
    assert snapshot() == before


BAD_DEFINITIONS = {
    "invalid TOML": ("name = ", "not valid TOML"),
    "unknown key": ('name = "e1"\nmemroy = 64\n', "unknown key 'memroy' (did you mean 'memory'?)"),
    "control bytes": ('name = "\x01\x02"\n', "not valid TOML"),
    "path name": ('name = "../x"\n', "field 'name': must not contain '/'"),
    "unit-like name": ('name = "x.service"\n', "must not end with '.service'"),
    "leading dash": ('name = "-x"\n', "must start with a letter or digit"),
    "deep nesting": ("x = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    "10 MB": ('name = "' + "a" * 10_000_000 + '"\n', "too large"),
}


@pytest.mark.parametrize("case", sorted(BAD_DEFINITIONS))
@pytest.mark.parametrize("method", ["Define", "Create"])
def test_bad_definitions_over_the_bus(method: str, case: str, clean: None, tmp_path: Path) -> None:
    text, expected = BAD_DEFINITIONS[case]
    if len(text) > 100_000:  # too long for an argv: send it through svmctl's bus call
        path = tmp_path / "big.toml"
        path.write_text(text)
        result = svm(method.lower(), str(path))
        # svmctl refuses to read it at all: the same limit on both sides of the bus
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        return
    result = gdbus(method, gvariant_string(text))
    assert result.returncode != 0
    assert "org.supervisordvm1.Error.InvalidDefinition" in result.stderr, result.stderr
    assert expected in result.stderr
    assert "org.python" not in result.stderr and "Traceback" not in result.stderr


def test_ten_megabyte_definition_over_the_bus_is_refused(clean: None) -> None:
    """Straight over the bus, past svmctl's own limit: refused fast, nothing stored."""
    script = (
        "from sdbus import sd_bus_open_system\n"
        "bus = sd_bus_open_system()\n"
        f"m = bus.new_method_call_message({BUS!r}, {MANAGER!r}, {IFACE!r}, 'Define')\n"
        "m.append_data('s', 'name = \"big\"\\nextra_args = [\"' + 'a' * 10_000_000 + '\"]\\n')\n"
        "try:\n"
        "    bus.call(m)\n"
        "except Exception as exc:\n"
        "    print(exc.args[0] if len(exc.args) > 1 else exc.dbus_error_name, exc.args[-1])\n"
    )
    started = time.monotonic()
    result = sh("/usr/local/lib/supervisord-vm/venv/bin/python3", "-c", script)
    assert time.monotonic() - started < 10
    assert result.stdout.startswith("org.supervisordvm1.Error.InvalidDefinition"), result
    assert "too large" in result.stdout


@pytest.mark.parametrize(
    ("method", "args", "error", "message"),
    [
        ("Destroy", ["nosuch", "frob", "0"], "InvalidArgument", "unknown destroy mode 'frob'"),
        ("Destroy", ["nosuch", "default", "-1"], "InvalidArgument", "must be from 0 to"),
        ("Destroy", ["nosuch", "default", "nan"], "InvalidArgument", "must be from 0 to"),
        ("Destroy", ["nosuch", "graceful", "inf"], "InvalidArgument", "must be from 0 to"),
        ("Shutdown", ["nosuch", "1e308", "false"], "InvalidArgument", "must be from 0 to"),
        ("ShutdownAll", ["inf", "0"], "InvalidArgument", "must be from 0 to"),
        ("Kill", ["nosuch", "0"], "InvalidArgument", "unknown signal '0'"),
        ("Kill", ["nosuch", "-1"], "InvalidArgument", "unknown signal '-1'"),
        ("Kill", ["nosuch", "99"], "InvalidArgument", "unknown signal '99'"),
        ("Kill", ["nosuch", "SIGFOO"], "InvalidArgument", "unknown signal 'SIGFOO'"),
        ("Kill", ["nosuch", "KILL"], "NoSuchMachine", "no VM named 'nosuch'"),
        ("GetLog", ["nosuch", "4294967295"], "NoSuchMachine", "no VM named 'nosuch'"),
        ("GetMachine", ["../x"], "NoSuchMachine", "no VM named '../x'"),
        ("Start", ["nosuch"], "NoSuchMachine", "no VM named 'nosuch'"),
    ],
)
def test_bad_arguments_over_the_bus(
    method: str, args: list[str], error: str, message: str, clean: None
) -> None:
    result = gdbus(method, *args)
    assert result.returncode != 0
    assert f"org.supervisordvm1.Error.{error}" in result.stderr, result.stderr
    assert message in result.stderr


def test_huge_log_request_of_a_defined_vm(clean: None, tmp_path: Path) -> None:
    path = tmp_path / "lg.toml"
    path.write_text(definition("se_log", ACPI_IMAGE))
    assert svm("define", str(path)).returncode == 0
    try:
        result = gdbus("GetLog", "se_log", "4294967295")
        assert result.returncode == 0, result.stderr
        empty = svm("log", "se_log")
        assert empty.returncode == 0 and empty.stdout == ""
        assert "no QEMU output recorded for se_log" in empty.stderr
        as_json = svm("--json", "log", "se_log")
        assert json.loads(as_json.stdout) == {"name": "se_log", "log": ""}
    finally:
        svm("undefine", "se_log")


@pytest.mark.parametrize(
    ("case", "extra", "image", "expected"),
    [
        ("missing disk", {}, Path("/nonexistent.img"), "disk /nonexistent.img does not exist"),
        ("missing qemu", {"qemu": '"/usr/bin/nope"'}, ACPI_IMAGE, "/usr/bin/nope does not exist"),
        ("bad extra args", {"extra_args": '["-frobnicate"]'}, ACPI_IMAGE, "-frobnicate"),
    ],
)
def test_start_failures_leave_nothing_behind(
    case: str, extra: dict[str, str], image: Path, expected: str, clean: None
) -> None:
    """Create fails with StartFailed naming the cause; a defined VM stays with reason failed."""
    name = "se_fail"
    text = definition(name, image, 5, **extra)
    created = gdbus("Create", gvariant_string(text))
    assert "org.supervisordvm1.Error.StartFailed" in created.stderr, created.stderr
    assert expected in created.stderr
    assert svm("status", name).returncode == 4  # the transient VM is forgotten
    path = Path(f"/run/{name}.toml")
    path.write_text(text)
    assert svm("define", str(path)).returncode == 0
    try:
        started = gdbus("Start", name)
        assert "org.supervisordvm1.Error.StartFailed" in started.stderr, started.stderr
        info = status(name)
        assert (info["state"], info["reason"]) == ("shutoff", "failed")
        assert not Path(RUNTIME / f"{name}.json").exists()
        assert sh("systemctl", "is-active", f"svm-{name}.scope").stdout.strip() != "active"
    finally:
        svm("undefine", name)


def test_log_of_a_forgotten_transient_vm(clean: None) -> None:
    """svmctl log serves a failed Create's log (QEMU ran); no log where QEMU never ran."""
    name, never = "se_flog", "se_nolog"
    logs = Path("/var/log/supervisord-vm")
    try:
        text = definition(name, ACPI_IMAGE, 5, extra_args='["-frobnicate"]')
        assert "Error.StartFailed" in gdbus("Create", gvariant_string(text)).stderr
        assert svm("status", name).returncode == 4
        shown = svm("log", name)
        assert shown.returncode == 0, shown.stderr
        assert "-frobnicate" in shown.stdout
        text = definition(never, ACPI_IMAGE, 5, qemu='"/usr/bin"')
        created = gdbus("Create", gvariant_string(text))
        assert "/usr/bin is a directory, not an executable program" in created.stderr
        assert not (logs / f"{never}.log").exists()
        assert svm("log", never).returncode == 4
    finally:
        for vm in (name, never):
            (logs / f"{vm}.log").unlink(missing_ok=True)


def test_define_of_running_vm_and_create_of_existing_name(clean: None, tmp_path: Path) -> None:
    name = "se_rep"
    path = tmp_path / "rep.toml"
    path.write_text(definition(name, ACPI_IMAGE, stop_timeout=5))
    assert svm("define", str(path)).returncode == 0
    try:
        assert svm("start", name).returncode == 0
        pid = status(name)["pid"]
        path.write_text(definition(name, ACPI_IMAGE, stop_timeout=7))
        redefined = svm("define", str(path))
        assert redefined.returncode == 0
        assert "the new definition applies at its next start" in redefined.stdout
        assert status(name)["pid"] == pid  # still the same QEMU
        exists = gdbus("Create", gvariant_string(definition(name, ACPI_IMAGE)))
        assert "org.supervisordvm1.Error.MachineExists" in exists.stderr, exists.stderr
        assert status(name)["pid"] == pid
        assert svm("destroy", "--force", name).returncode == 0
        exists = gdbus("Create", gvariant_string(definition(name, ACPI_IMAGE)))
        assert "org.supervisordvm1.Error.MachineExists" in exists.stderr
        assert "stop_timeout = 7" in (DEFS / f"{name}.toml").read_text()
    finally:
        svm("destroy", "--force", name)
        svm("undefine", name)


def test_broken_files_on_reload_are_reported_and_harm_nothing(clean: None) -> None:
    good = "se_good"
    (DEFS / f"{good}.toml").write_text(definition(good, ACPI_IMAGE))
    broken: dict[str, str | bytes] = {
        "se_typo.toml": 'name = "se_typo"\nmemroy = 5\n',
        "se_other.toml": definition("se_mismatch", ACPI_IMAGE),
        "se_binary.toml": b"\xff\xfe\x00garbage",
        "se_empty.toml": "",
        "se_deep.toml": "x = " + "[" * 5000 + "]" * 5000,
    }
    try:
        assert svm("reload").returncode == 0
        assert svm("start", good).returncode == 0
        pid = status(good)["pid"]
        for file_name, content in broken.items():
            target = DEFS / file_name
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
        reload = svm("reload")
        assert reload.returncode == 1
        for file_name in broken:
            assert f"error: {DEFS / file_name}: " in reload.stdout, reload.stdout
        assert "unknown key 'memroy'" in reload.stdout
        assert "field 'name' is 'se_mismatch'" in reload.stdout
        assert "nested too deeply" in reload.stdout
        as_json = json.loads(svm("--json", "reload").stdout)
        assert len([e for e in as_json["errors"] if "/se_" in e]) == len(broken)
        assert sh("systemctl", "reload", "supervisord-vm.service").returncode == 0
        journal = sh(
            "journalctl", "-u", "supervisord-vm", "--no-pager", "-o", "cat", "--since", "-60s"
        ).stdout
        assert f"reload: {DEFS / 'se_typo.toml'}: unknown key 'memroy'" in journal
        healthy()
        info = status(good)
        assert (info["state"], info["pid"]) == ("running", pid)
        listed = {m["name"] for m in json.loads(svm("--json", "list", "--all").stdout)}
        assert good in listed and not listed & {"se_typo", "se_mismatch"}
    finally:
        for file_name in broken:
            (DEFS / file_name).unlink(missing_ok=True)
        svm("destroy", "--force", good)
        svm("undefine", good)
        svm("reload")


# --- svmctl as a person uses it ----------------------------------------------------------------


def test_svmctl_usage_errors_never_show_a_traceback(service: None) -> None:
    for argv in (
        ("log", "x", "-n", "-5"),
        ("log", "x", "-n", "99999999999"),
        ("destroy", "x", "--timeout", "nan"),
        ("destroy", "x", "--timeout", "inf"),
        ("kill", "x", "--signal", "SIGFOO"),
        ("shutdown-all", "--parallel", "-1"),
        ("--json",),
        (),
    ):
        result = svm(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert "Traceback" not in result.stderr and "usage: svmctl" in result.stderr


def test_svmctl_define_bounded_input(clean: None) -> None:
    result = svm("define", "/dev/zero", timeout=30)
    assert result.returncode == 1
    assert "too large for a definition" in result.stderr


def test_events_filter_and_follow_stop_cleanly(clean: None, tmp_path: Path) -> None:
    for name in ("se_ev1", "se_ev2"):
        path = tmp_path / f"{name}.toml"
        path.write_text(definition(name, ACPI_IMAGE))
        assert svm("define", str(path)).returncode == 0
    try:
        rows = [json.loads(line) for line in svm("events", "se_ev1", "--json").stdout.splitlines()]
        assert rows and {r["name"] for r in rows} == {"se_ev1"}
        assert set(rows[0]) == {"time", "name", "event", "state", "reason"}
        follow = subprocess.Popen(
            ["/usr/local/bin/svmctl", "--json", "events", "--follow", "se_ev2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)
            assert svm("start", "se_ev1").returncode == 0
            assert svm("start", "se_ev2").returncode == 0
            time.sleep(1)
            follow.send_signal(signal.SIGINT)  # Ctrl-C
            out, err = follow.communicate(timeout=10)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        assert follow.returncode in (0, 130), err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        followed = [json.loads(line) for line in out.splitlines()]
        assert {r["name"] for r in followed} == {"se_ev2"}
        assert "started" in {r["event"] for r in followed}
    finally:
        for name in ("se_ev1", "se_ev2"):
            svm("destroy", "--force", name)
            svm("undefine", name)


def test_status_and_list_of_a_transient_vm(clean: None) -> None:
    path = Path("/run/se_tr.toml")
    path.write_text(definition("se_tr", ACPI_IMAGE))
    assert svm("create", str(path)).returncode == 0
    try:
        info = status("se_tr")
        assert info["transient"] is True and info["state"] == "running"
        assert "se_tr" in {m["name"] for m in json.loads(svm("--json", "list").stdout)}
        assert "Transient: yes" in svm("status", "se_tr").stdout
        assert svm("destroy", "se_tr").returncode == 0
        assert svm("status", "se_tr").returncode == 4
        assert "se_tr" not in svm("list", "--all").stdout
    finally:
        svm("destroy", "--force", "se_tr")


def test_daemon_stopped_and_masked_gives_a_sentence(service: None) -> None:
    sh("systemctl", "stop", "supervisord-vm.service", check=True)
    sh("systemctl", "mask", "--runtime", "supervisord-vm.service", check=True)
    try:
        for argv in (("list",), ("status", "x"), ("events", "--follow"), ("log", "x")):
            result = svm(*argv, timeout=30)
            assert result.returncode == 1, argv
            assert result.stderr.startswith("svmctl: daemon not running"), result.stderr
            assert "Traceback" not in result.stderr
    finally:
        sh("systemctl", "unmask", "--runtime", "supervisord-vm.service", check=True)
        sh("systemctl", "start", "supervisord-vm.service", check=True)
    healthy()


# --- one call per list and status (issue 8) ---------------------------------------------------

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
MACHINE_IFACE = "org.supervisordvm1.Machine"


def managed_objects(user: str | None = None) -> dict[str, Any]:
    argv = ["busctl", "--json=short", "call", BUS, MANAGER, OBJECT_MANAGER, "GetManagedObjects"]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = sh(*argv)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)["data"][0]
    return answer


def test_one_call_lists_every_vm_with_its_properties(clean: None, tmp_path: Path) -> None:
    """GetManagedObjects (open to everyone) answers every VM's properties; InterfacesAdded and
    InterfacesRemoved announce VMs coming and going; status of a missing VM is still exit 4."""
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--system", "--dest", BUS, "--object-path", MANAGER],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert monitor.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(monitor.stdout or ()), daemon=True)
    reader.start()

    def wait_for_line(*words: str) -> None:
        deadline = time.monotonic() + 20
        while not any(all(word in line for word in words) for line in list(lines)):
            assert time.monotonic() < deadline, (words, lines)
            time.sleep(0.05)

    names = ["se_om-1", "se_om2"]
    try:
        # Printed after a round trip on the connection that sent the match: it is in place.
        wait_for_line("is owned by")
        for name in names:
            file = tmp_path / f"{name}.toml"
            file.write_text(definition(name, ACPI_IMAGE))
            assert svm("define", str(file)).returncode == 0
        try:
            objects = managed_objects(user="svmtest")  # a reader, not an admin
            by_name = {
                str(props[MACHINE_IFACE]["Name"]["data"]): (path, props[MACHINE_IFACE])
                for path, props in objects.items()
                if MACHINE_IFACE in props
            }
            for name in names:
                path, machine = by_name[name]
                assert machine["State"] == {"type": "s", "data": "shutoff"}
                assert path == gdbus("GetMachine", name).stdout.split("'")[1]
                assert status(name)["path"] == path
            listed = json.loads(svm("--json", "list", "--all").stdout)
            assert [m["name"] for m in listed] == sorted(m["name"] for m in listed)
            assert set(names) <= {m["name"] for m in listed}
        finally:
            for name in names:
                assert svm("undefine", name).returncode == 0
        path_1 = by_name["se_om-1"][0]
        wait_for_line("InterfacesRemoved", path_1)
        wait_for_line("InterfacesAdded", path_1, "'se_om-1'")
    finally:
        monitor.terminate()
        monitor.wait(timeout=10)
        reader.join(timeout=10)
    assert path_1 not in managed_objects()
    result = svm("status", "se_om-1")
    assert result.returncode == 4
    assert result.stderr == "svmctl: no VM named 'se_om-1'\n"


# --- concurrency at the bus --------------------------------------------------------------------

NAMED_FAILURES = (
    "is not running",
    "is already running",
    "is already paused",
    "is already starting",
    "cannot ",
    "still running",
    "stopped during",  # NotRunning: QEMU exited under the command (a pause racing a destroy)
    "has just stopped",  # NotRunning: the same, noticed before the command was sent
    "is stopping; start it again",  # InvalidState: a start racing a destroy of the same VM
)


def test_twenty_parallel_clients(clean: None, tmp_path: Path) -> None:
    names = ["se_c1", "se_c2", "se_c3"]
    for name in names:
        path = tmp_path / f"{name}.toml"
        path.write_text(definition(name, ACPI_IMAGE, stop_timeout=3))
        assert svm("define", str(path)).returncode == 0
    operations: dict[str, Callable[[str], tuple[str, ...]]] = {
        "start": lambda n: ("start", n),
        "destroy": lambda n: ("destroy", n),
        "force": lambda n: ("destroy", "--force", n),
        "graceful": lambda n: ("destroy", "--graceful", "--timeout", "2", n),
        "status": lambda n: ("status", n),
        "kill": lambda n: ("kill", n, "-s", "KILL"),
        "pause": lambda n: ("pause", n),
        "resume": lambda n: ("resume", n),
    }

    def client(seed: int) -> list[tuple[str, int, str]]:
        rnd = random.Random(seed)
        done = []
        for _ in range(6):
            op = rnd.choice(sorted(operations))
            result = svm(*operations[op](rnd.choice(names)), timeout=120)
            done.append((op, result.returncode, result.stderr))
        return done

    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = [r for rs in pool.map(client, range(20)) for r in rs]
        for op, code, err in results:
            assert "Traceback" not in err and "org.python" not in err, err
            assert "internal error" not in err and "unexpected error" not in err, err
            if code != 0:
                assert code in (1, 3), (op, code, err)  # 3: a graceful destroy found it busy
                assert code == 3 or any(text in err for text in NAMED_FAILURES), (op, err)
        healthy()
        for name in names:
            info = status(name)
            scope = sh("systemctl", "show", "-P", "ActiveState", f"svm-{name}.scope").stdout
            if info["state"] in ("running", "paused"):
                assert scope.strip() == "active", (name, info)
                pids = sh("systemctl", "show", "-P", "MainPID", f"svm-{name}.scope")
                assert isinstance(info["pid"], int) and info["pid"] > 0
                assert pids.returncode == 0
            else:
                assert info["state"] == "shutoff" and scope.strip() != "active", (name, info)
    finally:
        for name in names:
            svm("destroy", "--force", name)
            svm("undefine", name)
