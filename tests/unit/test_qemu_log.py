"""QEMU's log files stay bounded: rotated at start, copytruncated while a writer keeps writing.

The writers are real processes appending to an inherited O_APPEND fd, as QEMU does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from supervisord_vm import qemu_log
from supervisord_vm.qemu_log import (
    LogBounder,
    copy_truncate,
    open_log,
    read_since,
    read_tail,
    rotated_path,
)

LIMIT = 16 * 1024
LINE = 100  # bytes per write of the writer processes

# Writes COUNT lines of SIZE bytes ("TAG SEQUENCE xxx...\n") to FD; in lockstep mode it waits
# for a byte on stdin before each write and answers one after. Exits non-zero on a short write.
WRITER = """
import os, sys
fd, count, size, tag, lockstep = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4], sys.argv[5] == "1"
for number in range(count):
    if lockstep and not sys.stdin.buffer.read(1):
        sys.exit("stdin closed")
    line = f"{tag} {number:08d} ".encode().ljust(size - 1, b"x") + b"\\n"
    written = os.write(fd, line)
    if written != len(line):
        sys.exit(f"short write: {written} of {len(line)}")
    if lockstep:
        sys.stdout.buffer.write(b".")
        sys.stdout.buffer.flush()
"""


def _fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def _eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (the bounder works in the background); fail after a long while."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


async def _within_limit(log: Path) -> None:
    await _eventually(lambda: _size(log) <= LIMIT, f"{log} within the limit")


def _line(tag: str, number: int) -> bytes:
    """What the writer writes as its line `number`."""
    return f"{tag} {number:08d} ".encode().ljust(LINE - 1, b"x") + b"\n"


def _sequence(path: Path, tag: str, *, cut_last: bool = False) -> list[int]:
    """The writer's sequence numbers in `path`, checking that every line is whole, except with
    `cut_last` the last one: a write a copytruncate cut off, ended with a newline."""
    lines = path.read_bytes().splitlines(keepends=True)
    numbers: list[int] = []
    for index, line in enumerate(lines):
        if cut_last and index == len(lines) - 1 and index > 0 and len(line) < LINE:
            expected = _line(tag, numbers[-1] + 1)
            assert line.endswith(b"\n") and expected.startswith(line[:-1]), f"{line!r}"
            numbers.append(numbers[-1] + 1)
            continue
        assert len(line) == LINE and line.endswith(b"\n"), f"torn line in {path}: {line!r}"
        line_tag, number, _ = line.split(b" ", 2)
        assert line_tag.decode() == tag
        numbers.append(int(number))
    return numbers


def _generations(log: Path) -> tuple[list[int], list[int]]:
    """The sequence numbers in NAME.log.1 and NAME.log, read while no copytruncate is half done
    (its truncation comes before its rename)."""
    with qemu_log._generation_lock:
        older = _sequence(rotated_path(log), log.stem, cut_last=True)
        return older, _sequence(log, log.stem)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture
async def bounder(tmp_path: Path) -> AsyncIterator[LogBounder]:
    bounder = LogBounder(tmp_path / "logs", LIMIT)
    bounder.start()
    yield bounder
    await bounder.close()


async def _writer(path: Path, count: int, *, lockstep: bool) -> asyncio.subprocess.Process:
    fd, _created = open_log(path, LIMIT)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            str(fd),
            str(count),
            str(LINE),
            path.stem,
            "1" if lockstep else "0",
            pass_fds=(fd,),
            stdin=asyncio.subprocess.PIPE if lockstep else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if lockstep else asyncio.subprocess.DEVNULL,
        )
    finally:
        os.close(fd)  # as the daemon does once QEMU has it


# --- rotation at start --------------------------------------------------------------------------


def test_start_rotates_a_log_over_the_limit_replacing_the_older_one(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_bytes(b"b" * (LIMIT + 1))
    rotated_path(log).write_bytes(b"oldest")
    fd, created = open_log(log, LIMIT)
    try:
        os.write(fd, b"new run\n")
    finally:
        os.close(fd)
    assert created
    assert log.read_bytes() == b"new run\n"
    assert rotated_path(log).read_bytes() == b"b" * (LIMIT + 1)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def test_start_appends_to_a_log_within_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_bytes(b"a" * LIMIT)
    fd, created = open_log(log, LIMIT)
    try:
        os.write(fd, b"more\n")
    finally:
        os.close(fd)
    assert not created
    assert log.read_bytes() == b"a" * LIMIT + b"more\n"
    assert not rotated_path(log).exists()


def test_start_creates_a_missing_log(tmp_path: Path) -> None:
    fd, created = open_log(tmp_path / "vm.log", LIMIT)
    os.close(fd)
    assert created
    assert (tmp_path / "vm.log").read_bytes() == b""


# --- reading across a rotation ------------------------------------------------------------------


def test_tail_continues_into_the_rotated_log_when_the_log_is_short(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    rotated_path(log).write_bytes(b"one\ntwo\n")
    log.write_bytes(b"three\n")
    assert read_tail(log, 1000) == b"one\ntwo\nthree\n"
    assert read_tail(log, 10) == b"two\nthree\n"
    assert read_tail(log, 6) == b"three\n"
    log.unlink()
    assert read_tail(log, 1000) == b"one\ntwo\n"
    rotated_path(log).unlink()
    assert read_tail(log, 1000) == b""


def test_output_since_a_header_survives_a_copytruncate(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_bytes(b"x" * LIMIT + b"header\n")
    offset = _size(log)
    with log.open("ab") as stream:
        stream.write(b"qemu: early line\n")
    assert read_since(log, offset, 8192) == b"qemu: early line\n"
    assert copy_truncate(log, LIMIT)
    with log.open("ab") as stream:
        stream.write(b"qemu: cannot open disk\n")
    assert read_since(log, offset, 8192) == b"qemu: early line\nqemu: cannot open disk\n"


def test_copytruncate_keeps_a_cut_write_on_a_line_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_bytes(b"a" * LIMIT + b"\nqemu: half a li")
    assert copy_truncate(log, LIMIT)
    assert rotated_path(log).read_bytes() == b"a" * LIMIT + b"\nqemu: half a li\n"
    assert log.read_bytes() == b""
    assert not (tmp_path / "vm.log.1.tmp").exists()


def test_copytruncate_leaves_a_log_within_the_limit_alone(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_bytes(b"a" * LIMIT)
    assert not copy_truncate(log, LIMIT)
    assert not copy_truncate(tmp_path / "missing.log", LIMIT)
    assert log.read_bytes() == b"a" * LIMIT
    assert not rotated_path(log).exists()


# --- copytruncate while writers run -------------------------------------------------------------


async def test_log_returns_under_the_limit_after_every_write_and_older_data_is_in_log_1(
    bounder: LogBounder,
) -> None:
    """In lockstep with a writer: after each write the file holds at most limit + that write,
    and soon at most the limit again; what was cut off is in NAME.log.1."""
    log = bounder.log_dir / "lockstep.log"
    writes = 3 * LIMIT // LINE
    writer = await _writer(log, writes, lockstep=True)
    assert writer.stdin is not None and writer.stdout is not None
    for _ in range(writes):
        writer.stdin.write(b"g")
        await writer.stdin.drain()
        assert await writer.stdout.readexactly(1) == b"."
        assert _size(log) <= LIMIT + LINE
        await _within_limit(log)
    writer.stdin.close()
    assert await writer.wait() == 0
    older, newer = _generations(log)
    # Lockstep leaves no write in flight during a copytruncate: nothing is lost.
    assert older + newer == list(range(older[0], writes))
    assert len(older) > LIMIT // LINE


async def test_several_free_running_writers_stay_bounded_and_never_notice(
    bounder: LogBounder,
) -> None:
    logs = [bounder.log_dir / f"vm{number}.log" for number in range(3)]
    writes = 20 * LIMIT // LINE
    writers = [await _writer(log, writes, lockstep=False) for log in logs]
    codes = await asyncio.gather(*(writer.wait() for writer in writers))
    assert codes == [0, 0, 0]  # no write failed or came up short
    for log in logs:
        await _within_limit(log)
        older, newer = _generations(log)
        assert older, f"{log} was never copytruncated"
        # Each generation is one unbroken run of lines, the older one entirely before the newer;
        # only the lines written in a copytruncate's window may be missing between them.
        assert older == list(range(older[0], older[-1] + 1))
        assert newer == list(range(newer[0], newer[-1] + 1)) if newer else True
        assert not newer or newer[0] > older[-1]
        assert (newer or older)[-1] < writes


async def test_logs_already_over_the_limit_at_start_are_bounded(tmp_path: Path) -> None:
    """A VM that kept running while the daemon was away may have written past the limit."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "vm.log").write_bytes(b"y" * (2 * LIMIT - 1) + b"\n")
    bounder = LogBounder(log_dir, LIMIT)
    bounder.start()
    try:
        # The copy is renamed into place after the truncation.
        await _eventually(lambda: _size(log_dir / "vm.log.1") == 2 * LIMIT, "the old log moved")
        assert _size(log_dir / "vm.log") == 0
    finally:
        await bounder.close()


async def test_other_files_in_the_log_directory_are_left_alone(bounder: LogBounder) -> None:
    other = bounder.log_dir / "notes.txt"
    other.write_bytes(b"z" * (2 * LIMIT))
    log = bounder.log_dir / "vm.log"
    log.write_bytes(b"w" * (2 * LIMIT - 1) + b"\n")
    await _eventually(lambda: _size(rotated_path(log)) == 2 * LIMIT, "the log moved")
    assert _size(other) == 2 * LIMIT
    assert sorted(path.name for path in bounder.log_dir.iterdir()) == [
        "notes.txt",
        "vm.log",
        "vm.log.1",
    ]


async def test_close_leaves_no_fd_and_no_reader_behind(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    before = _fd_count()
    bounder = LogBounder(tmp_path / "logs", LIMIT)
    bounder.start()
    watch_fd = bounder._fd
    assert watch_fd is not None
    (bounder.log_dir / "vm.log").write_bytes(b"v" * (2 * LIMIT))  # keep a copy busy
    await bounder.close()
    assert _fd_count() == before
    assert not loop.remove_reader(watch_fd)
    # Writes after close are not bounded any more (and nothing runs that could).
    (bounder.log_dir / "late.log").write_bytes(b"u" * (2 * LIMIT))
    await asyncio.sleep(0)
    assert _size(bounder.log_dir / "late.log") == 2 * LIMIT


async def test_unwatchable_log_directory_warns_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    bounder = LogBounder(not_a_directory / "logs", LIMIT)
    with caplog.at_level(logging.WARNING):
        bounder.start()
    await bounder.close()
    assert "bounded only when a VM starts" in caplog.text
