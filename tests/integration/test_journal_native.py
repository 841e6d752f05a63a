"""journal.send() speaks journald's native protocol as the real journald understands it,
also for an entry too large for one datagram (passed as a sealed memfd)."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from supervisord_vm import journal

pytestmark = pytest.mark.integration


def _entries(token: str) -> list[dict[str, object]]:
    subprocess.run(["journalctl", "--sync"], check=True)
    out = subprocess.run(
        ["journalctl", "-o", "json", "--all", "--no-pager", f"SVM_TEST_TOKEN={token}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_entry_reaches_journald_with_its_fields() -> None:
    token = uuid.uuid4().hex
    journal.send("small entry\nsecond line", svm_test_token=token, vm_name="jn1")
    [entry] = _entries(token)
    assert entry["MESSAGE"] == "small entry\nsecond line"
    assert entry["VM_NAME"] == "jn1"
    assert entry["SYSLOG_IDENTIFIER"] == "supervisord-vm"
    assert entry["PRIORITY"] == "6"


def test_entry_larger_than_a_datagram_reaches_journald_whole() -> None:
    token = uuid.uuid4().hex
    message = "large entry " + "x" * (1 << 20)  # far above a datagram's limit (SO_SNDBUF)
    journal.send(message, svm_test_token=token, vm_name="jn2")
    [entry] = _entries(token)
    assert entry["MESSAGE"] == message
    assert entry["VM_NAME"] == "jn2"
