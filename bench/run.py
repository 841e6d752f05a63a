"""What supervisord-vm costs on top of QEMU, against bare systemd and libvirt, in one run.

The numbers a user chooses a supervisor by (issue 8): how long start and destroy take through
svmctl and through D-Bus, next to what one would otherwise run (a bare `systemd-run --scope` QEMU
driven over QMP, `systemctl stop`, libvirt's `virsh`), and how the daemon's own cost grows with
the number of VMs. Every figure comes from the installed service (`make install`) under a real
systemd, in the test sandbox, with libvirtd started in the same container, so both managers see
the same kernel, QEMU and load.

Run from the checkout on the host (root):
    make bench            # 30 runs, 100/250/500 VMs; writes bench/results.json, RESULTS.md, PNG
    make bench-smoke      # 3 runs, 3 VMs: proves the code works, the numbers mean nothing
which boots the sandbox and runs, inside it:
    .venv/bin/python -m bench.run [--smoke] [--runs N] [--counts 100,250,500] [--idle S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sdbus import SdBus, sd_bus_open_system

from bench.report import render
from supervisord_vm.definition import Definition, Disk
from supervisord_vm.qemu import QmpSession, build_argv
from tests.guests import write_acpi_guest

CHECKOUT = Path(__file__).resolve().parent.parent
SVMCTL = "/usr/local/bin/svmctl"
INSTALLED_PYTHON = "/usr/local/lib/supervisord-vm/venv/bin/python"
IMPORT_CLI = "import supervisord_vm.cli"
SERVICE = "supervisord-vm.service"
BUS_NAME = "org.supervisordvm1"
MANAGER_PATH = "/org/supervisordvm1"
MANAGER_IFACE = "org.supervisordvm1.Manager"
IMAGES = Path("/var/lib/supervisord-vm/images")
IMAGE = IMAGES / "bench-acpi.img"
LIBVIRT_IMAGE = Path("/var/lib/libvirt/images/bench-acpi.img")  # libvirt relabels its disks
LIBVIRT_URI = "qemu:///system"
LATENCY_VM = "lat"
CONCURRENT_CLIENTS = 8
# A scale VM: QEMU with no board, no disk and no guest code (about 32 MiB RSS under TCG); the
# daemon's per-VM work is the same as for a real guest. libvirt refuses `-M none`, so its scale
# domains are the cheapest it takes: `-M pc`, 16 MiB, no disk, created paused.
QEMU_RSS_BUDGET_MIB = 36  # measured: 31.7 MiB (-M none), 34.8 MiB (libvirt, paused)
MEMORY_MARGIN_MIB = 2048
# The sd-bus default (25 s) is too short for a start under heavy load; the daemon bounds its own.
CALL_TIMEOUT_USEC = 120 * 1_000_000


class BenchError(Exception):
    """A step of the bench failed: the run stops (after cleaning up) and exits non-zero."""


# --- small tools ---------------------------------------------------------------------------------


def log(text: str) -> None:
    print(f"bench: {text}", flush=True)


def stats(samples: Sequence[float]) -> dict[str, float]:
    """Median and p95 (nearest rank) in milliseconds, with the count of samples."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return {
        "median": statistics.median(ordered) * 1000,
        "p95": ordered[rank - 1] * 1000,
        "n": len(ordered),
    }


def sh(*argv: str, timeout: float = 600) -> str:
    """Run a command to completion; its stdout, or BenchError naming it and its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


async def run(*argv: str, limit: float = 600) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{' '.join(argv)} took over {limit} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode()[-2000:]}")
    return out.decode()


async def timed(*argv: str) -> float:
    begin = time.perf_counter()
    await run(*argv)
    return time.perf_counter() - begin


def main_pid(unit: str) -> int:
    pid = int(sh("systemctl", "show", "-P", "MainPID", unit).strip() or 0)
    if pid <= 0:
        raise BenchError(f"{unit} has no main PID")
    return pid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


async def idle_cost(pid: int, seconds: float) -> dict[str, float]:
    """CPU (% of one core) over an idle window, and RSS/fds at its end."""
    cpu_before, begin = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - begin) * 100
    return {
        "idle_cpu_percent": cpu,
        "idle_seconds": seconds,
        "rss_kib": rss_kib(pid),
        "fds": fd_count(pid),
    }


# --- the D-Bus client (in-process, one connection per client) -----------------------------------


class Client:
    """Raw Manager calls over one system-bus connection: what any D-Bus program would do.

    Every Client stays referenced until the process ends (`_kept`): when python-sdbus frees a
    closed bus it seems to drop the loop's reader of that bus's fd number, which by then may
    belong to a newer connection, whose replies then never arrive (seen here: a Client opened
    right after dropping the previous one answered its first call, then timed out on every
    later one, while busctl and svmctl got answers from the same daemon).
    """

    _kept: ClassVar[list[Client]] = []

    def __init__(self) -> None:
        self.bus: SdBus = sd_bus_open_system()
        Client._kept.append(self)

    @classmethod
    async def open(cls) -> Client:
        """A connection that has finished authenticating with the bus.

        sd-bus authenticates only when the connection is first used, and dbus-daemon drops a
        connection that has not authenticated within its auth_timeout: a client opened and
        left unused through the 60 s idle window failed its first call with 'Connection
        terminated' (probably that; the reader problem under `_kept` may have played a part)."""
        client = cls()
        message = client.bus.new_method_call_message(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"
        )
        await client.bus.call_async(message)
        return client

    async def call(self, method: str, signature: str = "", *args: Any) -> Any:
        message = self.bus.new_method_call_message(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, method)
        if signature:
            message.append_data(signature, *args)
        reply = await self.bus.call_async(message)
        return reply.get_contents()

    async def states(self) -> dict[str, str]:
        """Name -> state from ListMachines (the first two fields of each row)."""
        rows = await self.call("ListMachines")
        return {str(row[0]): str(row[1]) for row in rows}

    def close(self) -> None:
        self.bus.close()


class ShutoffEvents:
    """Waits for the MachineEvent signal that says a VM is shut off (the destroy's last step)."""

    def __init__(self, bus: SdBus) -> None:
        self._bus = bus
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._slot: Any = None

    async def subscribe(self) -> None:
        self._slot = await self._bus.match_signal_async(
            BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "MachineEvent", self._on_signal
        )

    def _on_signal(self, message: Any) -> None:
        row = message.get_contents()
        future = self._waiting.get(str(row[1]))
        if str(row[3]) == "shutoff" and future is not None and not future.done():
            future.set_result(None)

    def expect(self, name: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[name] = future
        return future

    def close(self) -> None:
        if self._slot is not None:
            self._slot.close()


async def destroy_and_event(
    events: ShutoffEvents, name: str, action: Callable[[], Awaitable[object]]
) -> float:
    """Call -> the call returned and the shutoff event arrived, whichever is later."""
    seen = events.expect(name)
    begin = time.perf_counter()
    await action()
    await asyncio.wait_for(seen, 30)
    return time.perf_counter() - begin


# --- set-up inside the sandbox --------------------------------------------------------------------


def install_service(from_head: bool) -> str:
    """`make install` of the checkout (as tests/integration/test_service.py does), or of its
    last commit: other people's half-done edits in a shared working tree must not be measured."""
    source = CHECKOUT
    if from_head:
        source = Path(tempfile.mkdtemp(prefix="svm-bench-src-", dir="/run"))
        archive = subprocess.run(
            ["git", "-C", str(CHECKOUT), "-c", f"safe.directory={CHECKOUT}", "archive", "HEAD"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    commit = sh("git", "-C", str(CHECKOUT), "-c", f"safe.directory={CHECKOUT}", "rev-parse", "HEAD")
    installed = f"{commit.strip()[:12]}{'' if from_head else ' + working tree'}"
    log(f"make install of {installed}")
    sh("make", "-C", str(source), "install")
    IMAGES.mkdir(parents=True, exist_ok=True)
    write_acpi_guest(IMAGE)
    sh("systemctl", "start", SERVICE)
    return installed


def libvirt_available() -> bool:
    return shutil.which("virsh") is not None and Path("/usr/sbin/libvirtd").exists()


def start_libvirt() -> None:
    """libvirtd as issue 8 found it must run in the container, network-isolated.

    cgroup v1 controllers are read-only in the container: libvirt must not try to use them.
    The root-only /dev/kvm that a container may have makes libvirt reject its capabilities
    cache on every create (~7 s each): the guests are TCG only, so it goes. PrivateNetwork keeps
    libvirt's network driver from touching the host's interfaces (the sandbox shares them).
    """
    with contextlib.suppress(FileNotFoundError):
        Path("/dev/kvm").unlink()
    conf = Path("/etc/libvirt/qemu.conf")
    conf.write_text(conf.read_text() + "\ncgroup_controllers = [ ]\n")
    dropin = Path("/run/systemd/system/libvirtd.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    # Debian runs it with --timeout 120: it would exit while the daemon's steps run.
    (dropin / "bench.conf").write_text(
        "[Service]\nPrivateNetwork=yes\nEnvironment=LIBVIRTD_ARGS=\n"
    )
    for leftover in Path("/etc/libvirt/qemu/networks/autostart").glob("*.xml"):
        leftover.unlink()
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "libvirtd.service")
    LIBVIRT_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    write_acpi_guest(LIBVIRT_IMAGE)


def libvirt_xml(name: str, disk: Path | None) -> str:
    """The same machine as the daemon's latency VM: TCG, -M pc, 16 MiB, the boot-sector disk."""
    disk_xml = (
        f'<disk type="file" device="disk"><driver name="qemu" type="raw"/>'
        f'<source file="{disk}"/><target dev="hda" bus="ide"/></disk>'
        if disk
        else ""
    )
    return (
        f'<domain type="qemu"><name>{name}</name><memory unit="MiB">16</memory><vcpu>1</vcpu>'
        '<os><type arch="x86_64" machine="pc">hvm</type></os>'
        "<on_poweroff>destroy</on_poweroff><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f'{disk_xml}<controller type="usb" model="none"/><memballoon model="none"/>'
        "</devices></domain>"
    )


def virsh(*args: str) -> list[str]:
    return ["virsh", "-q", "-c", LIBVIRT_URI, *args]


def vm_toml(name: str, image: Path | None) -> str:
    if image is None:
        return f'name = "{name}"\nmemory = 16\nmachine = "none"\naccel = "tcg"\nstop_timeout = 5\n'
    return (
        f'name = "{name}"\nmemory = 16\naccel = "tcg"\nstop_timeout = 5\n'
        f'[[disks]]\npath = "{image}"\nformat = "raw"\nsnapshot = true\n'
    )


# --- latency: one VM, start and destroy, every way ------------------------------------------


@dataclass
class Latency:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, operation: str, how: str, seconds: float) -> None:
        self.samples.setdefault(operation, {}).setdefault(how, []).append(seconds)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            op: {how: stats(values) for how, values in hows.items()}
            for op, hows in self.samples.items()
        }


async def bare_once(work: Path, index: int) -> tuple[float, float]:
    """systemd-run --scope QEMU -> QMP connected and `cont` answered; then `systemctl stop`."""
    unit = f"svmbench-{index}.scope"
    socket_path = work / f"bare{index}.qmp"
    defn = Definition(
        name="bare", memory=16, accel=("tcg",), disks=(Disk(str(IMAGE), "raw", snapshot=True),)
    )
    begin = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "systemd-run",
        "--quiet",
        "--scope",
        f"--unit={unit}",
        "--slice=machine.slice",
        "-p",
        "TimeoutStopSec=10",
        *build_argv(defn, socket_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        session = await QmpSession.connect(socket_path, timeout=10, on_event=lambda _event: None)
        await session.execute("cont")
        started = time.perf_counter() - begin
        stopped = await timed("systemctl", "stop", unit)
        await session.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        socket_path.unlink(missing_ok=True)
    return started, stopped


async def latency(runs: int, use_libvirt: bool, work: Path) -> dict[str, Any]:
    client = await Client.open()
    events = ShutoffEvents(client.bus)
    await events.subscribe()
    result = Latency()
    name = LATENCY_VM
    xml = work / "lat.xml"
    xml.write_text(libvirt_xml("lat", LIBVIRT_IMAGE))
    busctl = ["busctl", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE]
    try:
        toml = work / "lat.toml"
        toml.write_text(vm_toml(name, IMAGE))
        await run(SVMCTL, "define", str(toml))

        async def svmctl_round() -> None:
            result.add("start", "svmctl", await timed(SVMCTL, "start", name))
            destroy = await destroy_and_event(events, name, lambda: run(SVMCTL, "destroy", name))
            result.add("destroy", "svmctl", destroy)

        async def busctl_round() -> None:
            result.add("start", "busctl", await timed(*busctl, "Start", "s", name))
            destroy = await destroy_and_event(
                events, name, lambda: run(*busctl, "Destroy", "ssd", name, "default", "0")
            )
            result.add("destroy", "busctl", destroy)

        async def dbus_round() -> None:
            begin = time.perf_counter()
            await client.call("Start", "s", name)
            result.add("start", "dbus", time.perf_counter() - begin)
            destroy = await destroy_and_event(
                events, name, lambda: client.call("Destroy", "ssd", name, "default", 0.0)
            )
            result.add("destroy", "dbus", destroy)

        async def bare_round(index: int) -> None:
            started, stopped = await bare_once(work, index)
            result.add("start", "bare", started)
            result.add("destroy", "bare", stopped)

        async def libvirt_round() -> None:
            result.add("start", "libvirt", await timed(*virsh("create", str(xml))))
            result.add("destroy", "libvirt", await timed(*virsh("destroy", "lat")))

        # A warm-up of each (page cache, QEMU's first exec, libvirt's capabilities) whose samples
        # are dropped, then the kinds alternate run by run so that drift in the machine's load
        # hits all alike. (The rounds add to whatever `result` names when they run.)
        kept, result = result, Latency()
        await svmctl_round()
        await busctl_round()
        await dbus_round()
        await bare_round(0)
        if use_libvirt:
            await libvirt_round()
        result = kept
        for index in range(1, runs + 1):
            await svmctl_round()
            await busctl_round()
            await dbus_round()
            await bare_round(index)
            if use_libvirt:
                await libvirt_round()
        log("start/destroy done; list/status with one VM running in each manager")
        await client.call("Start", "s", name)
        if use_libvirt:
            await run(*virsh("create", str(xml)))
        for _ in range(runs):
            result.add("list", "svmctl", await timed(SVMCTL, "list"))
            result.add("list", "busctl", await timed(*busctl, "ListMachines"))
            begin = time.perf_counter()
            await client.call("ListMachines")
            result.add("list", "dbus", time.perf_counter() - begin)
            result.add("status", "svmctl", await timed(SVMCTL, "status", name))
            result.add("help", "svmctl", await timed(SVMCTL, "--help"))
            # The floor under every svmctl command: the interpreter, then svmctl's imports.
            result.add("help", "python", await timed(INSTALLED_PYTHON, "-I", "-S", "-c", "pass"))
            result.add("help", "import", await timed(INSTALLED_PYTHON, "-c", IMPORT_CLI))
            if use_libvirt:
                result.add("list", "virsh", await timed(*virsh("list", "--all")))
                result.add("status", "virsh", await timed(*virsh("dominfo", "lat")))
        await client.call("Destroy", "ssd", name, "default", 0.0)
        await client.call("Undefine", "s", name)
        if use_libvirt:
            await run(*virsh("destroy", "lat"))
    finally:
        await cleanup_ours(client, [name])
        if use_libvirt and "lat" in await libvirt_domains():
            await run(*virsh("destroy", "lat"))
        events.close()
        client.close()
    return {"runs": runs, "ms": result.summary()}


# --- where the daemon's time goes (py-spy, from the `bench` extra) ------------------------------

PY_SPY = CHECKOUT / ".venv" / "bin" / "py-spy"


@contextlib.asynccontextmanager
async def profiled(pid: int, name: str, profiles: dict[str, Any] | None) -> AsyncIterator[None]:
    """Sample the daemon with py-spy while the block runs; keep its busiest functions.

    Off unless --profile: sampling slows the daemon (it is paused to read each stack)."""
    if profiles is None or not PY_SPY.exists():
        yield
        return
    raw = Path(tempfile.mkstemp(prefix="svm-bench-profile-", suffix=".txt", dir="/run")[1])
    proc = await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        "--format",
        "raw",
        "--gil",
        "--rate",
        "100",
        "--pid",
        str(pid),
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(1)  # attached before the work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        await proc.wait()
        profiles[name] = hot_functions(take_text(raw))


def take_text(path: Path) -> str:
    """A file's text ('' if it was never written), and the file removed."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    finally:
        path.unlink(missing_ok=True)


def hot_functions(collapsed: str, top: int = 10) -> dict[str, Any]:
    """From py-spy's collapsed stacks (GIL holders only): where the daemon's CPU went.

    `self`: the innermost frames with the most samples; `ours`: supervisord_vm's own functions
    by inclusive share (what of ours the time was spent under)."""
    leaf: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit() or not stack:
            continue
        samples = int(number)
        total += samples
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + samples
        for frame in set(frames):
            if "supervisord_vm/" in frame:
                ours[frame] = ours.get(frame, 0) + samples

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [(frame, 100 * n / total) for frame, n in best]

    return {"samples": total, "self": ranked(leaf), "ours": ranked(ours)}


# --- scale: N VMs under one daemon ----------------------------------------------------------------


async def call_all(
    parallel: int, names: Sequence[str], method: str, signature: str, *args: Any
) -> float:
    """`method(name, *args)` for every name from PARALLEL new clients, one call in flight each;
    the seconds taken (connecting is not counted)."""
    clients = [await Client.open() for _ in range(parallel)]
    queue = list(reversed(names))

    async def worker(client: Client) -> None:
        while queue:
            await client.call(method, signature, queue.pop(), *args)

    begin = time.perf_counter()
    try:
        await asyncio.gather(*(worker(client) for client in clients))
    finally:
        for client in clients:
            client.close()
    return time.perf_counter() - begin


async def median_of(reps: int, action: Callable[[], Awaitable[object]]) -> dict[str, float]:
    samples = []
    for _ in range(reps):
        begin = time.perf_counter()
        await action()
        samples.append(time.perf_counter() - begin)
    return stats(samples)


async def expect_states(client: Client, names: Sequence[str], state: str) -> None:
    states = await client.states()
    wrong = [n for n in names if states.get(n) != state]
    if wrong:
        raise BenchError(f"{len(wrong)} VMs not {state}, e.g. {wrong[:3]}: {states.get(wrong[0])}")


async def scale_ours(
    count: int, idle: float, reps: int, work: Path, profile: bool
) -> dict[str, Any]:
    names = [f"s{index:04d}" for index in range(count)]
    one = await Client.open()
    out: dict[str, Any] = {"count": count}
    profiles: dict[str, Any] | None = {} if profile else None
    if profiles is not None:
        out["profiles"] = profiles
    try:
        pid = main_pid(SERVICE)
        out["rss_kib_before"] = rss_kib(pid)
        for name in names:
            await one.call("Define", "s", vm_toml(name, None))
        seconds = await call_all(1, names, "Start", "s")
        out["start_serial_s"] = seconds
        await expect_states(one, names, "running")
        out["rss_kib_after_start"] = rss_kib(pid)
        log(f"{count}: started serially in {seconds:.1f} s")
        seconds = await call_all(1, names, "Destroy", "ssd", "default", 0.0)
        out["destroy_serial_s"] = seconds
        await expect_states(one, names, "shutoff")
        seconds = await call_all(CONCURRENT_CLIENTS, names, "Start", "s")
        out["start_concurrent_s"] = seconds
        await expect_states(one, names, "running")
        log(f"{count}: started by {CONCURRENT_CLIENTS} clients in {seconds:.1f} s")
        async with profiled(pid, "ListMachines x50", profiles):
            for _ in range(50):
                await one.call("ListMachines")
        begin = time.perf_counter()
        await run("systemctl", "restart", SERVICE)
        out["restart_to_ready_s"] = time.perf_counter() - begin
        one.close()  # it named the old daemon's unique name
        one = await Client.open()
        await expect_states(one, names, "running")
        pid = main_pid(SERVICE)
        log(f"{count}: restart to READY {out['restart_to_ready_s']:.2f} s; idle {idle:.0f} s")
        out |= await idle_cost(pid, idle)
        out["list_svmctl_ms"] = await median_of(reps, lambda: run(SVMCTL, "list"))
        out["list_dbus_ms"] = await median_of(reps, lambda: one.call("ListMachines"))
        out["status_svmctl_ms"] = await median_of(reps, lambda: run(SVMCTL, "status", names[-1]))
        begin = time.perf_counter()
        await run(SVMCTL, "shutdown-all", "--timeout", "1")
        out["shutdown_all_s"] = time.perf_counter() - begin
        await expect_states(one, names, "shutoff")
        log(f"{count}: shutdown-all {out['shutdown_all_s']:.1f} s")
        async with profiled(pid, f"start {count} VMs, {CONCURRENT_CLIENTS} clients", profiles):
            out["start_concurrent_again_s"] = await call_all(
                CONCURRENT_CLIENTS, names, "Start", "s"
            )
        seconds = await call_all(CONCURRENT_CLIENTS, names, "Destroy", "ssd", "default", 0.0)
        out["destroy_concurrent_s"] = seconds
        await expect_states(one, names, "shutoff")
        out["fds_after"] = fd_count(pid)
    finally:
        await cleanup_ours(one, names)
        one.close()
    return out


async def diagnose(unit: str) -> None:
    """Print what the daemon was doing (py-spy dump of every thread) and its journal's end."""
    with contextlib.suppress(Exception):
        pid = main_pid(unit)
        if PY_SPY.exists():
            print(await run(str(PY_SPY), "dump", "--pid", str(pid), limit=60), flush=True)
    with contextlib.suppress(Exception):
        print(await run("journalctl", "-q", "-n", "40", "--no-pager", "-u", unit), flush=True)
    if unit == SERVICE:  # is it the daemon, or this process's connection?
        for argv in (
            [
                "busctl",
                "--timeout=5",
                "call",
                BUS_NAME,
                MANAGER_PATH,
                MANAGER_IFACE,
                "ListMachines",
            ],
            [SVMCTL, "list"],
        ):
            answer = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: ASYNC221
            got = f"{answer.returncode} {answer.stdout[:80]!r} {answer.stderr[:200]!r}"
            print(f"diagnose: {argv[0]} -> {got}")


async def cleanup_ours(client: Client, names: Sequence[str]) -> None:
    """Destroy and undefine every VM of a scale step, whatever state it was left in."""
    try:
        states = await client.states()
    except Exception as error:  # the daemon may be what failed: then systemd stops the scopes
        log(f"cleanup: ListMachines failed ({error}); stopping the scopes through systemd")
        sh("systemctl", "stop", *[f"svm-{name}.scope" for name in names])
        return
    running = [n for n in names if states.get(n, "shutoff") != "shutoff"]
    if running:
        log(f"cleanup: destroying {len(running)} VMs left running")
    for name in running:
        with contextlib.suppress(Exception):
            await client.call("Destroy", "ssd", name, "force", 0.0)
    for name in names:
        if name in states:
            with contextlib.suppress(Exception):
                await client.call("Undefine", "s", name)


async def virsh_all(commands: Sequence[list[str]], parallel: int) -> float:
    gate = asyncio.Semaphore(parallel)

    async def one(argv: list[str]) -> None:
        async with gate:
            await run(*argv)

    begin = time.perf_counter()
    await asyncio.gather(*(one(argv) for argv in commands))
    return time.perf_counter() - begin


async def libvirt_domains() -> list[str]:
    return (await run(*virsh("list", "--all", "--name"))).split()


async def scale_libvirt(count: int, idle: float, reps: int, work: Path) -> dict[str, Any]:
    names = [f"lv{index:04d}" for index in range(count)]
    out: dict[str, Any] = {"count": count}
    for name in names:
        (work / f"{name}.xml").write_text(libvirt_xml(name, None))
    try:
        pid = main_pid("libvirtd.service")
        out["rss_kib_before"] = rss_kib(pid)
        creates = [virsh("create", "--paused", str(work / f"{n}.xml")) for n in names]
        out["start_concurrent_s"] = await virsh_all(creates, CONCURRENT_CLIENTS)
        if len(await libvirt_domains()) != count:
            raise BenchError(f"libvirt: not {count} domains after create")
        out["rss_kib_after_start"] = rss_kib(pid)
        log(f"libvirt {count}: created in {out['start_concurrent_s']:.1f} s")
        begin = time.perf_counter()
        await run("systemctl", "restart", "libvirtd.service")
        out["restart_to_ready_s"] = time.perf_counter() - begin
        while len(await libvirt_domains()) != count:
            if time.perf_counter() - begin > 120:
                raise BenchError("libvirt: domains not back 120 s after its restart")
            await asyncio.sleep(0.05)
        out["restart_to_listed_s"] = time.perf_counter() - begin
        pid = main_pid("libvirtd.service")
        out |= await idle_cost(pid, idle)
        out["list_virsh_ms"] = await median_of(reps, lambda: run(*virsh("list", "--all")))
        out["status_virsh_ms"] = await median_of(reps, lambda: run(*virsh("dominfo", names[-1])))
        destroys = [virsh("destroy", n) for n in names]
        out["destroy_concurrent_s"] = await virsh_all(destroys, CONCURRENT_CLIENTS)
    finally:
        left = set(await libvirt_domains()) & set(names)
        if left:
            log(f"cleanup: destroying {len(left)} libvirt domains")
            await virsh_all([virsh("destroy", n) for n in sorted(left)], CONCURRENT_CLIENTS)
    return out


# --- the run --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    def version(*argv: str) -> str:
        try:
            return sh(*argv).splitlines()[0].strip()
        except (BenchError, FileNotFoundError, IndexError):
            return "-"

    return {
        "nproc": os.cpu_count(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "-",
        ),
        "memory_mib": int(Path("/proc/meminfo").read_text().split()[1]) // 1024,
        "kernel": platform.release(),
        "qemu": version("qemu-system-x86_64", "--version"),
        "systemd": version("systemctl", "--version"),
        "libvirt": version("libvirtd", "--version"),
        "python": platform.python_version(),
        "load_at_start": loadavg(),
        "other_sandboxes_at_start": os.environ.get("SVM_BENCH_OTHER_SANDBOXES", "?"),
    }


@contextlib.asynccontextmanager
async def work_dir() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="svm-bench-", dir="/run"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def scale_step_ours(results: dict[str, Any], count: int, options: argparse.Namespace) -> None:
    log(f"scale: {count} VMs under supervisord-vm")
    try:
        results["scale"]["supervisord-vm"][str(count)] = await scale_ours(
            count, options.idle, options.reps, options.work, options.profile
        )
    except Exception as error:  # the other steps still say something: go on
        results["errors"].append(f"supervisord-vm, {count} VMs: {error!r}")
        log(f"FAILED at {count} VMs: {error!r}; restarting the daemon for the next step")
        await diagnose(SERVICE)
        await run("systemctl", "restart", SERVICE)


async def bench(options: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    results: dict[str, Any] = {
        "command": options.command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": machine_info(),
        "skipped": [],
        "errors": [],
    }
    results["installed"] = install_service(options.from_head)
    use_libvirt = libvirt_available() and not options.no_libvirt
    if use_libvirt:
        start_libvirt()
    else:
        results["skipped"].append("libvirt: not installed (make bench-deps) or --no-libvirt")
    async with work_dir() as work:
        options.work = work
        if not options.libvirt_only:
            log(f"latency: {options.runs} runs of each")
            results["latency"] = await latency(options.runs, use_libvirt, work)
        scale: dict[str, dict[str, Any]] = {"supervisord-vm": {}, "libvirt": {}}
        results["scale"] = scale
        # Each manager freshly restarted with no VM: the point that per-VM growth starts from.
        units = [] if options.libvirt_only else [("supervisord-vm", SERVICE)]
        units += [("libvirt", "libvirtd.service")] if use_libvirt else []
        for manager, unit in units:
            await run("systemctl", "restart", unit)
            scale[manager]["0"] = await idle_cost(main_pid(unit), min(options.idle, 5))
        for count in options.counts:
            needed = count * QEMU_RSS_BUDGET_MIB + MEMORY_MARGIN_MIB
            if mem_available_mib() < needed:
                results["skipped"].append(
                    f"{count} VMs: {mem_available_mib()} MiB available, {needed} needed"
                )
                continue
            results["machine"][f"load_before_{count}"] = loadavg()
            if not options.libvirt_only:
                await scale_step_ours(results, count, options)
            if use_libvirt:
                log(f"scale: {count} domains under libvirt")
                try:
                    scale["libvirt"][str(count)] = await scale_libvirt(
                        count, min(options.idle, 20), options.reps, work
                    )
                except Exception as error:
                    results["errors"].append(f"libvirt, {count} domains: {error!r}")
                    log(f"libvirt FAILED at {count} domains: {error!r}")
    results["duration_s"] = time.time() - started
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 runs, 3 VMs, short idle")
    parser.add_argument("--runs", type=int, default=30, help="latency samples of each kind")
    parser.add_argument("--counts", default="100,250,500", help="VM counts of the scale runs")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--reps", type=int, default=15, help="samples of each list/status call")
    parser.add_argument(
        "--from-head", action="store_true", help="install the last commit, not the working tree"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the daemon in the scale runs' busy parts"
    )
    parser.add_argument(
        "--libvirt-only",
        action="store_true",
        help="only libvirt's scale steps, merged into --output's existing results",
    )
    parser.add_argument("--no-libvirt", action="store_true", help="skip the libvirt baselines")
    parser.add_argument("--output", type=Path, help="results JSON (default bench/results.json)")
    parser.add_argument("--report-dir", type=Path, help="where RESULTS.md and the plot go")
    options = parser.parse_args(argv)
    options.counts = [int(c) for c in options.counts.split(",") if c]
    options.command = "make bench"
    if options.smoke:
        options.runs, options.counts, options.idle, options.reps = 3, [3], 2.0, 3
        options.command = "make bench-smoke"
        smoke_dir = Path(tempfile.mkdtemp(prefix="svm-bench-smoke-", dir="/run"))
        options.output = options.output or smoke_dir / "results.json"
        options.report_dir = options.report_dir or smoke_dir
    options.output = options.output or CHECKOUT / "bench" / "results.json"
    options.report_dir = options.report_dir or CHECKOUT / "bench"
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if os.environ.get("SVM_IN_SANDBOX") != "1":
        print(
            "bench: runs inside the test sandbox; use `make bench` (or `make bench-smoke`)",
            file=sys.stderr,
        )
        return 2
    try:
        results = asyncio.run(bench(options))
    except BaseException as error:
        print(f"bench: FAILED: {error!r}; the daemon's journal ends:", file=sys.stderr)
        subprocess.run(["journalctl", "-q", "-n", "60", "--no-pager", "-u", SERVICE], check=False)
        if isinstance(error, BenchError):
            return 1
        raise
    if options.libvirt_only:  # a redo of libvirt's steps: into the run it completes
        merged = json.loads(options.output.read_text())
        counts = {str(count) for count in options.counts}
        merged["scale"]["libvirt"] |= results["scale"]["libvirt"]
        merged["errors"] = [
            e for e in merged["errors"] if not any(f"libvirt, {c} " in e for c in counts)
        ] + results["errors"]
        merged["libvirt_redone"] = f"{sorted(counts, key=int)} at {results['started']}"
        results = merged
    options.output.write_text(json.dumps(results, indent=2) + "\n")
    render(results, options.report_dir)
    for problem in results["errors"]:
        print(f"bench: FAILED: {problem}", file=sys.stderr)
    log(f"results in {options.output}, report in {options.report_dir / 'RESULTS.md'}")
    if options.smoke:  # the smoke run's files vanish with the sandbox: show what it made
        print((options.report_dir / "RESULTS.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
