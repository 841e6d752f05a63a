"""svmctl's plain commands skip argparse and mean exactly what argparse would make of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisord_vm import cli


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["list", "--all"],
        ["--json", "list"],
        ["list", "--json", "--all"],
        ["status", "web1"],
        ["--json", "status", "web1"],
        ["status", "web1", "--json"],
        ["start", "web-1"],
        ["start", "--json", "web.1"],
    ],
)
def test_plain_forms_parse_as_argparse_parses_them(argv: list[str]) -> None:
    plain = cli._plain_command(argv)
    assert plain is not None
    full = cli.build_parser().parse_args(argv)
    assert vars(plain) == vars(full)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["list", "-h"],
        ["list", "extra"],
        ["status"],
        ["status", "a", "b"],
        ["status", "-x"],
        ["status", "--all"],
        ["start", "--", "-odd"],
        ["destroy", "web1"],
        ["lis"],
    ],
)
def test_everything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert cli._plain_command(argv) is None


def test_a_plain_command_never_imports_argparse() -> None:
    """-I -S: the installed svmctl's interpreter loads no editable-install hooks (they load re)."""
    root = str(Path(cli.__file__).resolve().parents[1])
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from supervisord_vm import cli\n"
        "cli._plain_command(['--json', 'list', '--all'])\n"
        "print('argparse' in sys.modules, 're' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
