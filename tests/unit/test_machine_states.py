"""The state machine's tables and the exit classification rules, on their own (no systemd)."""

from __future__ import annotations

import pytest

from supervisord_vm.errors import AlreadyRunning, InvalidState, NotRunning
from supervisord_vm.lifecycle import (
    ALLOWED,
    TRANSITIONS,
    ExitFacts,
    Operation,
    check_operation,
    check_transition,
    classify_exit,
    classify_lost,
    classify_settled,
    destroy_intent,
    intent_mode,
)
from supervisord_vm.model import DestroyMode, Reason, State
from supervisord_vm.store import STOP_INTENTS
from supervisord_vm.supervisor import MESSAGE_IDS, RESTART_AFTER


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
        (Operation.SHUTDOWN, State.STOPPING),
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
        (ExitFacts(start_failed=True, destroy_requested=True), Reason.FAILED),
        (ExitFacts(destroy_requested=True, shutdown_guest=True), Reason.DESTROYED),
        (
            ExitFacts(destroy_requested=True, shutdown_guest=False, shutdown_reason="host-signal"),
            Reason.DESTROYED,
        ),
        (ExitFacts(shutdown_guest=True, shutdown_reason="guest-shutdown"), Reason.SHUTDOWN),
        (
            ExitFacts(shutdown_guest=False, shutdown_reason="host-signal"),
            Reason.STOPPED_EXTERNALLY,
        ),
        (
            ExitFacts(
                our_sigterm_pending=True, shutdown_guest=False, shutdown_reason="host-signal"
            ),
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
    ("stop", "result", "reason"),
    [
        ("destroy", "", Reason.DESTROYED),
        ("destroy", "timeout", Reason.DESTROYED),
        ("destroy-graceful", "success", Reason.DESTROYED),
        ("destroy-force", "signal", Reason.DESTROYED),
        ("shutdown", "", Reason.SHUTDOWN),
        ("shutdown", "success", Reason.SHUTDOWN),
        ("shutdown", "oom-kill", Reason.CRASHED),
        ("shutdown", "timeout", Reason.STOPPED_EXTERNALLY),
        ("", "", Reason.LOST),
        ("", "oom-kill", Reason.CRASHED),
    ],
)
def test_classify_settled_uses_the_stop_intent(stop: str, result: str, reason: Reason) -> None:
    assert classify_settled(stop, result) is reason


def test_destroy_intents_round_trip_and_are_storable() -> None:
    for mode in DestroyMode:
        assert destroy_intent(mode) in STOP_INTENTS
        assert intent_mode(destroy_intent(mode)) is mode
    assert intent_mode("shutdown") is None
    assert intent_mode("") is None


def test_adopted_shutdown_without_its_event_is_classified_from_the_result() -> None:
    assert classify_exit(ExitFacts(shutdown_unseen=True)) is Reason.SHUTDOWN
    assert classify_exit(ExitFacts(shutdown_unseen=True, unit_result="oom-kill")) is (
        Reason.CRASHED
    )
    assert classify_exit(ExitFacts(shutdown_unseen=True, external_stop=True)) is (
        Reason.STOPPED_EXTERNALLY
    )
    # the event, when it did come, decides
    facts = ExitFacts(shutdown_unseen=True, shutdown_guest=False, shutdown_reason="host-signal")
    assert classify_exit(facts) is Reason.STOPPED_EXTERNALLY


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
