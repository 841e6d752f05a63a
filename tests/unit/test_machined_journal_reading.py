"""Reading QEMU's output back from the journal (qemu_journal.py): the journalctl it runs, how an
entry reads, and that every read is bounded in lines, bytes kept and time, against a stand-in
journalctl (the real one is in tests/integration/test_machined_journal.py)."""

from __future__ import annotations

import json
import socket
import stat
import time
from pathlib import Path

import pytest

from supervisord_vm import qemu_journal


def fake_journalctl(tmp_path: Path, body: str) -> Path:
    """An executable standing in for journalctl: records its argv, then runs `body` (sh)."""
    script = tmp_path / "journalctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def entry(message: object, pid: int = 42, stamp: float = 1_700_000_000.0) -> str:
    return json.dumps(
        {
            "MESSAGE": message,
            "SYSLOG_IDENTIFIER": "qemu-web",
            "_PID": str(pid),
            "__REALTIME_TIMESTAMP": str(int(stamp * 1e6)),
        }
    )


def test_journalctl_reads_only_what_the_scopes_processes_wrote() -> None:
    argv = qemu_journal.journalctl_argv("svm-web.scope", 20)
    assert argv[0] == "journalctl"
    assert "_SYSTEMD_UNIT=svm-web.scope" in argv  # not OBJECT_SYSTEMD_UNIT: QEMU's own only
    assert "--lines=20" in argv and "--output=json" in argv and "--all" in argv
    assert not any(arg.startswith("--boot") for arg in argv)  # finds nothing in the sandbox


def test_one_starts_lines_are_its_process_since_its_launch() -> None:
    argv = qemu_journal.journalctl_argv("svm-web.scope", 8, pid=42, since=1_700_000_000.7)
    assert "_PID=42" in argv and "--since=@1700000000" in argv


def test_all_lines_means_at_most_lines_max() -> None:
    assert f"--lines={qemu_journal.LINES_MAX}" in qemu_journal.journalctl_argv("u.scope", 0)
    assert f"--lines={qemu_journal.LINES_MAX}" in qemu_journal.journalctl_argv("u.scope", 2**32)


def test_an_entry_reads_as_time_identifier_pid_and_message() -> None:
    text = qemu_journal.format_entry(entry("hello").encode())
    expected_time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
    assert text == f"{expected_time} qemu-web[42]: hello\n"
    assert qemu_journal.format_entry(entry("hello").encode(), with_prefix=False) == "hello\n"


def test_a_message_that_is_not_utf8_is_decoded_with_replacement() -> None:
    raw = list(b"guest \xff bytes")  # journalctl's JSON for a binary MESSAGE: an array
    assert (
        qemu_journal.format_entry(entry(raw).encode(), with_prefix=False) == "guest \ufffd bytes\n"
    )


@pytest.mark.parametrize("line", [b"", b"not json", b"[1, 2]", b'"text"'])
def test_what_is_not_an_entry_is_skipped(line: bytes) -> None:
    assert qemu_journal.format_entry(line) is None


def test_read_output_keeps_only_the_newest_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = "\n".join(f"echo '{entry(f'line {n}')}'" for n in range(200))
    monkeypatch.setattr(qemu_journal, "JOURNALCTL", str(fake_journalctl(tmp_path, lines)))
    text = qemu_journal.read_output("svm-web.scope", lines=0, max_bytes=100, with_prefix=False)
    assert len(text) <= 100
    assert text.endswith("line 198\nline 199\n")


def test_read_output_gives_up_on_a_journalctl_that_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = f"echo '{entry('before the hang')}'\nexec sleep 60"
    monkeypatch.setattr(qemu_journal, "JOURNALCTL", str(fake_journalctl(tmp_path, body)))
    started = time.monotonic()
    text = qemu_journal.read_output("svm-web.scope", lines=5, max_bytes=1000, timeout=0.5)
    assert time.monotonic() - started < 30  # killed at the timeout, not after the sleep
    assert text.endswith("qemu-web[42]: before the hang\n")


def test_sync_comes_first_and_a_missing_journalctl_reads_as_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_journal, "JOURNALCTL", str(fake_journalctl(tmp_path, "")))
    assert qemu_journal.read_output("svm-web.scope", lines=8, max_bytes=100, sync=True) == ""
    calls = (tmp_path / "argv").read_text().splitlines()
    assert calls[0] == "--sync" and "_SYSTEMD_UNIT=svm-web.scope" in calls[1]
    monkeypatch.setattr(qemu_journal, "JOURNALCTL", str(tmp_path / "nowhere"))
    assert qemu_journal.read_output("svm-web.scope", lines=8, max_bytes=100, sync=True) == ""


def test_the_stream_socket_must_be_a_socket(tmp_path: Path) -> None:
    assert not qemu_journal.stream_available(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    assert not qemu_journal.stream_available(tmp_path / "file")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "stdout"))
        assert qemu_journal.stream_available(tmp_path / "stdout")


def test_qemus_identifier_names_the_vm() -> None:
    assert qemu_journal.identifier("web1") == "qemu-web1"
