"""Start and destroy latency of the lifecycle core against bare systemd-run + QMP + systemctl stop.

Runs inside the sandbox (real systemd):
    .venv/bin/python -m tests.sandbox --exec .venv/bin/python bench/lifecycle.py [--runs N]

start:   Supervisor.start() call -> running   vs  `systemd-run --scope qemu ... -S` spawned ->
         QMP connected and `cont` answered
destroy: Supervisor.destroy() call -> shutoff recorded (reason saved, scope and files gone)
         vs  `systemctl stop` of the baseline scope returned (stop job done)
Both use the same guest (ACPI boot sector, TCG, 16 MiB) and the same QMP library. The two
kinds alternate run by run so that drift in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisord_vm.definition import Definition, Disk
from supervisord_vm.model import Reason, State
from supervisord_vm.qemu import QmpSession, build_argv
from supervisord_vm.store import Paths
from supervisord_vm.supervisor import Supervisor
from supervisord_vm.systemd import Systemd
from tests.guests import write_acpi_guest


def definition(name: str, image: Path) -> Definition:
    return Definition(
        name=name,
        memory=16,
        accel=("tcg",),
        disks=(Disk(str(image), "raw", snapshot=True),),
    )


async def run_command(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    if await proc.wait() != 0:
        raise RuntimeError(f"{argv} failed")


async def baseline_once(base: Path, image: Path, index: int) -> tuple[float, float]:
    unit = f"svmbench-{index}.scope"
    socket_path = base / f"b{index}.qmp"
    argv = build_argv(definition("bench", image), socket_path)
    begin = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "systemd-run",
        "--quiet",
        "--scope",
        f"--unit={unit}",
        "--slice=machine.slice",
        "-p",
        "TimeoutStopSec=10",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    session = await QmpSession.connect(socket_path, timeout=10, on_event=lambda _event: None)
    await session.execute("cont")
    started = time.perf_counter() - begin
    begin = time.perf_counter()
    await run_command("systemctl", "stop", unit)
    stopped = time.perf_counter() - begin
    await session.close()
    await proc.wait()
    socket_path.unlink(missing_ok=True)
    return started, stopped


async def core_once(supervisor: Supervisor) -> tuple[float, float]:
    begin = time.perf_counter()
    info = await supervisor.start("bench")
    started = time.perf_counter() - begin
    assert info.state is State.RUNNING
    begin = time.perf_counter()
    info = await supervisor.destroy("bench")
    stopped = time.perf_counter() - begin
    assert (info.state, info.reason) == (State.SHUTOFF, Reason.DESTROYED)
    return started, stopped


async def main(runs: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="svmb-", dir="/run"))
    image = base / "acpi.img"
    write_acpi_guest(image)
    paths = Paths(
        definitions_dir=base / "defs",
        state_dir=base / "state",
        runtime_dir=base / "run",
        log_dir=base / "log",
    )
    systemd = await Systemd.connect()
    supervisor = Supervisor(paths, systemd)
    await supervisor.start_up()
    toml = (
        f'name = "bench"\nmemory = 16\naccel = "tcg"\n'
        f'[[disks]]\npath = "{image}"\nformat = "raw"\nsnapshot = true\n'
    )
    await supervisor.define(toml)
    core: list[tuple[float, float]] = []
    baseline: list[tuple[float, float]] = []
    try:
        await core_once(supervisor)  # warm caches (QEMU binary, firmware) for both
        await baseline_once(base, image, 0)
        for index in range(1, runs + 1):
            core.append(await core_once(supervisor))
            baseline.append(await baseline_once(base, image, index))
    finally:
        await supervisor.close()
        await systemd.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"runs: {runs} (median, milliseconds)")
    print(f"{'':10}{'core':>10}{'baseline':>10}{'ratio':>8}")
    for label, column in (("start", 0), ("destroy", 1)):
        ours = statistics.median(sample[column] for sample in core) * 1000
        theirs = statistics.median(sample[column] for sample in baseline) * 1000
        print(f"{label:10}{ours:10.1f}{theirs:10.1f}{ours / theirs:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
