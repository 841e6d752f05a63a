"""A supervisor in its own process, for the crash-consistency tests to SIGKILL.

    python -m tests.integration.crash_child BASE [--kill-at WHEN:POINT[:N]] OP ARG

builds a Supervisor over BASE/{defs,state,run,log}, runs start_up, prints ``go``, runs one
operation and prints ``done``. Operation ``start-up`` (ARG ignored) prints ``go`` first and
then runs start_up itself (reattach and autostart), so its steps can be cut. With
``--kill-at`` the process SIGKILLs itself ``before`` or ``after`` the Nth call (counted from
``go``) of one of the core's steps named in POINTS, so a test can cut an operation at an exact
place; without it the test kills it after a delay.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisord_vm import store
from supervisord_vm.model import DestroyMode, EventType, MachineEvent
from supervisord_vm.qemu import QmpSession
from supervisord_vm.store import Paths, RuntimeStore, StateStore
from supervisord_vm.supervisor import Supervisor
from supervisord_vm.systemd import Systemd

# name -> (owner, attribute, QMP command the call must carry or "")
POINTS: dict[str, tuple[Any, str, str]] = {
    "start_scope": (Systemd, "start_scope", ""),
    "stop_unit": (Systemd, "stop_unit", ""),
    "kill_unit": (Systemd, "kill_unit", ""),
    "reset_failed": (Systemd, "reset_failed", ""),
    "runtime_save": (RuntimeStore, "save", ""),
    "runtime_remove": (RuntimeStore, "remove", ""),
    "save_exit": (StateStore, "save_exit", ""),
    "qmp_connect": (QmpSession, "connect", ""),
    "cont": (QmpSession, "execute", "cont"),
    "powerdown": (QmpSession, "execute", "system_powerdown"),
    "set_action": (QmpSession, "execute", "set-action"),
    "rename": (Path, "replace", ""),  # atomic_write's rename
    "fsync": (os, "fsync", ""),  # atomic_write's fsync of the temp file, before the rename
    "unlink": (store, "_remove", ""),  # a definition's or runtime record's removal
}


class Arm:
    """Counting starts at `go`: start_up's own calls (reattach) do not count."""

    on = False


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Patch one step so that its Nth call after `go` kills this process before or after it."""
    when, point, *rest = spec.split(":")
    nth = int(rest[0]) if rest else 1
    owner, attribute, command = POINTS[point]
    raw = inspect.getattr_static(owner, attribute)
    is_classmethod = isinstance(raw, classmethod)
    original: Callable[..., Any] = raw.__func__ if is_classmethod else raw
    calls = 0

    def due(args: tuple[Any, ...]) -> bool:
        nonlocal calls
        if not Arm.on or (command and command not in args):
            return False
        calls += 1
        return calls == nth

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            hit = due(args)
            if hit and when == "before":
                die()
            result = await original(*args, **kwargs)
            if hit:
                die()
            return result

        wrapper: Any = async_wrapper
    else:

        @functools.wraps(original)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            hit = due(args)
            if hit and when == "before":
                die()
            result = original(*args, **kwargs)
            if hit:
                die()
            return result

        wrapper = sync_wrapper
    setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def read(path: str) -> str:
    return Path(path).read_text()


async def operate(supervisor: Supervisor, op: str, arg: str) -> None:
    if op == "start":
        await supervisor.start(arg)
    elif op == "create":
        await supervisor.create(read(arg))
    elif op == "define":
        await supervisor.define(read(arg))
    elif op == "undefine":
        await supervisor.undefine(arg)
    elif op == "destroy":
        await supervisor.destroy(arg)
    elif op == "destroy-graceful":
        await supervisor.destroy(arg, DestroyMode.GRACEFUL)
    elif op == "reboot":
        await supervisor.reboot(arg)
    elif op == "kill-pipe":  # a signal QEMU ignores: pending until the stop timeout passes
        await supervisor.kill(arg, signal.SIGPIPE)
        await asyncio.sleep(3600)
    elif op == "shutdown-then-destroy":  # a deaf guest: the deadline passes, it is destroyed
        await supervisor.shutdown(arg, timeout=3, then_destroy=True)
    elif op == "shutdown":
        await supervisor.shutdown(arg, timeout=20)
    elif op == "crash":  # QEMU dies under the daemon; the daemon settles the exit
        stopped = asyncio.get_running_loop().create_future()

        def on_event(event: MachineEvent) -> None:
            if event.name == arg and event.event is EventType.STOPPED and not stopped.done():
                stopped.set_result(None)

        supervisor.subscribe(on_event)
        os.kill(supervisor.get_machine(arg).pid, signal.SIGKILL)
        await stopped
    else:
        raise SystemExit(f"unknown operation {op}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", type=Path)
    parser.add_argument("--kill-at", default="")
    parser.add_argument("op")
    parser.add_argument("arg")
    args = parser.parse_args()
    if args.kill_at:
        install(args.kill_at)
    base: Path = args.base
    paths = Paths(base / "defs", base / "state", base / "run", base / "log")
    systemd = await Systemd.connect()
    supervisor = Supervisor(paths, systemd)
    if args.op == "start-up":
        Arm.on = True
        print("go", flush=True)
        await supervisor.start_up()
    else:
        await supervisor.start_up()
        Arm.on = True
        print("go", flush=True)
        await operate(supervisor, args.op, args.arg)
    print("done", flush=True)
    await supervisor.close()
    await systemd.close()


if __name__ == "__main__":
    asyncio.run(main())
