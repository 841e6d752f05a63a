"""Holds a freshly forked child until its scope exists, then becomes the real program.

Run as ``python3 -I -S _spawn_trampoline.py FD ARGV...`` by ``systemd.spawn_in_scope``. FD is
one end of a socket pair whose other end the parent keeps. The child blocks reading one byte:
``g`` means "you are in your scope now, exec"; end-of-file means the parent gave up or died, and
the child exits without ever running ARGV. After a successful exec the socket is closed (it is
close-on-exec by then), which tells the parent the program is running; if exec fails, the errno
is written back instead. Only the standard library's built-in modules are used, so ``-I -S``
(no site, no user paths) keeps startup short and independent of the environment.
"""

# The built-in module, not `signal`: that one imports enum and costs ~5 ms of startup.
import _signal  # type: ignore[import-not-found]
import os
import sys

GO = b"g"
EXIT_ABANDONED = 125  # the parent closed the socket: never exec'd
EXIT_EXEC_FAILED = 127


def main() -> None:
    control_fd = int(sys.argv[1])
    argv = sys.argv[2:]
    if os.read(control_fd, 1) != GO:
        os._exit(EXIT_ABANDONED)
    # The interpreter ignores these at startup; an exec'd program would inherit "ignored".
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    os.set_inheritable(control_fd, False)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(control_fd, str(exc.errno or 0).encode())
        os._exit(EXIT_EXEC_FAILED)


if __name__ == "__main__":
    main()
