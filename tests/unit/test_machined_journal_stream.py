"""The spawn trampoline's journal streams: the header journald reads, one stream per fd with
its priority, the fallback when journald is not there, and what QEMU inherits (no variables,
SIGRTMIN+4 ignored)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisord_vm import _spawn_trampoline

TRAMPOLINE = Path(_spawn_trampoline.__file__)


def test_stdout_and_stderr_become_streams_with_a_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stdout"
    monkeypatch.setattr(_spawn_trampoline, "JOURNAL_STREAM_SOCKET", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(2)
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                _spawn_trampoline.connect_journal_streams("qemu-web", "svm-web.scope")
                os.write(1, f"to stdout, blocking {os.get_blocking(1)}\n".encode())
                os.write(2, f"to stderr, blocking {os.get_blocking(2)}\n".encode())
            finally:
                os._exit(0)
        received = []
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                chunks = []
                while chunk := connection.recv(4096):
                    chunks.append(chunk)
                received.append(b"".join(chunks).decode())
        os.waitpid(child, 0)
    assert received == [
        "qemu-web\nsvm-web.scope\n6\n0\n0\n0\n0\nto stdout, blocking True\n",  # info
        "qemu-web\nsvm-web.scope\n4\n0\n0\n0\n0\nto stderr, blocking True\n",  # warning
    ]


def test_without_journald_the_fds_stay_and_nothing_leaks_into_the_program(
    tmp_path: Path,
) -> None:
    """The variables asking for streams are not passed on; SIGRTMIN+4 is ignored by the program
    (machinectl poweroff would otherwise kill QEMU at once)."""
    program = (
        "import os, signal, sys;"
        "print(os.environ.get('SVM_JOURNAL_STREAM'), os.environ.get('SVM_JOURNAL_UNIT'),"
        " signal.getsignal(signal.SIGRTMIN + 4) == signal.SIG_IGN)"
    )
    env = {
        "SVM_JOURNAL_STREAM": "qemu-web",
        "SVM_JOURNAL_UNIT": "svm-web.scope",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    script = tmp_path / "patched_trampoline.py"
    # The real socket path may exist on this host: point the copy at one that does not.
    script.write_text(
        TRAMPOLINE.read_text().replace(
            _spawn_trampoline.JOURNAL_STREAM_SOCKET, str(tmp_path / "no-journald")
        )
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script), "-", "-", sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "None None True\n"  # still the pipe we gave it


def test_poweroff_signal_is_machineds() -> None:
    assert signal.SIGRTMIN + 4 == _spawn_trampoline.MACHINED_POWEROFF_SIGNAL
