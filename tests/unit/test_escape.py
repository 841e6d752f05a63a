"""Scope names must be exactly what `systemd-escape NAME` prints, or users cannot find them."""

import shutil
import subprocess

import pytest

from supervisord_vm.unitname import UNIT_NAME_MAX, escape_name, scope_name

SYSTEMD_ESCAPE = shutil.which("systemd-escape") or "/usr/bin/systemd-escape"

# Expected values as printed by systemd 252's systemd-escape.
KNOWN = [
    ("acc-a", "acc\\x2da"),
    (".hidden", "\\x2ehidden"),
    ("..a", "\\x2e.a"),
    ("a.b", "a.b"),
    ("x.", "x."),
    ("a b", "a\\x20b"),
    ("a\\b", "a\\x5cb"),
    ("é", "\\xc3\\xa9"),
    ("日本", "\\xe6\\x97\\xa5\\xe6\\x9c\\xac"),
    ("a/b", "a-b"),
    ("/a", "-a"),
    ("a//b", "a--b"),
    ("a:b", "a:b"),
    ("a_b", "a_b"),
    ("1abc", "1abc"),
    ("-x", "\\x2dx"),
    ("", ""),
]

TRICKY = [
    *(name for name, _ in KNOWN if name),
    "web1",
    "a" * 64,
    "a-" * 32,
    "9" + "-" * 63,
    ".",
    "-",
    "--",
    "tab\there",
    "new\nline",
    "ÿ",
    "🙂vm",
    "x@y",
    "star*",
    "per%cent",
    "$HOME",
    "quo'te\"s",
    "~tilde",
    "UPPER.lower_09",
    "a.b-c_d:e/f\\g h",
]


@pytest.mark.parametrize(("name", "expected"), KNOWN)
def test_escape_known(name: str, expected: str) -> None:
    assert escape_name(name) == expected


def test_scope_name() -> None:
    assert scope_name("acc-a") == "svm-acc\\x2da.scope"
    assert scope_name("web1") == "svm-web1.scope"


def test_enough_tricky_names() -> None:
    assert len(set(TRICKY)) >= 15


@pytest.mark.skipif(not shutil.which(SYSTEMD_ESCAPE), reason="systemd-escape not installed")
@pytest.mark.parametrize("name", TRICKY)
def test_escape_matches_systemd_escape(name: str) -> None:
    real = subprocess.run(
        [SYSTEMD_ESCAPE, "--", name], check=True, capture_output=True, text=True
    ).stdout.rstrip("\n")
    assert escape_name(name) == real


def test_longest_valid_names_may_overflow_unit_name_limit() -> None:
    # A 64-character VM name of mostly dashes escapes to 4 bytes per dash: the definition
    # layer must check len(scope_name(name)) <= UNIT_NAME_MAX, systemd refuses longer names.
    assert len(scope_name("a" * 64)) <= UNIT_NAME_MAX
    assert len(scope_name("9" + "-" * 63)) > UNIT_NAME_MAX
