"""svmctl's side of the console: its D-Bus client negotiates descriptor passing and receives
OpenConsole's descriptor (SCM_RIGHTS, the `h` type, the UNIX_FDS header), and `svmctl console`
relays between a terminal (or pipes) and that descriptor, detaching on Ctrl-] with the
terminal restored. The bus here is the test playing the bus's part of the wire protocol over a
real unix socket; against the real system bus: tests/integration/test_console.py."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from supervisord_vm import cli, wire

# --- the bus's side of the wire, just enough for one call ----------------------------------------


def encode_reply(reply_to: int, signature: str, args: tuple[Any, ...], fds: int = 0) -> bytes:
    """A METHOD_RETURN, little-endian, as a bus would deliver it."""
    body = wire._Writer()
    for type_, value in zip(wire.split_signature(signature), args, strict=True):
        body.write(type_, value)
    fields: list[tuple[int, tuple[str, Any]]] = [(wire._REPLY_SERIAL, ("u", reply_to))]
    if signature:
        fields.append((wire._SIGNATURE, ("g", signature)))
    if fds:
        fields.append((wire._UNIX_FDS, ("u", fds)))
    header = wire._Writer()
    header.data += struct.pack("<cBBBII", b"l", wire.METHOD_RETURN, 0, 1, len(body.data), 99)
    header.write("a(yv)", fields)
    header.pad(8)
    return bytes(header.data + body.data)


def read_message(conn: socket.socket, buffer: bytearray) -> wire.Message:
    def need(count: int) -> None:
        while len(buffer) < count:
            chunk = conn.recv(65536)
            assert chunk, "the client hung up"
            buffer.extend(chunk)

    need(16)
    body_length, _serial, fields_length = struct.unpack_from("<III", buffer, 4)
    total = 16 + fields_length + (-fields_length % 8) + body_length
    need(total)
    message = wire.decode_message(bytes(buffer[:total]))
    del buffer[:total]
    return message


class FakeBus:
    """Answers AUTH (agreeing to pass descriptors, or not), Hello, then one call with `reply`,
    sending `fd` along with it."""

    def __init__(
        self, path: Path, *, agree: bool, reply: tuple[str, tuple[Any, ...]], fd: int = -1
    ):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.agree = agree
        self.reply = reply
        self.fd = fd
        self.auth_lines: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            received = b""
            while b"NEGOTIATE_UNIX_FD\r\n" not in received:
                received += conn.recv(256)
            self.auth_lines = received.split(b"\r\n")[:-1]
            answer = b"AGREE_UNIX_FD\r\n" if self.agree else b"ERROR not here\r\n"
            conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n" + answer)
            buffer = bytearray()
            while not buffer.startswith(b"BEGIN\r\n"):
                buffer += conn.recv(256)
            del buffer[:7]
            hello = read_message(conn, buffer)
            conn.sendall(encode_reply(hello.serial, "s", (":1.42",)))
            call = read_message(conn, buffer)
            signature, args = self.reply
            data = encode_reply(call.serial, signature, args, fds=1 if self.fd >= 0 else 0)
            if self.fd >= 0:
                conn.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.fd))]
                )
            else:
                conn.sendall(data)
            conn.recv(1)  # until the client closes

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def bus_path(tmp_path: Path) -> Path:
    return tmp_path / "bus"


def test_a_descriptor_in_a_reply_becomes_the_callers(bus_path: Path) -> None:
    ours, theirs = socket.socketpair()
    bus = FakeBus(bus_path, agree=True, reply=("h", (0,)), fd=theirs.fileno())
    with wire.Connection(f"unix:path={bus_path}") as connection:
        assert connection.unix_fds
        fd = connection.call("x.y", "/x", "x.Y", "OpenConsole", "s", "vm")
    theirs.close()
    bus.close()
    assert bus.auth_lines[1] == b"NEGOTIATE_UNIX_FD"  # sent with AUTH, before BEGIN
    try:
        assert fd >= 0 and os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
        os.write(fd, b"ping")
        assert ours.recv(4) == b"ping"  # it is the very socket the bus sent
    finally:
        os.close(fd)
        ours.close()


def test_without_descriptor_passing_the_connection_says_so(bus_path: Path) -> None:
    bus = FakeBus(bus_path, agree=False, reply=("s", ("fine",)))
    with wire.Connection(f"unix:path={bus_path}") as connection:
        assert not connection.unix_fds
        assert connection.call("x.y", "/x", "x.Y", "M") == "fine"
    bus.close()


def test_a_refused_auth_is_an_error_not_a_hang(bus_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(bus_path))
    listener.listen(1)

    def refuse() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(256)
            conn.sendall(b"REJECTED EXTERNAL\r\n")  # and nothing more: no second line comes
            conn.recv(256)

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    with pytest.raises(wire.BusError, match="refused us: REJECTED EXTERNAL"):
        wire.Connection(f"unix:path={bus_path}")
    thread.join(10)
    listener.close()


def test_byte_arrays_are_bytes_both_ways() -> None:
    payload = bytes(range(256)) * 3
    data = wire.encode_message(
        1,
        destination="d",
        path="/p",
        interface="i.I",
        member="M",
        signature="ayu",
        args=(payload, 5),
    )
    assert wire.decode_message(data).body == [payload, 5]


def test_an_fd_index_without_its_descriptor_is_refused() -> None:
    data = encode_reply(1, "h", (0,))
    with pytest.raises(ValueError, match="file descriptor 0 of 0 is missing"):
        wire.decode_message(data)


# --- svmctl console's relay ---------------------------------------------------------------------


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int, int]]:
    """(stdin read end, stdin write end, stdout read end, stdout write end)."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    yield stdin_r, stdin_w, stdout_r, stdout_w
    for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_ctrl_close_bracket_detaches_after_sending_what_came_before(
    pipes: tuple[int, int, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_r, stdin_w, _stdout_r, stdout_w = pipes
    daemon, client = socket.socketpair()
    os.write(stdin_w, b"root\r\x1dnot sent")
    code = cli.console_session(client.detach(), "web1", stdin=stdin_r, stdout=stdout_w)
    assert code == 0
    assert read_all(daemon) == b"root\r"  # and then EOF: the descriptor was closed
    assert capsys.readouterr().err.startswith("Connected to web1; escape character is ^]\n")
    daemon.close()


def test_the_end_of_input_detaches(pipes: tuple[int, int, int, int]) -> None:
    stdin_r, stdin_w, _stdout_r, stdout_w = pipes
    daemon, client = socket.socketpair()
    os.write(stdin_w, b"typed")
    os.close(stdin_w)
    assert cli.console_session(client.detach(), "web1", stdin=stdin_r, stdout=stdout_w) == 0
    assert read_all(daemon) == b"typed"
    daemon.close()


def test_output_is_relayed_until_the_console_closes(
    pipes: tuple[int, int, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_r, _stdin_w, stdout_r, stdout_w = pipes
    daemon, client = socket.socketpair()
    daemon.sendall(b"Debian GNU/Linux 12 web1 ttyS0\r\n\r\nweb1 login: ")
    daemon.close()  # the VM stopped
    assert cli.console_session(client.detach(), "web1", stdin=stdin_r, stdout=stdout_w) == 0
    os.close(stdout_w)
    with os.fdopen(stdout_r, "rb", closefd=False) as out:
        assert out.read() == b"Debian GNU/Linux 12 web1 ttyS0\r\n\r\nweb1 login: "
    assert "the console of web1 was closed" in capsys.readouterr().err


def test_a_terminal_is_raw_while_attached_and_restored_after(
    pipes: tuple[int, int, int, int],
) -> None:
    _stdin_r, _stdin_w, _stdout_r, stdout_w = pipes
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    daemon, client = socket.socketpair()
    seen: list[list[Any]] = []

    def type_when_raw() -> None:
        for _ in range(1000):
            mode = termios.tcgetattr(slave)
            if not mode[3] & termios.ICANON:
                seen.append(mode)
                os.write(master, b"ls\x03\x1d")  # Ctrl-C goes to the guest; Ctrl-] detaches
                return
            threading.Event().wait(0.01)

    typist = threading.Thread(target=type_when_raw, daemon=True)
    typist.start()
    try:
        code = cli.console_session(client.detach(), "web1", stdin=slave, stdout=stdout_w)
        typist.join(10)
        assert code == 0
        assert seen and not seen[0][3] & (termios.ECHO | termios.ISIG)
        assert read_all(daemon) == b"ls\x03"
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
        daemon.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["console", "--log", "--force", "vm"],
        ["console", "--lines", "3", "vm"],
        ["--json", "console", "vm"],
    ],
)
def test_console_options_that_do_not_go_together_are_usage_errors(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(cli.CommandError) as refused:
        cli.cmd_console(cast(cli.Client, None), args)  # refused before any call
    assert refused.value.code == cli.EXIT_USAGE
