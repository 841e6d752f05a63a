"""The sandbox really is a systemd host with a system bus, isolated from the host's files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_pid1_is_systemd() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


def test_system_bus_and_manager_answer() -> None:
    state = subprocess.run(
        ["systemctl", "is-system-running"], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert state in ("running", "degraded")
    assert Path("/run/dbus/system_bus_socket").is_socket()


def test_root_is_a_throwaway_overlay(tmp_path: Path) -> None:
    marker = Path("/etc/svm-sandbox-write-test")
    marker.write_text("x")  # lands in the container's tmpfs overlay, never on the host
    marker.unlink()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert " / / " in mounts and "overlay" in mounts
