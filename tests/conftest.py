"""Suite-wide rules: integration tests run only in the sandbox, are never skipped, leak nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_SANDBOX = os.environ.get("SVM_IN_SANDBOX") == "1"
STRICT = os.environ.get("SVM_STRICT") == "1"

_skipped_integration: list[str] = []
_deselected_integration: list[str] = []
_integration_ran: list[str] = []


def is_integration(item: pytest.Item) -> bool:
    return item.get_closest_marker("integration") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_SANDBOX:
        return
    for item in items:
        if is_integration(item):
            item.add_marker(
                pytest.mark.usefixtures("_refuse_outside_sandbox"),
            )


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected_integration.extend(item.nodeid for item in items if is_integration(item))


@pytest.fixture
def _refuse_outside_sandbox() -> None:
    pytest.fail(
        "integration tests need real systemd: run them through the sandbox "
        "(make test, or .venv/bin/python -m tests.sandbox -- PYTEST_ARGS)",
        pytrace=False,
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "integration" not in report.keywords:
        return
    if report.skipped:
        _skipped_integration.append(report.nodeid)
    elif report.when == "call":
        _integration_ran.append(report.nodeid)


def _children() -> set[int]:
    """Our direct child processes, from /proc (no polling of anything but this snapshot)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves child processes behind, and kill them (by PID)."""
    before = _children()
    yield
    leaked = _children() - before
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    if leaked:
        pytest.fail(f"test left child processes behind: {sorted(leaked)}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_integration:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if STRICT and _deselected_integration:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    write = terminalreporter.write_line
    if not IN_SANDBOX and not _integration_ran:
        return
    write(f"integration tests run against real systemd: {len(_integration_ran)}")
    for nodeid in _skipped_integration:
        write(f"FAILED: integration test skipped (not allowed): {nodeid}")
    if STRICT:
        for nodeid in _deselected_integration:
            write(f"FAILED: integration test deselected (not allowed in CI): {nodeid}")
