"""Holds a freshly forked child until its scope exists, drops root, then becomes the real program.

Run as ``python3 -I -S _spawn_trampoline.py FD CREDS ARGV...`` by ``systemd.spawn_in_scope``. FD
is one end of a socket pair whose other end the parent keeps. The child blocks reading one byte:
``g`` means "you are in your scope now, exec"; end-of-file means the parent gave up or died, and
the child exits without ever running ARGV. After a successful exec the socket is closed (it is
close-on-exec by then), which tells the parent the program is running; if anything fails, a
report is written back instead: the errno of a failed exec as digits, or ``P`` and a message when
privileges could not be dropped (then ARGV never runs). FD ``-`` means: no parent to wait for
(a short probe of a QEMU binary), exec at once; failures then go to stderr.

CREDS is ``-`` (run ARGV as we are: the host opted out of confinement) or
``UID:GID:GROUPS:UMASK`` (GROUPS comma-separated, UMASK octal): before the exec the child sets
no_new_privs, empties the capability bounding, ambient and inheritable sets, takes the
supplementary groups, GID and UID (real, effective and saved), and the umask. Whatever program
ARGV names therefore never runs as root and can never regain a capability (setuid binaries and
file capabilities included). This happens here, after the scope holds the child, so systemd
moves a process the daemon still fully owns.

Only the standard library's built-in modules, ``_ctypes`` (for prctl and capset, which
``os`` lacks; ``ctypes`` itself costs ~10 ms of imports) and ``_socket`` (the journal streams
asked for by SVM_JOURNAL_STREAM) are used, so ``-I -S`` (no site, no user
paths) keeps startup short and independent of the environment.
"""

# The built-in module, not `signal`: that one imports enum and costs ~5 ms of startup.
import _signal  # type: ignore[import-not-found]
import os
import sys

GO = b"g"
PRIVILEGE_FAILURE = b"P"
EXIT_ABANDONED = 125  # the parent closed the socket: never exec'd
EXIT_PRIVILEGES = 126  # privileges could not be dropped: never exec'd
EXIT_EXEC_FAILED = 127
NO_CONTROL = "-"
UNCONFINED = "-"
# Set to an identifier (qemu-NAME): ARGV's stdout and stderr become journald streams under it,
# connected from here, inside the scope (see connect_journal_streams). Not passed on to ARGV.
JOURNAL_STREAM_ENV = "SVM_JOURNAL_STREAM"
# The scope's name, for the streams' header: journald's fallback for lines it reads only after
# ARGV exited (a dead process has no cgroup to look up), such as a failed start's last words.
JOURNAL_UNIT_ENV = "SVM_JOURNAL_UNIT"
JOURNAL_STREAM_SOCKET = "/run/systemd/journal/stdout"
JOURNAL_CONNECT_TIMEOUT = 5.0  # seconds; then that fd stays the parent's
# machinectl poweroff sends this to the leader (for a container's init: "power off"). QEMU has
# no handler, so by default it would die at once, like a pulled plug: it ignores it instead.
MACHINED_POWEROFF_SIGNAL = _signal.SIGRTMIN + 4

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """A step of dropping privileges failed; the message names it, for a person."""


def encode_credentials(uid: int, gid: int, groups: tuple[int, ...], umask: int) -> str:
    """CREDS for the command line (the daemon's side of the format parsed below)."""
    return f"{uid}:{gid}:{','.join(str(g) for g in groups)}:{umask:o}"


class _Libc:
    """prctl and capset through _ctypes; a failed call raises PrivilegeError with its errno."""

    def __init__(self) -> None:
        import _ctypes  # noqa: PLC0415 - only when confining

        class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "i"

        class CULong(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "L"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        handle = _ctypes.dlopen(None)  # type: ignore[arg-type]  # the program itself, with libc
        self._ctypes = _ctypes
        self._ulong = CULong
        self._prctl = Function(_ctypes.dlsym(handle, "prctl"))
        self._capset = Function(_ctypes.dlsym(handle, "capset"))

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            raise PrivilegeError(f"{what}: {os.strerror(self._ctypes.get_errno())}")
        return result

    def prctl(self, option: int, arg: int = 0, what: str = "prctl") -> int:
        ulong = self._ulong
        return self._check(self._prctl(option, ulong(arg), ulong(0), ulong(0), ulong(0)), what)

    def clear_capability_sets(self) -> None:
        """capset(2) with all-zero effective, permitted and inheritable sets (both words)."""
        header = _LINUX_CAPABILITY_VERSION_3.to_bytes(4, sys.byteorder) + bytes(4)  # pid 0: self
        self._check(self._capset(header, bytes(24)), "capset")


def drop_privileges(creds: str) -> None:
    """Become CREDS for good; raises PrivilegeError naming the step that failed."""
    uid_text, gid_text, groups_text, umask_text = creds.split(":")
    uid, gid = int(uid_text), int(gid_text)
    groups = [int(g) for g in groups_text.split(",") if g]
    libc = _Libc()
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")
    with open("/proc/sys/kernel/cap_last_cap", "rb") as file:
        last_cap = int(file.read())
    for cap in range(last_cap + 1):
        if libc.prctl(_PR_CAPBSET_READ, cap):
            libc.prctl(_PR_CAPBSET_DROP, cap, what=f"dropping capability {cap} (needs CAP_SETPCAP)")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="clearing ambient capabilities")
    try:
        os.setgroups(groups)
        os.setgid(gid)  # as root: real, effective and saved
        os.setuid(uid)  # as root: real, effective and saved; clears permitted and effective caps
    except OSError as exc:
        raise PrivilegeError(f"changing to uid {uid}, gid {gid}: {exc.strerror}") from None
    libc.clear_capability_sets()  # the inheritable set, which setuid leaves
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(f"the credentials did not change to uid {uid}, gid {gid}")
    os.umask(int(umask_text, 8))


def connect_journal_streams(identifier: str, unit: str = "") -> None:
    """Make fds 1 (priority info) and 2 (warning) streams to journald named IDENTIFIER.

    Connected here, in the scope, as the user ARGV runs as: journald takes the peer's PID,
    credentials and cgroup at connect time, so every line carries _SYSTEMD_UNIT=the scope and
    the truthful _UID. No level prefixes: output (a guest's, too) cannot choose its priority.
    An fd whose stream cannot be opened stays what the parent gave (its fallback).
    """
    import _socket  # noqa: PLC0415 - only when asked; socket.py would cost ~5 ms

    for fd, priority in ((1, 6), (2, 4)):
        stream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            stream.settimeout(JOURNAL_CONNECT_TIMEOUT)  # a wedged journald delays, never stalls
            stream.connect(JOURNAL_STREAM_SOCKET)
            stream.shutdown(_socket.SHUT_RD)
            # identifier, unit, priority, level prefix, to syslog, to kmsg, to console
            stream.sendall(f"{identifier}\n{unit}\n{priority}\n0\n0\n0\n0\n".encode())
            stream.settimeout(None)  # blocking again: O_NONBLOCK would go to ARGV with the fd
            os.dup2(stream.fileno(), fd)  # the copy is inheritable
        except OSError:
            pass
        finally:
            stream.close()


def main() -> None:
    control = sys.argv[1]
    creds = sys.argv[2]
    argv = sys.argv[3:]
    journal_identifier = os.environ.pop(JOURNAL_STREAM_ENV, "")
    journal_unit = os.environ.pop(JOURNAL_UNIT_ENV, "")
    control_fd = -1 if control == NO_CONTROL else int(control)
    if control_fd >= 0 and os.read(control_fd, 1) != GO:
        os._exit(EXIT_ABANDONED)
    # The interpreter ignores these at startup; an exec'd program would inherit "ignored".
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    _signal.signal(MACHINED_POWEROFF_SIGNAL, _signal.SIG_IGN)  # inherited through the exec
    if creds != UNCONFINED:
        try:
            drop_privileges(creds)
        except (PrivilegeError, OSError, ValueError) as exc:
            message = f"cannot drop privileges before starting {argv[0]}: {exc}"
            if control_fd >= 0:
                os.write(control_fd, PRIVILEGE_FAILURE + message.encode())
            else:
                os.write(2, message.encode() + b"\n")
            os._exit(EXIT_PRIVILEGES)
    if control_fd >= 0:
        os.set_inheritable(control_fd, False)
    if journal_identifier:
        connect_journal_streams(journal_identifier, journal_unit)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        if control_fd >= 0:
            os.write(control_fd, str(exc.errno or 0).encode())
        else:
            os.write(2, f"cannot execute {argv[0]}: {exc.strerror}\n".encode())
        os._exit(EXIT_EXEC_FAILED)


if __name__ == "__main__":
    main()
