"""The core's exception types.

The core raises only these; the edges (D-Bus adapter, svmctl) translate each one exactly once
into an error name or an exit code. Messages are written for a person.
"""


class SvmError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidDefinition(SvmError):
    """A definition (file, TOML text or field) is not acceptable; the message names the field."""


class NoSuchMachine(SvmError):
    """No VM of that name is defined or running."""


class MachineExists(SvmError):
    """A VM of that name already exists where a new one was asked for."""


class AlreadyRunning(SvmError):
    """The VM is already running (or starting)."""


class NotRunning(SvmError):
    """The operation needs a running VM and this one is shut off."""


class InvalidState(SvmError):
    """The VM's current state does not allow the operation (e.g. pause while stopping)."""


class Busy(SvmError):
    """A graceful destroy sent SIGTERM and QEMU is still running; nothing was escalated."""


class OperationTimeout(SvmError):
    """The operation did not finish within its timeout; the VM is left as it was."""


class DiskAccessDenied(SvmError):
    """A definition names a disk its author may not use (not root, outside the image
    directories, and the author cannot open the file themselves); nothing of it was opened."""


class StartFailed(SvmError):
    """QEMU could not be started; nothing was left behind. The message names the cause."""


class SystemdError(SvmError):
    """A systemd manager call failed."""


class NoSuchUnit(SystemdError):
    """The unit is not loaded."""


class UnitExists(SystemdError):
    """A unit of that name is still loaded, so a transient unit cannot take the name."""


class ProcessGone(SystemdError):
    """The process to put into a scope no longer exists (systemd: UnixProcessIdUnknown)."""


class QmpError(SvmError):
    """QEMU's monitor refused a command or the connection to it failed."""


class QmpDisconnected(QmpError):
    """The QMP connection ended (QEMU exited or closed the socket)."""


class QmpTimeout(QmpError):
    """QEMU did not answer a QMP command in time (its main loop is stopped or stuck)."""
