"""Lifecycle rules, pure: which state moves and operations are allowed, what reason an exit gets.

Kept apart from machine.py (which acts on processes, QMP and systemd) so that the rules read as
tables and small functions and are unit-tested without any of those.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from supervisord_vm.errors import AlreadyRunning, InvalidState, NotRunning
from supervisord_vm.model import DestroyMode, Reason, State


class Operation(enum.StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    KILL = "kill"
    REBOOT = "reboot"
    RESET = "reset"
    PAUSE = "pause"
    RESUME = "resume"


# The one table of allowed state changes. STOPPING may fall back to RUNNING/PAUSED: a shutdown
# that timed out or a graceful destroy answered Busy leaves the VM running as it was.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.SHUTOFF: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.SHUTOFF}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPING, State.SHUTOFF}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPING, State.SHUTOFF}),
    State.STOPPING: frozenset({State.RUNNING, State.PAUSED, State.SHUTOFF}),
}

# The states in which each operation may begin.
ALLOWED: Mapping[Operation, frozenset[State]] = {
    Operation.START: frozenset({State.SHUTOFF}),
    Operation.SHUTDOWN: frozenset({State.RUNNING}),
    Operation.DESTROY: frozenset({State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING}),
    Operation.KILL: frozenset({State.RUNNING, State.PAUSED, State.STOPPING}),
    Operation.REBOOT: frozenset({State.RUNNING}),
    Operation.RESET: frozenset({State.RUNNING, State.PAUSED}),
    Operation.PAUSE: frozenset({State.RUNNING}),
    Operation.RESUME: frozenset({State.PAUSED}),
}

# Signals after which QEMU is not expected to go on running (default action or QEMU's handler
# ends the process); a kill with one of these makes the exit ours (`destroyed`).
NON_TERMINATING_SIGNALS = frozenset(
    {
        0,
        signal.SIGSTOP,
        signal.SIGCONT,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGWINCH,
        signal.SIGCHLD,
        signal.SIGURG,
    }
)


# Unit Results that prove a VM died on its own even when no daemon watched it end.
CRASH_RESULTS = frozenset({"oom-kill", "signal", "core-dump", "exit-code"})


def check_transition(name: str, old: State, new: State) -> None:
    """Refuse a state change the table does not allow (a bug in the caller, said clearly)."""
    if new is not old and new not in TRANSITIONS[old]:
        raise InvalidState(f"VM {name} cannot go from {old} to {new}")


def check_operation(name: str, operation: Operation, state: State) -> None:
    """Raise the error a client should see when `operation` cannot begin in `state`."""
    if state in ALLOWED[operation]:
        return
    if operation is Operation.START:
        if state is State.STOPPING:
            raise InvalidState(f"VM {name} is stopping; start it again once it is shut off")
        raise AlreadyRunning(f"VM {name} is already {state}")
    if state is State.SHUTOFF:
        raise NotRunning(f"VM {name} is not running")
    raise InvalidState(f"cannot {operation} VM {name} while it is {state}")


@dataclass(frozen=True)
class ExitFacts:
    """Everything known about one run's end, gathered from the process, QMP and systemd."""

    start_failed: bool = False
    destroy_requested: bool = False
    our_sigterm_pending: bool = False  # a graceful destroy answered Busy earlier
    shutdown_guest: bool | None = None  # SHUTDOWN event: guest flag; None if none came
    shutdown_reason: str = ""  # SHUTDOWN event: QEMU's reason (host-signal, guest-shutdown, ...)
    external_stop: bool = False  # the unit went deactivating without our request
    unit_result: str = ""
    # A shutdown asked for by a daemon that died; its SHUTDOWN event may have gone unseen.
    shutdown_unseen: bool = False


def classify_exit(facts: ExitFacts) -> Reason:
    """The reason for an exit this daemon watched; pure, so the rules are tested on their own."""
    if facts.start_failed:
        return Reason.FAILED
    if facts.destroy_requested:
        return Reason.DESTROYED
    if facts.shutdown_guest is True:
        return Reason.SHUTDOWN
    if facts.our_sigterm_pending and facts.shutdown_reason == "host-signal":
        return Reason.DESTROYED
    if facts.external_stop or facts.unit_result == "timeout":
        return Reason.STOPPED_EXTERNALLY
    if facts.shutdown_unseen and facts.shutdown_guest is None:
        return classify_settled("shutdown", facts.unit_result)
    if facts.shutdown_guest is False and facts.shutdown_reason != "host-error":
        return Reason.STOPPED_EXTERNALLY
    return Reason.CRASHED


def classify_lost(unit_result: str) -> Reason:
    """The reason for a run that ended while no daemon watched: `crashed` only where provable."""
    return Reason.CRASHED if unit_result in CRASH_RESULTS else Reason.LOST


def classify_settled(stop: str, unit_result: str) -> Reason:
    """The reason for a run that ended unwatched, given the stop intent its record carried.

    A destroy (any mode) whose daemon died mid-stop is `destroyed`: the daemon had asked for
    it, whatever ended the process. A shutdown only pressed the power button, so a clean end
    (Result `success`, or the scope already gone) is the guest powering off: `shutdown`. That is
    not strictly provable (a `kill -9` of QEMU in the same window also leaves a scope ending
    `success`), but the user asked for the VM to go down, and it did; a Result that proves a
    crash stays `crashed`, and any other Result (`timeout`: the scope was stopped) is a stop
    from outside. Without an intent nothing more than `lost` (or a provable crash) is known.
    """
    if stop.startswith("destroy"):
        return Reason.DESTROYED
    if stop == "shutdown":
        if unit_result in CRASH_RESULTS:
            return Reason.CRASHED
        if unit_result in ("", "success"):
            return Reason.SHUTDOWN
        return Reason.STOPPED_EXTERNALLY
    return classify_lost(unit_result)


def destroy_intent(mode: DestroyMode) -> str:
    """The stop intent a destroy in `mode` records (store.STOP_INTENTS)."""
    return "destroy" if mode is DestroyMode.DEFAULT else f"destroy-{mode}"


def intent_mode(stop: str) -> DestroyMode | None:
    """The destroy mode a recorded intent asks for; None if it is no destroy."""
    if not stop.startswith("destroy"):
        return None
    return DestroyMode(stop.removeprefix("destroy-")) if "-" in stop else DestroyMode.DEFAULT
