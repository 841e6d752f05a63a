"""The Debian package as a host meets it: `apt install` from dist/ with no network, an upgrade
that leaves running VMs alone, `apt remove` that shuts them down, `apt purge` that leaves nothing.

The sandbox boots this host's root with a tmpfs overlay, so what apt does here is thrown away
with it. apt sees only two local repositories: dist/ (what `make deb` built) and
build/deb/bookworm-subset (the few bookworm packages this host lacks, fetched by `make deb`; it
stands in for the host's Debian mirror). The venv and the checkout's code are not used by the
installed service: it runs Debian's /usr/bin/python3 on the packaged modules.

The tests run in file order, one phase each, on one installation (module fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.guests import write_acpi_guest

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
DIST = CHECKOUT / "dist"
SUBSET = CHECKOUT / "build" / "deb" / "bookworm-subset"
PACKAGE = "supervisord-vm"
SVMCTL = "/usr/bin/svmctl"
UNIT = "supervisord-vm.service"
GUESTS_UNIT = "supervisord-vm-guests.service"
VM = "pkgvm"
IMAGE = Path("/var/lib/supervisord-vm/images/pkgvm.img")
MEMBER = "svmpkgmember"
OUTSIDER = "svmpkgoutsider"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}
# Where a package's files go; the before/after comparison of purge walks these.
WATCHED = (
    "/etc",
    "/lib/systemd",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/python3",
    "/usr/lib/systemd",
    "/usr/lib/sysusers.d",
    "/usr/lib/tmpfiles.d",
    "/usr/share/dbus-1",
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/lintian",
    "/var/lib",
    "/var/log",
    "/run/supervisord-vm",
)
# Bookkeeping of dpkg, apt (and PackageKit's apt hook) and the journal, not files of a package.
NOT_PACKAGE_FILES = (
    "/var/lib/dpkg/",
    "/var/lib/apt/",
    "/var/lib/PackageKit/",
    "/var/log/journal/",
    "/var/log/apt/",
)


def sh(
    *argv: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env or CLEAN_ENV
    )


def svm(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [SVMCTL, *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return sh(*argv)


def show(unit: str, prop: str) -> str:
    return sh("systemctl", "show", "-P", prop, unit).stdout.strip()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def journal(unit: str) -> str:
    """The unit's journal, for assertion messages."""
    return sh("journalctl", "--no-pager", "-n", "60", "-u", unit).stdout


def vm_status() -> dict[str, object]:
    result = svm("--json", "status", VM)
    assert result.returncode == 0, result.stderr
    status: dict[str, object] = json.loads(result.stdout)
    return status


def file_list() -> set[str]:
    """Every path under WATCHED, bookkeeping and bytecode caches aside."""
    paths: set[str] = set()
    for top in WATCHED:
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in [*dirs, *files]:
                path = os.path.join(root, name)  # noqa: PTH118 - hundreds of thousands: str is cheaper
                if not path.startswith(NOT_PACKAGE_FILES):
                    paths.add(path)
    return paths


def deb_version(deb: Path) -> str:
    return sh("dpkg-deb", "--field", str(deb), "Version").stdout.strip()


def installed_version() -> str:
    result = sh("dpkg-query", "-W", "-f=${Status} ${Version}", PACKAGE)
    if result.returncode != 0 or not result.stdout.startswith("install ok installed"):
        return ""
    return result.stdout.split()[-1]


@dataclass
class Apt:
    """apt-get limited to local repositories: its own sources list and lists directory."""

    directory: Path
    repositories: list[Path] = field(default_factory=list)

    def options(self) -> list[str]:
        return [
            "-o",
            f"Dir::Etc::sourcelist={self.directory / 'sources.list'}",
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            f"Dir::State::Lists={self.directory / 'lists'}",
            "-o",
            "Dir::Cache::pkgcache=",
            "-o",
            "Dir::Cache::srcpkgcache=",
            "-o",
            "APT::Sandbox::User=root",
            "-o",
            "Acquire::Languages=none",
            "-o",
            "Dpkg::Use-Pty=0",
        ]

    def use(self, *repositories: Path) -> None:
        self.repositories = list(repositories)
        (self.directory / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        lines = [f"deb [trusted=yes] file:{repo} ./" for repo in self.repositories]
        (self.directory / "sources.list").write_text("\n".join(lines) + "\n")
        update = sh("apt-get", *self.options(), "update", timeout=300)
        assert update.returncode == 0, update.stdout + update.stderr
        assert "http" not in update.stdout, update.stdout  # no network source was read

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh("apt-get", *self.options(), "--yes", *args, timeout=600)


@dataclass
class Installation:
    apt: Apt
    before: set[str]
    workdir: Path
    qemu_pid: int = 0


def ensure_dist() -> None:
    """dist/ as `make deb` leaves it (CI builds it before the tests; build it if missing)."""
    if not (DIST / "Packages").exists() or not (SUBSET / "Packages").exists():
        build = sh("make", "-C", str(CHECKOUT), "--no-print-directory", "deb", timeout=1800)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]


def make_host_plain() -> None:
    """Undo what earlier tests' `make install` left in this sandbox: a plain host has none of it."""
    if (
        Path("/usr/local/bin/svmctl").is_symlink()
        or Path("/usr/local/lib/systemd/system/supervisord-vm.service").exists()
    ):
        uninstall = sh("make", "-C", str(CHECKOUT), "--no-print-directory", "uninstall")
        assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    for leftover in (
        "/etc/default/supervisord-vm",
        "/etc/supervisord-vm",
        "/var/lib/supervisord-vm",
        "/var/log/supervisord-vm",
        "/run/supervisord-vm",
    ):
        sh("rm", "-rf", leftover)
    for user in ("supervisord-vm-qemu",):
        if sh("getent", "passwd", user).returncode == 0:
            sh("userdel", user)
    for group in ("supervisord-vm-qemu", "supervisord-vm"):
        if sh("getent", "group", group).returncode == 0:
            sh("groupdel", group)
    sh("systemctl", "daemon-reload")
    assert installed_version() == ""


def purge_everything() -> None:
    """Teardown after a failure: no VM, no package, no test user left for later tests."""
    if Path(SVMCTL).exists():
        svm("destroy", "--force", VM)
    for user in (MEMBER, OUTSIDER):
        sh("userdel", user)
    if installed_version():
        sh("systemctl", "stop", GUESTS_UNIT, UNIT)
        sh("dpkg", "--purge", PACKAGE, timeout=300, env=CLEAN_ENV)
    sh("rm", "-rf", str(IMAGE.parent.parent))


@contextlib.contextmanager
def services_may_start() -> Iterator[None]:
    """Without this machine's Docker-style policy-rc.d (exit 101: maintainer scripts must not
    start services), which a plain Debian host does not have; put back afterwards."""
    aside = POLICY_RC_D.with_name(POLICY_RC_D.name + ".svm-test-aside")
    moved = POLICY_RC_D.exists()
    if moved:
        POLICY_RC_D.rename(aside)
    try:
        yield
    finally:
        if moved:
            aside.rename(POLICY_RC_D)


def group_members(group: str) -> list[str]:
    entry = sh("getent", "group", group).stdout.strip()
    return [m for m in entry.split(":")[3].split(",") if m] if entry else []


def restore_host(members: list[str]) -> None:
    """Give later tests the sandbox as they found it: the package's users and groups as the
    sandbox made them (purge removed them), with the members the group had before."""
    sh("systemd-sysusers", str(CHECKOUT / "units" / "supervisord-vm.sysusers"))
    for member in members:
        if sh("id", member).returncode == 0:
            sh("usermod", "-a", "-G", "supervisord-vm", member)


@pytest.fixture(scope="module")
def installation() -> Iterator[Installation]:
    ensure_dist()
    members = group_members("supervisord-vm")
    make_host_plain()
    with (
        services_may_start(),
        tempfile.TemporaryDirectory(prefix="svm-apt-") as directory,
    ):
        state = Installation(Apt(Path(directory) / "apt"), file_list(), Path(directory))
        state.apt.use(DIST, SUBSET)
        try:
            yield state
        finally:
            purge_everything()
            restore_host(members)


def test_apt_installs_offline_from_dist_and_starts_the_service(installation: Installation) -> None:
    (deb,) = DIST.glob(f"{PACKAGE}_*_all.deb")
    result = installation.apt("install", "--no-install-recommends", PACKAGE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert installed_version() == deb_version(deb)
    for unit in (UNIT, GUESTS_UNIT):
        assert sh("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit
        assert sh("systemctl", "is-active", unit).stdout.strip() == "active", journal(unit)
    assert sh("getent", "group", "supervisord-vm").returncode == 0
    # Debian's python3 on the packaged modules and libraries, no venv.
    pid = int(show(UNIT, "MainPID"))
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    assert argv[:2] == ["/usr/bin/python3", "/usr/bin/supervisord-vm"], argv
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/usr/lib/python3/dist-packages/sdbus/" in maps
    assert "/usr/lib/python3/dist-packages/pystemd/" in maps
    assert "venv" not in maps
    # Documentation= names a file that exists (uncompressed), and both man pages are there.
    docs = show(UNIT, "Documentation")
    assert docs == "file:///usr/share/doc/supervisord-vm/README.md"
    assert Path(docs.removeprefix("file://")).is_file()
    assert sh("man", "-w", "svmctl").stdout.strip() == "/usr/share/man/man1/svmctl.1.gz"
    assert sh("man", "-w", "8", "supervisord-vm").returncode == 0
    conffiles = Path("/var/lib/dpkg/info/supervisord-vm.conffiles").read_text().split()
    assert conffiles == ["/etc/default/supervisord-vm"]
    # The D-Bus activation file is in place: a call starts a stopped daemon.
    assert sh("systemctl", "stop", UNIT).returncode == 0
    assert svm("list").returncode == 0
    assert show(UNIT, "ActiveState") == "active"


def test_svmctl_starts_a_vm_as_root_and_lets_only_group_members_change_it(
    installation: Installation,
) -> None:
    write_acpi_guest(IMAGE)
    definition = Path("/run/pkgvm.toml")
    definition.write_text(
        f'name = "{VM}"\nmemory = 16\naccel = "tcg"\nstop_timeout = 10\n'
        f'[[disks]]\npath = "{IMAGE}"\nformat = "raw"\nsnapshot = true\n'
    )
    assert svm("define", str(definition)).returncode == 0
    definition.unlink()
    result = svm("start", VM)
    assert result.returncode == 0, result.stderr
    status = vm_status()
    assert status["state"] == "running" and status["unit"] == f"svm-{VM}.scope"
    assert isinstance(status["pid"], int)
    installation.qemu_pid = status["pid"]
    assert sh("systemctl", "is-active", f"svm-{VM}.scope").stdout.strip() == "active"

    # No subordinate id ranges: userdel would leave /etc/subuid- behind, a file of no package.
    no_ranges = ("--no-create-home", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0")
    assert sh("useradd", *no_ranges, "-G", "supervisord-vm", MEMBER).returncode == 0
    assert sh("useradd", *no_ranges, OUTSIDER).returncode == 0
    assert svm("pause", VM, user=MEMBER).returncode == 0
    assert vm_status()["state"] == "paused"
    assert svm("resume", VM, user=MEMBER).returncode == 0
    assert vm_status()["state"] == "running"
    listed = svm("list", user=OUTSIDER)
    assert listed.returncode == 0 and VM in listed.stdout
    refused = svm("pause", VM, user=OUTSIDER)
    assert refused.returncode == 6, refused.stderr  # permission denied
    for user in (MEMBER, OUTSIDER):
        assert sh("userdel", user).returncode == 0


def test_upgrade_restarts_the_daemon_which_reattaches_and_keeps_the_vm_and_guests_unit(
    installation: Installation,
) -> None:
    assert installation.qemu_pid > 0, "needs the running VM of the previous test"
    (deb,) = DIST.glob(f"{PACKAGE}_*_all.deb")
    newer = f"{deb_version(deb)}+upgrade1"
    upgrade_dist = installation.workdir / "upgrade-dist"
    build = sh(
        "/usr/bin/python3",
        str(CHECKOUT / "packaging" / "build_debs.py"),
        "--only-main",
        "--no-lintian",
        "--version",
        newer,
        "--dist",
        str(upgrade_dist),
        "--workdir",
        str(installation.workdir / "upgrade-work"),
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    daemon_pid = int(show(UNIT, "MainPID"))
    guests_invocation = show(GUESTS_UNIT, "InvocationID")
    installation.apt.use(DIST, SUBSET, upgrade_dist)

    result = installation.apt("install", "--no-install-recommends", PACKAGE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert installed_version() == newer
    new_daemon_pid = int(show(UNIT, "MainPID"))
    assert new_daemon_pid not in (0, daemon_pid)  # restarted
    assert show(GUESTS_UNIT, "ActiveState") == "active"
    assert show(GUESTS_UNIT, "InvocationID") == guests_invocation  # neither stopped nor restarted
    status = vm_status()
    assert (status["state"], status["pid"]) == ("running", installation.qemu_pid)
    assert Path(f"/proc/{installation.qemu_pid}").exists()
    invocation = show(UNIT, "InvocationID")
    journal = sh("journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}")
    assert f"VM {VM}: reattached to pid {installation.qemu_pid}" in journal.stdout, journal.stdout
    # The reattached daemon drives the VM's QEMU monitor.
    assert svm("pause", VM).returncode == 0
    assert svm("resume", VM).returncode == 0
    assert vm_status()["state"] == "running"


def test_remove_shuts_the_vm_down_like_a_host_shutdown(installation: Installation) -> None:
    assert installation.qemu_pid > 0, "needs the running VM of the previous tests"
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    result = installation.apt("remove", PACKAGE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert installed_version() == ""
    wait_for(lambda: not Path(f"/proc/{installation.qemu_pid}").exists(), "QEMU to exit")
    assert sh("systemctl", "is-active", f"svm-{VM}.scope").stdout.strip() != "active"
    for unit in (UNIT, GUESTS_UNIT):
        assert show(unit, "ActiveState") in ("inactive", "failed"), unit
    guests = sh("journalctl", "--no-pager", "-o", "cat", "-u", GUESTS_UNIT, "--since", since)
    assert f"{VM}: shutdown" in guests.stdout, guests.stdout
    stopped = sh(
        "journalctl",
        "--no-pager",
        "-o",
        "json",
        f"VM_NAME={VM}",
        "VM_EVENT=stopped",
        "--since",
        since,
    )
    reasons = [json.loads(line)["VM_REASON"] for line in stopped.stdout.splitlines()]
    assert reasons == ["shutdown"], stopped.stdout
    # Removal keeps the configuration and state: the definition is still there.
    assert Path(f"/etc/supervisord-vm/vms/{VM}.toml").exists()
    assert Path("/etc/default/supervisord-vm").exists()


def test_purge_leaves_no_file_of_the_package(installation: Installation) -> None:
    result = installation.apt("purge", "--autoremove", PACKAGE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sh("dpkg", "-L", PACKAGE).returncode != 0
    for package in ("python3-sdbus", "python3-qemu.qmp"):
        assert sh("dpkg", "-L", package).returncode != 0, package  # autoremoved with it
    for group in ("supervisord-vm", "supervisord-vm-qemu"):
        assert sh("getent", "group", group).returncode != 0, group
    assert sh("getent", "passwd", "supervisord-vm-qemu").returncode != 0
    # The administrator's disk image is data, not the package's: purge keeps it (and only it).
    assert IMAGE.exists()
    left = file_list() - installation.before
    assert left == {str(IMAGE.parent.parent), str(IMAGE.parent), str(IMAGE)}, sorted(left)
    IMAGE.unlink()
    IMAGE.parent.rmdir()
    IMAGE.parent.parent.rmdir()
    assert installation.before - file_list() == set()
