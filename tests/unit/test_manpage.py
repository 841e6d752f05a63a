"""The man pages the Debian package ships are generated from the real argparse parsers."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from supervisord_vm import cli, daemon

CHECKOUT = Path(__file__).resolve().parents[2]
GENERATOR = CHECKOUT / "packaging" / "manpage.py"


def load_generator() -> ModuleType:
    # By path: the directory's name is also the name of a PyPI library.
    spec = importlib.util.spec_from_file_location("svm_manpage", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and action.help != argparse.SUPPRESS and option != "--help"
    }


def roff_text(text: str) -> str:
    return text.replace("-", "\\-")


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("man")
    assert load_generator().main([str(outdir), "--version", "9.9"]) == 0
    return outdir


def test_svmctl_page_documents_every_command_and_option(pages: Path) -> None:
    text = (pages / "svmctl.1").read_text()
    assert text.startswith('.TH SVMCTL 1 "')
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert f".SS {roff_text(name)}\n" in text, name
        for option in long_options(sub) - {"--json"}:
            assert f"\\fB{roff_text(option)}\\fR" in text, (name, option)
    assert "\\fB\\-\\-json\\fR" in text
    assert ".SH EXIT STATUS" in text


def test_daemon_page_documents_every_option(pages: Path) -> None:
    text = (pages / "supervisord-vm.8").read_text()
    assert text.startswith('.TH SUPERVISORD\\-VM 8 "')
    captured: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        captured.append(self)
        return original(self, [])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        daemon.parse_args([])
    for option in long_options(captured[0]):
        assert f"\\fB{roff_text(option)}\\fR" in text, option


def test_pages_build_without_the_daemons_third_party_libraries(tmp_path: Path) -> None:
    """As in the Debian build: Debian's python3, isolated from the venv (no sdbus, qemu.qmp)."""
    result = subprocess.run(
        ["/usr/bin/python3", "-I", str(GENERATOR), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\\-\\-log\\-max\\-size" in (tmp_path / "supervisord-vm.8").read_text()
    assert ".SS shutdown\\-all" in (tmp_path / "svmctl.1").read_text()
