"""Lifecycle rules, pure: which state moves and operations are allowed, what reason an exit gets.

Kept apart from machine.py (which acts on processes, QMP and systemd) so that the rules read as
tables and small functions and are unit-tested without any of those.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from supervisord_vm.errors import AlreadyRunning, InvalidState, NotRunning
from supervisord_vm.model import DestroyMode, Reason, State
from supervisord_vm.signals import signal_name


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
    Operation.SHUTDOWN: frozenset({State.RUNNING, State.STOPPING}),  # STOPPING: joins one
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


# --- the pending operation ---------------------------------------------------------------------


class PendingOp(enum.StrEnum):
    """An operation on a run that is in progress: asked for, and its effect not yet seen."""

    NONE = ""
    SHUTDOWN = "shutdown"  # the power button was pressed; the guest's power-off is awaited
    DESTROY = "destroy"  # QEMU is being ended (Pending.mode says how)
    REBOOT = "reboot"  # QEMU pauses on the guest's power-off; the daemon then resets it


# How strong each destroy mode is: a destroy in flight is only ever escalated, never weakened.
_DESTROY_STRENGTH: Mapping[DestroyMode, int] = {
    DestroyMode.GRACEFUL: 0,
    DestroyMode.DEFAULT: 1,
    DestroyMode.FORCE: 2,
}

# Signals QEMU handles by stopping the guest and exiting cleanly (SHUTDOWN reason host-signal).
QEMU_TERMINATION_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True)
class Pending:
    """What is in progress on a VM's run: one value, persisted in its runtime record.

    Two parts that do not cancel each other: the operation (`op`: a shutdown, a destroy and
    its mode, or a reboot), and the last `kill` signal that may still end QEMU (`signal`,
    `signal_since`). A kill during a shutdown or a reboot must neither cancel it nor be lost
    (its exit is `destroyed`), so the signal sits beside the operation, not in its place.

    Written before the daemon acts, so a daemon killed meanwhile lets the next one finish the
    operation (or classify the exit it caused) instead of guessing. Changes only through the
    methods below, which apply the rules; everything else reads it.
    """

    op: PendingOp = PendingOp.NONE
    mode: DestroyMode | None = None  # DESTROY only
    since: float = 0.0  # when the operation began (seconds since the epoch)
    guest_off: bool = False  # REBOOT only: the guest powered off, QEMU waits paused for a reset
    # SHUTDOWN only: when a caller's `--then-destroy` ends the VM if it has not powered off
    # (0: nobody asked); kept so that a restarted daemon keeps that promise.
    destroy_at: float = 0.0
    signal: int = 0  # a kill's signal that may still end QEMU (0: none)
    signal_since: float = 0.0

    @property
    def stopping(self) -> bool:
        """A stop asked through the daemon is in progress (the VM is `stopping`)."""
        return self.op in (PendingOp.SHUTDOWN, PendingOp.DESTROY)

    def begin(self, new: Pending) -> Pending:
        """What is pending once the operation `new` is asked for; InvalidState if it may not.

        - a destroy wins over everything and is only escalated (graceful < default < force);
        - a shutdown joins a pending shutdown and replaces a reboot (the reboot is cancelled);
        - a reboot cannot begin during a stop.
        The kill part stays as it is.
        """
        if new.op is PendingOp.DESTROY:
            weaker = (
                self.op is PendingOp.DESTROY
                and self.mode is not None
                and new.mode is not None
                and _DESTROY_STRENGTH[new.mode] <= _DESTROY_STRENGTH[self.mode]
            )
            return self if weaker else self._with_op(new)
        if self.op is PendingOp.DESTROY:
            raise InvalidState(f"cannot {new.op}: the VM is being destroyed")
        if new.op is PendingOp.SHUTDOWN:
            return self if self.op is PendingOp.SHUTDOWN else self._with_op(new)
        if new.op is PendingOp.REBOOT:
            if self.op is PendingOp.SHUTDOWN:
                raise InvalidState("cannot reboot: the VM is shutting down")
            return self if self.op is PendingOp.REBOOT else self._with_op(new)
        raise ValueError(f"not an operation to begin: {new!r}")

    def end(self, ended: Pending, restore: Pending | None = None) -> Pending:
        """What is pending once the operation `ended` finished or gave up, QEMU running.

        Only that very operation is dropped (replaced by `restore`'s, if given): a graceful
        destroy that answers Busy while a stronger destroy is in flight leaves that destroy.
        """
        if (self.op, self.mode, self.since) != (ended.op, ended.mode, ended.since):
            return self
        return self._with_op(restore if restore is not None else NO_PENDING)

    def with_kill(self, sig: int, since: float) -> Pending:
        return dataclasses.replace(self, signal=sig, signal_since=since)

    def kill_expired(self, sig: int, since: float) -> Pending:
        """QEMU outlived that kill: it no longer explains an exit (a later kill stays)."""
        if (self.signal, self.signal_since) != (sig, since):
            return self
        return dataclasses.replace(self, signal=0, signal_since=0.0)

    def destroy_by(self, deadline: float) -> Pending:
        """A waiting shutdown's caller will destroy the VM at `deadline` (the earliest counts)."""
        if self.op is not PendingOp.SHUTDOWN:
            return self
        earliest = min(deadline, self.destroy_at) if self.destroy_at else deadline
        return dataclasses.replace(self, destroy_at=earliest)

    def _with_op(self, other: Pending) -> Pending:
        return dataclasses.replace(
            self,
            op=other.op,
            mode=other.mode,
            since=other.since,
            guest_off=other.guest_off,
            destroy_at=other.destroy_at,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "op": str(self.op),
            "mode": str(self.mode) if self.mode is not None else "",
            "since": self.since,
            "guest_off": self.guest_off,
            "destroy_at": self.destroy_at,
            "signal": self.signal,
            "signal_since": self.signal_since,
        }

    @classmethod
    def from_json(cls, data: object) -> Pending:
        """Read a record's pending operation; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("field 'pending' is not an object")
        op, mode, sig = data.get("op", ""), data.get("mode", ""), data.get("signal", 0)
        since, guest_off = data.get("since", 0.0), data.get("guest_off", False)
        signal_since = data.get("signal_since", 0.0)
        destroy_at = data.get("destroy_at", 0.0)
        if not isinstance(op, str) or op not in set(PendingOp):
            raise ValueError("field 'pending.op' is not a known operation")
        if not isinstance(mode, str) or (mode and mode not in set(DestroyMode)):
            raise ValueError("field 'pending.mode' is not a destroy mode")
        if isinstance(sig, bool) or not isinstance(sig, int) or not 0 <= sig < 128:
            raise ValueError("field 'pending.signal' is not a signal number")
        times = (("since", since), ("signal_since", signal_since), ("destroy_at", destroy_at))
        for key, value in times:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"field 'pending.{key}' has the wrong type")
        assert isinstance(since, int | float) and isinstance(signal_since, int | float)
        assert isinstance(destroy_at, int | float)
        if not isinstance(guest_off, bool):
            raise ValueError("field 'pending.guest_off' has the wrong type")
        kind = PendingOp(op)
        if (kind is PendingOp.DESTROY) != bool(mode):
            raise ValueError("field 'pending.mode' is required for a destroy, and only there")
        return cls(
            kind,
            DestroyMode(mode) if mode else None,
            float(since),
            guest_off,
            float(destroy_at),
            sig,
            float(signal_since),
        )

    @classmethod
    def from_stop_intent(cls, stop: str, stop_at: float) -> Pending:
        """Records of earlier versions carried a stop intent string instead."""
        if stop == "shutdown":
            return shutdown(stop_at)
        if stop == "destroy":
            return destroy(DestroyMode.DEFAULT, stop_at)
        if stop in ("destroy-graceful", "destroy-force"):
            return destroy(DestroyMode(stop.removeprefix("destroy-")), stop_at)
        if stop == "":
            return NO_PENDING
        raise ValueError("field 'stop' is not a known stop intent")

    def describe(self) -> str:
        """For messages: "destroy (graceful)", "shutdown", "kill (SIGUSR1)"."""
        if self.op is PendingOp.DESTROY and self.mode is not None:
            return f"destroy ({self.mode})"
        if self.op is PendingOp.NONE and self.signal:
            return f"kill ({signal_name(self.signal)})"
        return str(self.op) or "nothing"


NO_PENDING = Pending()


def destroy(mode: DestroyMode, since: float) -> Pending:
    return Pending(PendingOp.DESTROY, mode, since)


def shutdown(since: float) -> Pending:
    return Pending(PendingOp.SHUTDOWN, since=since)


def reboot(since: float) -> Pending:
    return Pending(PendingOp.REBOOT, since=since)


# --- exit classification -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExitFacts:
    """Everything known about one run's end, gathered from the process, QMP and systemd."""

    pending: Pending = NO_PENDING  # the operation in progress when QEMU exited
    start_failed: bool = False
    sigterm_sent: bool = False  # a graceful destroy answered Busy earlier: its SIGTERM may act
    shutdown_guest: bool | None = None  # SHUTDOWN event: guest flag; None if none came
    shutdown_reason: str = ""  # SHUTDOWN event: QEMU's reason (host-signal, guest-shutdown, ...)
    external_stop: bool = False  # the unit went deactivating without our request
    unit_result: str = ""
    exit_signal: int | None = None  # known only for a QEMU this daemon spawned
    exit_status: int | None = None
    # Adopted from a previous daemon while QEMU was no longer running: events may be unseen.
    events_missed: bool = False
    monitored: bool = True  # QMP was connected: its events (or their absence) are known


def kill_caused_exit(sig: int, facts: ExitFacts) -> bool:
    """Whether the exit is the effect of a kill with `sig` (not of something after it).

    QEMU ends on SIGTERM/SIGINT/SIGHUP with a SHUTDOWN `host-signal` event; other signals that
    end it leave no event, and for a QEMU this daemon spawned, the exit signal says which.
    A guest power-off, an error exit or another signal is not the kill's doing.
    """
    if facts.shutdown_guest is True:
        return False
    if facts.shutdown_reason == "host-signal":
        return sig in QEMU_TERMINATION_SIGNALS
    if facts.exit_signal is not None:
        return facts.exit_signal == sig
    return facts.exit_status is None and facts.shutdown_guest is None


def classify_exit(facts: ExitFacts) -> Reason:
    """The reason for an exit this daemon watched; pure, so the rules are tested on their own."""
    pending = facts.pending
    if facts.start_failed:
        return Reason.FAILED
    if pending.op is PendingOp.DESTROY:
        return Reason.DESTROYED
    if facts.shutdown_guest is True:
        return Reason.SHUTDOWN
    if pending.signal and kill_caused_exit(pending.signal, facts):
        return Reason.DESTROYED
    if facts.sigterm_sent and (facts.shutdown_reason == "host-signal" or not facts.monitored):
        return Reason.DESTROYED
    if facts.external_stop or facts.unit_result == "timeout":
        return Reason.STOPPED_EXTERNALLY
    if pending.op is PendingOp.SHUTDOWN and facts.events_missed and facts.shutdown_guest is None:
        return classify_settled(pending, facts.unit_result)
    if facts.shutdown_guest is False and facts.shutdown_reason != "host-error":
        return Reason.STOPPED_EXTERNALLY
    return Reason.CRASHED


def classify_lost(unit_result: str) -> Reason:
    """The reason for a run that ended while no daemon watched: `crashed` only where provable."""
    return Reason.CRASHED if unit_result in CRASH_RESULTS else Reason.LOST


def classify_settled(pending: Pending, unit_result: str) -> Reason:
    """The reason for a run that ended unwatched, given the operation its record carried.

    A destroy (any mode) or kill whose daemon died before the exit is `destroyed`: the daemon
    had asked for it, whatever ended the process. A shutdown only pressed the power button, so
    a clean end (Result `success`, or the scope already gone) is the guest powering off:
    `shutdown`. That is not strictly provable (a `kill -9` of QEMU in the same window also
    leaves a scope ending `success`), but the user asked for the VM to go down, and it did; a
    Result that proves a crash stays `crashed`, and any other Result (`timeout`: the scope was
    stopped) is a stop from outside. Otherwise (nothing, or a reboot, pending) nothing more
    than `lost` (or a provable crash) is known.
    """
    if pending.op is PendingOp.DESTROY or pending.signal:
        return Reason.DESTROYED
    if pending.op is PendingOp.SHUTDOWN:
        if unit_result in CRASH_RESULTS:
            return Reason.CRASHED
        if unit_result in ("", "success"):
            return Reason.SHUTDOWN
        return Reason.STOPPED_EXTERNALLY
    return classify_lost(unit_result)
