"""The sandbox leaves nothing behind, whether its command passes, fails or is interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import sandbox
from tests.sandbox import CHECKOUT

RUNNER = [sys.executable, "-m", "tests.sandbox"]
NOBODY = 65534


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
    """A non-root user is told to use root, wherever root keeps the checkout.

    root may clone the project below a 0700 directory (/root), where `nobody` can neither
    enter the checkout nor run its venv's python. So the runner is copied, byte for byte, into
    a directory everyone may read, and run by the base interpreter the venv was made from:
    the same code, reached the way an unprivileged user with their own copy would reach it.
    """
    base_python = str(getattr(sys, "_base_executable", None) or sys.executable)
    with tempfile.TemporaryDirectory(prefix="svm-not-root-") as scratch:
        directory = Path(scratch)
        directory.chmod(0o755)
        runner = directory / "sandbox.py"
        shutil.copyfile(Path(sandbox.__file__), runner)
        runner.chmod(0o644)
        result = subprocess.run(
            [base_python, "-I", str(runner), "--exec", "true"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=lambda: os.setuid(NOBODY),
        )
    assert result.returncode == 2, result.stderr
    assert "must run as root" in result.stderr
