"""The state machine's tables and the exit classification rules, on their own (no systemd)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from supervisord_vm import lifecycle
from supervisord_vm.errors import AlreadyRunning, InvalidState, NotRunning
from supervisord_vm.lifecycle import (
    ALLOWED,
    NO_PENDING,
    TRANSITIONS,
    ExitFacts,
    Operation,
    Pending,
    PendingOp,
    check_operation,
    check_transition,
    classify_exit,
    classify_lost,
    classify_settled,
)
from supervisord_vm.model import DestroyMode, Reason, State
from supervisord_vm.restart_policy import RESTART_AFTER
from supervisord_vm.supervisor import MESSAGE_IDS

SHUTDOWN = lifecycle.shutdown(1.0)


def kill(sig: int, since: float) -> Pending:
    return NO_PENDING.with_kill(sig, since)


DESTROY = lifecycle.destroy(DestroyMode.DEFAULT, 1.0)


def test_every_state_has_a_row_and_every_operation_a_rule() -> None:
    assert set(TRANSITIONS) == set(State)
    assert set(ALLOWED) == set(Operation)


def test_every_running_state_can_end_in_shutoff() -> None:
    for state in State:
        if state not in (State.SHUTOFF, State.STARTING):
            assert State.SHUTOFF in TRANSITIONS[state]
    assert State.SHUTOFF in TRANSITIONS[State.STARTING]  # a failed start


def test_shutoff_only_starts() -> None:
    assert TRANSITIONS[State.SHUTOFF] == {State.STARTING}
    check_transition("vm", State.SHUTOFF, State.STARTING)
    with pytest.raises(InvalidState):
        check_transition("vm", State.SHUTOFF, State.RUNNING)


def test_same_state_is_no_transition() -> None:
    for state in State:
        check_transition("vm", state, state)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STARTING, State.PAUSED),
        (State.STARTING, State.STOPPING),
        (State.SHUTOFF, State.PAUSED),
        (State.SHUTOFF, State.STOPPING),
    ],
)
def test_forbidden_transitions(old: State, new: State) -> None:
    with pytest.raises(InvalidState, match=f"from {old} to {new}"):
        check_transition("vm", old, new)


def test_operations_every_allowed_state_is_reachable() -> None:
    reachable = {State.SHUTOFF}
    for targets in TRANSITIONS.values():
        reachable |= targets
    for states in ALLOWED.values():
        assert states <= reachable


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED, State.STARTING])
def test_start_when_up_is_already_running(state: State) -> None:
    with pytest.raises(AlreadyRunning, match="already"):
        check_operation("vm", Operation.START, state)


def test_start_while_stopping_is_invalid_state() -> None:
    with pytest.raises(InvalidState, match="stopping"):
        check_operation("vm", Operation.START, State.STOPPING)


@pytest.mark.parametrize("operation", [op for op in Operation if op is not Operation.START])
def test_everything_but_start_refuses_shutoff_as_not_running(operation: Operation) -> None:
    with pytest.raises(NotRunning, match="not running"):
        check_operation("vm", operation, State.SHUTOFF)


@pytest.mark.parametrize(
    ("operation", "state"),
    [
        (Operation.PAUSE, State.PAUSED),
        (Operation.RESUME, State.RUNNING),
        (Operation.SHUTDOWN, State.PAUSED),
        (Operation.REBOOT, State.PAUSED),
        (Operation.KILL, State.STARTING),
    ],
)
def test_invalid_state_names_operation_and_state(operation: Operation, state: State) -> None:
    with pytest.raises(InvalidState, match=f"cannot {operation} VM vm while it is {state}"):
        check_operation("vm", operation, state)


def test_destroy_allowed_in_every_running_state() -> None:
    assert ALLOWED[Operation.DESTROY] == {
        State.STARTING,
        State.RUNNING,
        State.PAUSED,
        State.STOPPING,
    }


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (ExitFacts(start_failed=True, pending=DESTROY), Reason.FAILED),
        (ExitFacts(pending=DESTROY, shutdown_guest=True), Reason.DESTROYED),
        (
            ExitFacts(pending=DESTROY, shutdown_guest=False, shutdown_reason="host-signal"),
            Reason.DESTROYED,
        ),
        (ExitFacts(shutdown_guest=True, shutdown_reason="guest-shutdown"), Reason.SHUTDOWN),
        (
            ExitFacts(shutdown_guest=False, shutdown_reason="host-signal"),
            Reason.STOPPED_EXTERNALLY,
        ),
        (
            ExitFacts(sigterm_sent=True, shutdown_guest=False, shutdown_reason="host-signal"),
            Reason.DESTROYED,
        ),
        (ExitFacts(external_stop=True, unit_result="timeout"), Reason.STOPPED_EXTERNALLY),
        (ExitFacts(unit_result="timeout"), Reason.STOPPED_EXTERNALLY),
        (ExitFacts(external_stop=True), Reason.STOPPED_EXTERNALLY),
        (ExitFacts(), Reason.CRASHED),  # kill -9 from outside: no SHUTDOWN event
        (ExitFacts(unit_result="oom-kill"), Reason.CRASHED),
        (ExitFacts(shutdown_guest=False, shutdown_reason="host-error"), Reason.CRASHED),
    ],
)
def test_classify_exit(facts: ExitFacts, reason: Reason) -> None:
    assert classify_exit(facts) is reason


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("", Reason.LOST),
        ("success", Reason.LOST),
        ("timeout", Reason.LOST),
        ("oom-kill", Reason.CRASHED),
        ("signal", Reason.CRASHED),
        ("core-dump", Reason.CRASHED),
    ],
)
def test_classify_lost(result: str, reason: Reason) -> None:
    assert classify_lost(result) is reason


@pytest.mark.parametrize(
    ("pending", "result", "reason"),
    [
        (DESTROY, "", Reason.DESTROYED),
        (DESTROY, "timeout", Reason.DESTROYED),
        (lifecycle.destroy(DestroyMode.GRACEFUL, 1.0), "success", Reason.DESTROYED),
        (lifecycle.destroy(DestroyMode.FORCE, 1.0), "signal", Reason.DESTROYED),
        (kill(9, 1.0), "success", Reason.DESTROYED),
        (SHUTDOWN, "", Reason.SHUTDOWN),
        (SHUTDOWN, "success", Reason.SHUTDOWN),
        (SHUTDOWN, "oom-kill", Reason.CRASHED),
        (SHUTDOWN, "timeout", Reason.STOPPED_EXTERNALLY),
        (lifecycle.reboot(1.0), "success", Reason.LOST),
        (NO_PENDING, "", Reason.LOST),
        (NO_PENDING, "oom-kill", Reason.CRASHED),
    ],
)
def test_classify_settled_uses_the_pending_operation(
    pending: Pending, result: str, reason: Reason
) -> None:
    assert classify_settled(pending, result) is reason


def test_adopted_shutdown_without_its_event_is_classified_from_the_result() -> None:
    missed = ExitFacts(pending=SHUTDOWN, events_missed=True)
    assert classify_exit(missed) is Reason.SHUTDOWN
    assert classify_exit(replace(missed, unit_result="oom-kill")) is Reason.CRASHED
    assert classify_exit(replace(missed, external_stop=True)) is Reason.STOPPED_EXTERNALLY
    # the event, when it did come, decides
    facts = replace(missed, shutdown_guest=False, shutdown_reason="host-signal")
    assert classify_exit(facts) is Reason.STOPPED_EXTERNALLY


def test_a_busy_graceful_destroys_sigterm_explains_an_unmonitored_exit() -> None:
    """Reattached without QMP (QEMU was wedged): no event can tell, and the SIGTERM we sent
    is what a wedged QEMU acts on when it recovers."""
    assert classify_exit(ExitFacts(sigterm_sent=True, monitored=False)) is Reason.DESTROYED
    assert classify_exit(ExitFacts(sigterm_sent=True)) is Reason.CRASHED
    assert classify_exit(ExitFacts(monitored=False)) is Reason.CRASHED


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        # the signal ended QEMU: its own exit signal, or QEMU's host-signal shutdown
        (ExitFacts(pending=kill(9, 1.0), exit_signal=9), Reason.DESTROYED),
        (
            ExitFacts(
                pending=kill(15, 1.0),
                shutdown_guest=False,
                shutdown_reason="host-signal",
                exit_status=0,
            ),
            Reason.DESTROYED,
        ),
        # a reattached QEMU (no exit status) that ended with no event: the kill did it
        (ExitFacts(pending=kill(9, 1.0)), Reason.DESTROYED),
        # QEMU survived the signal and the guest powered off later
        (
            ExitFacts(
                pending=kill(10, 1.0),
                shutdown_guest=True,
                shutdown_reason="guest-shutdown",
                exit_status=0,
            ),
            Reason.SHUTDOWN,
        ),
        # another signal, or an error exit, is not the kill's doing
        (ExitFacts(pending=kill(10, 1.0), exit_signal=11), Reason.CRASHED),
        (ExitFacts(pending=kill(10, 1.0), exit_status=1), Reason.CRASHED),
        (
            ExitFacts(
                pending=kill(10, 1.0),
                shutdown_guest=False,
                shutdown_reason="host-signal",
                exit_status=0,
            ),
            Reason.STOPPED_EXTERNALLY,
        ),
    ],
)
def test_a_kill_covers_only_the_exit_it_caused(facts: ExitFacts, reason: Reason) -> None:
    assert classify_exit(facts) is reason


def test_destroys_are_only_escalated_never_weakened() -> None:
    graceful = lifecycle.destroy(DestroyMode.GRACEFUL, 1.0)
    default = lifecycle.destroy(DestroyMode.DEFAULT, 2.0)
    force = lifecycle.destroy(DestroyMode.FORCE, 3.0)
    assert graceful.begin(default) == default
    assert default.begin(force) == force
    assert default.begin(graceful) == default
    assert force.begin(default) == force
    # a graceful destroy's Busy ends only itself, never the stronger destroy in flight
    assert default.end(graceful) == default
    assert graceful.end(graceful) == NO_PENDING


def test_pending_operations_replace_join_or_refuse() -> None:
    reboot = lifecycle.reboot(1.0)
    assert NO_PENDING.begin(SHUTDOWN) == SHUTDOWN
    assert SHUTDOWN.begin(lifecycle.shutdown(9.0)) == SHUTDOWN  # joins
    assert reboot.begin(SHUTDOWN) == SHUTDOWN  # a shutdown cancels the reboot
    assert reboot.begin(DESTROY) == DESTROY
    assert SHUTDOWN.begin(DESTROY) == DESTROY
    with pytest.raises(InvalidState):
        DESTROY.begin(SHUTDOWN)
    with pytest.raises(InvalidState):
        SHUTDOWN.begin(reboot)
    with pytest.raises(InvalidState):
        DESTROY.begin(reboot)


def test_a_kill_sits_beside_the_operation_and_cancels_none() -> None:
    reboot = lifecycle.reboot(1.0)
    assert SHUTDOWN.with_kill(9, 2.0).op is PendingOp.SHUTDOWN
    assert reboot.with_kill(13, 2.0).begin(DESTROY) == DESTROY.with_kill(13, 2.0)
    assert kill(10, 2.0).begin(reboot) == reboot.with_kill(10, 2.0)
    # the operation ending keeps the kill; the kill expiring keeps the operation
    assert SHUTDOWN.with_kill(9, 2.0).end(SHUTDOWN) == kill(9, 2.0)
    assert SHUTDOWN.with_kill(9, 2.0).kill_expired(9, 2.0) == SHUTDOWN
    # only that very kill expires, not a later one with the same signal
    assert kill(9, 3.0).kill_expired(9, 2.0) == kill(9, 3.0)
    assert not kill(9, 2.0).stopping


def test_a_then_destroy_deadline_belongs_to_its_shutdown() -> None:
    assert SHUTDOWN.destroy_by(9.0).destroy_by(5.0).destroy_at == 5.0  # the earliest counts
    assert SHUTDOWN.destroy_by(5.0).destroy_by(9.0).destroy_at == 5.0
    assert NO_PENDING.destroy_by(5.0) == NO_PENDING
    # a destroy that takes over, or the shutdown ending, drops the deadline with it
    assert SHUTDOWN.destroy_by(5.0).begin(DESTROY).destroy_at == 0.0
    assert SHUTDOWN.destroy_by(5.0).end(SHUTDOWN).destroy_at == 0.0


def test_pending_operation_json_round_trip_and_old_stop_intents() -> None:
    for pending in (
        NO_PENDING,
        SHUTDOWN,
        DESTROY,
        kill(34, 5.0),
        SHUTDOWN.with_kill(15, 6.0),
        SHUTDOWN.destroy_by(7.0),
        replace(lifecycle.reboot(1.0), guest_off=True),
    ):
        assert Pending.from_json(pending.to_json()) == pending
    assert Pending.from_stop_intent("destroy-force", 2.0) == lifecycle.destroy(
        DestroyMode.FORCE, 2.0
    )
    assert Pending.from_stop_intent("", 0.0) == NO_PENDING
    with pytest.raises(ValueError, match="stop"):
        Pending.from_stop_intent("reboot", 0.0)


def test_restart_policies() -> None:
    assert RESTART_AFTER["no"] == frozenset()
    assert RESTART_AFTER["on-crash"] == {Reason.CRASHED}
    assert Reason.SHUTDOWN in RESTART_AFTER["always"]
    for policy in RESTART_AFTER.values():
        assert Reason.DESTROYED not in policy
        assert Reason.FAILED not in policy
        assert Reason.STOPPED_EXTERNALLY not in policy


def test_message_ids_are_distinct_128_bit_hex() -> None:
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    for message_id in ids:
        assert len(message_id) == 32
        int(message_id, 16)
