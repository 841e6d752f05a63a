"""build_argv: QEMU's command line from a Definition (pure)."""

from pathlib import Path

from supervisord_vm.definition import Definition, Disk
from supervisord_vm.qemu import build_argv, drive_option, qemu_option_value
from supervisord_vm.unitname import machine_uuid
from tests.guests import acpi_guest_image, deaf_guest_image

SOCKET = Path("/run/supervisord-vm/web1.qmp")


def test_minimal_definition_gives_the_agreed_order() -> None:
    argv = build_argv(Definition(name="web1"), SOCKET)
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "guest=web1,debug-threads=on",
        "-uuid",
        str(machine_uuid("web1")),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-qmp",
        "unix:/run/supervisord-vm/web1.qmp,server=on,wait=off",
        "-S",
        "-accel",
        "kvm",
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        "512",
        "-smp",
        "1",
    ]


def test_guest_uuid_is_machineds_id_and_stable() -> None:
    argv = build_argv(Definition(name="web1"), SOCKET)
    # Pinned: a guest keys licences and cloud-init state on its SMBIOS UUID; it must never change.
    assert argv[argv.index("-uuid") + 1] == "3c35b3f7-bdf4-5fad-97bf-72399c9cbe55"
    assert str(machine_uuid("web1")) == "3c35b3f7-bdf4-5fad-97bf-72399c9cbe55"
    other = build_argv(Definition(name="web2"), SOCKET)
    assert other[other.index("-uuid") + 1] != argv[argv.index("-uuid") + 1]


def test_accelerators_repeat_in_preference_order() -> None:
    argv = build_argv(Definition(name="a", accel=("tcg", "kvm", "xen")), SOCKET)
    accels = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-accel"]
    assert accels == ["tcg", "kvm", "xen"]


def test_single_accelerator_appears_once() -> None:
    argv = build_argv(Definition(name="a", accel=("tcg",)), SOCKET)
    assert argv.count("-accel") == 1


def test_qemu_binary_machine_memory_and_cpus() -> None:
    defn = Definition(name="a", qemu="/opt/q/bin/qemu", machine="q35", memory=16, cpus=4)
    argv = build_argv(defn, SOCKET)
    assert argv[0] == "/opt/q/bin/qemu"
    assert argv[argv.index("-machine") + 1] == "q35"
    assert argv[argv.index("-m") + 1] == "16"
    assert argv[argv.index("-smp") + 1] == "4"


def test_cpus_stay_stopped_until_cont() -> None:
    assert "-S" in build_argv(Definition(name="a"), SOCKET)


def test_drives_in_order_with_flags() -> None:
    disks = (
        Disk(path="/img/root.qcow2", format="qcow2"),
        Disk(path="/img/scratch.raw", snapshot=True),
    )
    argv = build_argv(Definition(name="a", disks=disks), SOCKET)
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert drives == [
        "file=/img/root.qcow2,format=qcow2,if=ide",
        "file=/img/scratch.raw,format=raw,if=ide,snapshot=on",
    ]


def test_readonly_disk_goes_on_virtio_because_qemu_refuses_readonly_ide() -> None:
    disk = Disk(path="/img/iso.raw", readonly=True, snapshot=True)
    assert (
        drive_option("pc", disk) == "file=/img/iso.raw,format=raw,if=virtio,readonly=on,snapshot=on"
    )


def test_non_pc_machines_use_virtio() -> None:
    assert drive_option("microvm", Disk(path="/i")) == "file=/i,format=raw,if=virtio"
    assert drive_option("q35", Disk(path="/i")) == "file=/i,format=raw,if=ide"
    assert drive_option("pc-i440fx-7.2", Disk(path="/i")) == "file=/i,format=raw,if=ide"


def test_commas_in_paths_are_doubled() -> None:
    assert qemu_option_value("a,b,,c") == "a,,b,,,,c"
    defn = Definition(name="a", disks=(Disk(path="/img/x,format=qcow2,y.raw"),))
    argv = build_argv(defn, Path("/run/s,v/a.qmp"))
    assert argv[argv.index("-qmp") + 1] == "unix:/run/s,,v/a.qmp,server=on,wait=off"
    assert argv[argv.index("-drive") + 1] == "file=/img/x,,format=qcow2,,y.raw,format=raw,if=ide"


def test_extra_args_come_last_verbatim() -> None:
    extra = ("-device", "virtio-rng-pci", "; rm -rf /", "$(x)", "a b")
    defn = Definition(name="a", disks=(Disk(path="/i"),), extra_args=extra)
    argv = build_argv(defn, SOCKET)
    assert tuple(argv[-len(extra) :]) == extra


def test_name_is_quoted_too() -> None:
    argv = build_argv(Definition(name="a,b"), SOCKET)
    assert argv[argv.index("-name") + 1] == "guest=a,,b,debug-threads=on"


def test_guest_images_are_boot_sectors() -> None:
    for image in (acpi_guest_image(), deaf_guest_image()):
        assert len(image) == 512
        assert image[510:] == b"\x55\xaa"
    assert acpi_guest_image() != deaf_guest_image()
