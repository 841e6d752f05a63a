"""Display, firmware, CPU model, cdroms and boot order as users meet them: the installed service
runs confined QEMUs (TCG) and is driven through svmctl; what QEMU really got is read from its
command line, from a second QMP monitor the test adds through `extra_args` (the daemon holds the
first), and from the guests themselves (which device booted shows on the serial console)."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guests import serial_guest_image
from tests.integration.test_service import (
    ACPI_IMAGE,
    IMAGES,
    MEMBER,
    USER,
    main_pid,
    service,
    sh,
    status,
    svm,
    wait_for,
)

pytestmark = pytest.mark.integration
__all__ = ["service"]  # test_service's module fixture: make install, the service started

RUNTIME = Path("/run/supervisord-vm")
NVRAM = Path("/var/lib/supervisord-vm/nvram")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
RFB_GREETING = b"RFB 003.008\n"
CDROM_IMAGE = IMAGES / "df_serial.iso"
DISK_IMAGE = IMAGES / "df_serial.img"
CDROM_BANNER = b"svm guest booted from the cdrom"
DISK_BANNER = b"svm guest booted from the disk"
WAIT = 60.0  # TCG guests on a loaded 2-core machine: generous, never a measured time

ISO_SECTOR = 2048
_CATALOG_SECTOR, _BOOT_SECTOR = 19, 20


def el_torito_image(boot_sector: bytes) -> bytes:
    """A minimal ISO 9660 image whose El Torito boot record loads `boot_sector` (512 bytes,
    no emulation) at 0x7c00, the way SeaBIOS boots an installer CD."""

    def sector(data: bytes) -> bytes:
        return data.ljust(ISO_SECTOR, b"\0")

    total = _BOOT_SECTOR + 1
    primary = bytearray(ISO_SECTOR)
    primary[0:7] = b"\x01CD001\x01"
    primary[80:88] = total.to_bytes(4, "little") + total.to_bytes(4, "big")
    primary[128:132] = ISO_SECTOR.to_bytes(2, "little") + ISO_SECTOR.to_bytes(2, "big")
    boot_record = (
        b"\x00CD001\x01"
        + b"EL TORITO SPECIFICATION".ljust(32, b"\0")
        + bytes(32)
        + _CATALOG_SECTOR.to_bytes(4, "little")
    )
    validation = bytearray(32)
    validation[0] = 1  # header ID; platform 0 = x86
    validation[30:32] = b"\x55\xaa"
    words = sum(int.from_bytes(validation[i : i + 2], "little") for i in range(0, 32, 2))
    validation[28:30] = (-words & 0xFFFF).to_bytes(2, "little")  # all words sum to 0
    initial = bytes([0x88, 0x00])  # bootable, no emulation
    initial += (0).to_bytes(2, "little") + bytes(2)  # load segment 0 = 0x7c0, system type
    initial += (1).to_bytes(2, "little") + _BOOT_SECTOR.to_bytes(4, "little")  # 1 sector
    sectors = [bytes(ISO_SECTOR)] * 16 + [
        bytes(primary),
        sector(boot_record),
        sector(b"\xffCD001\x01"),  # volume descriptor set terminator
        sector(bytes(validation) + initial.ljust(32, b"\0")),
        sector(boot_sector),
    ]
    return b"".join(sectors)


@pytest.fixture(scope="module")
def images(service: None) -> None:
    CDROM_IMAGE.write_bytes(el_torito_image(serial_guest_image(CDROM_BANNER + b"\r\n")))
    DISK_IMAGE.write_bytes(serial_guest_image(DISK_BANNER + b"\r\n"))


def toml_value(value: object) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and arrays are TOML too


@pytest.fixture
def define(service: None, images: None, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Define VMs for one test from keys and disks; destroy and undefine them afterwards."""
    names: list[str] = []

    def make(name: str, disks: list[dict[str, object]] | None = None, **keys: object) -> str:
        lines = [f"name = {toml_value(name)}", 'accel = "tcg"', "stop_timeout = 5"]
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        if "memory" not in keys:
            lines.append("memory = 16")
        for disk in disks if disks is not None else [{"path": str(ACPI_IMAGE), "snapshot": True}]:
            lines.append("[[disks]]")
            lines += [f"{key} = {toml_value(value)}" for key, value in disk.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        result = svm("define", str(path))
        assert result.returncode == 0, result.stderr
        names.append(name)
        return name

    yield make
    for name in names:
        svm("destroy", "--force", name)
        svm("undefine", name)
    for name in names:  # undefine takes the VM's UEFI variables store with it
        assert not (NVRAM / f"{name}_VARS.fd").exists()


def start(name: str) -> dict[str, Any]:
    result = svm("start", name)
    assert result.returncode == 0, result.stderr
    info = status(name)
    assert info["state"] == "running"
    return info


def console_log(name: str) -> bytes:
    result = svm("console", "--log", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.encode()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def greeting_unix(path: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Connect to a VNC unix socket (as `user`, through runuser) and print what it sends first."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(30)\n"
        f"s.connect({path!r})\n"
        "sys.stdout.write(repr(s.recv(12)))\n"
    )
    argv = ["python3", "-c", script]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return sh(*argv)


def greeting_tcp(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=30) as connection:
        data = b""
        while len(data) < len(RFB_GREETING):
            chunk = connection.recv(len(RFB_GREETING) - len(data))
            if not chunk:
                break
            data += chunk
        return data


def restart_daemon() -> None:
    before = main_pid()
    sh("systemctl", "restart", "supervisord-vm.service", check=True)
    assert main_pid() != before


class Monitor:
    """A second QMP monitor, which the test asked QEMU for through extra_args."""

    def __init__(self, path: Path) -> None:
        wait_for(path.exists, WAIT, f"QMP socket {path}")
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.settimeout(WAIT)
        self.socket.connect(str(path))
        self.stream = self.socket.makefile("rw")
        json.loads(self.stream.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.stream.write(json.dumps(request) + "\n")
        self.stream.flush()
        while True:
            reply = json.loads(self.stream.readline())
            if "event" not in reply:
                assert "return" in reply, reply
                return reply["return"]

    def close(self) -> None:
        self.stream.close()
        self.socket.close()


def monitor_args(name: str) -> tuple[list[str], Path]:
    """extra_args for a second QMP monitor in the VM's QEMU directory (QEMU's own, so the
    confined QEMU may create the socket there; gone with the directory when QEMU ends)."""
    path = RUNTIME / "qemu" / name / "test.qmp"
    return ["-qmp", f"unix:{path},server=on,wait=off"], path


# --- display --------------------------------------------------------------------------------


def test_vnc_on_a_unix_socket_greets_root_and_the_group_and_nobody_else(
    define: Callable[..., str],
) -> None:
    name = define("df_vnc", display="vnc")
    info = start(name)
    socket_path = RUNTIME / "qemu" / name / "vnc.sock"
    expected = f"vnc+unix://{socket_path}"
    assert info["display"] == expected
    shown = svm("display", name)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == expected + "\n"
    assert f"vncviewer {socket_path}" in shown.stderr
    assert json.loads(svm("--json", "display", name).stdout) == {
        "name": name,
        "display": expected,
        "socket": str(socket_path),
    }
    assert "-vga" in cmdline(info["pid"])
    mode = socket_path.stat()
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660
    root = greeting_unix(str(socket_path))
    assert root.stdout == repr(RFB_GREETING), root.stderr
    member = greeting_unix(str(socket_path), MEMBER)
    assert member.stdout == repr(RFB_GREETING), member.stderr
    outsider = greeting_unix(str(socket_path), USER)
    assert outsider.returncode != 0 and "PermissionError" in outsider.stderr

    restart_daemon()  # the address is derived again, not lost
    assert status(name)["display"] == expected
    assert greeting_unix(str(socket_path)).stdout == repr(RFB_GREETING)

    assert svm("destroy", name).returncode == 0
    assert status(name)["display"] == ""
    gone = svm("display", name)
    assert gone.returncode == 1 and "is not running" in gone.stderr


def test_vnc_on_loopback_gives_each_vm_its_own_free_port(define: Callable[..., str]) -> None:
    names = [define(f"df_tcp{i}", display="vnc", vnc_listen="127.0.0.1") for i in range(2)]
    addresses = [start(name)["display"] for name in names]
    ports = []
    for name, address in zip(names, addresses, strict=True):
        assert address.startswith("vnc://127.0.0.1:"), address
        port = int(address.rsplit(":", 1)[1])
        assert 5900 <= port <= 5999
        ports.append(port)
        assert svm("display", name).stdout == address + "\n"
        assert greeting_tcp("127.0.0.1", port) == RFB_GREETING
    assert ports[0] != ports[1]

    restart_daemon()
    assert [status(name)["display"] for name in names] == addresses
    for port in ports:
        assert greeting_tcp("127.0.0.1", port) == RFB_GREETING


def test_a_vm_without_a_display_says_so(define: Callable[..., str]) -> None:
    name = define("df_nodisplay")
    info = start(name)
    assert info["display"] == ""
    assert "-vnc" not in cmdline(info["pid"])
    result = svm("display", name)
    assert result.returncode == 1 and "has no display" in result.stderr
    missing = svm("display", "df_nosuchvm")
    assert missing.returncode == 4


# --- firmware ---------------------------------------------------------------------------------


def test_a_uefi_vm_keeps_its_own_variables_store_until_undefined(
    define: Callable[..., str],
) -> None:
    name = define("df_uefi", disks=[], firmware="uefi", memory=128)
    store = NVRAM / f"{name}_VARS.fd"
    assert not store.exists()
    info = start(name)
    assert store.is_file()
    mode = store.stat()
    assert (mode.st_uid, stat.S_IMODE(mode.st_mode)) == (0, 0o600)  # root's, held by QEMU
    argv = cmdline(info["pid"])
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in drives
    vars_drive = next(d for d in drives if d.startswith("if=pflash,format=raw,unit=1,"))
    assert "file=/dev/fdset/" in vars_drive
    held = {str(link.readlink()) for link in Path(f"/proc/{info['pid']}/fd").iterdir()}
    assert str(store) in held
    # OVMF writes its boot variables on the first boot, through the descriptor: the
    # unprivileged QEMU wrote a root-owned 0600 file it could not have opened itself.
    template = OVMF_VARS.read_bytes()
    wait_for(lambda: store.read_bytes() != template, WAIT * 2, "OVMF to write its variables")

    inode = store.stat().st_ino
    assert svm("destroy", name).returncode == 0
    assert store.read_bytes() != template  # kept as the guest left it
    start(name)
    assert store.stat().st_ino == inode and store.read_bytes() != template
    restart_daemon()
    assert status(name)["state"] == "running" and store.is_file()
    assert svm("destroy", name).returncode == 0
    assert store.is_file()
    assert svm("undefine", name).returncode == 0
    assert not store.exists()


def test_a_transient_uefi_vms_store_goes_when_the_vm_is_forgotten(
    service: None, tmp_path: Path
) -> None:
    name = "df_uefi_transient"
    store = NVRAM / f"{name}_VARS.fd"
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\naccel = "tcg"\nmemory = 128\nstop_timeout = 5\nfirmware = "uefi"\n'
    )
    try:
        created = svm("create", str(path))
        assert created.returncode == 0, created.stderr
        assert status(name)["transient"] is True and store.is_file()
        assert svm("destroy", name).returncode == 0
        wait_for(lambda: svm("status", name).returncode == 4, WAIT, f"{name} forgotten")
        assert not store.exists()
    finally:
        svm("destroy", "--force", name)


def test_uefi_on_a_board_ovmf_does_not_support_is_a_clear_start_error(
    define: Callable[..., str],
) -> None:
    name = define("df_uefi_micro", disks=[], firmware="uefi", machine="microvm")
    result = svm("start", name)
    assert result.returncode == 1
    assert 'firmware = "uefi" needs machine "pc" or "q35"' in result.stderr
    assert not (NVRAM / f"{name}_VARS.fd").exists()
    assert status(name)["state"] == "shutoff"
    assert sh("systemctl", "is-active", f"svm-{name}.scope").stdout.strip() != "active"


# --- cpu and media --------------------------------------------------------------------------


def test_an_explicit_cpu_and_a_cdrom_are_what_qemu_runs(define: Callable[..., str]) -> None:
    extra, monitor_path = monitor_args("df_media")
    name = define(
        "df_media",
        disks=[
            {"path": str(ACPI_IMAGE), "snapshot": True},
            {"path": str(CDROM_IMAGE), "media": "cdrom"},
        ],
        cpu="qemu64",
        extra_args=extra,
    )
    info = start(name)
    argv = cmdline(info["pid"])
    assert argv[argv.index("-cpu") + 1] == "qemu64"
    monitor = Monitor(monitor_path)
    try:
        cpus = monitor.execute("query-cpus-fast")
        cpu_type = monitor.execute("qom-get", {"path": cpus[0]["qom-path"], "property": "type"})
        assert cpu_type == "qemu64-x86_64-cpu"
        blocks = monitor.execute("query-block")
    finally:
        monitor.close()
    by_removable = {block["removable"]: block for block in blocks if "inserted" in block}
    cdrom, disk = by_removable[True], by_removable[False]
    assert cdrom["inserted"]["ro"] is True and "tray_open" in cdrom  # an ATAPI cdrom
    assert disk["inserted"]["ro"] is False


def test_the_boot_order_decides_which_device_the_guest_boots_from(
    define: Callable[..., str],
) -> None:
    disks = [
        {"path": str(DISK_IMAGE), "snapshot": True},
        {"path": str(CDROM_IMAGE), "media": "cdrom"},
    ]
    for order, banner in ((["cdrom", "disk"], CDROM_BANNER), (["disk", "cdrom"], DISK_BANNER)):
        name = define(f"df_boot_{order[0]}", disks=disks, boot=order)
        info = start(name)
        assert "bootindex=1" in " ".join(cmdline(info["pid"]))
        wait_for(lambda: banner in console_log(name), WAIT, f"{banner!r} on {name}'s console")  # noqa: B023
        other = DISK_BANNER if banner == CDROM_BANNER else CDROM_BANNER
        assert other not in console_log(name)
        assert svm("destroy", "--force", name).returncode == 0


def ovmf_tried(name: str) -> list[str]:
    """The devices OVMF's boot manager tried, in order, as it says on the serial console
    ("BdsDxe: failed to load Boot0001 "UEFI QEMU DVD-ROM QM00002 " from ...")."""
    tried: list[str] = []
    for line in console_log(name).splitlines():
        if b"BdsDxe:" not in line:
            continue
        for kind in ("DVD-ROM", "HARDDISK"):
            if kind.encode() in line and kind not in tried:
                tried.append(kind)
    return tried


def test_ovmf_follows_the_boot_order_too(define: Callable[..., str]) -> None:
    """Neither device holds a UEFI boot loader, so OVMF tries both and says so on the serial
    console: the first kind in `boot` first. One VM on each board OVMF supports (i440fx, q35:
    its AHCI ports take one device each)."""
    disks = [
        {"path": str(DISK_IMAGE), "snapshot": True},
        {"path": str(CDROM_IMAGE), "media": "cdrom"},
    ]
    expected = {"df_uefi_cd": ["DVD-ROM", "HARDDISK"], "df_uefi_hd": ["HARDDISK", "DVD-ROM"]}
    vms = (("df_uefi_cd", ["cdrom", "disk"], "pc"), ("df_uefi_hd", ["disk", "cdrom"], "q35"))
    for name, order, machine in vms:
        define(name, disks=disks, boot=order, firmware="uefi", memory=128, machine=machine)
        start(name)
    for name, tried in expected.items():
        wait_for(
            lambda name=name: len(ovmf_tried(name)) == 2,  # type: ignore[misc]
            WAIT * 3,
            f"OVMF of {name} to try both devices",
        )
        assert ovmf_tried(name) == tried
