"""The restart policy: which exits restart a VM, with backoff, and when to stop trying.

Kept apart from the supervisor (which owns the VMs) so that the policy's rules, its history
per VM and its pending restarts are one small thing to read and to test.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from supervisord_vm import journal
from supervisord_vm.errors import SvmError
from supervisord_vm.machine import Machine
from supervisord_vm.model import EventType, Reason

log = logging.getLogger(__name__)

# Which exits the restart policies restart after. An explicit destroy, an external
# `systemctl stop` and a failed start are never undone; `always` also covers guest power-off.
# Nor is any exit during a stop asked through the daemon (Machine.stop_requested): a shutdown
# the user asked for, or a destroy cut off by a daemon restart, stays down.
RESTART_AFTER: dict[str, frozenset[Reason]] = {
    "no": frozenset(),
    "on-crash": frozenset({Reason.CRASHED}),
    "always": frozenset({Reason.CRASHED, Reason.SHUTDOWN, Reason.LOST}),
}


@dataclass(frozen=True)
class RestartPolicyLimits:
    """Backoff and limit of automatic restarts (constructor parameters so tests run fast)."""

    backoff: float = 1.0  # first delay; doubles per restart within the window
    backoff_max: float = 30.0
    limit: int = 5  # restarts within `window`; then restarting stops and `crashed` stays
    window: float = 60.0


class RestartPolicy:
    """Restarts after the exits a VM's `restart` setting names: bounded history, one at a time."""

    def __init__(self, limits: RestartPolicyLimits) -> None:
        self._limits = limits
        self._history: dict[str, collections.deque[float]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def schedule(
        self, machine: Machine, reason: Reason, start: Callable[[Machine], Awaitable[None]]
    ) -> bool:
        """Start `machine` again later (via `start`) if its policy says so; whether it will."""
        if machine.stop_requested:
            return False
        if reason not in RESTART_AFTER.get(machine.definition.restart, frozenset()):
            return False
        limits = self._limits
        now = time.monotonic()
        history = self._history.setdefault(machine.name, collections.deque())
        while history and now - history[0] > limits.window:
            history.popleft()
        if len(history) >= limits.limit:
            message = (
                f"restart limit reached ({limits.limit} in {limits.window:g} s); not restarting"
            )
            log.warning("VM %s: %s", machine.name, message)
            journal.send(
                f"VM {machine.name}: {message}",
                logging.WARNING,
                VM_NAME=machine.name,
                VM_UNIT=machine.unit,
                VM_REASON=str(reason),
            )
            return False
        delay = min(limits.backoff * 2 ** len(history), limits.backoff_max)
        history.append(now)
        # The exit's cleanup has already recorded `reason` on the machine.
        machine.emit(
            EventType.RESTARTING, f"restart {len(history)} of {limits.limit} in {delay:g} s"
        )
        self.cancel(machine.name)
        self._tasks[machine.name] = asyncio.ensure_future(self._later(machine, delay, start))
        return True

    async def _later(
        self, machine: Machine, delay: float, start: Callable[[Machine], Awaitable[None]]
    ) -> None:
        try:
            await asyncio.sleep(delay)  # the backoff itself, not a poll
            await start(machine)
        except SvmError as err:
            log.error("restart of VM %s failed: %s", machine.name, err)
        finally:
            if self._tasks.get(machine.name) is asyncio.current_task():
                del self._tasks[machine.name]

    def cancel(self, name: str) -> None:
        """A restart waiting for its backoff is not wanted any more (a start, stop, undefine)."""
        task = self._tasks.pop(name, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def forget(self, name: str) -> None:
        self._history.pop(name, None)

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
