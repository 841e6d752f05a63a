"""svmctl: the command line for supervisord-vm, a thin client of org.supervisordvm1.

It only speaks D-Bus: every command is one or a few method calls (`list` and `status` exactly one:
ObjectManager.GetManagedObjects, Properties.GetAll); answers become tables or JSON,
D-Bus error names become exit codes (0 ok, 1 other, 2 usage, 3 busy, 4 no such VM, 5 timeout,
6 permission denied).

It runs for every command a user or script types, so its start-up is part of every command's
latency: it imports only what it needs (wire.py's blocking client instead of sdbus, which loads
asyncio; the definition and signal modules only in the commands that use them), never the
daemon's modules.
"""

from __future__ import annotations

import contextlib
import sys
import time
from types import SimpleNamespace

from supervisord_vm.api import (
    ADMIN_GROUP,
    BUS_NAME,
    ERROR_PREFIX,
    MACHINE_INTERFACE,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    TIMEOUT_MAX,
    machine_path,
)
from supervisord_vm.wire import BusError, Connection

# typing.TYPE_CHECKING without importing typing at run time (mypy knows any TYPE_CHECKING name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, NoReturn


def _json(value: object) -> str:
    """JSON text, importing json only for --json output (a table needs none of it)."""
    import json  # noqa: PLC0415 - start-up time: most commands print tables

    return json.dumps(value)


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_NO_SUCH_MACHINE = 4
EXIT_TIMEOUT = 5
EXIT_ACCESS_DENIED = 6

DBUS = "org.freedesktop.DBus.Error."
ACCESS_DENIED_ERRORS = {
    ERROR_PREFIX + "AccessDenied",
    DBUS + "AccessDenied",
    DBUS + "InteractiveAuthorizationRequired",
}
EXIT_CODES = {
    ERROR_PREFIX + "Busy": EXIT_BUSY,
    ERROR_PREFIX + "NoSuchMachine": EXIT_NO_SUCH_MACHINE,
    ERROR_PREFIX + "Timeout": EXIT_TIMEOUT,
    ERROR_PREFIX + "AccessDenied": EXIT_ACCESS_DENIED,
    ERROR_PREFIX + "DiskAccessDenied": EXIT_ACCESS_DENIED,  # the daemon's words: which rule
    "org.freedesktop.DBus.Error.AccessDenied": EXIT_ACCESS_DENIED,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": EXIT_ACCESS_DENIED,
}
NOT_RUNNING_HINT = "daemon not running: systemctl start supervisord-vm"
SERVICE_HINT = "see `systemctl status supervisord-vm` and `journalctl -u supervisord-vm`"
# Calls wait for their reply without a time limit of their own (sd-bus would give up after
# 25 s): shutdown and destroy may legitimately take longer (the caller chooses the timeout, a
# VM's stop timeout may be up to an hour), so the daemon, not the bus library, decides when a
# call ends. A daemon that dies meanwhile still ends the call: the bus answers NoReply.

# What a refused method would have done, for "permission denied: starting VMs needs ...".
ACTIONS = {
    "Define": "defining VMs",
    "Undefine": "removing VM definitions",
    "Create": "creating VMs",
    "Start": "starting VMs",
    "Shutdown": "shutting VMs down",
    "ShutdownAll": "shutting all VMs down",
    "Destroy": "destroying VMs",
    "Kill": "sending signals to VMs",
    "Reboot": "rebooting VMs",
    "Reset": "resetting VMs",
    "Pause": "pausing VMs",
    "Resume": "resuming VMs",
    "Reload": "reloading definitions",
    "GetLog": "reading a VM's QEMU output",
    "OpenConsole": "attaching to a VM's console",
    "OpenConsoleWithFlags": "attaching to a VM's console",
    "GetConsoleLog": "reading a VM's console output",
}

STATUS_KEYS = (
    "name",
    "state",
    "reason",
    "unit",
    "pid",
    "transient",
    "autostart",
    "restart",
    "stop_timeout",
    "exit_result",
    "exit_status",
    "exit_signal",
    "exit_time",
    "path",
)
_PROPERTY_OF_KEY = {
    "name": "Name",
    "state": "State",
    "reason": "Reason",
    "unit": "Unit",
    "pid": "MainPID",
    "transient": "Transient",
    "autostart": "Autostart",
    "restart": "Restart",
    "stop_timeout": "StopTimeout",
    "exit_result": "ExitResult",
    "exit_status": "ExitStatus",
    "exit_signal": "ExitSignal",
    "exit_time": "ExitTime",
}


class CommandError(Exception):
    """A failure to report as 'svmctl: MESSAGE' with exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def permission_denied(method: str) -> CommandError:
    """The same sentence whether the bus policy or the daemon itself refused the call."""
    action = ACTIONS.get(method, f"calling {method}")
    return CommandError(
        f"permission denied: {action} needs root or membership in group '{ADMIN_GROUP}'",
        EXIT_ACCESS_DENIED,
    )


def translate(name: str, text: str, method: str) -> CommandError:
    """A D-Bus error as a sentence for a person; the daemon's own errors already are one."""
    if name in ACCESS_DENIED_ERRORS:
        return permission_denied(method)
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown", DBUS + "NameHasNoOwner"):
        return CommandError(NOT_RUNNING_HINT)
    if name == "org.freedesktop.systemd1.UnitMasked":
        return CommandError(
            f"{NOT_RUNNING_HINT} (supervisord-vm.service is masked: "
            "systemctl unmask supervisord-vm first)"
        )
    if name == "org.freedesktop.systemd1.NoSuchUnit":
        return CommandError(
            "daemon not running, and supervisord-vm.service is not installed (make install)"
        )
    if name == DBUS + "TimedOut" or name.startswith(DBUS + "Spawn."):
        return CommandError(f"daemon not running and it failed to start on demand; {SERVICE_HINT}")
    if name in (DBUS + "NoReply", DBUS + "Timeout"):
        return CommandError(f"no reply from supervisord-vm to {method}; {SERVICE_HINT}")
    if name == DBUS + "Disconnected":
        return CommandError("lost the connection to the system bus")
    if name == DBUS + "UnknownObject":
        return CommandError("no such VM (it went away meanwhile)", EXIT_NO_SUCH_MACHINE)
    if name in (DBUS + "UnknownMethod", DBUS + "UnknownInterface"):
        return CommandError(
            f"supervisord-vm does not know {method}: is the running daemon older than svmctl? "
            "(systemctl restart supervisord-vm)"
        )
    if name.startswith(ERROR_PREFIX):
        return CommandError(text or name, EXIT_CODES.get(name, EXIT_FAILURE))
    detail = f"{name}: {text}" if name and text else name or text
    return CommandError(f"{method} failed: {detail}", EXIT_CODES.get(name, EXIT_FAILURE))


class Client:
    """Method calls on org.supervisordvm1 through a system bus connection."""

    def __init__(self, bus: Connection) -> None:
        self.bus = bus

    def call(self, path: str, interface: str, method: str, signature: str = "", *args: Any) -> Any:
        try:
            return self.bus.call(BUS_NAME, path, interface, method, signature, *args)
        except BusError as exc:
            raise translate(exc.name, exc.text, method) from None

    def manager(self, method: str, signature: str = "", *args: Any) -> Any:
        return self.call(MANAGER_PATH, MANAGER_INTERFACE, method, signature, *args)

    def subscribe_events(self) -> None:
        try:
            self.bus.add_match(
                f"type='signal',sender='{BUS_NAME}',path='{MANAGER_PATH}',"
                f"interface='{MANAGER_INTERFACE}',member='MachineEvent'"
            )
        except BusError as exc:
            raise translate(exc.name, exc.text, "AddMatch") from None

    def events(self) -> Iterator[tuple[Any, ...]]:
        """MachineEvent signals as they come (after subscribe_events); blocks."""
        try:
            for message in self.bus.signals():
                if message.member == "MachineEvent" and message.interface == MANAGER_INTERFACE:
                    yield tuple(message.body)
        except BusError as exc:
            raise translate(exc.name, exc.text, "GetEvents") from None

    def status(self, name: str) -> dict[str, Any]:
        """One Properties.GetAll on the VM's object, whose path follows from its name."""
        path = machine_path(name)
        try:
            props = self.call(
                path, "org.freedesktop.DBus.Properties", "GetAll", "s", MACHINE_INTERFACE
            )
        except CommandError as exc:
            if exc.code == EXIT_NO_SUCH_MACHINE:  # no object there: the daemon's own words
                raise CommandError(f"no VM named {name!r}", EXIT_NO_SUCH_MACHINE) from None
            raise
        return _status_of(path, props)

    def statuses(self) -> list[dict[str, Any]]:
        """Every VM, by name, from one ObjectManager.GetManagedObjects."""
        objects = self.call(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        found = [
            _status_of(path, interfaces[MACHINE_INTERFACE])
            for path, interfaces in objects.items()
            if MACHINE_INTERFACE in interfaces
        ]
        return sorted(found, key=lambda status: str(status["name"]))


def _status_of(path: str, props: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = {key: props[prop][1] for key, prop in _PROPERTY_OF_KEY.items()}
    status["display"] = props.get("Display", ("s", ""))[1]  # a daemon older than svmctl: none
    status["path"] = path
    return status


# --- output ------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [list(headers), *[[str(c) if c not in ("", None) else "-" for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) + (
        f".{int(timestamp * 1000) % 1000:03d}"
    )


def _event_dict(row: Sequence[Any]) -> dict[str, Any]:
    time_, name, event, state, reason = row
    return {"time": time_, "name": name, "event": event, "state": state, "reason": reason}


def _print_event(row: Sequence[Any], as_json: bool) -> None:
    event = _event_dict(row)
    if as_json:
        print(_json(event), flush=True)
    else:
        reason = f" ({event['reason']})" if event["reason"] else ""
        print(
            f"{_when(event['time'])}  {event['name']}  {event['event']}  {event['state']}{reason}",
            flush=True,
        )


def _resources_of(values: dict[str, Any]) -> dict[str, Any]:
    """Machine.GetResources (systemd's names and units) in the definition's [resources] keys
    and units; None for a limit not set."""

    def get(key: str) -> Any:
        return values[key][1] if key in values else None

    quota = get("CPUQuotaPerSecUSec")
    if quota is not None:
        quota = quota // 10_000 if quota % 10_000 == 0 else quota / 10_000
    return {
        "slice": get("Slice"),
        "control_group": get("ControlGroup"),
        "cpu_weight": get("CPUWeight"),
        "cpu_quota": quota,
        "memory_high": get("MemoryHigh"),
        "memory_max": get("MemoryMax"),
        "io_weight": get("IOWeight"),
        "tasks_max": get("TasksMax"),
        "allowed_cpus": get("AllowedCPUs"),
    }


def _size(size: int | None) -> str:
    """Bytes as systemd writes a limit: 512M, 2G; exact bytes where no unit divides."""
    if size is None:
        return "-"
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def _resource_lines(found: dict[str, Any]) -> list[tuple[str, object]]:
    def shown(value: object) -> object:
        return "-" if value is None else value

    quota = found["cpu_quota"]
    return [
        ("Slice", shown(found["slice"])),
        ("CPU weight", shown(found["cpu_weight"])),
        ("CPU quota", "-" if quota is None else f"{quota}%"),
        ("Memory high", _size(found["memory_high"])),
        ("Memory max", _size(found["memory_max"])),
        ("IO weight", shown(found["io_weight"])),
        ("Tasks max", shown(found["tasks_max"])),
        ("Allowed CPUs", shown(found["allowed_cpus"])),
    ]


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        shown = {key: status[key] for key in STATUS_KEYS}
        if "resources" in status:
            shown["resources"] = status["resources"]
        if "display" in status:
            shown["display"] = status["display"]
        print(_json(shown))
        return
    exit_parts = [status["exit_result"] or ""]
    if status["exit_status"] >= 0:
        exit_parts.append(f"status={status['exit_status']}")
    if status["exit_signal"]:
        from supervisord_vm.signals import signal_name  # noqa: PLC0415 - only status needs it

        exit_parts.append(f"signal={signal_name(status['exit_signal'])}")
    lines = [
        ("Name", status["name"]),
        ("State", status["state"] + (f" ({status['reason']})" if status["reason"] else "")),
        ("Unit", status["unit"] or "-"),
        ("Main PID", status["pid"] or "-"),
        ("Transient", "yes" if status["transient"] else "no"),
        ("Autostart", "yes" if status["autostart"] else "no"),
        ("Restart", status["restart"]),
        ("Stop timeout", f"{status['stop_timeout']}s"),
        ("Last exit", " ".join(p for p in exit_parts if p) or "-"),
        ("Exited at", _when(status["exit_time"])),
    ]
    if status.get("display"):
        lines.append(("Display", status["display"]))
    found = status.get("resources")
    if isinstance(found, dict):
        lines += _resource_lines(found)
    elif "resources_problem" in status:
        lines.append(("Limits", f"unknown ({status['resources_problem']})"))
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.rjust(width)}: {value}")


# --- commands ----------------------------------------------------------------------------------


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    statuses = [s for s in client.statuses() if args.all or s["state"] != "shutoff"]
    if args.json:
        print(_json([{key: s[key] for key in STATUS_KEYS} for s in statuses]))
        return EXIT_OK
    print(
        _table(
            [
                (
                    s["name"],
                    s["state"],
                    s["reason"],
                    s["pid"] or "",
                    s["unit"],
                    "yes" if s["autostart"] else "no",
                )
                for s in statuses
            ],
            ("NAME", "STATE", "REASON", "PID", "UNIT", "AUTOSTART"),
        )
    )
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status(args.name)
    # The limits in force, as systemd reports them now: only a running VM has any.
    status["resources"] = None
    if status["state"] != "shutoff":
        try:
            found = client.call(status["path"], MACHINE_INTERFACE, "GetResources")
        except CommandError as exc:  # the rest of the status is still worth showing
            status["resources_problem"] = str(exc)
        else:
            status["resources"] = _resources_of(found) if found else None
    _print_status(status, args.json)
    return EXIT_OK


def cmd_display(client: Client, args: argparse.Namespace) -> int:
    status = client.status(args.name)
    address = str(status["display"])
    if status["state"] == "shutoff":
        raise CommandError(f"VM {args.name} is not running: it has no display now")
    if not address:
        raise CommandError(
            f'VM {args.name} has no display (display = "none"; or its VNC port could not be '
            f"read: {SERVICE_HINT})"
        )
    if args.json:
        print(_json({"name": args.name, **display_parts(address)}))
        return EXIT_OK
    print(address)
    for line in display_hints(address):
        print(line, file=sys.stderr)
    return EXIT_OK


def display_parts(address: str) -> dict[str, object]:
    """The address and its parts: `socket` for vnc+unix:///PATH, `host` and `port` for
    vnc://HOST:PORT."""
    if address.startswith("vnc+unix://"):
        return {"display": address, "socket": address.removeprefix("vnc+unix://")}
    host, _, port = address.removeprefix("vnc://").rpartition(":")
    return {"display": address, "host": host.strip("[]"), "port": int(port)}


def display_hints(address: str) -> list[str]:
    """How a person connects to `address` (printed on stderr: stdout is the address alone)."""
    parts = display_parts(address)
    if "socket" in parts:
        path = parts["socket"]
        return [
            f"connect with: vncviewer {path}   (TigerVNC; root or group {ADMIN_GROUP})",
            f"          or: remote-viewer {address}",
            f"  from afar: ssh -L 5900:{path} root@THIS-HOST, then vncviewer localhost::5900",
        ]
    where = f"{parts['host']}::{parts['port']}"
    return [
        f"connect with: vncviewer {where}   or: remote-viewer {address}",
        "  (no password: any local user can connect; a unix socket is the default for that)",
    ]


def _read_definition(path: str) -> str:
    """The file's text; at most DEFINITION_MAX_BYTES are read, so /dev/zero cannot hang us."""
    from supervisord_vm.definition import DEFINITION_MAX_BYTES  # noqa: PLC0415 - not for list

    try:
        if path == "-":
            data = sys.stdin.buffer.read(DEFINITION_MAX_BYTES + 1)
        else:
            with open(path, "rb") as stream:  # not pathlib: importing it costs start-up time
                data = stream.read(DEFINITION_MAX_BYTES + 1)
        if len(data) > DEFINITION_MAX_BYTES:
            raise CommandError(
                f"cannot read {path}: too large for a definition "
                f"(more than {DEFINITION_MAX_BYTES} bytes)"
            )
        return data.decode("utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None


def _report(client: Client, args: argparse.Namespace, name: str, verb: str) -> int:
    """After a changing command: the VM's status as JSON, or one line for a person."""
    if args.json:
        try:
            print(_json({k: v for k, v in (client.status(name)).items()}))
        except CommandError:
            print(_json({"name": name, "result": verb}))
    else:
        print(f"{name}: {verb}")
    return EXIT_OK


def _name_of(client: Client, path: str) -> str:
    """The Name property of a machine object (Define and Create answer with its path)."""
    reply = client.call(
        path, "org.freedesktop.DBus.Properties", "Get", "ss", MACHINE_INTERFACE, "Name"
    )
    return str(reply[1])


def cmd_define(client: Client, args: argparse.Namespace) -> int:
    path = client.manager("Define", "s", _read_definition(args.file))
    name = _name_of(client, path)
    if not args.json:
        # libvirt semantics: a running VM keeps its configuration until it starts again.
        try:
            state = (client.status(name))["state"]
        except CommandError:
            state = "shutoff"
        if state != "shutoff":
            print(f"{name}: defined (it is {state}; the new definition applies at its next start)")
            return EXIT_OK
    return _report(client, args, name, "defined")


def cmd_create(client: Client, args: argparse.Namespace) -> int:
    path = client.manager("Create", "s", _read_definition(args.file))
    return _report(client, args, _name_of(client, path), "created and started")


def cmd_undefine(client: Client, args: argparse.Namespace) -> int:
    client.manager("Undefine", "s", args.name)
    if args.json:
        print(_json({"name": args.name, "result": "undefined"}))
    else:
        print(f"{args.name}: undefined")
    return EXIT_OK


def _simple(method: str, verb: str) -> Callable[[Client, argparse.Namespace], int]:
    def command(client: Client, args: argparse.Namespace) -> int:
        client.manager(method, "s", args.name)
        return _report(client, args, args.name, verb)

    return command


_START = _simple("Start", "started")


def cmd_shutdown(client: Client, args: argparse.Namespace) -> int:
    client.manager("Shutdown", "sdb", args.name, args.timeout or 0.0, args.then_destroy)
    return _report(client, args, args.name, "shut down")


def cmd_destroy(client: Client, args: argparse.Namespace) -> int:
    mode = "graceful" if args.graceful else "force" if args.force else "default"
    client.manager("Destroy", "ssd", args.name, mode, args.timeout or 0.0)
    return _report(client, args, args.name, "destroyed")


def cmd_kill(client: Client, args: argparse.Namespace) -> int:
    client.manager("Kill", "ss", args.name, args.signal)
    return _report(client, args, args.name, f"sent {args.signal}")


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    added, removed, changed, errors = client.manager("Reload")
    if args.json:
        print(_json({"added": added, "removed": removed, "changed": changed, "errors": errors}))
    else:
        for label, names in (("added", added), ("removed", removed), ("changed", changed)):
            print(f"{label}: {', '.join(names) if names else '-'}")
        for problem in errors:
            print(f"error: {problem}")
    return EXIT_FAILURE if errors else EXIT_OK


def cmd_shutdown_all(client: Client, args: argparse.Namespace) -> int:
    results = client.manager("ShutdownAll", "du", args.timeout or 0.0, args.parallel)
    if args.json:
        print(_json({name: outcome for name, outcome in results}))
    else:
        for name, outcome in results:
            print(f"{name}: {outcome}")
    return EXIT_FAILURE if any(o.startswith("error") for _, o in results) else EXIT_OK


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    if args.follow:  # subscribed before the history is read, so nothing falls in between
        client.subscribe_events()
    history = client.manager("GetEvents", "s", args.name or "")
    seen = set()
    for row in history:
        seen.add(tuple(row))
        _print_event(row, args.json)
    if args.follow:
        for row in client.events():
            if row in seen or (args.name and row[1] != args.name):
                continue
            _print_event(row, args.json)
    return EXIT_OK


def cmd_log(client: Client, args: argparse.Namespace) -> int:
    text = client.manager("GetLog", "su", args.name, args.lines)
    if args.json:
        print(_json({"name": args.name, "log": text}))
    elif text:
        sys.stdout.write(text)
    else:
        print(
            f"svmctl: no QEMU output recorded for {args.name} (it has not run yet)", file=sys.stderr
        )
    return EXIT_OK


CONSOLE_ESCAPE = b"\x1d"  # Ctrl-], as in virsh console, telnet and systemd-nspawn
CONSOLE_FORCE = 1  # OpenConsoleWithFlags: take the console over from the client attached now
# Typed input not yet taken by the daemon (a guest that does not read its serial port): from a
# terminal, more is dropped (Ctrl-] must still be seen); from a pipe, reading waits instead.
CONSOLE_INPUT_LIMIT = 64 * 1024


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    if args.log and args.force:
        raise CommandError("--force applies to attaching, not to --log", EXIT_USAGE)
    if args.lines and not args.log:
        raise CommandError("--lines applies to --log only", EXIT_USAGE)
    if args.log:
        data = client.manager("GetConsoleLog", "su", args.name, args.lines)
        if args.json:
            print(_json({"name": args.name, "log": data.decode("utf-8", "replace")}))
        elif data:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            print(f"svmctl: no console output recorded for {args.name}", file=sys.stderr)
        return EXIT_OK
    if args.json:
        raise CommandError("--json applies to console --log only", EXIT_USAGE)
    if not client.bus.unix_fds:
        raise CommandError("the system bus does not pass file descriptors: cannot attach")
    if args.force:
        fd = client.manager("OpenConsoleWithFlags", "st", args.name, CONSOLE_FORCE)
    else:
        fd = client.manager("OpenConsole", "s", args.name)
    client.bus.close()  # the console is the descriptor now
    return console_session(fd, args.name)


def console_session(fd: int, name: str, stdin: int = 0, stdout: int = 1) -> int:
    """Relay between the terminal and the console socket `fd` (closed on return) until Ctrl-]
    or the end of standard input (detach) or of the console (the VM stopped, or another client
    took it over). A terminal is put in raw mode, so every key (Ctrl-C too) goes to the guest,
    and restored on every way out, signals included."""
    import signal  # noqa: PLC0415 - start-up time: only the console needs these
    import termios  # noqa: PLC0415

    def ended_by_signal(signum: int, _frame: object) -> None:
        raise _ConsoleSignal(signum)

    saved = None
    previous = {
        signum: signal.signal(signum, ended_by_signal)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    }
    try:
        try:
            saved = termios.tcgetattr(stdin)
        except termios.error:
            saved = None  # not a terminal: a pipe or a file
        print(f"Connected to {name}; escape character is ^]", file=sys.stderr, flush=True)
        if saved is not None:
            import tty  # noqa: PLC0415

            tty.setraw(stdin, termios.TCSANOW)
        try:
            closed = _relay(fd, stdin, stdout, from_terminal=saved is not None)
        except _ConsoleSignal as ended:
            closed, code = False, 128 + ended.signum
        else:
            code = EXIT_OK
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        import os  # noqa: PLC0415 - loaded already (by wire); named here for the close

        os.close(fd)
    if closed:
        print(f"\nsvmctl: the console of {name} was closed", file=sys.stderr)
    elif saved is not None:
        print(f"\nDisconnected from {name}", file=sys.stderr)
    return code


class _ConsoleSignal(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _relay(sock: int, stdin: int, stdout: int, *, from_terminal: bool) -> bool:
    """Copy until detached (False) or the console's end (True)."""
    import os  # noqa: PLC0415 - loaded already (by wire)
    import select  # noqa: PLC0415 - a built-in module

    os.set_blocking(sock, False)
    pending = bytearray()  # typed, not yet taken by the daemon
    poller = select.poll()
    stdin_polled = False
    while True:
        poller.register(sock, select.POLLIN | (select.POLLOUT if pending else 0))
        want_input = from_terminal or len(pending) < CONSOLE_INPUT_LIMIT
        if want_input != stdin_polled:
            if want_input:
                poller.register(stdin, select.POLLIN)
            else:
                poller.unregister(stdin)
            stdin_polled = want_input
        for fd, events in poller.poll():
            if fd == sock:
                if events & select.POLLOUT and pending:
                    with contextlib.suppress(BlockingIOError):
                        del pending[: os.write(sock, pending)]
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = os.read(sock, 65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        return True
                    _write_all(stdout, data)
                continue
            data = os.read(stdin, 4096)
            escape = data.find(CONSOLE_ESCAPE)
            if escape >= 0 or not data:
                pending += data[:escape]
                # What was typed before the escape goes too, as far as the socket takes it now.
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    os.write(sock, pending)
                return False
            if from_terminal:  # beyond the limit, typing into a guest that does not read is lost
                data = data[: max(CONSOLE_INPUT_LIMIT - len(pending), 0)]
            pending += data


def _write_all(fd: int, data: bytes) -> None:
    import os  # noqa: PLC0415 - loaded already (by wire)

    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- argument parsing --------------------------------------------------------------------------


def _usage_error(message: str) -> Exception:
    """A bad option value, as argparse reports it (exit 2); argparse is loaded by then."""
    import argparse  # noqa: PLC0415 - start-up time: see _plain_command

    return argparse.ArgumentTypeError(message)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _usage_error(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= TIMEOUT_MAX:  # also NaN and inf
        raise _usage_error(f"must be from 0 to {TIMEOUT_MAX:.0f} seconds, not {text!r}")
    return value


def _positive(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise _usage_error("must be more than 0 seconds")
    return value


def _non_negative(text: str) -> float:
    return _seconds(text)


def _count(text: str, what: str) -> int:
    """A whole number from 0 to 2**32-1 (the D-Bus argument is an unsigned 32-bit count)."""
    try:
        value = int(text)
    except ValueError:
        raise _usage_error(f"not a number of {what}: {text!r}") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise _usage_error(f"must be from 0 to {0xFFFFFFFF} {what}, not {text!r}")
    return value


def _line_count(text: str) -> int:
    return _count(text, "lines")


def _signal(text: str) -> str:
    """Checked here for exit code 2; sent as typed, the daemon parses it the same way
    (bus.parse_signal: the same function, the same message)."""
    from supervisord_vm.signals import signal_number  # noqa: PLC0415 - only kill needs it

    try:
        signal_number(text)
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    return text


def _parallel(text: str) -> int:
    return _count(text, "VMs at once (0: all)")


def _skip_missing_translations() -> None:
    """Let argparse skip its message-catalogue look-ups when there is no catalogue.

    argparse passes every text it builds through gettext, which searches the locale
    directories afresh each time: 54 searches (hundreds of stat calls, about 9 ms, half of
    svmctl's own start-up) to build this parser, all finding nothing on a host without a
    catalogue for the current text domain. Searched once here: if there is none, gettext
    would return every text unchanged, so argparse may as well use them as they are.
    """
    import argparse  # noqa: PLC0415 - start-up time: see _plain_command
    import gettext  # noqa: PLC0415 - argparse has imported it already

    if gettext.find(gettext.textdomain()) is None:
        namespace = vars(argparse)
        namespace["_"] = lambda message: message
        namespace["ngettext"] = lambda singular, plural, n: singular if n == 1 else plural


def build_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 - start-up time: see _plain_command

    _skip_missing_translations()
    parser = argparse.ArgumentParser(
        prog="svmctl",
        description="Control QEMU VMs supervised by supervisord-vm (over D-Bus).",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 busy, 4 no such VM, 5 timed out, "
        "6 permission denied.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Any, *, needs_name: bool = True) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print JSON instead of tables",
        )
        if needs_name:
            p.add_argument("name", metavar="NAME", help="the VM's name")
        p.set_defaults(handler=handler)
        return p

    p = command(
        "list", "List VMs (running ones; --all for every defined VM).", cmd_list, needs_name=False
    )
    p.add_argument("--all", action="store_true", help="include shut-off VMs")
    command(
        "status",
        "Show one VM's state, reason, unit, PID and settings; while it runs, the resource "
        "limits in force as systemd reports them.",
        cmd_status,
    )
    p = command(
        "define",
        "Store a definition file (TOML) in the definitions directory.",
        cmd_define,
        needs_name=False,
    )
    p.add_argument("file", metavar="FILE", help="definition file, or - for standard input")
    command("undefine", "Remove a VM's definition (the VM must be shut off).", cmd_undefine)
    p = command(
        "create",
        "Start a transient VM from a definition file; forgotten when it stops.",
        cmd_create,
        needs_name=False,
    )
    p.add_argument("file", metavar="FILE", help="definition file, or - for standard input")
    command("start", "Start a defined VM.", _START)
    p = command(
        "shutdown", "Press the ACPI power button and wait until the guest is off.", cmd_shutdown
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        help="give up after S seconds (exit 5, VM still running)",
    )
    p.add_argument(
        "--then-destroy",
        action="store_true",
        help="destroy the VM if it is still running after the timeout",
    )
    p = command(
        "destroy",
        "Stop a VM now: SIGTERM, SIGKILL after its stop timeout (like systemctl stop).",
        cmd_destroy,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--graceful",
        action="store_true",
        help="SIGTERM only; exit 3 (busy) if QEMU is still running after the timeout",
    )
    mode.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        help="how long to wait (default: the VM's stop timeout)",
    )
    p = command("kill", "Send a signal to every process of the VM's scope.", cmd_kill)
    p.add_argument(
        "--signal",
        "-s",
        default="SIGTERM",
        type=_signal,
        metavar="SIG",
        help="signal name or number (default SIGTERM)",
    )
    command("reboot", "Reboot the guest (ACPI where possible).", _simple("Reboot", "rebooting"))
    command("reset", "Hard-reset the VM (like the reset button).", _simple("Reset", "reset"))
    command("pause", "Pause the VM's CPUs.", _simple("Pause", "paused"))
    command("resume", "Resume a paused VM.", _simple("Resume", "resumed"))
    p = command(
        "events",
        "Show recent lifecycle events; --follow to keep printing new ones.",
        cmd_events,
        needs_name=False,
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="only this VM's events")
    p.add_argument(
        "--follow", "-f", action="store_true", help="keep printing events as they happen"
    )
    p = command(
        "console",
        "Attach to a VM's serial console (Ctrl-] detaches); --log prints its recent output.",
        cmd_console,
    )
    p.add_argument(
        "--log",
        action="store_true",
        help="print the console's recent output and exit (also of a VM that has stopped)",
    )
    p.add_argument(
        "--lines",
        "-n",
        type=_line_count,
        default=0,
        metavar="N",
        help="with --log: only the last N lines (default: all that is kept)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="take the console over from the client attached now (it is disconnected)",
    )
    command(
        "display",
        "Print where a running VM's display (VNC) listens: vnc+unix:///PATH or "
        "vnc://HOST:PORT, with how to connect on stderr.",
        cmd_display,
    )
    p = command(
        "log",
        "Show QEMU's own output for a VM, from the journal (`journalctl -u svm-NAME.scope` "
        "shows it with the VM's lifecycle entries).",
        cmd_log,
    )
    p.add_argument(
        "--lines",
        "-n",
        type=_line_count,
        default=0,
        metavar="N",
        help="only the last N lines (default: all that is kept, at most 5000 from the journal)",
    )
    command(
        "reload",
        "Re-read the definitions directory and report what changed.",
        cmd_reload,
        needs_name=False,
    )
    p = command(
        "shutdown-all",
        "Shut every running VM down in parallel, destroying those that "
        "do not power off in time (host shutdown).",
        cmd_shutdown_all,
        needs_name=False,
    )
    p.add_argument(
        "--timeout",
        type=_non_negative,
        metavar="S",
        help="seconds each VM gets to power off (0 or unset: its stop timeout)",
    )
    p.add_argument(
        "--parallel",
        type=_parallel,
        default=0,
        metavar="N",
        help="at most N VMs at a time (default 0: all at once)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        bus = Connection()
    except (OSError, BusError) as exc:
        reason = exc.text if isinstance(exc, BusError) else exc.strerror or str(exc)
        raise CommandError(
            f"cannot connect to the system bus (is dbus running?): {reason}"
        ) from None
    with bus:
        result: int = args.handler(Client(bus), args)
        return result


def _fail(message: str, code: int) -> NoReturn:
    print(f"svmctl: {message}", file=sys.stderr)
    sys.exit(code)


def _plain_command(argv: list[str]) -> argparse.Namespace | None:
    """The plain forms scripts run most — `list [--all]`, `status NAME`, `start NAME`, with
    `--json` anywhere — parsed without argparse, whose import (with re and enum) is a third of
    svmctl's own start-up. Anything else (help, options, mistakes) goes to argparse, so every
    message and exit code stays argparse's."""
    words = [word for word in argv if word != "--json"]
    if not words or any(word.startswith("-") for word in words[1:] if word != "--all"):
        return None
    command, rest = words[0], words[1:]
    as_json = len(words) != len(argv)
    args: Any = None
    if command == "list" and rest in ([], ["--all"]):
        args = SimpleNamespace(command=command, json=as_json, all=bool(rest), handler=cmd_list)
    elif command in ("status", "start") and len(rest) == 1 and not rest[0].startswith("-"):
        handler = cmd_status if command == "status" else _START
        args = SimpleNamespace(command=command, json=as_json, name=rest[0], handler=handler)
    return args  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = _plain_command(words) or build_parser().parse_args(words)
    try:
        return _run(args)
    except CommandError as exc:
        _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # a bug of ours; still no traceback for the user
        _fail(f"unexpected error ({type(exc).__name__}: {exc}); please report it", EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
