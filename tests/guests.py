"""Tiny test guests: 512-byte boot sectors that SeaBIOS boots from a raw disk.

They exist so integration tests can watch a real guest cooperate with (or ignore) the ACPI power
button without any operating system image. The machine code is written out here byte by byte
(checked against nasm output while writing it), so running the tests needs no assembler.
Use them as `Disk(path, format="raw", snapshot=True)`: QEMU refuses a read-only IDE disk.
"""

from pathlib import Path

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"

# PCI config address of the PIIX4 power-management function: enable bit, bus 0, device 1,
# function 3, register 0x40 (PMBA, the PM I/O base).
_PIIX4_PMBA = 0x8000_0000 | (0 << 16) | (1 << 11) | (3 << 8) | 0x40
_PWRBTN = 0x0100  # PWRBTN_STS in PM1_STS, PWRBTN_EN in PM1_EN
_SLP_EN = 0x2000  # PM1_CNT: sleep enable with sleep type 0 (soft off on QEMU's PIIX4)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _read_pm_base() -> bytes:
    """Leave the PIIX4 PM I/O base in BX (SeaBIOS has programmed and enabled it)."""
    return b"".join(
        (
            b"\xfa",  # cli
            b"\x66\xb8" + _u32(_PIIX4_PMBA),  # mov eax, PMBA config address
            b"\xba" + _u16(0x0CF8),  # mov dx, 0xcf8
            b"\x66\xef",  # out dx, eax
            b"\xba" + _u16(0x0CFC),  # mov dx, 0xcfc
            b"\x66\xed",  # in eax, dx
            b"\x83\xe0\xc0",  # and ax, 0xffc0   (bits 15:6 hold the base)
            b"\x89\xc3",  # mov bx, ax
        )
    )


def _acpi_body() -> bytes:
    """Enable the power button, sleep until it is pressed, then enter S5 (soft off)."""
    wait_loop = b"".join(
        (
            b"\xfb",  # sti            (timer ticks wake hlt even without an SCI)
            b"\xf4",  # hlt
            b"\x89\xda",  # mov dx, bx     (PM1_STS = base + 0)
            b"\xed",  # in ax, dx
            b"\xa9" + _u16(_PWRBTN),  # test ax, PWRBTN_STS
        )
    )
    jz_back = b"\x74" + (-(len(wait_loop) + 2) & 0xFF).to_bytes(1, "little")  # jz wait_loop
    return b"".join(
        (
            b"\x8d\x57\x02",  # lea dx, [bx+2] (PM1_EN)
            b"\xed",  # in ax, dx
            b"\x0d" + _u16(_PWRBTN),  # or ax, PWRBTN_EN
            b"\xef",  # out dx, ax
            wait_loop,
            jz_back,
            b"\x8d\x57\x04",  # lea dx, [bx+4] (PM1_CNT)
            b"\xb8" + _u16(_SLP_EN),  # mov ax, SLP_EN | SLP_TYP 0
            b"\xef",  # out dx, ax     (QEMU powers off here)
            b"\xfa\xf4\xeb\xfc",  # cli; hlt; jmp $-2 (never reached)
        )
    )


def _deaf_body() -> bytes:
    """Idle forever with PWRBTN_EN left clear: the power button changes nothing."""
    return b"\xfb\xf4\xeb\xfc"  # sti; hlt; jmp $-2


def boot_sector(code: bytes) -> bytes:
    """Pad `code` to a 512-byte MBR with the 0x55AA boot signature SeaBIOS requires."""
    room = SECTOR_SIZE - len(BOOT_SIGNATURE)
    if len(code) > room:
        raise ValueError(f"boot code is {len(code)} bytes, at most {room} fit")
    return code.ljust(room, b"\x00") + BOOT_SIGNATURE


def acpi_guest_image() -> bytes:
    """A guest that powers off when QMP `system_powerdown` presses the ACPI power button."""
    return boot_sector(_read_pm_base() + _acpi_body())


def deaf_guest_image() -> bytes:
    """A guest that ignores the ACPI power button and runs until killed."""
    return boot_sector(_read_pm_base() + _deaf_body())


def write_acpi_guest(path: Path) -> None:
    path.write_bytes(acpi_guest_image())


def write_deaf_guest(path: Path) -> None:
    path.write_bytes(deaf_guest_image())
