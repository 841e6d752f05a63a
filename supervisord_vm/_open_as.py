"""Opens files with a caller's own rights and hands the descriptors back (disk_access.py).

Run as ``python3 -I -S _open_as.py FD MODE PATH [MODE PATH ...]`` by ``disk_access.open_as``,
already switched to the caller's uid, gid and supplementary groups (and so without any
capability): the kernel's own permission check on open(2) decides, at the moment of the open,
with symlinks resolved as the caller would resolve them. MODE is ``r`` (read-only) or ``w``
(read and write). For each PATH one SOCK_SEQPACKET message goes back on FD: ``+`` with the open
descriptor (SCM_RIGHTS), or ``-ERRNO`` when the open failed, or ``!`` when the file is neither a
regular file nor a block device (nothing else is a disk; a FIFO would otherwise block QEMU).
O_NONBLOCK makes the open of a FIFO return at once instead of waiting for a writer.
"""

import _socket
import os
import stat
import sys


def main() -> None:
    channel = _socket.socket(fileno=int(sys.argv[1]))
    pairs = sys.argv[2:]
    flags = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    for index in range(0, len(pairs) - 1, 2):
        mode, path = pairs[index], pairs[index + 1]
        try:
            fd = os.open(path, flags | (os.O_RDWR if mode == "w" else os.O_RDONLY))
        except OSError as exc:
            channel.sendmsg([f"-{exc.errno or 0}".encode()])
            continue
        kind = os.fstat(fd).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISBLK(kind)):
            os.close(fd)
            channel.sendmsg([b"!"])
            continue
        channel.sendmsg(
            [b"+"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
        )
        os.close(fd)


if __name__ == "__main__":
    main()
