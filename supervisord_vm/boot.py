"""A definition's boot order as QEMU `bootindex` values, and where its IDE devices sit (pure).

`-boot order=` is read by SeaBIOS only (from CMOS); OVMF ignores it and follows the
`bootorder` file QEMU builds from the devices' `bootindex` properties, which SeaBIOS reads
too. So the boot order is given as bootindex on every device, the one way that works with
both firmwares. A `-drive if=ide` device cannot carry a bootindex: with a boot order, disks
are given as `-drive if=none` plus an explicit `-device` on a computed IDE bus and unit.
"""

from __future__ import annotations

from supervisord_vm.definition import Definition, Disk

# Which machine types have which IDE layout: q35's AHCI has six ports of one unit each; the
# i440fx board (pc) has two PIIX IDE buses of two units each (master and slave).
_Q35_PREFIXES = ("q35", "pc-q35")
_PIIX_PREFIXES = ("pc",)  # pc, pc-i440fx-*; checked after q35 ("pc-q35-*" starts with "pc")
Q35_IDE_PORTS = 6
PIIX_IDE_BUSES, PIIX_IDE_UNITS = 2, 2


def boot_kind(disk: Disk) -> str:
    """The `boot` entry that names this disk: "cdrom" for a cdrom, else "disk"."""
    return "cdrom" if disk.media == "cdrom" else "disk"


def boot_indexes(defn: Definition) -> tuple[dict[int, int], dict[int, int]]:
    """bootindex per disk index and per NIC index, from `defn.boot` (empty maps without one).

    The kinds come in `boot`'s order; devices of one kind in definition order. A kind `boot`
    does not name gets no bootindex: the firmware tries those devices after the listed ones.
    """
    disks: dict[int, int] = {}
    nics: dict[int, int] = {}
    next_index = 1
    for kind in defn.boot:
        if kind == "network":
            for nic_index in range(len(defn.nics)):
                nics[nic_index] = next_index
                next_index += 1
            continue
        for disk_index, disk in enumerate(defn.disks):
            if boot_kind(disk) == kind:
                disks[disk_index] = next_index
                next_index += 1
    return disks, nics


def ide_layout(machine: str) -> tuple[int, int] | None:
    """(buses, units per bus) of the board's IDE controller, or None when it has none."""
    if machine.startswith(_Q35_PREFIXES):
        return Q35_IDE_PORTS, 1
    if machine.startswith(_PIIX_PREFIXES):
        return PIIX_IDE_BUSES, PIIX_IDE_UNITS
    return None


def ide_address(machine: str, ordinal: int) -> tuple[str, int]:
    """(bus, unit) of the `ordinal`-th IDE device, as `-drive if=ide` would place it.

    ValueError when the board has no IDE or no free place (the message says so).
    """
    layout = ide_layout(machine)
    if layout is None:
        raise ValueError(f"machine {machine!r} has no IDE controller")
    buses, units = layout
    if ordinal >= buses * units:
        raise ValueError(
            f"machine {machine!r} has room for {buses * units} IDE devices (disks and cdroms)"
        )
    return f"ide.{ordinal // units}", ordinal % units


def on_ide(machine: str, disk: Disk) -> bool:
    """Whether `disk` goes on the board's IDE controller (else on virtio-blk).

    IDE is what SeaBIOS boots on pc/q35 without extra firmware. QEMU refuses a read-only IDE
    hard disk, so read-only disks go on virtio-blk (which SeaBIOS also boots); a cdrom is an
    IDE (ATAPI) device, read-only by nature: virtio has none.
    """
    return ide_layout(machine) is not None and (not disk.readonly or disk.media == "cdrom")


def devices_problem(defn: Definition) -> str | None:
    """Why the definition's disks cannot be attached, or None (this daemon adds no SCSI
    controller, and the board's IDE has room for a fixed number of devices)."""
    layout = ide_layout(defn.machine)
    if layout is None:
        if any(disk.media == "cdrom" for disk in defn.disks):
            return (
                f"a cdrom needs a board with an IDE controller (pc or q35), not machine "
                f"{defn.machine!r}"
            )
        return None
    buses, units = layout
    ide_devices = sum(1 for disk in defn.disks if on_ide(defn.machine, disk))
    if ide_devices > buses * units:
        return (
            f"machine {defn.machine!r} has room for {buses * units} IDE disks and cdroms, "
            f"the definition has {ide_devices} (read-only disks go on virtio)"
        )
    return None
