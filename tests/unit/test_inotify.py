"""libc is looked up once: find_library forks `ldconfig -p`, which must not run per QMP connect."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest

from supervisord_vm import inotify, qemu


@pytest.fixture
def find_library_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of ctypes.util.find_library from now on (the real one still answers)."""
    calls: list[str] = []
    real = ctypes.util.find_library

    def counting(name: str) -> str | None:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    inotify.libc.cache_clear()
    return calls


def test_libc_is_found_once_per_process(find_library_calls: list[str]) -> None:
    first = inotify.libc()
    assert inotify.libc() is first
    assert first is not None
    assert find_library_calls == ["c"]


async def test_second_wait_for_a_qmp_socket_does_not_look_up_libc_again(
    find_library_calls: list[str], tmp_path: Path
) -> None:
    socket_path = tmp_path / "qmp.sock"
    socket_path.touch()
    await qemu._wait_for_path(socket_path)
    await qemu._wait_for_path(socket_path)
    assert find_library_calls == ["c"]
