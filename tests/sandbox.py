"""Run commands under a real systemd (PID 1) with the system D-Bus, in a throwaway container.

Integration tests need a real systemd, and this machine's PID 1 is not systemd. Booting systemd
on the host's own root empties the host's /tmp (SANDBOX.md), so the container boots the host's
OS from a read-only bind of `/` with a tmpfs overlay (`systemd-nspawn --volatile=overlay`): all
writes vanish with it, only the checkout is shared. One container per run; it is torn down when
the command passes, fails or is interrupted (SIGINT, SIGTERM, SIGHUP), and the teardown checks
that nothing is left mounted or running and that the host's /tmp was not touched.

    python -m tests.sandbox [-- PYTEST_ARGS]       run pytest inside (the default command)
    python -m tests.sandbox --exec CMD [ARGS]      run any command inside instead
    python -m tests.sandbox --keep ...             leave the container running afterwards
    python -m tests.sandbox --stop DIR             tear down a container left by --keep

Works the same on a host whose PID 1 is systemd: the container is isolated from the host's
own units (`--register=no --keep-unit`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

CHECKOUT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 90.0
POWEROFF_TIMEOUT = 20.0
SENTINEL_NAME = ".svm-sandbox-sentinel"
STATE_FILE = "sandbox.json"


class SandboxError(Exception):
    """The sandbox could not be set up or torn down cleanly."""


@dataclass
class Sandbox:
    """A booted container: what is needed to run commands in it and to tear it down."""

    directory: str
    machine: str
    nspawn_pid: int
    leader_pid: int
    checkout: str
    cgroups: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.directory) / "root"

    def command(self, argv: Sequence[str]) -> list[str]:
        """An argv that runs `argv` in the container's namespaces (not inside a unit)."""
        return ["nsenter", "-t", str(self.leader_pid), "-a", "--", *argv]

    def service_command(self, argv: Sequence[str], env: dict[str, str]) -> list[str]:
        """An argv that runs `argv` as a transient service of the container's systemd.

        A service, not a bare nsenter'd process, so the command and everything it starts live
        in the container's own cgroup tree, as on a real host.
        """
        props = [f"--property=WorkingDirectory={self.checkout}"]
        if argv and "/" in argv[0] and not argv[0].startswith("/"):
            # systemd-run takes a relative path with a slash as not found: resolve it here.
            argv = [str(Path(self.checkout) / argv[0]), *argv[1:]]
        envs = [f"--setenv={key}={value}" for key, value in env.items()]
        return self.command(
            [
                "systemd-run",
                "--quiet",
                "--pipe",
                "--wait",
                "--collect",
                "--service-type=exec",
                *props,
                *envs,
                "--",
                *argv,
            ]
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "the test sandbox boots systemd in a container and must run as root "
            "(try: sudo make test)"
        )
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SandboxError(
                f"'{tool}' is not installed (apt-get install systemd-container util-linux); "
                "'make deps' installs everything the tests need"
            )


def container_cgroups(name: str) -> list[Path]:
    """A cgroup of its own per hierarchy that systemd-nspawn uses, on a host without systemd.

    nspawn puts the container at `payload/` below its own cgroup; two sandboxes started from the
    same cgroup would share it, and their systemds would fight over `payload/machine.slice/...`.
    Where systemd runs the host, `systemd-run --scope` gives nspawn a cgroup instead.
    """
    if Path("/run/systemd/system").is_dir():
        return []
    dirs = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount_point, fstype, options, *_ = line.split()
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            dirs.append(Path(mount_point) / name)
    return dirs


def remove_cgroups(dirs: Sequence[str]) -> list[str]:
    """Remove the (by now empty) cgroup trees, deepest first; the problems found."""
    problems = []
    for top in dirs:
        if not Path(top).is_dir():
            continue
        for path, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            try:
                Path(path).rmdir()
            except OSError as error:
                problems.append(f"cgroup {path} not removed: {error}")
    return problems


def tmp_snapshot() -> set[str]:
    return {entry.name for entry in Path("/tmp").iterdir()}


def leader_of(nspawn_pid: int) -> int | None:
    """The container's PID 1: the child of systemd-nspawn that is PID 1 in its own namespace.

    nspawn first forks an intermediate child that forks the container's init and exits; taking
    that short-lived child for the leader would point every later nsenter at a gone PID.
    """
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            fields = line.split()
            if fields[:1] == ["NSpid:"] and len(fields) > 2 and fields[-1] == "1":
                return int(child)
    return None


def wait_booted(sandbox: Sandbox, nspawn: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    leader = None
    while leader is None:
        if nspawn.poll() is not None:
            raise SandboxError(f"systemd-nspawn exited with {nspawn.returncode} while booting")
        if time.monotonic() > deadline:
            raise SandboxError("the container did not start in time")
        leader = leader_of(nspawn.pid)
        if leader is None:
            time.sleep(0.05)
    sandbox.leader_pid = leader
    # `is-system-running --wait` needs the container's D-Bus; retry until systemd answers.
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            jobs = subprocess.run(
                sandbox.command(["systemctl", "list-jobs", "--no-pager"]),
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            raise SandboxError(
                "systemd in the container did not finish booting in time; pending jobs:\n"
                + (jobs.stdout or jobs.stderr)
            )
        result = subprocess.run(
            sandbox.command(["systemctl", "is-system-running", "--wait"]),
            capture_output=True,
            text=True,
            timeout=remaining,
            check=False,
        )
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return
        if nspawn.poll() is not None:
            raise SandboxError(f"systemd-nspawn exited with {nspawn.returncode} while booting")
        time.sleep(0.1)


def boot(keep_dir: bool = False) -> Sandbox:
    """Boot a container; on any failure undo what was done and raise."""
    require_root()
    base = Path("/var/tmp")
    directory = Path(tempfile.mkdtemp(prefix=f"svm-sandbox-{os.getpid()}-", dir=base))
    machine = f"svmtest-{os.getpid()}"
    sandbox = Sandbox(str(directory), machine, 0, 0, str(CHECKOUT))
    root = sandbox.root
    root.mkdir()
    try:
        subprocess.run(["mount", "--bind", "/", str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        console = (directory / "console.log").open("wb")
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={root}",
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            f"--machine={machine}",
            f"--bind={CHECKOUT}:{CHECKOUT}",
            "--boot",
            "--",
            "systemd.mask=postgresql.service",
            "systemd.mask=console-getty.service",
            "systemd.mask=redis-server.service",
            "systemd.mask=nginx.service",
            "systemd.mask=memcached.service",
        ]
        cgroups = container_cgroups(directory.name)
        for cgroup in cgroups:
            cgroup.mkdir(exist_ok=True)
        sandbox.cgroups = [str(cgroup) for cgroup in cgroups]
        if not cgroups:
            argv = ["systemd-run", "--scope", "--quiet", "--collect", "--", *argv]

        def enter_cgroups() -> None:
            for cgroup in cgroups:
                (cgroup / "cgroup.procs").write_text("0\n")

        # New session: a Ctrl-C at the terminal reaches us, and we power the container off.
        nspawn = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=enter_cgroups,  # noqa: PLW1509 - the runner has no other threads
        )
        console.close()
        sandbox.nspawn_pid = nspawn.pid
        (directory / STATE_FILE).write_text(json.dumps(asdict(sandbox)))
        wait_booted(sandbox, nspawn)
    except BaseException:
        teardown(sandbox)
        raise
    return sandbox


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def is_mount_point(path: Path) -> bool:
    """From mountinfo: os.path.ismount misses a bind of `/` (same device, different inode)."""
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == target:
            return True
    return False


def teardown(sandbox: Sandbox) -> list[str]:
    """Power the container off and unmount; returns the problems found (empty when clean)."""
    problems: list[str] = []
    pid = sandbox.nspawn_pid
    if pid and process_alive(pid):
        os.kill(pid, signal.SIGTERM)  # nspawn turns SIGTERM into a clean poweroff
        deadline = time.monotonic() + POWEROFF_TIMEOUT
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            problems.append(f"container {sandbox.machine} did not power off; killed it")
            for victim in (sandbox.leader_pid, pid):
                if victim:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
            time.sleep(0.5)
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    root = sandbox.root
    if is_mount_point(root):
        result = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=False)
            problems.append(f"{root} was busy at unmount: {result.stderr.strip()}")
    if is_mount_point(root):
        problems.append(f"{root} is still mounted")
    else:
        # Never a recursive delete here: `root` was a bind of the host's `/`.
        for name in ("console.log", STATE_FILE):
            (Path(sandbox.directory) / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            root.rmdir()
            Path(sandbox.directory).rmdir()
    if sandbox.leader_pid and process_alive(sandbox.leader_pid):
        problems.append(f"container PID 1 ({sandbox.leader_pid}) is still running")
    else:
        problems += remove_cgroups(sandbox.cgroups)
    return problems


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception, so `finally` tears the container down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def inside_env() -> dict[str, str]:
    env = {"SVM_IN_SANDBOX": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("SVM_STRICT", "CI", "TERM", "PYTEST_ADDOPTS"):
        if key in os.environ:
            env[key] = os.environ[key]
    # Test knobs (SVM_CHAOS_ITERATIONS, SVM_CHAOS_SEED, SVM_LOAD_SECONDS, ...: RELIABILITY.md).
    env |= {k: v for k, v in os.environ.items() if k.startswith("SVM_") and k not in env}
    return env


INSIDE_STATUS = "/run/svm-sandbox-status"


def create_users(sandbox: Sandbox) -> None:
    """Create the package's users and groups inside (as `make install` does on a host): the
    group supervisord-vm and the unprivileged user QEMU runs as. The overlay forgets them."""
    sysusers = CHECKOUT / "units" / "supervisord-vm.sysusers"
    subprocess.run(
        sandbox.command(["systemd-sysusers", str(sysusers)]), check=True, capture_output=True
    )


def run_inside(sandbox: Sandbox, argv: Sequence[str]) -> int:
    """Run ARGV as a service inside and return its exit status.

    `systemd-run --wait` exits 0 when its own bus connection dies (systemd 252; a test that
    restarts dbus.service does that), while the command runs on: the command's status goes to
    a file inside, and a lost `systemd-run` waits for that file instead of trusting its code.
    """
    script = f'rm -f {INSIDE_STATUS}; "$@"; echo $? > {INSIDE_STATUS}'
    wrapped = ["/bin/sh", "-c", script, "sh", *argv]
    result = subprocess.run(sandbox.service_command(wrapped, inside_env()), check=False)
    while True:
        read = subprocess.run(
            sandbox.command(["cat", INSIDE_STATUS]), capture_output=True, text=True, check=False
        )
        if read.returncode == 0 and read.stdout.strip():
            return int(read.stdout.strip())
        if result.returncode != 0:
            return result.returncode  # the command never ran, or systemd-run failed to start it
        units = subprocess.run(
            sandbox.command(["systemctl", "list-units", "--plain", "--no-legend", "run-u*"]),
            capture_output=True,
            text=True,
            check=False,
        )
        if units.returncode == 0 and not units.stdout.strip():
            print("sandbox: the command's unit ended without an exit status", file=sys.stderr)
            return 1
        time.sleep(0.5)


def run(argv: Sequence[str], keep: bool) -> int:
    sentinel = Path("/tmp") / f"{SENTINEL_NAME}-{os.getpid()}"
    sentinel.write_text("sandbox teardown checks this file survives\n")
    before = tmp_snapshot()
    sandbox: Sandbox | None = None
    status = 1
    problems: list[str] = []
    try:
        with signals_raise():
            sandbox = boot()
            create_users(sandbox)
            status = run_inside(sandbox, argv)
    except KeyboardInterrupt as interrupt:
        print(f"sandbox: interrupted ({interrupt}); tearing down", file=sys.stderr)
        status = 130
    finally:
        if sandbox is not None and keep and status != 130:
            print(
                f"sandbox: left running. Shell: nsenter -t {sandbox.leader_pid} -a bash\n"
                f"sandbox: tear down: cd {shlex.quote(str(CHECKOUT))} && "
                f".venv/bin/python -m tests.sandbox --stop {shlex.quote(str(sandbox.directory))}",
                file=sys.stderr,
            )
        elif sandbox is not None:
            problems = teardown(sandbox)
        if not sentinel.exists():
            problems.append("the host's /tmp was emptied during the run")
        vanished = before - tmp_snapshot() - {sentinel.name}
        if vanished:  # a note, not a failure: other programs on the host may remove their files
            print(
                f"sandbox: note: entries gone from /tmp: {sorted(vanished)[:10]}", file=sys.stderr
            )
        sentinel.unlink(missing_ok=True)
    for problem in problems:
        print(f"sandbox: teardown problem: {problem}", file=sys.stderr)
    return status if not problems or status else 1


def stop(directory: str) -> int:
    state = Path(directory) / STATE_FILE
    try:
        sandbox = Sandbox(**json.loads(state.read_text()))
    except (OSError, ValueError, TypeError) as error:
        print(f"sandbox: no sandbox state in {directory}: {error}", file=sys.stderr)
        return 1
    problems = teardown(sandbox)
    for problem in problems:
        print(f"sandbox: teardown problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox",
        description="Run pytest (or --exec CMD) under a real systemd in a throwaway container.",
    )
    parser.add_argument("--keep", action="store_true", help="leave the container running")
    parser.add_argument("--stop", metavar="DIR", help="tear down a container left by --keep")
    parser.add_argument(
        "--exec",
        dest="exec_argv",
        nargs=argparse.REMAINDER,
        help="run this command inside instead of pytest",
    )
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    options = parser.parse_args(args)
    try:
        require_root()
        if options.stop:
            return stop(options.stop)
        if options.exec_argv:
            argv = list(options.exec_argv)
        else:
            pytest_args = [arg for arg in options.pytest_args if arg != "--"]
            argv = [str(CHECKOUT / ".venv/bin/python"), "-m", "pytest", *pytest_args]
        return run(argv, options.keep)
    except SandboxError as error:
        print(f"sandbox: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
