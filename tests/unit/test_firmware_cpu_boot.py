"""CPU model, UEFI firmware and its variables store, cdroms and the boot order: the QEMU
arguments each definition key produces, and the files a start prepares for them."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from supervisord_vm import boot, cpu, firmware, hardware
from supervisord_vm.confinement import QemuIdentity
from supervisord_vm.definition import Definition, Disk
from supervisord_vm.definition_devices import Nic
from supervisord_vm.launch import LaunchFailed
from supervisord_vm.qemu import LaunchResources, build_argv, disk_args
from supervisord_vm.store import Paths

SOCKET = Path("/run/supervisord-vm/t.qmp")
QEMU = QemuIdentity("supervisord-vm-qemu", 990, 990, (990, 107))


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


# --- cpu ------------------------------------------------------------------------------------


def test_an_explicit_cpu_model_is_passed_as_given() -> None:
    defn = Definition(name="c", cpu="Haswell,-hle", accel=("tcg",))
    assert cpu.cpu_args(defn, kvm=False) == ["-cpu", "Haswell,-hle"]
    assert cpu.cpu_args(defn, kvm=True) == ["-cpu", "Haswell,-hle"]


def test_the_default_cpu_is_host_only_when_kvm_comes_first_and_is_usable() -> None:
    assert cpu.cpu_args(Definition(name="c", accel=("kvm", "tcg")), kvm=True) == ["-cpu", "host"]
    assert cpu.cpu_args(Definition(name="c", accel=("kvm", "tcg")), kvm=False) == []
    assert cpu.cpu_args(Definition(name="c", accel=("tcg", "kvm")), kvm=True) == []
    assert cpu.cpu_args(Definition(name="c", accel=("tcg",)), kvm=True) == []


def test_build_argv_carries_the_cpu_after_the_machine() -> None:
    resources = LaunchResources(qmp_socket=SOCKET, kvm=True)
    argv = build_argv(Definition(name="c"), SOCKET, resources)
    assert values(argv, "-cpu") == ["host"]
    assert values(build_argv(Definition(name="c", accel=("tcg",)), SOCKET), "-cpu") == []


def test_kvm_permission_is_judged_for_qemus_user_by_owner_group_and_other_bits() -> None:
    assert cpu.may_open_rw(0o600, 990, 0, QEMU)
    assert not cpu.may_open_rw(0o600, 0, 0, QEMU)
    assert cpu.may_open_rw(0o660, 0, 107, QEMU)  # group kvm, a supplementary group
    assert not cpu.may_open_rw(0o640, 0, 107, QEMU)  # read-only for the group
    assert cpu.may_open_rw(0o666, 0, 0, QEMU)
    # The owner's bits decide for the owner, even if others may more.
    assert not cpu.may_open_rw(0o066, 990, 0, QEMU)


def test_kvm_is_unusable_without_the_device(tmp_path: Path) -> None:
    assert not cpu.kvm_usable(None, tmp_path / "kvm")
    device = tmp_path / "kvm-file"
    device.write_bytes(b"")
    device.chmod(0o600)
    assert cpu.kvm_usable(None, device)  # QEMU as root: opening it is the test
    uid, gid = device.stat().st_uid, device.stat().st_gid
    other = QemuIdentity("q", uid + 1, gid + 1)
    assert not cpu.kvm_usable(other, device)
    device.chmod(0o666)
    assert cpu.kvm_usable(other, device)


# --- firmware -------------------------------------------------------------------------------


def test_bios_needs_no_firmware_arguments() -> None:
    assert firmware.firmware_args(Definition(name="f"), None) == []


def test_uefi_gives_read_only_code_and_the_vms_store_as_pflash() -> None:
    defn = Definition(name="f", firmware="uefi")
    assert firmware.firmware_args(defn, "/dev/fdset/3") == [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.OVMF_CODE}",
        "-drive",
        "if=pflash,format=raw,unit=1,file=/dev/fdset/3",
    ]
    with pytest.raises(ValueError, match="no variables store"):
        firmware.firmware_args(defn, None)


def test_build_argv_hands_the_store_over_as_an_fd_set() -> None:
    resources = LaunchResources(qmp_socket=SOCKET)
    resources.nvram_file = resources.add_fdset([41, 42], "nvram")
    argv = build_argv(Definition(name="f", firmware="uefi"), SOCKET, resources)
    assert values(argv, "-add-fd") == ["fd=41,set=1,opaque=nvram", "fd=42,set=1,opaque=nvram"]
    assert "if=pflash,format=raw,unit=1,file=/dev/fdset/1" in values(argv, "-drive")
    assert resources.pass_fds == [41, 42]


@pytest.mark.parametrize("machine", ["pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2"])
def test_uefi_runs_on_both_boards_ovmf_names(machine: str) -> None:
    assert firmware.firmware_problem(Definition(name="f", firmware="uefi", machine=machine)) is None


def test_uefi_on_another_board_is_refused_with_the_reason() -> None:
    problem = firmware.firmware_problem(Definition(name="f", firmware="uefi", machine="microvm"))
    assert problem is not None and "needs machine" in problem and "'microvm'" in problem
    assert firmware.firmware_problem(Definition(name="f", machine="microvm")) is None


def _templates(tmp_path: Path) -> tuple[Path, Path]:
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"code")
    template.write_bytes(b"empty store")
    return code, template


def test_the_first_uefi_start_copies_the_template_and_later_ones_keep_the_store(
    tmp_path: Path,
) -> None:
    paths = Paths(state_dir=tmp_path / "state")
    code, template = _templates(tmp_path)
    fds = firmware.open_nvram(paths, "web1", code, template)
    try:
        store = firmware.nvram_path(paths, "web1")
        assert store == tmp_path / "state" / "nvram" / "web1_VARS.fd"
        assert store.read_bytes() == b"empty store"
        assert stat.S_IMODE(store.stat().st_mode) == 0o600
        modes = [_access_mode(fd) for fd in fds]
        assert modes == [os.O_RDWR, os.O_RDONLY]
        assert all(not os.get_inheritable(fd) for fd in fds)
        os.pwrite(fds[0], b"guest", 0)  # the guest writes its boot entries
    finally:
        hardware.close(fds)
    template.write_bytes(b"another template")
    hardware.close(firmware.open_nvram(paths, "web1", code, template))
    assert firmware.nvram_path(paths, "web1").read_bytes() == b"guest store"


def _access_mode(fd: int) -> int:
    import fcntl  # noqa: PLC0415 - only this helper needs it

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def test_a_missing_ovmf_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    paths = Paths(state_dir=tmp_path / "state")
    with pytest.raises(firmware.FirmwareUnavailable, match="install Debian's package ovmf"):
        firmware.open_nvram(paths, "web1", tmp_path / "none.fd", tmp_path / "none-vars.fd")
    assert not (tmp_path / "state").exists()


def test_a_store_that_is_a_symlink_is_never_followed(tmp_path: Path) -> None:
    paths = Paths(state_dir=tmp_path / "state")
    code, template = _templates(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    store = firmware.nvram_path(paths, "web1")
    store.parent.mkdir(parents=True)
    store.symlink_to(secret)
    with pytest.raises(OSError):
        firmware.open_nvram(paths, "web1", code, template)


def test_undefine_removes_the_store_and_the_sweep_removes_only_unknown_vms(
    tmp_path: Path,
) -> None:
    paths = Paths(state_dir=tmp_path / "state")
    code, template = _templates(tmp_path)
    for name in ("a", "b", "c"):
        hardware.close(firmware.open_nvram(paths, name, code, template))
    (paths.state_dir / "nvram" / "notes.txt").write_text("not a store")
    assert firmware.remove_nvram(paths, "a")
    assert not firmware.remove_nvram(paths, "a")
    removed = firmware.remove_stale_nvram(paths, {"b"})
    assert removed == [firmware.nvram_path(paths, "c")]
    assert sorted(p.name for p in (paths.state_dir / "nvram").iterdir()) == [
        "b_VARS.fd",
        "notes.txt",
    ]
    assert firmware.remove_stale_nvram(Paths(state_dir=tmp_path / "none"), set()) == []


# --- what a start prepares --------------------------------------------------------------------


def test_prepare_refuses_an_impossible_combination_before_opening_anything(
    tmp_path: Path,
) -> None:
    paths = Paths(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    resources = LaunchResources(qmp_socket=SOCKET)
    defn = Definition(name="u", firmware="uefi", machine="microvm")
    with pytest.raises(LaunchFailed, match="needs machine"):
        asyncio.run(hardware.prepare(paths, defn, resources))
    assert resources.pass_fds == [] and not (tmp_path / "state").exists()
    cdrom = Definition(name="u", machine="microvm", disks=(Disk("/i.iso", media="cdrom"),))
    with pytest.raises(LaunchFailed, match="cdrom needs a board with an IDE controller"):
        asyncio.run(hardware.prepare(paths, cdrom, resources))


def test_prepare_opens_the_store_and_names_the_vnc_socket(tmp_path: Path) -> None:
    paths = Paths(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    resources = LaunchResources(qmp_socket=SOCKET)
    defn = Definition(name="u", firmware="uefi", display="vnc", accel=("tcg",))
    fds = asyncio.run(hardware.prepare(paths, defn, resources))
    try:
        assert resources.nvram_file == "/dev/fdset/1"
        assert [entry[0] for entry in resources.fdsets] == fds and len(fds) == 2
        assert resources.vnc_socket == tmp_path / "run" / "qemu" / "u" / "vnc.sock"
        assert not resources.kvm  # tcg: never asked
        size = firmware.nvram_path(paths, "u").stat().st_size
        assert size == firmware.OVMF_VARS_TEMPLATE.stat().st_size
    finally:
        hardware.close(fds)


# --- cdroms and the boot order ------------------------------------------------------------------

ROOT = Disk("/img/root.raw")
ISO = Disk("/img/install.iso", readonly=True, media="cdrom")
DATA = Disk("/img/data.qcow2", format="qcow2", readonly=True)


def test_a_cdrom_without_boot_order_is_an_ide_cdrom_read_only() -> None:
    argv = disk_args(Definition(name="b", disks=(ROOT, ISO)), {})
    assert argv == [
        "-drive",
        "file=/img/root.raw,format=raw,if=ide",
        "-drive",
        "file=/img/install.iso,format=raw,if=ide,media=cdrom,readonly=on",
    ]


def test_boot_indexes_follow_the_kinds_in_boot_order_then_definition_order() -> None:
    nics = (Nic(type="user"), Nic(type="user"))
    defn = Definition(
        name="b", disks=(ROOT, ISO, DATA, ISO), nics=nics, boot=("cdrom", "network", "disk")
    )
    disks, nic_indexes = boot.boot_indexes(defn)
    assert disks == {1: 1, 3: 2, 0: 5, 2: 6}
    assert nic_indexes == {0: 3, 1: 4}
    assert boot.boot_indexes(Definition(name="b", disks=(ROOT, ISO))) == ({}, {})
    only_disks = Definition(name="b", disks=(ROOT, ISO), boot=("disk",))
    assert boot.boot_indexes(only_disks) == ({0: 1}, {})  # the cdrom is tried after


def test_with_a_boot_order_on_pc_disks_are_devices_on_piix_buses_with_bootindex() -> None:
    defn = Definition(name="b", disks=(ROOT, ISO, DATA), boot=("cdrom", "disk"))
    assert disk_args(defn, {0: "/dev/fdset/1"}) == [
        "-drive",
        "file=/dev/fdset/1,format=raw,if=none,id=drive-disk0",
        "-device",
        "ide-hd,drive=drive-disk0,bus=ide.0,unit=0,bootindex=2",
        "-drive",
        "file=/img/install.iso,format=raw,if=none,id=drive-disk1,media=cdrom,readonly=on",
        "-device",
        "ide-cd,drive=drive-disk1,bus=ide.0,unit=1,bootindex=1",
        "-drive",
        "file=/img/data.qcow2,format=qcow2,if=none,id=drive-disk2,readonly=on",
        "-device",
        "virtio-blk-pci,drive=drive-disk2,bootindex=3",
    ]


def test_with_a_boot_order_on_q35_each_ide_device_has_its_own_ahci_port() -> None:
    defn = Definition(name="b", machine="q35", disks=(ROOT, ISO, ROOT), boot=("disk",))
    devices = values(disk_args(defn, {}), "-device")
    assert devices == [
        "ide-hd,drive=drive-disk0,bus=ide.0,unit=0,bootindex=1",
        "ide-cd,drive=drive-disk1,bus=ide.1,unit=0",
        "ide-hd,drive=drive-disk2,bus=ide.2,unit=0,bootindex=2",
    ]


def test_ide_places_run_out_as_the_board_says() -> None:
    assert boot.ide_address("pc", 3) == ("ide.1", 1)
    assert boot.ide_address("pc-q35-7.2", 5) == ("ide.5", 0)
    with pytest.raises(ValueError, match="room for 4"):
        boot.ide_address("pc", 4)
    with pytest.raises(ValueError, match="no IDE controller"):
        boot.ide_address("microvm", 0)
    five = Definition(name="b", disks=(ROOT,) * 5)
    problem = boot.devices_problem(five)
    assert problem is not None and "room for 4" in problem and "has 5" in problem
    assert boot.devices_problem(Definition(name="b", machine="q35", disks=(ROOT,) * 5)) is None
    assert boot.devices_problem(Definition(name="b", disks=(ROOT,) * 4 + (DATA,) * 3)) is None


def test_network_boot_puts_a_bootindex_on_the_nic_device() -> None:
    defn = Definition(name="b", disks=(ROOT,), nics=(Nic(type="user"),), boot=("network", "disk"))
    argv = build_argv(defn, SOCKET)
    nic = next(v for v in values(argv, "-device") if v.startswith("virtio-net-pci"))
    assert nic.endswith(",id=nic0,bootindex=1")
    assert "ide-hd,drive=drive-disk0,bus=ide.0,unit=0,bootindex=2" in values(argv, "-device")
