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


# --- a guest on the serial port (COM1) ----------------------------------------------------------

_COM1 = 0x3F8
_LSR = _COM1 + 5  # line status: bit 0 data ready, bit 5 transmitter holding register empty


class _Assembler:
    """Just enough of a 16-bit assembler for the serial guest: bytes, labels, short jumps,
    near calls and 16-bit addresses of labels (the sector is loaded at 0x7c00)."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[str, int, str]] = []

    def emit(self, data: bytes) -> None:
        self.code += data

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def jump8(self, opcode: bytes, target: str) -> None:
        self.emit(opcode)
        self.fixups.append(("rel8", len(self.code), target))
        self.emit(b"\0")

    def call(self, target: str) -> None:
        self.emit(b"\xe8")
        self.fixups.append(("rel16", len(self.code), target))
        self.emit(b"\0\0")

    def address(self, opcode: bytes, target: str) -> None:
        self.emit(opcode)
        self.fixups.append(("abs16", len(self.code), target))
        self.emit(b"\0\0")

    def assemble(self) -> bytes:
        for kind, at, target in self.fixups:
            offset = self.labels[target]
            if kind == "rel8":
                distance = offset - (at + 1)
                assert -128 <= distance < 128, f"jump to {target} too far"
                self.code[at] = distance & 0xFF
            elif kind == "rel16":
                self.code[at : at + 2] = _u16((offset - (at + 2)) & 0xFFFF)
            else:
                self.code[at : at + 2] = _u16(0x7C00 + offset)
        return bytes(self.code)


def serial_guest_image(banner: bytes) -> bytes:
    """A guest that writes `banner` to COM1, then echoes what it reads there, lower-case
    letters made upper-case (so an echo proves the guest read the input, not a loopback).

    It waits for the transmitter to be empty before each byte (nothing is overwritten) and
    sleeps with `sti; hlt` between polls of the receiver (a timer tick wakes it): an idle
    guest costs no CPU. It ignores the ACPI power button (destroy it).
    """
    if b"\0" in banner:
        raise ValueError("the banner is NUL-terminated: no NUL in it")
    asm = _Assembler()
    # cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; cld
    asm.emit(b"\xfa\x31\xc0\x8e\xd8\x8e\xd0\xbc\x00\x7c\xfc")
    asm.address(b"\xbe", "banner")  # mov si, banner
    asm.label("print")
    asm.emit(b"\xac\x84\xc0")  # lodsb; test al, al
    asm.jump8(b"\x74", "echo")  # jz echo
    asm.emit(b"\x88\xc4")  # mov ah, al
    asm.call("putc")
    asm.jump8(b"\xeb", "print")
    asm.label("echo")
    asm.emit(b"\xfb\xf4")  # sti; hlt
    asm.label("poll")
    asm.emit(b"\xba" + _u16(_LSR) + b"\xec\xa8\x01")  # mov dx, LSR; in al, dx; test al, 1
    asm.jump8(b"\x74", "echo")  # jz echo (nothing received)
    asm.emit(b"\xba" + _u16(_COM1) + b"\xec\x88\xc4")  # mov dx, COM1; in al, dx; mov ah, al
    asm.emit(b"\x3c\x61")  # cmp al, 'a'
    asm.jump8(b"\x72", "send")  # jb send
    asm.emit(b"\x3c\x7a")  # cmp al, 'z'
    asm.jump8(b"\x77", "send")  # ja send
    asm.emit(b"\x80\xec\x20")  # sub ah, 0x20
    asm.label("send")
    asm.call("putc")
    asm.jump8(b"\xeb", "poll")
    asm.label("putc")  # write AH to COM1 once it can take a byte
    asm.emit(b"\xba" + _u16(_LSR))  # mov dx, LSR
    asm.label("wait")
    asm.emit(b"\xec\xa8\x20")  # in al, dx; test al, 0x20
    asm.jump8(b"\x74", "wait")
    asm.emit(b"\xba" + _u16(_COM1) + b"\x88\xe0\xee\xc3")  # mov dx, COM1; mov al, ah; out; ret
    asm.label("banner")
    asm.emit(banner + b"\0")
    return boot_sector(asm.assemble())


def write_serial_guest(path: Path, banner: bytes) -> None:
    path.write_bytes(serial_guest_image(banner))


# QEMU's debug console port (isa-debugcon's default iobase): each byte written there goes to
# the chardev it is connected to.
DEBUGCON_PORT = 0x402


def _print_debugcon(message_address: int) -> bytes:
    """Write the NUL-terminated string at DS:message_address to the debug console, byte by byte."""
    return b"".join(
        (
            b"\x31\xc0",  # xor ax, ax
            b"\x8e\xd8",  # mov ds, ax
            b"\xfc",  # cld
            b"\xbe" + _u16(message_address),  # mov si, message
            b"\xba" + _u16(DEBUGCON_PORT),  # mov dx, 0x402
            b"\xac",  # next: lodsb
            b"\x84\xc0",  # test al, al
            b"\x74\x03",  # jz done (over out and jmp)
            b"\xee",  # out dx, al
            b"\xeb\xf8",  # jmp next
        )
    )


def debugcon_guest_image(message: bytes) -> bytes:
    """A guest that writes `message` to QEMU's debug console (`-device isa-debugcon`), then
    powers off when the ACPI power button is pressed, like the ACPI guest."""
    if b"\x00" in message:
        raise ValueError("the message is NUL-terminated: it cannot contain NUL")
    body_length = len(_print_debugcon(0) + _read_pm_base() + _acpi_body())
    code = _print_debugcon(0x7C00 + body_length) + _read_pm_base() + _acpi_body()
    return boot_sector(code + message + b"\x00")


def write_debugcon_guest(path: Path, message: bytes) -> None:
    path.write_bytes(debugcon_guest_image(message))
