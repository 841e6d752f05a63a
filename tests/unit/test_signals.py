"""Signals are taken and shown as `systemctl kill --signal` spells them, real-time ones too."""

from __future__ import annotations

import signal

import pytest

from supervisord_vm.signals import signal_name, signal_number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("15", 15),
        ("TERM", signal.SIGTERM),
        ("sigkill", signal.SIGKILL),
        (" HUP ", signal.SIGHUP),
        ("SIGRTMIN", signal.SIGRTMIN),
        ("RTMIN+3", signal.SIGRTMIN + 3),
        ("SIGRTMAX-1", signal.SIGRTMAX - 1),
        ("SIGRTMAX", signal.SIGRTMAX),
        (str(int(signal.SIGRTMIN) + 6), signal.SIGRTMIN + 6),
    ],
)
def test_signal_number_accepts_names_numbers_and_realtime(text: str, number: int) -> None:
    assert signal_number(text) == number


@pytest.mark.parametrize(
    "text", ["0", "-1", "+9", "", "SIGFOO", "RTMIN-1", "RTMAX+1", "SIGRTMIN+40", "99"]
)
def test_signal_number_refuses_what_names_no_signal(text: str) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        signal_number(text)


def test_signal_name_round_trips_including_realtime() -> None:
    assert signal_name(9) == "SIGKILL"
    assert signal_name(int(signal.SIGRTMIN) + 3) == "SIGRTMIN+3"
    assert signal_number(signal_name(int(signal.SIGRTMIN) + 3)) == signal.SIGRTMIN + 3
    assert signal_name(0) == "0"
