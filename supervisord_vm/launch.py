"""Launching QEMU for a VM: its files checked, its log opened, its process spawned already
inside its scope; every failure said for a person, and a log of a run that never was removed.

Kept apart from machine.py, which decides when to launch and what a launched QEMU means; this
module only knows how to get the process running and how to explain why it did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from supervisord_vm import confined_launch, network, qemu_journal, qemu_log
from supervisord_vm.definition import Definition
from supervisord_vm.disk_access import Credentials
from supervisord_vm.errors import SvmError
from supervisord_vm.qemu import LaunchResources, build_argv
from supervisord_vm.resources import resource_control
from supervisord_vm.systemd import ScopeProperties, Systemd, spawn_in_scope

# Environment variables a service manager hands to the daemon that QEMU must never see.
PRIVATE_ENVIRONMENT = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"}
)


class LaunchFailed(Exception):
    """QEMU could not be launched; the message says why, for a person."""


@dataclass(frozen=True)
class Launched:
    """A QEMU running in its scope, and where its output for this start begins."""

    process: asyncio.subprocess.Process
    log_file: Path
    log_offset: int
    journal_unit: str | None = None  # QEMU's output went to the journal, from this scope
    started_at: float = 0.0  # when the launch began (seconds since the epoch)

    async def last_output(self, lines: int = 8) -> str:
        """The last lines QEMU wrote in this start (for a failed start's error): its process's
        lines in the journal, or the log file's since this start's header."""
        if self.journal_unit is not None:
            text = await asyncio.to_thread(
                qemu_journal.read_output,
                self.journal_unit,
                lines=lines,
                max_bytes=8192,
                pid=self.process.pid,
                since=self.started_at,
                sync=True,  # what a QEMU that just exited wrote may not be stored yet
                with_prefix=False,
            )
            return "\n".join(text.strip().splitlines()[-lines:])
        try:
            data = qemu_log.read_since(self.log_file, self.log_offset, 8192)
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").strip().splitlines()[-lines:])


async def check_files(defn: Definition) -> None:
    """LaunchFailed if QEMU's binary or a disk cannot be used (stat may block: off the loop)."""
    problem = await asyncio.to_thread(_file_problem, defn)
    if problem is not None:
        raise LaunchFailed(problem)


async def launch(
    defn: Definition,
    unit: str,
    *,
    systemd: Systemd,
    socket_path: Path,
    log_file: Path,
    log_limit: int,
    slice: str,
    resources: LaunchResources | None = None,
    owner: Credentials | None = None,
    journal_stream: Path | None = qemu_journal.STREAM_SOCKET,
) -> Launched:
    """Spawn QEMU inside a new scope `unit`, its output sent to the journal from inside the
    scope (qemu_journal.py) if `journal_stream` (journald's stream socket) is there, else
    appended to `log_file`.

    Raises LaunchFailed (or the SvmError of the scope's creation); a log file this call created
    is removed again then, since QEMU never ran, and so are the taps it made for bridge NICs.
    QEMU runs confined (confined_launch.py): disks opened with `owner`'s rights where the path
    policy says so (None: root's definition), monitor socket bound by the daemon.
    """
    log_created = False
    started_at = time.time()
    confined: confined_launch.ConfinedLaunch | None = None
    nics = network.OpenedNics()
    try:
        nics = await network.open_nics(defn)
        if nics.fds:
            if resources is None:
                resources = LaunchResources(qmp_socket=socket_path)
            resources.nic_fds = dict(nics.fds)
            resources.pass_fds += nics.fds.values()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
        header = f"--- {stamp}: supervisord-vm starts VM {defn.name} ({unit}) ---\n"
        to_journal = journal_stream is not None and await asyncio.to_thread(
            qemu_journal.stream_available, journal_stream
        )
        log_fd, log_created, log_offset = await asyncio.to_thread(
            _prepare_files, socket_path, None if to_journal else log_file, log_limit, header
        )
        try:
            if resources is None:
                resources = LaunchResources(qmp_socket=socket_path)
            confined = await confined_launch.prepare(defn, resources, socket_path, owner, systemd)
            env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENVIRONMENT}
            if to_journal:  # the trampoline opens the streams once it is in the scope
                env[qemu_journal.STREAM_ENV] = qemu_journal.identifier(defn.name)
                env[qemu_journal.UNIT_ENV] = unit
            props = ScopeProperties(
                description=f"QEMU virtual machine {defn.name} (supervisord-vm)",
                stop_timeout=float(defn.stop_timeout),
                # The definition's own slice, else the daemon's: systemd creates a slice that
                # does not exist yet (and its parents: tenant-a-web.slice is in tenant-a.slice).
                slice=defn.resources.slice or slice,
                resource_control=resource_control(defn.resources),
            )
            process = await spawn_in_scope(
                systemd,
                build_argv(defn, socket_path, resources),
                unit,
                props,
                env=env,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=resources.pass_fds,
                run_as=confined.identity,
                umask=confined.umask,
            )
        finally:
            os.close(log_fd)
            if confined is not None:
                confined.close_fds()  # the daemon's copies: a QEMU that runs holds its own
            nics.close_fds()  # the daemon's copies: a QEMU that runs holds its own
    except (SvmError, OSError, network.NetworkError) as err:
        await network.discard(defn.name, nics)  # no tap outlives a start that did not happen
        if isinstance(err, network.NetworkError):
            raise LaunchFailed(str(err)) from err
        if log_created:  # QEMU never ran: no log of a run that never was
            with contextlib.suppress(OSError):
                await asyncio.to_thread(log_file.unlink)
        if isinstance(err, SvmError):
            raise
        # spawn_in_scope's OSError for a failed execve of QEMU carries execve's errno and no
        # file name; others (fork, the trampoline itself) name their file.
        if err.filename is None and (err.strerror or "").startswith("cannot execute"):
            user = confined.identity.user if confined and confined.identity else None
            raise LaunchFailed(exec_problem(defn.qemu, err, user)) from err
        raise LaunchFailed(os_error(err)) from err
    return Launched(
        process,
        log_file,
        log_offset,
        journal_unit=unit if to_journal else None,
        started_at=started_at,
    )


def _prepare_files(
    socket_path: Path, log_file: Path | None, log_limit: int, header: str
) -> tuple[int, bool, int]:
    """Clear a stale monitor socket; open the log (rotated if over the limit), write the header.

    Returns the log's fd, whether it was created now, and where this start's output begins.
    Without `log_file` (QEMU's output goes to the journal): the daemon's own stderr instead,
    QEMU's only if the trampoline cannot open its journal streams (journald restarting).
    """
    socket_path.unlink(missing_ok=True)
    if log_file is None:
        try:
            return os.dup(2), False, 0
        except OSError:
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), False, 0
    log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    log_fd, created = qemu_log.open_log(log_file, log_limit)
    try:
        data = header.encode()
        offset = os.lseek(log_fd, 0, os.SEEK_END) + len(data)
        os.write(log_fd, data)
    except OSError:
        os.close(log_fd)
        if created:
            with contextlib.suppress(OSError):
                log_file.unlink()
        raise
    return log_fd, created, offset


def _file_problem(defn: Definition) -> str | None:
    """Why the definition's files cannot be used, or None (blocking: stat on any file system)."""
    try:
        mode = Path(defn.qemu).stat().st_mode
    except OSError as err:
        return f"QEMU binary {path_problem(defn.qemu, err)}"
    if S_ISDIR(mode):
        return f"QEMU binary {defn.qemu} is a directory, not an executable program"
    if not S_ISREG(mode):
        return f"QEMU binary {defn.qemu} is not a regular file"
    if not os.access(defn.qemu, os.X_OK):
        return f"QEMU binary {defn.qemu} is not executable (no permission to execute it)"
    for disk in defn.disks:
        try:
            Path(disk.path).stat()
        except OSError as err:
            return f"disk {path_problem(disk.path, err)}"
    return None


def os_error(err: OSError) -> str:
    """An OSError for a person: "PATH: Permission denied", not "[Errno 13] ..."."""
    text = err.strerror or str(err)
    return f"{err.filename}: {text}" if err.filename else text


def path_problem(path: str, err: OSError) -> str:
    """Why `path` cannot be used, from stat's error, starting with the path."""
    if isinstance(err, FileNotFoundError):
        return f"{path} does not exist"
    if isinstance(err, PermissionError):
        return f"{path} cannot be reached (permission denied)"
    if isinstance(err, NotADirectoryError):
        return f"{path} does not exist (a part of the path is not a directory)"
    return f"{path} cannot be used ({os.strerror(err.errno) if err.errno else err})"


# execve's errors, said about the program (the errno's own text follows in parentheses).
_EXEC_PROBLEMS: Mapping[int, str] = {
    errno.ENOEXEC: "is not an executable program",
    errno.EACCES: "cannot be executed (permission denied",
    errno.ENOENT: "does not exist, or the interpreter it names does not",
    errno.EISDIR: "is a directory, not an executable program",
    errno.ETXTBSY: "is being written to and cannot be executed now",
    errno.ELIBBAD: "is not an executable program",
    errno.ENOMEM: "cannot be executed: not enough memory",
    errno.E2BIG: "cannot be executed: its command line is too long",
}


def exec_problem(program: str, err: OSError, user: str | None = None) -> str:
    """Why execve of `program` failed, said about the program: no raw "[Errno N]".

    `user`: the unprivileged user QEMU runs as, named when it lacks permission.
    """
    code = err.errno or 0
    if code == errno.EACCES and user is not None:
        return (
            f"QEMU binary {program} cannot be executed by user {user}, whom QEMU runs as "
            "(permission denied: the file and every directory above it must be accessible to "
            "that user)"
        )
    reason = os.strerror(code) if code else str(err)
    problem = _EXEC_PROBLEMS.get(code)
    if problem is None:
        return f"QEMU binary {program} cannot be executed ({reason})"
    if problem.endswith("(permission denied"):
        return f"QEMU binary {program} {problem})"
    return f"QEMU binary {program} {problem} ({reason})"
