"""`make demo` on a host whose PID 1 is systemd — the sandbox is such a host: the quick start
installs and starts the real service with the demo VM; `make uninstall` takes it away again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
SVMCTL = Path("/usr/local/bin/svmctl")
DEMO_IMAGE = Path("/var/lib/supervisord-vm/images/demo.img")
INSTALLED = (
    SVMCTL,
    Path("/usr/local/bin/supervisord-vm"),
    Path("/usr/local/lib/systemd/system/supervisord-vm.service"),
    Path("/usr/local/lib/systemd/system/supervisord-vm-guests.service"),
    Path("/usr/local/share/doc/supervisord-vm/README.md"),
    Path("/usr/share/dbus-1/system.d/org.supervisordvm1.conf"),
    Path("/usr/share/dbus-1/system-services/org.supervisordvm1.service"),
)


def sh(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def make(target: str) -> subprocess.CompletedProcess[str]:
    return sh("make", "-C", str(CHECKOUT), "--no-print-directory", target, timeout=600)


def test_make_demo_with_systemd_as_pid1() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    try:
        demo = make("demo")
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "svm-demo.scope" in demo.stdout  # its own `systemctl status` of the VM's scope
        for unit in ("supervisord-vm.service", "supervisord-vm-guests.service"):
            assert sh("systemctl", "is-active", unit).stdout.strip() == "active", unit
            assert sh("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit
        assert sh("systemctl", "is-active", "svm-demo.scope").stdout.strip() == "active"
        info = json.loads(sh(str(SVMCTL), "--json", "status", "demo").stdout)
        assert info["state"] == "running" and info["unit"] == "svm-demo.scope"
        main_pid = sh("systemctl", "show", "-P", "MainPID", "supervisord-vm.service").stdout
        assert int(main_pid) > 0
        docs = sh("systemctl", "show", "-P", "Documentation", "supervisord-vm.service").stdout
        assert docs.strip() == "file:///usr/local/share/doc/supervisord-vm/README.md"
        # the demo VM answers the ACPI button, as the README promises
        assert sh(str(SVMCTL), "shutdown", "demo", "--timeout", "20").returncode == 0
        info = json.loads(sh(str(SVMCTL), "--json", "status", "demo").stdout)
        assert (info["state"], info["reason"]) == ("shutoff", "shutdown")
    finally:
        if SVMCTL.exists():
            sh(str(SVMCTL), "destroy", "--force", "demo")
            sh(str(SVMCTL), "undefine", "demo")
        uninstall = make("uninstall")
        DEMO_IMAGE.unlink(missing_ok=True)
    assert uninstall.returncode == 0, uninstall.stdout[-3000:] + uninstall.stderr[-3000:]
    assert [path for path in INSTALLED if path.exists() or path.is_symlink()] == []
    assert sh("systemctl", "is-active", "svm-demo.scope").stdout.strip() != "active"
    assert sh("systemctl", "is-active", "supervisord-vm.service").stdout.strip() != "active"
    assert not Path("/etc/supervisord-vm/vms/demo.toml").exists()
