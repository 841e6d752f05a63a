"""A blocking D-Bus client on a bus socket: just enough of the wire protocol (the D-Bus
specification's "Message Protocol") for svmctl to call methods and receive signals.

Why not sdbus, which the daemon uses: its extension module imports asyncio when it loads, and
with its Python layer that was most of svmctl's start-up (about 120 ms of CPU here against
16 ms for Python itself), while every svmctl command is one or two calls. This needs only
_socket and struct (not even socket.py or typing: they cost start-up time too). Values come
back as sdbus returns them: arrays as lists, dicts as dicts, structs as tuples, variants as
(signature, value); byte arrays (`ay`) as bytes; a file descriptor (`h`) as the descriptor
itself, received with the message (SCM_RIGHTS) and then owned by the caller.
"""

from __future__ import annotations

import _socket
import os
import struct

# typing.TYPE_CHECKING without importing typing (mypy knows any TYPE_CHECKING name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"
DBUS_ERROR = "org.freedesktop.DBus.Error."

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION, _SENDER, _SIGNATURE = range(
    1, 9
)
_UNIX_FDS = 9

# Basic fixed-size types: struct format (also their size and alignment).
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q"}
_FIXED |= {"d": "d", "h": "I"}
_ALIGN = {code: struct.calcsize(fmt) for code, fmt in _FIXED.items()}
_ALIGN |= {"s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
_MAX_MESSAGE = 128 << 20  # the specification's limit on a whole message
# Room for the descriptors one read may bring: the kernel's limit per message (SCM_MAX_FD).
_FD_SPACE = _socket.CMSG_SPACE(253 * 4)


class BusError(Exception):
    """An error reply (or a local failure named like one): ``name`` and a message."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(name, text)
        self.name = name
        self.text = text


def _end_of_type(signature: str, start: int) -> int:
    """Index just past the one complete type that begins at ``start``."""
    index = start
    while signature[index] == "a":
        index += 1
    if signature[index] not in "({":
        return index + 1
    depth = 0
    for end in range(index, len(signature)):
        if signature[end] in "({":
            depth += 1
        elif signature[end] in ")}":
            depth -= 1
            if depth == 0:
                return end + 1
    raise ValueError(f"unbalanced D-Bus signature {signature!r}")


def split_signature(signature: str) -> list[str]:
    """'sa{sv}(ii)' -> ['s', 'a{sv}', '(ii)']."""
    types, index = [], 0
    while index < len(signature):
        end = _end_of_type(signature, index)
        types.append(signature[index:end])
        index = end
    return types


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()

    def pad(self, alignment: int) -> None:
        self.data += bytes(-len(self.data) % alignment)

    def write(self, type_: str, value: Any) -> None:
        code = type_[0]
        if code in _FIXED:
            self.pad(_ALIGN[code])
            self.data += struct.pack("<" + _FIXED[code], int(value) if code == "b" else value)
        elif code in "so":
            encoded = value.encode()
            self.pad(4)
            self.data += struct.pack("<I", len(encoded)) + encoded + b"\0"
        elif code == "g":
            self.data += bytes((len(value),)) + value.encode() + b"\0"
        elif code == "v":
            inner_type, inner = value
            self.write("g", inner_type)
            self.write(inner_type, inner)
        elif type_ == "ay" and isinstance(value, bytes | bytearray):
            self.pad(4)
            self.data += struct.pack("<I", len(value)) + value
        elif code == "a":
            self.pad(4)
            length_at = len(self.data)
            self.data += bytes(4)
            element = type_[1:]
            self.pad(_ALIGN[element[0]])
            start = len(self.data)
            for item in value.items() if element[0] == "{" else value:
                self.write(element, item)
            struct.pack_into("<I", self.data, length_at, len(self.data) - start)
        elif code in "({":
            self.pad(8)
            for member_type, member in zip(split_signature(type_[1:-1]), value, strict=True):
                self.write(member_type, member)
        else:
            raise ValueError(f"cannot write D-Bus type {type_!r}")


class _Reader:
    def __init__(self, data: bytes, endian: str, fds: Sequence[int] = ()) -> None:
        self.data = data
        self.endian = endian
        self.pos = 0
        self.fds = fds  # the message's descriptors, which `h` values index

    def align(self, alignment: int) -> None:
        self.pos += -self.pos % alignment

    def read(self, type_: str) -> Any:
        code = type_[0]
        if code in _FIXED:
            self.align(_ALIGN[code])
            (value,) = struct.unpack_from(self.endian + _FIXED[code], self.data, self.pos)
            self.pos += _ALIGN[code]
            if code == "h":
                if value >= len(self.fds):
                    raise ValueError(f"file descriptor {value} of {len(self.fds)} is missing")
                return self.fds[value]
            return bool(value) if code == "b" else value
        if code in "so":
            length = self.read("u")
            text = self.data[self.pos : self.pos + length].decode()
            self.pos += length + 1
            return text
        if code == "g":
            length = self.data[self.pos]
            text = self.data[self.pos + 1 : self.pos + 1 + length].decode()
            self.pos += length + 2
            return text
        if code == "v":
            inner_type = self.read("g")
            return (inner_type, self.read(inner_type))
        if type_ == "ay":
            length = self.read("u")
            self.pos += length
            return bytes(self.data[self.pos - length : self.pos])
        if code == "a":
            length = self.read("u")
            element = type_[1:]
            self.align(_ALIGN[element[0]])
            end = self.pos + length
            items = []
            while self.pos < end:
                items.append(self.read(element))
            return dict(items) if element[0] == "{" else items
        if code in "({":
            self.align(8)
            return tuple(self.read(member) for member in split_signature(type_[1:-1]))
        raise ValueError(f"cannot read D-Bus type {type_!r}")


class Message:
    """A received message: its type, header fields and body values."""

    def __init__(
        self,
        kind: int,
        serial: int,
        fields: dict[int, Any],
        body: list[Any],
        fds: Sequence[int] = (),
    ) -> None:
        self.kind = kind
        self.serial = serial
        self.fields = fields
        self.body = body
        self.fds = list(fds)  # descriptors that came with it: the receiver closes them

    def close_fds(self) -> None:
        """Close the descriptors that came with a message nobody will use."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    @property
    def path(self) -> str:
        return str(self.fields.get(_PATH, ""))

    @property
    def interface(self) -> str:
        return str(self.fields.get(_INTERFACE, ""))

    @property
    def member(self) -> str:
        return str(self.fields.get(_MEMBER, ""))

    def contents(self) -> Any:
        """None for no value, the value for one, a tuple for several (as sdbus gives them)."""
        if not self.body:
            return None
        return self.body[0] if len(self.body) == 1 else tuple(self.body)


def encode_message(
    serial: int,
    *,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    args: Sequence[Any] = (),
) -> bytes:
    """One method call, little-endian."""
    body = _Writer()
    for type_, value in zip(split_signature(signature), args, strict=True):
        body.write(type_, value)
    fields: list[tuple[int, tuple[str, Any]]] = [
        (_PATH, ("o", path)),
        (_INTERFACE, ("s", interface)),
        (_MEMBER, ("s", member)),
        (_DESTINATION, ("s", destination)),
    ]
    if signature:
        fields.append((_SIGNATURE, ("g", signature)))
    header = _Writer()
    header.data += struct.pack("<cBBBII", b"l", METHOD_CALL, 0, 1, len(body.data), serial)
    header.write("a(yv)", fields)
    header.pad(8)
    return bytes(header.data + body.data)


def decode_message(data: bytes, fds: Sequence[int] = ()) -> Message:
    """A whole message as read from the bus (either byte order), with the descriptors that
    came with it (its UNIX_FDS header says how many): its `h` values are those descriptors."""
    endian = "<" if data[:1] == b"l" else ">"
    kind, _flags, _version, _body_length, serial = struct.unpack_from(endian + "BBBII", data, 1)
    header = _Reader(data, endian)
    header.pos = 12
    fields = dict(header.read("a(yv)"))
    header.align(8)
    reader = _Reader(data[header.pos :], endian, fds)
    signature = fields.get(_SIGNATURE, ("g", ""))[1]
    body = [reader.read(type_) for type_ in split_signature(signature)]
    return Message(kind, serial, {code: value for code, (_, value) in fields.items()}, body, fds)


def _fd_count(data: bytes) -> int:
    """How many descriptors a whole message says came with it (its UNIX_FDS header field)."""
    endian = "<" if data[:1] == b"l" else ">"
    header = _Reader(data, endian)
    header.pos = 12
    for code, (_signature, value) in header.read("a(yv)"):
        if code == _UNIX_FDS:
            return int(value)
    return 0


def _socket_address(address: str) -> str | bytes:
    """The first unix: socket of a D-Bus address list (path, or abstract as bytes)."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(part.partition("=")[::2] for part in params.split(",") if part)
        if "path" in keys:
            return _unescape(keys["path"])
        if "abstract" in keys:
            return b"\0" + _unescape(keys["abstract"]).encode()
    raise OSError(f"no unix socket in bus address {address!r}")


def _unescape(value: str) -> str:
    parts = value.split("%")
    return parts[0] + "".join(chr(int(p[:2], 16)) + p[2:] for p in parts[1:])


class Connection:
    """One authenticated connection to a message bus; calls block until their reply."""

    DRIVER = "org.freedesktop.DBus"

    def __init__(self, address: str | None = None) -> None:
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_ADDRESS
        self._socket = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            self._socket.connect(_socket_address(address))
            self._authenticate()
        except BaseException:
            self._socket.close()
            raise
        self._buffer = bytearray()
        self._fds: list[int] = []  # descriptors received, not yet taken by their message
        self._serial = 0
        self._queued: list[Message] = []  # signals read while waiting for a reply
        # Hello must be the first message; its reply comes before any other, unread until then.
        self._send(
            destination=self.DRIVER,
            path="/org/freedesktop/DBus",
            interface=self.DRIVER,
            member="Hello",
            prefix=b"BEGIN\r\n",
        )

    def _authenticate(self) -> None:
        """AUTH EXTERNAL, and NEGOTIATE_UNIX_FD in the same write (as sd-bus does): without it
        the bus delivers no message carrying a descriptor to us (OpenConsole's reply)."""
        uid = str(os.geteuid()).encode().hex().encode()
        self._socket.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\n")
        received = b""
        while True:  # the OK line, then the answer to NEGOTIATE_UNIX_FD (not after a refusal)
            first, end, rest = received.partition(b"\r\n")
            if end and (not first.startswith(b"OK ") or b"\r\n" in rest):
                break
            chunk = self._socket.recv(256)
            if not chunk:
                raise BusError(DBUS_ERROR + "Disconnected", "the bus closed the connection")
            received += chunk
        if not first.startswith(b"OK "):
            reply = first.decode(errors="replace").strip()
            raise BusError(DBUS_ERROR + "AuthFailed", f"the bus refused us: {reply}")
        self.unix_fds = rest.startswith(b"AGREE_UNIX_FD\r\n")

    def close(self) -> None:
        self._socket.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(
        self,
        *,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        args: Sequence[Any] = (),
        prefix: bytes = b"",
    ) -> int:
        self._serial += 1
        message = encode_message(
            self._serial,
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            args=args,
        )
        self._socket.sendall(prefix + message)
        return self._serial

    def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self._recv(max(65536, count - len(self._buffer)))
            if not chunk:
                raise BusError(DBUS_ERROR + "Disconnected", "the bus closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _recv(self, size: int) -> bytes:
        """Read up to `size` bytes, keeping the descriptors that come with them (in order: a
        message's descriptors arrive with its first bytes, so they are here when it is)."""
        data, ancillary, flags, _ = self._socket.recvmsg(size, _FD_SPACE, _socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                count = len(payload) // 4
                self._fds += struct.unpack(f"={count}i", payload[: count * 4])
        if flags & _socket.MSG_CTRUNC:
            raise BusError(DBUS_ERROR + "LimitsExceeded", "file descriptors from the bus were lost")
        return data

    def _receive(self) -> Message:
        fixed = self._read_exactly(16)
        endian = "<" if fixed[:1] == b"l" else ">"
        body_length, _serial, fields_length = struct.unpack_from(endian + "III", fixed, 4)
        header_length = 16 + fields_length + (-fields_length % 8)
        if header_length + body_length > _MAX_MESSAGE:
            raise BusError(DBUS_ERROR + "LimitsExceeded", "message from the bus is too large")
        data = fixed + self._read_exactly(header_length - 16 + body_length)
        count = _fd_count(data)
        if count > len(self._fds):
            raise BusError(DBUS_ERROR + "InconsistentMessage", "file descriptors are missing")
        fds, self._fds = self._fds[:count], self._fds[count:]
        try:
            return decode_message(data, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        *args: Any,
    ) -> Any:
        """Call a method and wait for its reply; an error reply raises BusError."""
        serial = self._send(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            args=args,
        )
        while True:
            message = self._receive()
            if message.kind == SIGNAL:
                message.close_fds()  # no signal this client waits for carries any
                self._queued.append(message)
            elif message.fields.get(_REPLY_SERIAL) != serial:
                message.close_fds()
            else:
                if message.kind == ERROR:
                    message.close_fds()
                    text = (
                        message.body[0] if message.body and isinstance(message.body[0], str) else ""
                    )
                    raise BusError(str(message.fields.get(_ERROR_NAME, "")), text)
                return message.contents()

    def add_match(self, rule: str) -> None:
        self.call(self.DRIVER, "/org/freedesktop/DBus", self.DRIVER, "AddMatch", "s", rule)

    def signals(self) -> Iterator[Message]:
        """Signals as they arrive (first those read while waiting for replies); blocks."""
        while True:
            while self._queued:
                yield self._queued.pop(0)
            message = self._receive()
            if message.kind == SIGNAL:
                yield message
