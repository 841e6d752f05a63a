"""Confinement's pure parts: QEMU's command line for handed-over fds, the trampoline's
credentials, the path policy's rules and the owner records (no root, no systemd, no QEMU)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from supervisord_vm import (
    _spawn_trampoline,
    confined_launch,
    confinement,
    daemon,
    disk_access,
    launch,
)
from supervisord_vm.definition import Definition, Disk
from supervisord_vm.disk_access import Credentials, OwnerStore
from supervisord_vm.errors import DiskAccessDenied
from supervisord_vm.qemu import (
    LaunchResources,
    build_argv,
    confinement_args,
    drive_option,
    qmp_args,
)
from supervisord_vm.systemd import Systemd

SOCKET = Path("/run/supervisord-vm/web1.qmp")


@pytest.fixture(autouse=True)
def default_confinement() -> Iterator[None]:
    confinement.configure(confinement.QEMU_USER, confinement.DEFAULT_IMAGE_DIRS)
    yield
    confinement.configure(confinement.QEMU_USER, confinement.DEFAULT_IMAGE_DIRS)


# --- QEMU's command line --------------------------------------------------------------------


def test_qmp_on_a_handed_over_socket_is_a_chardev_and_a_control_monitor() -> None:
    assert qmp_args(SOCKET, 7) == [
        "-chardev",
        "socket,id=qmp,fd=7,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]


def test_qmp_without_a_socket_fd_is_created_by_qemu_at_the_path() -> None:
    assert qmp_args(Path("/run/a,b.qmp"), None) == [
        "-qmp",
        "unix:/run/a,,b.qmp,server=on,wait=off",
    ]


def test_fd_sets_are_numbered_and_handed_over() -> None:
    resources = LaunchResources(qmp_socket=SOCKET)
    assert resources.add_fdset([10, 11], "disk0") == "/dev/fdset/1"
    assert resources.add_fdset([12], "disk,1") == "/dev/fdset/2"
    assert resources.pass_fds == [10, 11, 12]
    resources.sandbox = confinement.SANDBOX_OPTION
    assert confinement_args(resources) == [
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-add-fd",
        "fd=10,set=1,opaque=disk0",
        "-add-fd",
        "fd=11,set=1,opaque=disk0",
        "-add-fd",
        "fd=12,set=2,opaque=disk,,1",
    ]


def test_a_disk_the_daemon_opened_is_named_by_its_fd_set() -> None:
    disk = Disk(path="/var/lib/supervisord-vm/images/a.qcow2", format="qcow2")
    assert drive_option("pc", disk, "/dev/fdset/3") == "file=/dev/fdset/3,format=qcow2,if=ide"
    assert drive_option("pc", disk).startswith("file=/var/lib/supervisord-vm/images/a.qcow2,")


def test_build_argv_with_confinement_resources() -> None:
    defn = Definition(name="web1", disks=(Disk(path="/img/a.raw", snapshot=True),))
    resources = LaunchResources(qmp_socket=SOCKET, qmp_fd=5, sandbox="on")
    resources.disk_files[0] = resources.add_fdset([9], "disk0")
    argv = build_argv(defn, SOCKET, resources)
    assert "-qmp" not in argv
    assert argv[argv.index("-mon") + 1] == "chardev=qmp,mode=control"
    assert argv[argv.index("-sandbox") + 1] == "on"
    assert argv[argv.index("-add-fd") + 1] == "fd=9,set=1,opaque=disk0"
    assert argv[argv.index("-drive") + 1].startswith("file=/dev/fdset/1,format=raw,")
    assert argv.index("-S") < argv.index("-sandbox")


# --- the trampoline ---------------------------------------------------------------------------


def test_credentials_are_encoded_for_the_trampoline() -> None:
    assert _spawn_trampoline.encode_credentials(994, 994, (107, 994), 0o007) == "994:994:107,994:7"
    assert _spawn_trampoline.encode_credentials(5, 6, (), 0o22) == "5:6::22"


def test_unconfined_trampoline_execs_at_once_without_a_parent() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-S", _spawn_trampoline.__file__, "-", "-", "/bin/sh", "-c", "id"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_trampoline_never_runs_the_program_when_it_cannot_drop() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-S", _spawn_trampoline.__file__, "-", "bad", "/bin/echo", "ran"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == _spawn_trampoline.EXIT_PRIVILEGES
    assert "cannot drop privileges before starting /bin/echo" in result.stderr
    assert "ran" not in result.stdout


# --- who QEMU runs as -------------------------------------------------------------------------


def test_a_missing_qemu_user_is_an_error_never_root() -> None:
    confinement.configure("svm-no-such-user-here")
    with pytest.raises(confinement.ConfinementUnavailable, match="does not exist"):
        confinement.qemu_identity()


def test_opting_out_means_no_identity_and_no_sandbox() -> None:
    confinement.configure(None)
    assert confinement.qemu_identity() is None
    assert not confinement.confined()
    no_systemd = cast(Systemd, None)  # never asked: opted out
    qemu = "/usr/bin/qemu-system-x86_64"
    assert asyncio.run(confinement.sandbox_option(qemu, None, no_systemd)) is None
    confinement.configure("root")
    assert confinement.qemu_identity() is None


def test_daemon_options_choose_the_user_and_image_dirs(tmp_path: Path) -> None:
    args = daemon.parse_args(["--image-dir", str(tmp_path), "--image-dir", "/srv/vm"])
    assert args.image_dir == [tmp_path, Path("/srv/vm")]
    assert args.qemu_user == confinement.QEMU_USER and not args.no_confine
    assert daemon.parse_args(["--no-confine"]).no_confine
    assert daemon.parse_args(["--qemu-user", "kvmuser"]).qemu_user == "kvmuser"


# --- the path policy --------------------------------------------------------------------------


def test_image_dirs_contain_files_by_their_real_path(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.img").write_bytes(b"")
    (images / "out").symlink_to("/etc/shadow")
    (tmp_path / "link-in").symlink_to(images / "a.img")
    confinement.configure(confinement.QEMU_USER, [images])
    assert disk_access.in_image_dirs(str(images / "a.img"))
    assert disk_access.in_image_dirs(str(tmp_path / "link-in"))
    assert not disk_access.in_image_dirs(str(images / "out"))
    assert not disk_access.in_image_dirs(str(images / ".." / "x.img"))
    assert not disk_access.in_image_dirs(str(images))


def test_only_disks_qemu_writes_to_need_write_access() -> None:
    assert disk_access.writable(Disk(path="/a"))
    assert not disk_access.writable(Disk(path="/a", snapshot=True))
    assert not disk_access.writable(Disk(path="/a", readonly=True))
    assert not disk_access.writable(Disk(path="/a", media="cdrom"))


def test_roots_definitions_are_not_checked(tmp_path: Path) -> None:
    defn = Definition(name="a", disks=(Disk(path="/etc/shadow"),))
    asyncio.run(disk_access.check_disks(defn, None))
    asyncio.run(disk_access.check_disks(defn, Credentials(0, 0)))


def test_owner_records_round_trip_and_root_removes_them(tmp_path: Path) -> None:
    store = OwnerStore(tmp_path)
    assert store.get("web1") is None
    owner = Credentials(1000, 1000, (27, 1000))
    store.set("web1", owner)
    assert store.get("web1") == owner
    assert (tmp_path / "owners" / "web1.json").stat().st_mode & 0o777 == 0o600
    store.set("web1", Credentials(0, 0))
    assert store.get("web1") is None


def test_an_unreadable_owner_record_means_nobodys_rights(tmp_path: Path) -> None:
    store = OwnerStore(tmp_path)
    (tmp_path / "owners").mkdir()
    (tmp_path / "owners" / "web1.json").write_text("{not json")
    assert store.get("web1") == Credentials(65534, 65534)


def test_caller_credentials_fall_back_to_the_user_database() -> None:
    creds = Credentials.of_caller(0, None)
    assert (creds.uid, creds.gid) == (0, 0)
    assert 0 in creds.groups
    assert Credentials.of_caller(0, [5, 3, 5]).groups == (3, 5)
    unknown = Credentials.of_caller(2_000_000_000, None)
    assert (unknown.gid, unknown.groups) == (65534, ())


def test_qemu_runtime_dir_is_private_and_removed(tmp_path: Path) -> None:
    from supervisord_vm.store import Paths  # noqa: PLC0415

    confinement.configure(None)  # owned by root then (as root) or unchanged (as a user)
    paths = Paths(runtime_dir=tmp_path / "run")
    directory = confinement.qemu_runtime_dir(paths, "web1")
    assert directory == tmp_path / "run" / "qemu" / "web1"
    assert directory.stat().st_mode & 0o7777 == 0o750
    assert (tmp_path / "run").stat().st_mode & 0o077 == 0o011
    confinement.remove_qemu_runtime_dir(paths.runtime_dir, "web1")
    assert not (tmp_path / "run" / "qemu").exists()
    assert list((tmp_path / "run").iterdir()) == []


# --- what the daemon opens for QEMU -----------------------------------------------------------


def test_the_monitor_socket_is_listening_and_root_only(tmp_path: Path) -> None:
    path = tmp_path / "web1.qmp"
    path.write_text("stale")
    fd = confined_launch.bind_qmp_socket(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not os.get_inheritable(fd)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # accepted into the backlog: QEMU answers later
    finally:
        os.close(fd)


def test_disks_are_opened_in_the_modes_qemu_needs(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(512))
    defn = Definition(name="a", disks=(Disk(path=str(image)), Disk(path=str(image), snapshot=True)))
    opened = asyncio.run(disk_access.open_disks(defn, None))
    try:
        modes = [[fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in fds] for fds in opened]
        assert modes == [[os.O_RDWR, os.O_RDONLY], [os.O_RDONLY]]
        assert all(
            os.get_blocking(fd) and not os.get_inheritable(fd) for fds in opened for fd in fds
        )
    finally:
        for fds in opened:
            for fd in fds:
                os.close(fd)


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    defn = Definition(name="a", disks=(Disk(path=str(fifo), snapshot=True),))
    with pytest.raises(OSError, match="not a regular file or block device"):
        asyncio.run(disk_access.open_disks(defn, None))


def test_a_file_that_left_the_image_dirs_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"")
    confinement.configure(confinement.QEMU_USER, [images])
    with pytest.raises(DiskAccessDenied, match="now is"):
        disk_access._open_in_image_dirs(str(outside), False)
    (images / "in.img").write_bytes(b"")
    os.close(disk_access._open_in_image_dirs(str(images / "in.img"), True))


def test_a_program_qemus_user_may_not_run_is_said_so() -> None:
    message = launch.exec_problem("/root/qemu", PermissionError(13, "Permission denied"), "svq")
    assert message.startswith("QEMU binary /root/qemu cannot be executed by user svq, whom QEMU")
    assert "every directory above it must be accessible to that user" in message
