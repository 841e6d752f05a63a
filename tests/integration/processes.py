"""The QEMU processes on this machine, found from /proc (no project code involved)."""

from __future__ import annotations

from pathlib import Path


def qemu_processes() -> tuple[dict[str, list[int]], list[int]]:
    """Live QEMUs by VM name (their `-name guest=NAME`), and spawn trampolines never exec'd.

    Imports nothing of the project: the tests of the installed service use it too.
    """
    found: dict[str, list[int]] = {}
    trampolines: list[int] = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0] if argv else "X"
        except OSError:
            continue
        if state in ("Z", "X") or b"-name" not in argv:
            continue
        if any(arg.endswith(b"_spawn_trampoline.py") for arg in argv):
            trampolines.append(int(entry.name))
            continue
        value = argv[argv.index(b"-name") + 1].decode()
        if value.startswith("guest="):
            found.setdefault(value[6:].split(",")[0], []).append(int(entry.name))
    return found, trampolines
