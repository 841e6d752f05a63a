"""Signal names and numbers, spelled as `systemctl kill --signal` spells them (pure)."""

from __future__ import annotations

import re
import signal


def signal_number(text: str) -> int:
    """'15', 'TERM', 'SIGTERM', 'SIGRTMIN+3' or 'RTMAX-1' -> the number; ValueError otherwise."""
    spec = text.strip().upper()
    name = spec if spec.startswith("SIG") else "SIG" + spec
    number: int | None = None
    if spec.isdigit():
        number = int(spec)
    elif name in signal.Signals.__members__:
        number = int(signal.Signals[name])
    elif realtime := re.fullmatch(r"SIGRT(MIN|MAX)([+-]\d+)?", name):
        offset = int(realtime[2] or 0)
        if realtime[1] == "MIN" and offset >= 0:
            number = int(signal.SIGRTMIN) + offset
        elif realtime[1] == "MAX" and offset <= 0:
            number = int(signal.SIGRTMAX) + offset
    if number is not None and 1 <= number <= signal.SIGRTMAX:
        return number
    raise ValueError(
        f"unknown signal {text!r} (use a number from 1 to {int(signal.SIGRTMAX)} or a name like "
        "SIGTERM or SIGRTMIN+3)"
    )


def signal_name(number: int) -> str:
    """SIGTERM for 15, SIGRTMIN+3 for 37; the number itself where it names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return str(number)
