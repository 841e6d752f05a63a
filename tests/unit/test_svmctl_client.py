"""svmctl starts without loading the daemon's libraries, and its small D-Bus client speaks the
wire format and names objects exactly as sd-bus does (issue 8).

Against the real system bus, every svmctl command runs in tests/integration/test_service*.py.
"""

from __future__ import annotations

import gettext
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sdbus import encode_object_path

from supervisord_vm import api, bus, cli, wire

# What svmctl must not load: each costs start-up time on every command, and none is needed
# to make one D-Bus call (sdbus's extension imports asyncio as it loads).
HEAVY = (
    *("asyncio", "sdbus", "tomllib", "uuid", "logging", "supervisord_vm.bus"),
    *("supervisord_vm.definition", "supervisord_vm.model", "supervisord_vm.supervisor"),
)


def modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "command",
    [
        "cli.build_parser().parse_args(['list'])",
        "cli.build_parser().parse_args(['--json', 'status', 'x'])",
        "cli.build_parser().parse_args(['destroy', '--force', 'x'])",
    ],
)
def test_svmctl_loads_no_heavy_module(command: str) -> None:
    loaded = modules_after(f"from supervisord_vm import cli\n{command}")
    assert not {m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY}


def test_building_the_parser_searches_for_translations_at_most_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """argparse's gettext look-ups were half of svmctl's own start-up (54 searches)."""
    searches: list[str] = []
    real_find = gettext.find

    def find(domain: str, *args: Any, **kwargs: Any) -> Any:
        searches.append(domain)
        return real_find(domain, *args, **kwargs)

    monkeypatch.setattr(gettext, "find", find)
    parser = cli.build_parser()
    assert len(searches) <= 1
    assert parser.format_usage().startswith("usage: svmctl")


# D-Bus strings are UTF-8 without NUL: no lone surrogates, no "\0".
NAMES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=70)


@given(NAMES)
def test_machine_paths_are_sd_bus_paths(name: str) -> None:
    assert api.machine_path(name) == encode_object_path(api.MACHINE_PATH_PREFIX, name)
    assert bus.machine_path(name) == api.machine_path(name)


def test_machine_path_examples() -> None:
    assert api.machine_path("web-1") == "/org/supervisordvm1/machine/web_2d1"
    assert api.machine_path("0a_b") == "/org/supervisordvm1/machine/_30a_5fb"
    assert api.machine_path("") == "/org/supervisordvm1/machine/_"


CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("", ()),
    ("s", ("web1",)),
    ("sdb", ("web1", 2.5, True)),
    ("ssd", ("web-1", "graceful", 0.0)),
    ("su", ("x", 4294967295)),
    ("du", (0.0, 8)),
    (
        "a(ssssuo)",
        ([("a", "running", "", "svm-a.scope", 7, "/org/x/a"), ("b", "", "", "", 0, "/")],),
    ),
    ("a{sv}", ({"State": ("s", "running"), "MainPID": ("u", 42), "Exit": ("i", -1)},)),
    ("a{oa{sa{sv}}}", ({"/p/a": {"I": {"T": ("d", 1.5), "B": ("b", False)}, "E": {}}},)),
    ("asasasas", (["a"], [], ["c", "d"], ["error: x"])),
    ("vyas", (("a(dssss)", [(1.25, "a", "started", "running", "")]), 255, [])),
]


@pytest.mark.parametrize(("signature", "args"), CALLS)
def test_messages_round_trip(signature: str, args: tuple[Any, ...]) -> None:
    data = wire.encode_message(
        7,
        destination=api.BUS_NAME,
        path=api.MANAGER_PATH,
        interface=api.MANAGER_INTERFACE,
        member="Method",
        signature=signature,
        args=args,
    )
    assert len(data) % 8 == 0 or signature  # the header ends 8-aligned
    message = wire.decode_message(data)
    assert (message.kind, message.serial) == (wire.METHOD_CALL, 7)
    assert (message.path, message.interface, message.member) == (
        api.MANAGER_PATH,
        api.MANAGER_INTERFACE,
        "Method",
    )
    assert message.body == list(args)


def test_split_signature() -> None:
    assert wire.split_signature("sa{sv}(ii)aas") == ["s", "a{sv}", "(ii)", "aas"]
    assert wire.split_signature("a{oa{sa{sv}}}") == ["a{oa{sa{sv}}}"]


def test_bus_addresses() -> None:
    path = "/run/dbus/system_bus_socket"
    assert wire._socket_address(f"unix:path={path}") == path
    assert wire._socket_address(f"tcp:host=x,port=1;unix:path={path},guid=ab") == path
    assert wire._socket_address("unix:path=/tmp/a%20b") == "/tmp/a b"
    assert wire._socket_address("unix:abstract=/tmp/dbus-x") == b"\0/tmp/dbus-x"
    with pytest.raises(OSError, match="no unix socket"):
        wire._socket_address("tcp:host=x,port=1")
