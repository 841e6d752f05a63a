"""Values that cross layer boundaries: states, reasons, events and VM snapshots.

The core produces them, the D-Bus adapter and svmctl present them; they carry no behaviour.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    SHUTOFF = "shutoff"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


class Reason(enum.StrEnum):
    """Why a VM is shut off; NONE for a VM that never ran since it was defined."""

    NONE = ""
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    STOPPED_EXTERNALLY = "stopped-externally"
    CRASHED = "crashed"
    FAILED = "failed"
    LOST = "lost"


class DestroyMode(enum.StrEnum):
    DEFAULT = "default"  # StopUnit: SIGTERM, SIGKILL after the stop timeout
    GRACEFUL = "graceful"  # KillUnit SIGTERM only; Busy if QEMU survives
    FORCE = "force"  # KillUnit SIGKILL


class EventType(enum.StrEnum):
    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTING = "starting"
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RESET = "reset"
    REBOOTED = "rebooted"
    RESTARTING = "restarting"


@dataclass(frozen=True)
class Caller:
    """Who asked for an operation, for the audit record (from the bus credentials)."""

    uid: int
    pid: int
    # The groups the bus reported for the caller's process (None: unknown); a group member's
    # disks are opened with these (disk_access.py).
    groups: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExitInfo:
    """How the last run ended: the unit's Result and, where known, exit status or signal."""

    result: str = ""  # systemd unit Result: success, timeout, signal, oom-kill, resources, ...
    exit_status: int | None = None
    exit_signal: int | None = None
    time: float = 0.0  # seconds since the epoch


@dataclass(frozen=True)
class MachineEvent:
    """One lifecycle event; the only event type that flows from the core to its clients."""

    time: float
    name: str
    event: EventType
    state: State
    reason: Reason
    message: str = ""


@dataclass(frozen=True)
class MachineInfo:
    """A snapshot of one VM as clients see it.

    While a VM runs, a redefine or reload changes its definition for the *next* start only, so
    each field says what is in effect now:
    - `stop_timeout` is the running scope's TimeoutStopSec (and a graceful destroy's wait):
      the definition the run was started with; the new value shows once the VM is shut off.
    - `autostart` and `restart` are the daemon's own policies, read when it decides (at the
      next boot, at this run's exit): they show the newest definition, in effect at once.
    - `transient` follows the definition file at once (undefine/reload of a running VM).
    """

    name: str
    state: State
    reason: Reason
    unit: str
    pid: int  # 0 when not running
    transient: bool
    autostart: bool
    restart: str
    stop_timeout: int
    exit: ExitInfo
    display: str = ""  # the running VM's display, vnc+unix:///PATH or vnc://HOST:PORT; or ""
