"""The VNC display: QEMU's arguments, the address clients are given, the socket shared with the
group, and how svmctl prints it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisord_vm import cli, display
from supervisord_vm.definition import Definition
from supervisord_vm.errors import QmpError
from supervisord_vm.qemu import LaunchResources, build_argv

SOCKET = Path("/run/supervisord-vm/web1.qmp")
VNC = Path("/run/supervisord-vm/qemu/web1/vnc.sock")


def test_no_display_adds_nothing_and_keeps_display_none() -> None:
    defn = Definition(name="web1")
    assert display.display_args(defn, None) == []
    argv = build_argv(defn, SOCKET)
    assert "-vnc" not in argv and "-vga" not in argv
    assert argv[argv.index("-display") + 1] == "none"


def test_vnc_on_a_unix_socket_with_a_vga_card() -> None:
    defn = Definition(name="web1", display="vnc")
    assert display.display_args(defn, VNC) == ["-vnc", f"unix:{VNC}", "-vga", "std"]
    argv = build_argv(defn, SOCKET, LaunchResources(qmp_socket=SOCKET, vnc_socket=VNC))
    assert argv[argv.index("-vnc") + 1] == f"unix:{VNC}"
    quoted = display.display_args(defn, Path("/run/a,b/vnc.sock"))
    assert quoted[1] == "unix:/run/a,,b/vnc.sock"
    with pytest.raises(ValueError, match="no socket path"):
        display.display_args(defn, None)


def test_vnc_on_an_address_lets_qemu_take_the_first_free_port_from_5900() -> None:
    v4 = Definition(name="web1", display="vnc", vnc_listen="127.0.0.1")
    assert display.display_args(v4, None) == ["-vnc", "127.0.0.1:0,to=99", "-vga", "std"]
    v6 = Definition(name="web1", display="vnc", vnc_listen="::1")
    assert display.display_args(v6, None)[1] == "[::1]:0,to=99"


def test_the_vnc_socket_lives_in_the_vms_qemu_directory() -> None:
    assert display.vnc_socket(Path("/run/supervisord-vm"), "web1") == VNC


def test_addresses_are_uris_with_the_port_qemu_reports() -> None:
    unix = Definition(name="web1", display="vnc")
    assert display.address(unix, VNC, None) == f"vnc+unix://{VNC}"
    v4 = Definition(name="web1", display="vnc", vnc_listen="127.0.0.1")
    reply = {"enabled": True, "host": "127.0.0.1", "service": "5901", "family": "ipv4"}
    assert display.address(v4, VNC, reply) == "vnc://127.0.0.1:5901"
    v6 = Definition(name="web1", display="vnc", vnc_listen="::1")
    assert display.address(v6, VNC, {"service": "5900"}) == "vnc://[::1]:5900"
    assert display.address(v4, VNC, {"enabled": False}) == ""
    assert display.address(v4, VNC, "nonsense") == ""
    assert display.address(Definition(name="web1"), VNC, reply) == ""


class FakeQmp:
    def __init__(self, reply: object = None, error: Exception | None = None) -> None:
        self.reply, self.error = reply, error
        self.commands: list[str] = []

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        self.commands.append(command)
        if self.error is not None:
            raise self.error
        return self.reply


def test_attach_reads_the_port_from_qmp_and_never_raises(tmp_path: Path) -> None:
    defn = Definition(name="web1", display="vnc", vnc_listen="127.0.0.1")
    qmp = FakeQmp({"service": "5907"})
    assert asyncio.run(display.attach(qmp, defn, tmp_path)) == "vnc://127.0.0.1:5907"
    assert qmp.commands == ["query-vnc"]
    failing = FakeQmp(error=QmpError("QMP command 'query-vnc' failed"))
    assert asyncio.run(display.attach(failing, defn, tmp_path)) == ""
    assert asyncio.run(display.attach(None, defn, tmp_path)) == ""
    none = FakeQmp()
    assert asyncio.run(display.attach(none, Definition(name="web1"), tmp_path)) == ""
    assert none.commands == []


def _listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    return listener


def test_attach_opens_the_unix_socket_to_the_group_and_no_one_else(tmp_path: Path) -> None:
    defn = Definition(name="web1", display="vnc")
    path = display.vnc_socket(tmp_path, "web1")
    path.parent.mkdir(parents=True)
    old_umask = os.umask(0o077)
    try:
        listener = _listen(path)
    finally:
        os.umask(old_umask)
    with listener:
        address = asyncio.run(display.attach(FakeQmp(), defn, tmp_path))
        assert address == f"vnc+unix://{path}"
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660


def test_sharing_never_follows_a_link_qemu_could_plant(tmp_path: Path) -> None:
    target = tmp_path / "shadow"
    target.write_text("secret")
    target.chmod(0o600)
    link = tmp_path / "vnc.sock"
    link.symlink_to(target)
    with pytest.raises(OSError):
        display.share_with_group(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(PermissionError, match="not a socket of QEMU's"):
        display.share_with_group(plain)


def test_svmctl_splits_an_address_into_its_parts_and_hints_how_to_connect() -> None:
    unix = f"vnc+unix://{VNC}"
    assert cli.display_parts(unix) == {"display": unix, "socket": str(VNC)}
    assert cli.display_parts("vnc://[::1]:5901") == {
        "display": "vnc://[::1]:5901",
        "host": "::1",
        "port": 5901,
    }
    hints = "\n".join(cli.display_hints(unix))
    assert f"vncviewer {VNC}" in hints and f"remote-viewer {unix}" in hints
    tcp = "\n".join(cli.display_hints("vnc://127.0.0.1:5901"))
    assert "vncviewer 127.0.0.1::5901" in tcp and "no password" in tcp


class FakeClient:
    """What cmd_display asks of svmctl's client: one VM's status."""

    def __init__(self, state: str, address: str) -> None:
        self.answer = {"name": "web1", "state": state, "display": address}

    def status(self, name: str) -> dict[str, object]:
        return dict(self.answer, name=name)


def _display(client: FakeClient, as_json: bool = False) -> int:
    args = SimpleNamespace(name="web1", json=as_json)
    return cli.cmd_display(client, args)  # type: ignore[arg-type]


def test_svmctl_display_prints_the_address_alone_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    unix = f"vnc+unix://{VNC}"
    assert _display(FakeClient("running", unix)) == 0
    out, err = capsys.readouterr()
    assert out == unix + "\n" and "vncviewer" in err
    assert _display(FakeClient("paused", "vnc://127.0.0.1:5900"), as_json=True) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == {
        "name": "web1",
        "display": "vnc://127.0.0.1:5900",
        "host": "127.0.0.1",
        "port": 5900,
    }


def test_svmctl_display_of_a_stopped_vm_or_one_without_display_fails() -> None:
    with pytest.raises(cli.CommandError, match="is not running") as stopped:
        _display(FakeClient("shutoff", ""))
    assert stopped.value.code == cli.EXIT_FAILURE
    with pytest.raises(cli.CommandError, match='has no display \\(display = "none"'):
        _display(FakeClient("running", ""))
