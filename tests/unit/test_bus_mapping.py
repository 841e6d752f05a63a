"""The D-Bus edge's pure parts: error names, object paths, argument parsing, exit codes."""

from __future__ import annotations

import signal

import pytest
from sdbus import DbusFailedError, decode_object_path

from supervisord_vm import bus, errors
from supervisord_vm.cli import ACTIONS, EXIT_CODES, build_parser, translate
from supervisord_vm.model import DestroyMode

CORE_ERRORS = [
    (errors.NoSuchMachine, "NoSuchMachine"),
    (errors.MachineExists, "MachineExists"),
    (errors.AlreadyRunning, "AlreadyRunning"),
    (errors.NotRunning, "NotRunning"),
    (errors.InvalidState, "InvalidState"),
    (errors.Busy, "Busy"),
    (errors.OperationTimeout, "Timeout"),
    (errors.InvalidDefinition, "InvalidDefinition"),
    (errors.StartFailed, "StartFailed"),
    (errors.SystemdError, "SystemdError"),
    (errors.NoSuchUnit, "SystemdError"),
    (errors.UnitExists, "SystemdError"),
    (errors.ProcessGone, "SystemdError"),
    (errors.QmpError, "QmpError"),
    (errors.QmpDisconnected, "QmpError"),
    (errors.SvmError, "Failed"),
]


@pytest.mark.parametrize(("core", "suffix"), CORE_ERRORS)
def test_each_core_error_has_its_own_name_and_keeps_the_message(
    core: type[Exception], suffix: str
) -> None:
    mapped = bus.to_bus_error(core("the message for a person"))
    assert isinstance(mapped, DbusFailedError)
    assert mapped.dbus_error_name == f"org.supervisordvm1.Error.{suffix}"
    assert str(mapped) == "the message for a person"


def test_unexpected_exceptions_become_failed_not_python_errors() -> None:
    for exc in (KeyError("x"), RuntimeError("boom"), ValueError(), OSError(5, "I/O error")):
        mapped = bus.to_bus_error(exc)
        assert mapped.dbus_error_name == "org.supervisordvm1.Error.Failed"
        assert str(mapped)


@pytest.mark.parametrize("name", ["web1", "a", "x.y_z-1", "A" * 64, "0start", "a-b.c_d"])
def test_object_paths_round_trip(name: str) -> None:
    path = bus.machine_path(name)
    assert path.startswith("/org/supervisordvm1/machine/")
    assert decode_object_path(bus.MACHINE_PATH_PREFIX, path) == name


def test_signal_and_mode_and_timeout_parsing() -> None:
    assert bus.parse_signal("15") == signal.SIGTERM
    assert bus.parse_signal("TERM") == signal.SIGTERM
    assert bus.parse_signal("sigkill") == signal.SIGKILL
    for bad in ("NOPE", "999", "", "-1"):
        with pytest.raises(bus.InvalidArgumentError):
            bus.parse_signal(bad)
    assert bus.parse_mode("") == DestroyMode.DEFAULT
    assert bus.parse_mode("graceful") == DestroyMode.GRACEFUL
    with pytest.raises(bus.InvalidArgumentError):
        bus.parse_mode("gentle")
    assert bus.parse_timeout(0, "timeout") is None
    assert bus.parse_timeout(2.5, "timeout") == 2.5
    for bad_timeout in (-1.0, float("nan")):
        with pytest.raises(bus.InvalidArgumentError):
            bus.parse_timeout(bad_timeout, "timeout")


def test_exit_codes_follow_the_design() -> None:
    prefix = "org.supervisordvm1.Error."
    assert EXIT_CODES[prefix + "Busy"] == 3
    assert EXIT_CODES[prefix + "NoSuchMachine"] == 4
    assert EXIT_CODES[prefix + "Timeout"] == 5
    assert EXIT_CODES[prefix + "AccessDenied"] == 6
    assert EXIT_CODES["org.freedesktop.DBus.Error.AccessDenied"] == 6


def test_usage_errors_exit_2() -> None:
    parser = build_parser()
    for argv in (["start"], ["destroy", "x", "--graceful", "--force"], ["bogus"], []):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
    args = parser.parse_args(["destroy", "vm1", "--graceful", "--timeout", "3"])
    assert args.graceful and args.timeout == 3.0 and args.json is False
    assert parser.parse_args(["--json", "list"]).json is True
    assert parser.parse_args(["list", "--json"]).json is True


POLICY_REJECTION = (
    'Rejected send message, 2 matched rules; type="method_call", sender=":1.7" (uid=1001 '
    'pid=152 comm="svmctl") interface="org.supervisordvm1.Manager" member="Start" error '
    'name="(unset)" requested_reply="0" destination="org.supervisordvm1"'
)


@pytest.mark.parametrize(
    "name",
    [
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.supervisordvm1.Error.AccessDenied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    ],
)
def test_permission_errors_read_as_a_sentence(name: str) -> None:
    """Whoever refused (bus policy or daemon), the user reads what needs which rights."""
    error = translate(name, POLICY_REJECTION, "Start")
    assert error.code == 6
    assert str(error) == (
        "permission denied: starting VMs needs root or membership in group 'supervisord-vm'"
    )
    for method in ACTIONS:
        assert "Rejected" not in str(translate(name, POLICY_REJECTION, method))


def test_bus_errors_read_as_sentences() -> None:
    cases = {
        "org.freedesktop.DBus.Error.ServiceUnknown": "daemon not running: systemctl start",
        "org.freedesktop.DBus.Error.NameHasNoOwner": "daemon not running: systemctl start",
        "org.freedesktop.systemd1.UnitMasked": "systemctl unmask supervisord-vm",
        "org.freedesktop.systemd1.NoSuchUnit": "not installed",
        "org.freedesktop.DBus.Error.TimedOut": "failed to start on demand",
        "org.freedesktop.DBus.Error.Spawn.ChildExited": "failed to start on demand",
        "org.freedesktop.DBus.Error.NoReply": "no reply from supervisord-vm to Destroy",
        "org.freedesktop.DBus.Error.UnknownMethod": "does not know Destroy",
    }
    for name, expected in cases.items():
        error = translate(name, "raw library text", "Destroy")
        assert expected in str(error), name
        assert "raw library text" not in str(error), name
        assert error.code == 1
    daemon = translate("org.supervisordvm1.Error.Busy", "web1: still running after 3 s", "Destroy")
    assert (str(daemon), daemon.code) == ("web1: still running after 3 s", 3)
    gone = translate("org.freedesktop.DBus.Error.UnknownObject", "raw", "GetAll")
    assert gone.code == 4
    other = translate("org.example.Error.Odd", "odd text", "Reboot")
    assert str(other) == "Reboot failed: org.example.Error.Odd: odd text"
