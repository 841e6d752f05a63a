"""The sandbox leaves nothing behind, whether its command passes, fails or is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.sandbox import CHECKOUT

RUNNER = [sys.executable, "-m", "tests.sandbox"]


def leftovers(runner_pid: int) -> list[str]:
    """Directories and mounts of the runner with this PID (its names carry the PID)."""
    prefix = f"svm-sandbox-{runner_pid}-"
    dirs = [str(p) for p in Path("/var/tmp").iterdir() if p.name.startswith(prefix)]
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    mounts = [line.split()[4] for line in lines if f"/{prefix}" in line.split()[4]]
    return dirs + mounts


def children_named(parent: int, comm: str) -> list[int]:
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    found.append(int(pid))
            except OSError:
                continue
    return found


def run_inside(*argv: str) -> subprocess.CompletedProcess[str]:
    runner = subprocess.Popen(
        [*RUNNER, "--exec", *argv],
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = runner.communicate(timeout=180)
    assert leftovers(runner.pid) == []
    return subprocess.CompletedProcess(runner.args, runner.returncode, stdout, stderr)


def test_passing_command_exit_status_and_teardown() -> None:
    result = run_inside("sh", "-c", 'test "$(cat /proc/1/comm)" = systemd && exit 0')
    assert result.returncode == 0, result.stderr


def test_failing_command_status_is_passed_through() -> None:
    result = run_inside("sh", "-c", "exit 3")
    assert result.returncode == 3


def test_container_writes_do_not_reach_the_host() -> None:
    marker = Path("/var/tmp/svm-sandbox-write-probe")
    result = run_inside("sh", "-c", f"echo x > {marker} && rm -rf /tmp/* ; true")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_interrupted_run_is_torn_down() -> None:
    runner = subprocess.Popen(
        [*RUNNER, "--exec", "sleep", "300"],
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Wait until the command runs inside (its container's systemd-nspawn exists and booted).
        while time.monotonic() < deadline and not children_named(runner.pid, "nsenter"):
            time.sleep(0.1)
        assert children_named(runner.pid, "nsenter"), "sandbox never started its command"
        nspawn = children_named(runner.pid, "systemd-nspawn")
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        assert runner.returncode == 130
        assert leftovers(runner.pid) == []
        for pid in nspawn:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_refuses_clearly_when_not_root() -> None:
    result = subprocess.run(
        [*RUNNER, "--exec", "true"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.setuid(65534),
    )
    assert result.returncode == 2
    assert "must run as root" in result.stderr
