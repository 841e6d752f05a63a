"""supervisord-vm: the process systemd runs — asyncio loop, bus name, sd_notify, signals.

Order of start-up matters: take the single-instance lock, let the supervisor reattach to running
VMs, export the D-Bus objects, take the bus name, and only then tell systemd READY=1 — so a
client that finds the name always finds a complete and current daemon. SIGTERM stops the daemon
and nothing else: VMs live in their own scopes and keep running.

A daemon that loses a system-bus connection (its own, where it owns its name, or either of the
systemd adapter's) exits with EXIT_CONNECTION_LOST instead of reconnecting in place: its name,
its exported objects, systemd's Subscribe and its match rules are gone, and unit signals sent
meanwhile are lost for good, so the only trustworthy picture is a fresh one. Restart=on-failure
starts it again, and start-up's reattach (the same path as after a crash) resynchronises every
VM from systemd's and QEMU's current state. It stops feeding the watchdog at once, and the exit
cannot hang on the dead bus: a deadline ends the process if the clean exit path stalls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TextIO, TypeVar

import sdnotify
from sdbus import SdBus, sd_bus_open_system
from sdbus.sd_bus_internals import SdBusBaseError, SdBusMessage, SdBusRequestNameError

from supervisord_vm import confinement, journal, qemu_log
from supervisord_vm.bus import BUS_NAME, BusService
from supervisord_vm.errors import SystemdError
from supervisord_vm.model import Caller
from supervisord_vm.store import Paths
from supervisord_vm.supervisor import Supervisor
from supervisord_vm.systemd import Systemd

log = logging.getLogger("supervisord_vm")
_T = TypeVar("_T")

LOCK_NAME = "supervisord-vm.lock"
EXIT_ALREADY_RUNNING = 3  # an LSB "not running"-style code; Restart=on-failure would retry
EXIT_CONNECTION_LOST = 75  # EX_TEMPFAIL: restart me (Restart=on-failure) and I reattach
LOST_EXIT_DEADLINE = 10.0  # seconds the clean exit path may take after a lost connection
IO_THREADS = 32  # worker threads for blocking calls (file, netlink, journal, user database)
# Seconds start-up waits for the bus and systemd before it exits to be restarted. Short on
# purpose: when dbus.service hits its own start limit, systemd 252 fails dbus.socket too
# ('service-start-limit-hit') and only a new start job of this unit (Requires=dbus.socket)
# makes it listen again.
CONNECT_PATIENCE = 10.0
_LOCAL_IFACE = "org.freedesktop.DBus.Local"


class AlreadyRunning(Exception):
    """Another supervisord-vm holds the lock or the bus name."""


class ConnectError(Exception):
    """The system bus or systemd could not be reached within CONNECT_PATIENCE at start-up."""


class ConnectionLost(Exception):
    """A system-bus connection the daemon needs is gone; Daemon.lost_reason says which."""


class Notifier:
    """sd_notify, only when systemd asked for it (NOTIFY_SOCKET set)."""

    def __init__(self) -> None:
        self._enabled = "NOTIFY_SOCKET" in os.environ
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None
        self._status = ""

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, if systemd set a watchdog for this very process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.01)
    except ValueError:
        return None


@contextlib.contextmanager
def single_instance(runtime_dir: Path) -> Iterator[None]:
    """Hold an flock on RUNTIME_DIR/supervisord-vm.lock for the daemon's life."""
    runtime_dir.mkdir(mode=0o711, parents=True, exist_ok=True)  # QEMU passes, nobody lists
    fd = os.open(runtime_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(
                f"supervisord-vm is already running (PID {holder} holds "
                f"{runtime_dir / LOCK_NAME}); use `systemctl status supervisord-vm`"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def raise_fd_limit() -> None:
    """Take the soft limit on open files up to the hard one (systemd's default soft limit is
    1024): each running VM holds three (QMP, pidfd, serial console), so 500 VMs need ~1500.
    The event loop uses epoll, so descriptors above 1024 are fine (no select())."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log_resource_counts() -> None:
    """SIGUSR1: one journal line with the loop's task count and the open fds, so a load test
    (tests/integration/test_load.py) can prove from outside that nothing leaks."""
    fds = sum(1 for _ in Path("/proc/self/fd").iterdir()) - 1  # minus the one listing them
    log.info("resources: %d asyncio tasks, %d open fds", len(asyncio.all_tasks()), fds)


def _readable(exc: Exception) -> str:
    """sd-bus's "... returned error number: 111" as the errno's words."""
    found = re.search(r"error number: -?(\d+)", str(exc))
    return os.strerror(int(found.group(1))) if found else str(exc)


class Daemon:
    """One running daemon: supervisor + bus service + systemd notification."""

    def __init__(
        self, paths: Paths, slice_name: str, log_limit: int = qemu_log.DEFAULT_LIMIT
    ) -> None:
        self.paths = paths
        self.slice_name = slice_name
        self.log_limit = log_limit
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._status_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchdog_task: asyncio.Task[None] | None = None
        self._bus_watch: object = None  # the Disconnected match slot, kept referenced
        self.systemd: Systemd | None = None
        self.supervisor: Supervisor | None = None
        self.lost_reason = ""

    def lose(self, reason: str) -> None:
        """A connection is gone: stop the watchdog, say so, and leave (see the module doc)."""
        if self.lost_reason:
            return
        self.lost_reason = reason
        log.error(
            "%s: exiting with status %d so that systemd restarts the daemon, which then "
            "reattaches to the running VMs (they keep running)",
            reason,
            EXIT_CONNECTION_LOST,
        )
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        self.notifier.send(f"STATUS=lost the system bus ({reason}); exiting to be restarted")
        asyncio.get_running_loop().call_later(LOST_EXIT_DEADLINE, self._exit_now)
        self.stopping.set()

    def _exit_now(self) -> None:
        log.critical(
            "the exit after a lost connection did not finish within %.0f s; exiting at once",
            LOST_EXIT_DEADLINE,
        )
        logging.shutdown()
        os._exit(EXIT_CONNECTION_LOST)

    def _check_lost(self) -> None:
        """Adopt the systemd adapter's loss (its event may not have been seen yet) and raise."""
        if not self.lost_reason and self.systemd is not None and self.systemd.lost.is_set():
            self.lose(self.systemd.lost_reason)
        if self.lost_reason:
            raise ConnectionLost(self.lost_reason)

    async def _unless_lost(self, awaitable: Awaitable[_T]) -> _T:
        """Await AWAITABLE, but give up (ConnectionLost) as soon as a connection is lost.

        Start-up calls systemd and the bus: without this a lost connection during reattach
        would leave start-up waiting, or fail it with a misleading traceback.
        """
        work = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        try:
            self._check_lost()
        except ConnectionLost:
            if work.done() and not work.cancelled():
                work.exception()  # retrieved: the loss explains it
            raise
        if not work.done():
            raise ConnectionLost("stopped during start-up")  # SIGTERM while starting
        return work.result()

    async def wait_for(self, connect: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Connect, retrying for a while: right after `systemctl restart dbus` the bus (or
        systemd's name on it) may not be back yet, and a start that fails at once would spend
        the unit's start limit (StartLimitBurst) on every retry until it stays failed."""
        deadline = time.monotonic() + CONNECT_PATIENCE
        delay = 0.25
        attempts = 0
        while True:
            try:
                return await connect()
            except (SdBusBaseError, SystemdError) as exc:
                attempts += 1
                problem = _readable(exc)
                if time.monotonic() + delay > deadline:
                    raise ConnectError(
                        f"cannot connect to {what} ({problem}; tried {attempts} times in "
                        f"{CONNECT_PATIENCE:.0f} s)"
                    ) from None
                self.notifier.status(f"waiting for {what}")
                if attempts == 1:
                    log.warning("cannot connect to %s yet (%s); retrying", what, problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _watch_bus(self, bus: SdBus) -> None:
        """sd-bus's local Disconnected signal on the daemon's own connection means the bus
        daemon went away (or dropped us): the name and every exported object are gone."""

        def disconnected(message: SdBusMessage) -> None:
            if message.interface == _LOCAL_IFACE:
                self.lose("the system bus closed the daemon's connection (its name is gone)")

        # Only the member in the rule: see Systemd._watch_disconnect for why.
        self._bus_watch = await bus.match_signal_async(
            None, None, None, "Disconnected", disconnected
        )

    async def _watch_systemd(self, systemd: Systemd) -> None:
        await systemd.lost.wait()
        self.lose(systemd.lost_reason)

    async def reload(self, caller: Caller | None = None) -> tuple[list[str], ...]:
        """RELOADING=1, re-read definitions, READY=1 — for SIGHUP and the Reload method."""
        assert self.supervisor is not None
        async with self._reload_lock:
            self.notifier.send("RELOADING=1", "STATUS=reloading definitions")
            try:
                report = await self.supervisor.reload(caller)
            finally:
                self.notifier.send("READY=1", f"STATUS={self.supervisor.summary()}")
        for problem in report.errors:
            log.warning("reload: %s", problem)
        log.info(
            "reloaded: added %s, removed %s, changed %s, %d errors",
            report.added,
            report.removed,
            report.changed,
            len(report.errors),
        )
        return report.added, report.removed, report.changed, report.errors

    def _spawn(self, coro: asyncio.Future[object] | object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _status_soon(self, supervisor: Supervisor) -> None:
        """STATUS= once per loop turn, not per event: counting every VM for each of a burst
        of events (start-all, shutdown-all of hundreds) would grow with the host squared."""
        if self._status_pending:
            return
        self._status_pending = True

        def send() -> None:
            self._status_pending = False
            self.notifier.status(supervisor.summary())

        asyncio.get_running_loop().call_soon(send)

    async def _reload_from_signal(self) -> None:
        try:
            await self.reload()
        except Exception:
            log.exception("reload failed")

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the loop itself: a stuck loop stops the pings and systemd restarts."""
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self, bus: SdBus) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_from_signal()))
        loop.add_signal_handler(signal.SIGUSR1, log_resource_counts)
        interval = watchdog_interval()
        if interval is not None:
            self._watchdog_task = asyncio.ensure_future(self._watchdog(interval))
            self._tasks.add(self._watchdog_task)
            self._watchdog_task.add_done_callback(self._tasks.discard)

        self.notifier.status("reattaching to running VMs")
        await self._watch_bus(bus)
        systemd = await self._unless_lost(self.wait_for(Systemd.connect, "systemd on the bus"))
        self.systemd = systemd
        self._spawn(self._watch_systemd(systemd))
        supervisor = Supervisor(
            self.paths, systemd, slice=self.slice_name, log_limit=self.log_limit
        )
        self.supervisor = supervisor
        service = BusService(bus, supervisor, self.reload)
        try:
            await self._unless_lost(supervisor.start_up(autostart=False))
            service.export()
            try:
                await self._unless_lost(bus.request_name_async(BUS_NAME, 0))
            except SdBusRequestNameError as exc:
                raise AlreadyRunning(
                    f"the bus name {BUS_NAME} is taken by another process "
                    f"({type(exc).__name__}); is another supervisord-vm running?"
                ) from None
            unsubscribe = supervisor.subscribe(lambda _event: self._status_soon(supervisor))
            self.notifier.send("READY=1", f"STATUS={supervisor.summary()}")
            log.info("ready: %s", supervisor.summary())
            # After READY=1: autostart in dependency order, with its delays, may take longer
            # than systemd waits for it (TimeoutStartSec), and clients may call meanwhile.
            self._spawn(supervisor.autostart())
            await self.stopping.wait()
            unsubscribe()
            if not self.lost_reason:
                log.info("stopping; VMs keep running in their scopes")
                self.notifier.send("STOPPING=1", "STATUS=stopping (VMs keep running)")
        except ConnectionLost:
            if not self.lost_reason:
                log.info("stopped during start-up; VMs keep running in their scopes")
        finally:
            service.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await supervisor.close()
            await systemd.close()


class _JournalFormatter(logging.Formatter):
    """Prefix <N> so journald stores each line with its syslog priority."""

    _PRIORITY: ClassVar[dict[str, int]] = {
        "DEBUG": 7,
        "INFO": 6,
        "WARNING": 4,
        "ERROR": 3,
        "CRITICAL": 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def _setup_logging(level: str, stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    if "JOURNAL_STREAM" in os.environ:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _log_size(text: str) -> int:
    size = int(text)
    if not 4096 <= size <= 1 << 30:
        raise argparse.ArgumentTypeError("must be from 4096 to 1073741824 bytes")
    return size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Paths()
    parser = argparse.ArgumentParser(
        prog="supervisord-vm",
        description="Supervise QEMU VMs as transient systemd scopes (the system service; "
        "run it with `systemctl start supervisord-vm`, control it with svmctl).",
    )
    parser.add_argument("--definitions-dir", type=Path, default=defaults.definitions_dir)
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir)
    parser.add_argument("--runtime-dir", type=Path, default=defaults.runtime_dir)
    parser.add_argument("--log-dir", type=Path, default=defaults.log_dir)
    parser.add_argument("--slice", default="machine.slice", help="slice for the VM scopes")
    parser.add_argument(
        "--log-max-size",
        type=_log_size,
        default=qemu_log.DEFAULT_LIMIT,
        metavar="BYTES",
        help="largest QEMU log kept per VM before it is rotated to NAME.log.1 "
        f"(default {qemu_log.DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--qemu-user",
        default=confinement.QEMU_USER,
        metavar="USER",
        help="the unprivileged user QEMU runs as, without capabilities and with its seccomp "
        f"sandbox (default {confinement.QEMU_USER}); root means the same as --no-confine",
    )
    parser.add_argument(
        "--no-confine",
        action="store_true",
        help="opt out of confinement: QEMU runs as root with the daemon's capabilities and no "
        "seccomp sandbox, and a group member can run any program as root through a "
        "definition's qemu key (a warning is logged at start)",
    )
    parser.add_argument(
        "--image-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="a directory whose files any group member may use as disks (repeatable; default "
        f"{confinement.DEFAULT_IMAGE_DIRS[0]}); other files only if the member can open them",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SVM_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return parser.parse_args(argv)


def configure_confinement(args: argparse.Namespace) -> None:
    """Apply the confinement options; an opt-out, or a missing QEMU user, is said at start."""
    user = None if args.no_confine or args.qemu_user == "root" else args.qemu_user
    confinement.configure(user, args.image_dir or confinement.DEFAULT_IMAGE_DIRS)
    if user is None:
        log.warning(
            "confinement is off (%s): QEMU runs as root with the daemon's capabilities and "
            "without its seccomp sandbox; members of group supervisord-vm can run any program "
            "as root through a definition's qemu key",
            "--no-confine" if args.no_confine else "--qemu-user root",
        )
        return
    try:
        identity = confinement.qemu_identity()
    except confinement.ConfinementUnavailable as exc:
        log.error("%s: no VM can start until it exists", exc)
        return
    if identity is not None:
        log.info(
            "QEMU runs as %s (uid %d), without capabilities; image directories: %s",
            identity.user,
            identity.uid,
            ", ".join(str(d) for d in confinement.image_dirs()),
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log_level, sys.stderr)
    configure_confinement(args)
    raise_fd_limit()
    paths = Paths(
        definitions_dir=args.definitions_dir,
        state_dir=args.state_dir,
        runtime_dir=args.runtime_dir,
        log_dir=args.log_dir,
    )
    try:
        with single_instance(paths.runtime_dir):
            daemon = Daemon(paths, args.slice, args.log_max_size)

            async def run() -> None:
                # The default pool would be cpu_count + 4 threads: on a 2-core host six slow
                # blocking jobs (a journal read after a failed start, netlink, a stat on a hung
                # NFS image) would hold every other caller's short job behind them.
                asyncio.get_running_loop().set_default_executor(
                    ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="svm-io")
                )

                async def open_bus() -> SdBus:
                    return sd_bus_open_system()

                bus = await daemon.wait_for(open_bus, "the system bus")
                try:
                    await daemon.run(bus)
                finally:
                    bus.close()

            try:
                asyncio.run(run())
            finally:
                journal.finish()  # audit and lifecycle entries still queued for journald
            if daemon.lost_reason:
                return EXIT_CONNECTION_LOST
    except AlreadyRunning as exc:
        print(f"supervisord-vm: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except ConnectError as exc:
        print(f"supervisord-vm: {exc}", file=sys.stderr)
        return EXIT_CONNECTION_LOST
    except PermissionError as exc:
        print(f"supervisord-vm: {exc} (the daemon must run as root)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
