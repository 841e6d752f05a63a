"""QEMU confined (issue 9, deliverable 5), against real systemd and QEMU in the sandbox.

QEMU runs as supervisord-vm-qemu with no capability and its seccomp filter; images only root
can read still boot (the daemon hands QEMU descriptors); a group member can name only files in
the image directories or files they can open themselves; the host can opt out, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import json
import logging
import os
import pwd
import stat
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from supervisord_vm import confinement, daemon
from supervisord_vm.definition import parse_definition
from supervisord_vm.errors import (
    DiskAccessDenied,
    NoSuchMachine,
    OperationTimeout,
    StartFailed,
)
from supervisord_vm.model import Caller, Reason, State
from supervisord_vm.qemu import build_argv
from supervisord_vm.store import RuntimeRecord, RuntimeStore
from supervisord_vm.systemd import ScopeProperties, scope_name, spawn_in_scope
from tests.guests import write_acpi_guest
from tests.integration.lifecycle_env import WAIT, Env, lifecycle_env, proc_bytes, run_cmd
from tests.integration.test_service import IMAGES as SERVICE_IMAGES
from tests.integration.test_service import MEMBER as SERVICE_MEMBER
from tests.integration.test_service import definition, service, svm

__all__ = ["service"]  # the installed service's fixture (make install), used here too

pytestmark = pytest.mark.integration

MEMBER = "svm-confine-member"


def run(body: Callable[[Env], Awaitable[None]]) -> None:
    async def main() -> None:
        async with lifecycle_env() as env:
            await body(env)

    asyncio.run(main())


@pytest.fixture(autouse=True)
def default_confinement() -> Iterator[None]:
    """Every test starts and ends with the daemon's defaults (the settings are global)."""
    confinement.configure(confinement.QEMU_USER, confinement.DEFAULT_IMAGE_DIRS)
    yield
    confinement.configure(confinement.QEMU_USER, confinement.DEFAULT_IMAGE_DIRS)


@pytest.fixture
def member() -> Iterator[Caller]:
    """A member of group supervisord-vm who is not root, as the bus would report them."""
    subprocess.run(["useradd", "--no-create-home", "-G", "supervisord-vm", MEMBER], check=True)
    try:
        entry = pwd.getpwnam(MEMBER)
        groups = tuple(sorted(os.getgrouplist(MEMBER, entry.pw_gid)))
        assert grp.getgrnam("supervisord-vm").gr_gid in groups
        yield Caller(uid=entry.pw_uid, pid=0, groups=groups)
    finally:
        subprocess.run(["userdel", MEMBER], check=True)


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def assert_private(runtime: Path) -> None:
    """Nothing under the runtime directory is for other users: directories at most let them
    pass (search), files and sockets give them nothing."""
    for path in [runtime, *runtime.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode & 0o006 == 0, f"{path} is {oct(mode)}"
        else:
            assert mode & 0o007 == 0, f"{path} is {oct(mode)}"


def image_access_modes(pid: int, image: Path) -> set[int]:
    """The access modes (O_RDONLY, O_RDWR) of the descriptors of `image` that process `pid`
    holds (the fd set the daemon handed over, and QEMU's dups of it)."""
    modes: set[int] = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if link.readlink() == image:
                flags = (Path(f"/proc/{pid}/fdinfo") / link.name).read_text().split("\n")[1]
                modes.add(int(flags.split()[1], 8) & os.O_ACCMODE)
    return modes


def own_seccomp_filters() -> int:
    return int(status_fields(os.getpid())["Seccomp_filters"])


def qemu_user() -> pwd.struct_passwd:
    return pwd.getpwnam(confinement.QEMU_USER)


def root_only_image(path: Path) -> Path:
    write_acpi_guest(path)
    os.chown(path, 0, 0)
    path.chmod(0o600)
    return path


def toml(name: str, disk: Path, *, snapshot: bool = True, fmt: str = "raw", extra: str = "") -> str:
    return (
        f'name = "{name}"\nmemory = 16\naccel = "tcg"\nstop_timeout = 10\n{extra}\n'
        f'[[disks]]\npath = "{disk}"\nformat = "{fmt}"\nsnapshot = {str(snapshot).lower()}\n'
    )


async def power_off(env: Env, name: str) -> None:
    """Press the power button until the guest powers off: proof that the boot sector ran
    (it arms the button only once SeaBIOS has handed over; an earlier press is lost)."""
    async with asyncio.timeout(WAIT * 3):
        while True:
            try:
                info = await env.supervisor.shutdown(name, timeout=2)
            except OperationTimeout:
                continue
            assert (info.state, info.reason) == (State.SHUTOFF, Reason.SHUTDOWN)
            return


def test_qemu_runs_unprivileged_without_capabilities_under_seccomp() -> None:
    async def body(env: Env) -> None:
        image = root_only_image(env.base / "root-only.img")
        await env.supervisor.create(toml("conf1", image))
        pid = env.supervisor.get_machine("conf1").pid
        status = status_fields(pid)
        user = qemu_user()
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["Gid"].split() == [str(user.pw_gid)] * 4
        assert user.pw_uid != 0
        groups = {int(g) for g in status["Groups"].split()}
        assert groups == set(os.getgrouplist(user.pw_name, user.pw_gid))
        assert 0 not in groups
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        # The sandbox's container has a filter of its own (Seccomp 2 for every process in it):
        # QEMU's own filter is one more than ours.
        assert int(status["Seccomp_filters"]) > own_seccomp_filters()
        argv = proc_bytes(pid, "cmdline").split(b"\0")
        assert b"-sandbox" in argv
        await power_off(env, "conf1")

    run(body)


def test_root_only_images_boot_raw_and_qcow2_written_snapshot_and_readonly() -> None:
    """The daemon opens each image and hands QEMU the descriptors: a 0600 root file boots
    whether QEMU writes to it (read-write and read-only fds in its set), writes to a temporary
    overlay (snapshot) or only reads it (readonly)."""

    async def body(env: Env) -> None:
        raw = root_only_image(env.base / "rw.img")
        qcow2 = env.base / "rw.qcow2"
        await run_cmd("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
        qcow2.chmod(0o600)
        cases = [
            ("c-raw-rw", raw, False, "raw"),
            ("c-raw-snap", raw, True, "raw"),
            ("c-q-rw", qcow2, False, "qcow2"),
            ("c-q-snap", qcow2, True, "qcow2"),
            ("c-raw-ro", raw, False, "raw"),  # readonly (virtio: SeaBIOS boots it too)
            ("c-q-ro", qcow2, False, "qcow2"),
        ]
        for name, image, snapshot, fmt in cases:
            text = toml(name, image, snapshot=snapshot, fmt=fmt)
            if name.endswith("-ro"):
                text += "readonly = true\n"
            await env.supervisor.create(text)
            pid = env.supervisor.get_machine(name).pid
            assert int(status_fields(pid)["Uid"].split()[0]) == qemu_user().pw_uid
            argv = proc_bytes(pid, "cmdline").decode().split("\0")
            drive = argv[argv.index("-drive") + 1]
            assert drive.startswith("file=/dev/fdset/"), drive
            modes = image_access_modes(pid, image)
            if name.endswith("-ro"):
                # SeaBIOS does not boot this guest from a read-only virtio disk: proof enough
                # that QEMU runs with the image, and holds it read-only only.
                assert env.supervisor.get_machine(name).state is State.RUNNING
                assert modes == {os.O_RDONLY}, modes
                await env.supervisor.destroy(name)
            else:
                assert os.O_RDONLY in modes
                assert (os.O_RDWR in modes) == (not snapshot), modes
                await power_off(env, name)
        assert stat.S_IMODE(raw.stat().st_mode) == 0o600  # nothing was chmod'ed or chown'ed
        assert raw.stat().st_uid == 0

    run(body)


def test_a_vm_an_older_daemon_started_is_reattached() -> None:
    """Before confinement, QEMU (as root) made its monitor socket itself at NAME.qmp; the daemon
    now binds that same path itself, so a new daemon finds either kind where it always did."""

    async def body(env: Env) -> None:
        image = root_only_image(env.base / "old.img")
        text = toml("old1", image)
        defn = parse_definition(text)
        socket_path = env.paths.runtime_dir / "old1.qmp"
        await env.supervisor.close()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            process = await spawn_in_scope(
                env.systemd,
                build_argv(defn, socket_path),  # the old command line: `-qmp unix:PATH`
                scope_name("old1"),
                ScopeProperties(description="an older daemon's VM", stop_timeout=10.0),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                stdout=null,
                stderr=null,
            )
        finally:
            os.close(null)
        RuntimeStore(env.paths.runtime_dir).save(
            RuntimeRecord("old1", process.pid, scope_name("old1"), True, text, time.time())
        )
        fresh = await env.new_supervisor()
        info = fresh.get_machine("old1")
        assert (info.state, info.pid) == (State.RUNNING, process.pid)
        assert (
            socket_path.stat().st_uid == 0 and "-qmp" in proc_bytes(process.pid, "cmdline").decode()
        )
        await fresh.pause("old1")  # QMP works
        await fresh.resume("old1")
        await fresh.destroy("old1")
        await process.wait()

    run(body)


def test_a_qcow2_backing_file_is_opened_by_qemu_with_its_own_rights() -> None:
    """The daemon hands over the image it was named; the backing file named in the image's
    header QEMU opens itself, as its user: root-only fails (and says so), readable boots."""

    async def body(env: Env) -> None:
        base = root_only_image(env.base / "base.img")
        overlay = env.base / "overlay.qcow2"
        await run_cmd(
            "qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)
        )
        overlay.chmod(0o600)
        with pytest.raises(StartFailed, match="Could not open backing file") as caught:
            await env.supervisor.create(toml("backed", overlay, fmt="qcow2", snapshot=False))
        assert "Permission denied" in str(caught.value)
        assert "QEMU exited before its monitor was ready" in str(caught.value)
        os.chown(base, 0, qemu_user().pw_gid)
        base.chmod(0o640)  # the administrator's way: readable by QEMU's group
        await env.supervisor.create(toml("backed", overlay, fmt="qcow2", snapshot=False))
        await power_off(env, "backed")

    run(body)


def test_runtime_files_are_not_reachable_by_other_users() -> None:
    async def body(env: Env) -> None:
        image = root_only_image(env.base / "img0.img")
        await env.supervisor.create(toml("conf2", image))
        runtime = env.paths.runtime_dir
        qmp = runtime / "conf2.qmp"
        assert stat.S_ISSOCK(qmp.stat().st_mode)
        assert (qmp.stat().st_uid, stat.S_IMODE(qmp.stat().st_mode)) == (0, 0o600)
        qemu_dir = runtime / "qemu" / "conf2"
        info = qemu_dir.stat()
        assert (info.st_uid, info.st_gid) == (
            qemu_user().pw_uid,
            grp.getgrnam("supervisord-vm").gr_gid,
        )
        assert stat.S_IMODE(info.st_mode) == 0o750
        assert_private(runtime)
        await env.supervisor.destroy("conf2")
        assert not (runtime / "qemu").exists()  # removed with the other runtime files

    run(body)


def test_the_qemu_key_never_runs_a_program_as_root() -> None:
    async def body(env: Env) -> None:
        record = env.base / "uids"
        record.write_text("")
        record.chmod(0o666)  # any user may append: the script records who it ran as
        script = env.base / "fake-qemu"
        script.write_text(
            f'#!/bin/sh\nid -u >> {record}\nexec qemu-system-x86_64 "$@"\n', encoding="utf-8"
        )
        script.chmod(0o755)
        image = root_only_image(env.base / "img1.img")
        await env.supervisor.create(toml("conf3", image, extra=f'qemu = "{script}"'))
        uids = record.read_text().split()
        # the seccomp probe (once per binary) and the VM itself: both as QEMU's user
        assert uids and set(uids) == {str(qemu_user().pw_uid)}, uids
        await env.supervisor.destroy("conf3")

    run(body)


def test_the_seccomp_probe_leaves_nothing_running() -> None:
    """A definition's program is asked about -sandbox in a scope of its own, stopped after:
    what it leaves running (here a `sleep` it forks while asked) does not outlive the probe."""

    async def body(env: Env) -> None:
        marker = f"6000.{os.getpid()}"  # a sleep's argument no other process has
        script = env.base / "forking-qemu"
        script.write_text(
            "#!/bin/sh\n"
            f'case "$*" in *-version*) (sleep {marker} &) ;; esac\n'
            'exec qemu-system-x86_64 "$@"\n',
            encoding="utf-8",
        )
        script.chmod(0o755)
        image = root_only_image(env.base / "img3.img")
        await env.supervisor.create(toml("probed", image, extra=f'qemu = "{script}"'))
        assert processes_with_argument(marker) == []
        await env.supervisor.destroy("probed")

    run(body)


def processes_with_argument(argument: str) -> list[int]:
    """Live processes one of whose arguments is `argument` (from /proc)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argument.encode() in argv:
            found.append(int(entry.name))
    return found


def test_member_cannot_name_a_file_they_cannot_open(member: Caller) -> None:
    async def body(env: Env) -> None:
        secret = env.base / "secret"
        secret.write_text("root only\n")
        secret.chmod(0o600)
        with watch_opens(secret) as opened:
            for path in ("/etc/shadow", str(secret)):
                with pytest.raises(DiskAccessDenied) as caught:
                    await env.supervisor.define(toml("shadow", Path(path)), member)
                message = str(caught.value)
                assert f"disk {path}: not in an image directory" in message
                assert f"uid {member.uid} cannot open it for reading" in message
                assert "Permission denied" in message
                with pytest.raises(DiskAccessDenied):
                    await env.supervisor.create(toml("shadow", Path(path)), member)
            assert opened() == 0
        with pytest.raises(NoSuchMachine):
            env.supervisor.get_machine("shadow")
        assert not env.paths.definitions_dir.joinpath("shadow.toml").exists()
        # root may name anything
        await env.supervisor.define(toml("shadow", secret))
        await env.supervisor.undefine("shadow")

    run(body)


def test_member_may_use_images_dir_and_own_files_and_a_later_swap_is_refused(
    member: Caller,
) -> None:
    async def body(env: Env) -> None:
        confinement.configure(confinement.QEMU_USER, [env.images])
        in_images = root_only_image(env.images / "member.img")
        await env.supervisor.define(toml("mine1", in_images), member)
        await env.supervisor.start("mine1")  # started by root (as autostart would): still fine
        await power_off(env, "mine1")

        own = env.base / "own.img"
        write_acpi_guest(own)
        os.chown(own, member.uid, -1)
        own.chmod(0o600)
        await env.supervisor.define(toml("mine2", own, snapshot=False), member)
        await env.supervisor.start("mine2")
        await env.supervisor.destroy("mine2")

        # The member swaps their file for a link to root's: the next start, by root, opens it
        # with the member's rights and is refused.
        secret = root_only_image(env.base / "secret.img")
        own.unlink()
        own.symlink_to(secret)
        with pytest.raises(StartFailed, match=r"uid \d+ cannot open it for reading and writing"):
            await env.supervisor.start("mine2")
        assert (env.paths.state_dir / "owners" / "mine2.json").exists()

        # Root edits the file by hand and reloads: the definition, and its disks, are root's now.
        edited = toml("mine2", own, snapshot=False).replace("stop_timeout = 10", "stop_timeout = 9")
        (env.paths.definitions_dir / "mine2.toml").write_text(edited)
        assert (await env.supervisor.reload()).changed == ["mine2"]
        assert not (env.paths.state_dir / "owners" / "mine2.json").exists()
        await env.supervisor.start("mine2")
        await env.supervisor.destroy("mine2")
        for name in ("mine1", "mine2"):
            await env.supervisor.undefine(name)

    run(body)


def test_opting_out_runs_qemu_as_root_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def body(env: Env) -> None:
        with caplog.at_level(logging.WARNING, logger="supervisord_vm"):
            daemon.configure_confinement(daemon.parse_args(["--no-confine"]))
        assert any("confinement is off (--no-confine)" in r.getMessage() for r in caplog.records)
        image = root_only_image(env.base / "img2.img")
        await env.supervisor.create(toml("asroot", image))
        status = status_fields(env.supervisor.get_machine("asroot").pid)
        assert status["Uid"].split()[0] == "0"
        assert int(status["CapEff"], 16) != 0
        assert int(status["Seccomp_filters"]) == own_seccomp_filters()  # no filter of its own
        await env.supervisor.destroy("asroot")

    run(body)


# --- inotify: proof that a refused file was never opened ---------------------------------------

_IN_OPEN = 0x20
_IN_ACCESS = 0x01


@contextlib.contextmanager
def watch_opens(path: Path) -> Iterator[Callable[[], int]]:
    """Count open(2)s and reads of `path` while the block runs (inotify IN_OPEN|IN_ACCESS)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(path), _IN_OPEN | _IN_ACCESS) >= 0

        def count() -> int:
            events = 0
            with contextlib.suppress(BlockingIOError):
                data = os.read(fd, 65536)
                offset = 0
                while offset < len(data):
                    _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                    events += bool(mask & (_IN_OPEN | _IN_ACCESS))
                    offset += 16 + length
            return events

        yield count
    finally:
        os.close(fd)


# --- the installed service, over D-Bus ----------------------------------------------------------


def test_installed_service_confines_qemu_and_refuses_a_members_root_file(service: None) -> None:
    """Through svmctl as a group member: the bus's credentials reach the path policy."""
    request = Path("/run/cf_shadow.toml")
    request.write_text(definition("cf_shadow", Path("/etc/shadow")))
    request.chmod(0o644)
    refused = svm("define", str(request), user=SERVICE_MEMBER)
    assert refused.returncode == 6, refused.stderr
    assert "disk /etc/shadow: not in an image directory (/var/lib/supervisord-vm/images)" in (
        refused.stderr
    )
    assert "cannot open it for reading (Permission denied)" in refused.stderr
    assert svm("status", "cf_shadow").returncode == 4

    image = root_only_image(SERVICE_IMAGES / "cf_root.img")
    request.write_text(definition("cf_root", image))
    assert svm("define", str(request), user=SERVICE_MEMBER).returncode == 0
    try:
        started = svm("start", "cf_root", user=SERVICE_MEMBER)
        assert started.returncode == 0, started.stderr
        pid = int(json.loads(svm("--json", "status", "cf_root").stdout)["pid"])
        fields = status_fields(pid)
        assert fields["Uid"].split() == [str(qemu_user().pw_uid)] * 4
        for caps in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[caps], 16) == 0, (caps, fields[caps])
        assert fields["NoNewPrivs"] == "1"
        assert int(fields["Seccomp_filters"]) > own_seccomp_filters()
        assert_private(Path("/run/supervisord-vm"))
    finally:
        svm("destroy", "--force", "cf_root")
        svm("undefine", "cf_root")
        request.unlink(missing_ok=True)
