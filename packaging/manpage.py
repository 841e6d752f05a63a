"""Write the man pages svmctl(1) and supervisord-vm(8) from their argparse parsers (roff).

The pages are generated at package build time so they cannot drift from `--help`. The Debian
build has none of the daemon's third-party libraries (sdbus and qemu.qmp are built alongside, not
installed), and the daemon's module imports them at the top: like Sphinx's autodoc_mock_imports,
any third-party module that is missing is replaced by an inert stand-in while the parser is
built, which reads only argparse calls and the project's own constants.

    python3 packaging/manpage.py OUTDIR [--date YYYY-MM-DD] [--version V]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGE = "supervisord_vm"


class _Inert:
    """Anything a module-level statement may do with an imported name: call, subclass, decorate."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __call__(self, *args: object, **kwargs: object) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator: keep the function
        return _Inert()

    def __mro_entries__(self, bases: tuple[object, ...]) -> tuple[type, ...]:
        return (_InertBase,)

    def __iter__(self) -> Iterator[object]:
        return iter(())

    def __or__(self, other: object) -> _Inert:
        return self

    __ror__ = __or__

    def __getitem__(self, key: object) -> _Inert:
        return self


class _InertBase(Exception):
    def __init_subclass__(cls, **kwargs: object) -> None:
        pass


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert()


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: a module no real finder found becomes an inert stand-in."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", maxsplit=1)[0] == PROJECT_PACKAGE:
            return None  # the project's own modules must be real
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def daemon_parser() -> argparse.ArgumentParser:
    """The daemon's parser, caught at its parse_args (daemon.py builds it there)."""
    daemon = importlib.import_module(f"{PROJECT_PACKAGE}.daemon")
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        daemon.parse_args([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError("supervisord_vm.daemon.parse_args built no parser")


def svmctl_parser() -> argparse.ArgumentParser:
    cli = importlib.import_module(f"{PROJECT_PACKAGE}.cli")
    parser: argparse.ArgumentParser = cli.build_parser()
    return parser


# --- roff ---------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Text made safe for roff: backslashes, hyphens (as minus signs) and leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        lines.append("\\&" + stripped if stripped.startswith((".", "'")) else stripped)
    return "\n".join(lines)


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip().removeprefix("usage:")
    return "\n".join(line.strip() for line in text.splitlines())


def option_items(
    parser: argparse.ArgumentParser, inherited: frozenset[str] = frozenset()
) -> list[str]:
    """The .TP items of a parser's arguments, except those named in `inherited` (shown above)."""
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if inherited.intersection(action.option_strings):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                metavar = " " + str(action.metavar or action.dest.upper())
                if action.choices is not None and action.metavar is None:
                    metavar = " {" + ",".join(str(choice) for choice in action.choices) + "}"
            name = ", ".join(bold(option) for option in action.option_strings)
            label = name + (f" \\fI{roff(metavar.strip())}\\fR" if metavar else "")
        else:
            label = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        help_text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and "default" not in help_text
        ):
            help_text = f"{help_text} (default: {default})".strip()
        lines += [".TP", label, roff(help_text) if help_text else ""]
    return [line for line in lines if line != ""]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def page(
    parser: argparse.ArgumentParser,
    *,
    name: str,
    section: int,
    summary: str,
    date: str,
    version: str,
    extra: Callable[[], list[str]],
) -> str:
    title = roff(name.upper())
    manual = "System Administration" if section == 8 else "User Commands"
    lines = [
        f'.TH {title} {section} "{date}" "supervisord\\-vm {version}" "{manual}"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        roff(usage(parser)),
        ".fi",
    ]
    if parser.description:
        lines += [".SH DESCRIPTION", roff(parser.description)]
    options = option_items(parser)
    if options:
        lines += [".SH OPTIONS", *options]
    top_level = frozenset(option for action in parser._actions for option in action.option_strings)
    commands = subcommands(parser)
    if commands:
        lines.append(".SH COMMANDS")
        for command, sub in commands:
            lines += [".SS " + roff(command), ".nf", roff(usage(sub)), ".fi"]
            if sub.description:
                lines += [".PP", roff(sub.description)]
            sub_options = option_items(sub, top_level)
            if sub_options:
                lines += [".RS", *sub_options, ".RE"]
    if parser.epilog:
        lines += [".SH EXIT STATUS", roff(parser.epilog)]
    lines += extra()
    return "\n".join(lines) + "\n"


def _svmctl_extra() -> list[str]:
    return [
        ".SH FILES",
        ".TP",
        "\\fI/etc/supervisord\\-vm/vms/\\fR",
        "VM definitions (TOML), one file per VM.",
        ".SH SEE ALSO",
        "\\fBsupervisord\\-vm\\fR(8), \\fBsystemctl\\fR(1), \\fBbusctl\\fR(1);",
        "the README in \\fI/usr/share/doc/supervisord\\-vm/\\fR.",
    ]


def _daemon_extra() -> list[str]:
    return [
        ".SH FILES",
        ".TP",
        "\\fI/etc/default/supervisord\\-vm\\fR",
        "Extra arguments (SVM_DAEMON_ARGS) and host shutdown settings for the units.",
        ".TP",
        "\\fI/etc/supervisord\\-vm/vms/\\fR",
        "VM definitions.",
        ".TP",
        "\\fI/var/lib/supervisord\\-vm/\\fR, \\fI/var/log/supervisord\\-vm/\\fR, "
        "\\fI/run/supervisord\\-vm/\\fR",
        "State, QEMU logs and runtime files.",
        ".SH SEE ALSO",
        "\\fBsvmctl\\fR(1), \\fBsystemd.scope\\fR(5), \\fBqemu\\-system\\-x86_64\\fR(1);",
        "the README in \\fI/usr/share/doc/supervisord\\-vm/\\fR.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--date", default="2026-11-30")
    parser.add_argument("--version", default="0")
    args = parser.parse_args(argv)
    os.environ["COLUMNS"] = "78"  # argparse wraps usage lines to the terminal's width
    args.outdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(CHECKOUT))
    stand_ins = _StandInFinder()
    sys.meta_path.append(stand_ins)
    try:
        pages = {
            "svmctl": (
                svmctl_parser(),
                1,
                "control QEMU VMs supervised by supervisord-vm",
                _svmctl_extra,
            ),
            "supervisord-vm": (daemon_parser(), 8, "QEMU VM supervisor daemon", _daemon_extra),
        }
    finally:  # a caller in the same process (the unit tests) keeps its real import errors
        sys.meta_path.remove(stand_ins)
        sys.path.remove(str(CHECKOUT))
    for name, (command_parser, section, summary, extra) in pages.items():
        command_parser.prog = name
        text = page(
            command_parser,
            name=name,
            section=section,
            summary=summary,
            date=args.date,
            version=args.version,
            extra=extra,
        )
        (args.outdir / f"{name}.{section}").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
