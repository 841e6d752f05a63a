"""Edge input found by probing the service as a bus client and an svmctl user would: every case
is refused with a message for a person (a named error or exit code 2), never a traceback."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from supervisord_vm import bus, cli
from supervisord_vm.definition import (
    ARG_MAX_BYTES,
    DEFINITION_MAX_BYTES,
    parse_definition,
)
from supervisord_vm.errors import InvalidDefinition
from supervisord_vm.supervisor import AUDIT_MESSAGE_ID


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 100_000 + "]" * 100_000,
        "x = " + "{a=" * 5_000 + "1" + "}" * 5_000,
    ],
)
def test_deeply_nested_toml_is_an_invalid_definition(text: str) -> None:
    """tomllib recursed into RecursionError, which reached clients as Error.Failed."""
    with pytest.raises(InvalidDefinition, match="nested too deeply"):
        parse_definition(text, "t.toml")


def test_oversized_definition_is_refused_before_parsing() -> None:
    text = 'name = "a"\nextra_args = ["' + "a" * DEFINITION_MAX_BYTES + '"]\n'
    with pytest.raises(InvalidDefinition, match=r"t.toml: too large \(\d+ bytes"):
        parse_definition(text, "t.toml")


def test_extra_arg_longer_than_the_kernel_allows() -> None:
    ok = parse_definition(f'name = "a"\nextra_args = ["{"a" * ARG_MAX_BYTES}"]\n')
    assert len(ok.extra_args[0]) == ARG_MAX_BYTES
    with pytest.raises(InvalidDefinition, match=r"extra_args\[1\]': is longer than the kernel"):
        parse_definition(f'name = "a"\nextra_args = ["-S", "{"a" * (ARG_MAX_BYTES + 1)}"]\n')


def test_long_name_error_says_got_once() -> None:
    with pytest.raises(InvalidDefinition) as info:
        parse_definition(f'name = "{"a" * 100_000}"')
    message = str(info.value)
    assert message.count("got") == 1 and "got 100000" in message and "aaaa" not in message


def test_byte_order_mark_is_accepted() -> None:
    assert parse_definition('\ufeffname = "bom"\n').name == "bom"


@pytest.mark.parametrize("seconds", [float("inf"), float("-inf"), 1e308, bus.TIMEOUT_MAX + 1])
def test_infinite_and_huge_timeouts_are_invalid_arguments(seconds: float) -> None:
    with pytest.raises(bus.InvalidArgumentError, match="must be from 0 to 604800 seconds"):
        bus.parse_timeout(seconds, "timeout")
    assert bus.parse_timeout(bus.TIMEOUT_MAX, "timeout") == bus.TIMEOUT_MAX


def test_refusal_audit_shares_the_core_message_id() -> None:
    assert bus.AUDIT_MESSAGE_ID == AUDIT_MESSAGE_ID


@pytest.mark.parametrize(
    "argv",
    [
        ["log", "vm", "-n", "-5"],
        ["log", "vm", "-n", "99999999999"],
        ["log", "vm", "-n", "many"],
        ["destroy", "vm", "--timeout", "nan"],
        ["destroy", "vm", "--timeout", "inf"],
        ["shutdown", "vm", "--timeout", "1e9"],
        ["shutdown-all", "--timeout", "nan"],
        ["shutdown-all", "--parallel", "-1"],
        ["kill", "vm", "--signal", "SIGFOO"],
        ["kill", "vm", "--signal", "0"],
        ["kill", "vm", "-s", "99"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `log -n -5` died in append_data with an OverflowError traceback."""
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_good_arguments_still_parse() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["log", "vm", "-n", "4294967295"]).lines == 0xFFFFFFFF
    assert parser.parse_args(["kill", "vm", "-s", "KILL"]).signal == "KILL"
    assert parser.parse_args(["shutdown-all", "--timeout", "0"]).timeout == 0


def test_definition_reading_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`svmctl define /dev/zero` used to read forever."""
    with pytest.raises(cli.CommandError, match="too large for a definition"):
        cli._read_definition("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (DEFINITION_MAX_BYTES + 1))
    with pytest.raises(cli.CommandError, match="too large"):
        cli._read_definition(str(big))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'name = "s"\n')))
    assert cli._read_definition("-") == 'name = "s"\n'
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(cli.CommandError, match="not UTF-8"):
        cli._read_definition(str(binary))


def test_unexpected_error_is_a_sentence_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_args: object) -> int:  # svmctl's calls are synchronous (wire.py)
        raise OverflowError("Cannot convert int to 'u' type")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(SystemExit) as info:
        cli.main(["list"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("svmctl: unexpected error (OverflowError") and "Traceback" not in err
