"""The definition parser under hostile input: whatever text arrives (over D-Bus, from a file),
it either accepts a definition that survives a round trip through its canonical TOML, or
refuses with InvalidDefinition. Any other exception would reach a client as Error.Failed.

SVM_FUZZ_EXAMPLES=N runs N examples per property instead of the CI default.
"""

from __future__ import annotations

import datetime
import math
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisord_vm.definition import (
    DEFINITION_MAX_BYTES,
    definition_to_toml,
    parse_definition,
    toml_string,
)
from supervisord_vm.errors import InvalidDefinition

EXAMPLES = int(os.environ.get("SVM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its example and seed
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def accepted_or_refused(text: str) -> None:
    """The property: InvalidDefinition, or a definition that round-trips unchanged."""
    try:
        defn = parse_definition(text, "fuzz.toml")
    except InvalidDefinition as refusal:
        assert str(refusal)
        return
    canonical = definition_to_toml(defn)
    assert parse_definition(canonical) == defn
    assert definition_to_toml(parse_definition(canonical)) == canonical


# --- TOML documents built from random keys and values ----------------------------------------

KNOWN_KEYS = [
    "name",
    "memory",
    "cpus",
    "machine",
    "accel",
    "stop_timeout",
    "restart",
    "autostart",
    "qemu",
    "extra_args",
    "disks",
]
DISK_KEYS = ["path", "format", "readonly", "snapshot"]
# TOML text cannot carry lone surrogates (not Unicode scalar values): keys and strings written
# into a document are drawn without them; raw text below still has them.
SCALAR_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True)
PLAUSIBLE_STRINGS = st.one_of(
    NAMES,
    st.sampled_from(["kvm:tcg", "tcg", "kvm", "pc", "q35", "no", "on-crash", "always", "raw"]),
    st.sampled_from(["qcow2", "/usr/bin/qemu-system-x86_64", "/var/lib/x.img", "", ":", "kvm::"]),
    st.from_regex(r"/[a-z0-9/._ -]{0,30}", fullmatch=True),
    SCALAR_TEXT,
)
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-2, max_value=4000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    PLAUSIBLE_STRINGS,
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 1, 1)),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(DISK_KEYS), SCALAR_TEXT), inner, max_size=4),
    ),
    max_leaves=12,
)


def toml_key(key: str) -> str:
    bare = key and all(c in string.ascii_letters + string.digits + "_-" for c in key)
    return key if bare else toml_string(key)


def toml_value(value: object) -> str:
    """TOML for a value (inline form), written here so no TOML writer is needed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise AssertionError(f"no TOML for {value!r}")


DISK_TABLES = st.fixed_dictionaries(
    {},
    optional={
        "path": st.one_of(PLAUSIBLE_STRINGS, VALUES),
        "format": st.one_of(st.sampled_from(["raw", "qcow2", "vmdk"]), VALUES),
        "readonly": st.one_of(st.booleans(), VALUES),
        "snapshot": st.one_of(st.booleans(), VALUES),
    },
)
DOCUMENTS = st.dictionaries(
    st.one_of(st.sampled_from(KNOWN_KEYS), SCALAR_TEXT.filter(bool)),
    st.one_of(PLAUSIBLE_STRINGS, VALUES, st.lists(DISK_TABLES, max_size=3)),
    max_size=12,
)


def document_text(document: dict[str, object]) -> str:
    return "".join(f"{toml_key(key)} = {toml_value(value)}\n" for key, value in document.items())


# Near-valid definitions, so that the accepting path (and the round trip) is reached often.
NEAR_VALID = st.fixed_dictionaries(
    {"name": st.one_of(NAMES, PLAUSIBLE_STRINGS)},
    optional={
        "memory": st.one_of(st.integers(min_value=0, max_value=1048577), SCALARS),
        "cpus": st.one_of(st.integers(min_value=0, max_value=256), SCALARS),
        "machine": st.one_of(st.from_regex(r"[a-z0-9._-]{0,12}", fullmatch=True), SCALARS),
        "accel": st.one_of(
            st.lists(st.sampled_from(["kvm", "tcg", "xen", "hvf", "nope", ""]), max_size=4).map(
                ":".join
            ),
            SCALARS,
        ),
        "stop_timeout": st.one_of(st.integers(min_value=0, max_value=3601), SCALARS),
        "restart": st.one_of(st.sampled_from(["no", "on-crash", "always", "sometimes"]), SCALARS),
        "autostart": st.one_of(st.booleans(), SCALARS),
        "qemu": st.one_of(st.from_regex(r"/[\w/. -]{0,30}", fullmatch=True), SCALARS),
        "extra_args": st.one_of(st.lists(SCALAR_TEXT, max_size=5), VALUES),
        "disks": st.lists(DISK_TABLES, max_size=3),
    },
)


@FUZZ
@given(DOCUMENTS)
def test_random_toml_documents_are_accepted_round_trip_or_refused(
    document: dict[str, object],
) -> None:
    accepted_or_refused(document_text(document))


@FUZZ
@given(NEAR_VALID)
def test_near_valid_definitions_are_accepted_round_trip_or_refused(
    document: dict[str, object],
) -> None:
    accepted_or_refused(document_text(document))


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_random_bytes_decoded_are_refused_or_accepted(data: bytes, encoding: str) -> None:
    accepted_or_refused(data.decode(encoding, "replace"))
    accepted_or_refused(data.decode("utf-8", "surrogateescape"))


@FUZZ
@given(st.text(max_size=600))
def test_random_text_is_refused_or_accepted(text: str) -> None:
    accepted_or_refused(text)


VALID = definition_to_toml(parse_definition('name = "fuzz1"\n[[disks]]\npath = "/x.img"\n'))


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID)),
            st.integers(min_value=0, max_value=8),
            st.text(max_size=6),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mutated_valid_definitions_are_accepted_round_trip_or_refused(
    edits: list[tuple[int, int, str]],
) -> None:
    text = VALID
    for position, deleted, inserted in edits:
        text = text[:position] + inserted + text[position + deleted :]
    accepted_or_refused(text)


@FUZZ
@given(
    st.integers(min_value=1, max_value=4000),
    st.sampled_from(["[", "{a=", "[{a=", "a.", "[[", "{"]),
    st.booleans(),
)
def test_deep_nesting_is_refused_or_accepted(depth: int, opener: str, closed: bool) -> None:
    closer = {"[": "]", "{a=": "}", "[{a=": "}]", "a.": "", "[[": "]]", "{": "}"}[opener]
    body = opener * depth + ("1" + closer * depth if closed else "")
    accepted_or_refused(f'name = "deep"\nextra_args = {body}\n')
    accepted_or_refused(f"{body}\n")


@pytest.mark.parametrize(
    "text",
    [
        'name = "' + "a" * DEFINITION_MAX_BYTES + '"\n',
        'name = "big"\nextra_args = ["' + "x" * (DEFINITION_MAX_BYTES - 40) + '"]\n',
        'name = "big"\nqemu = "/' + "q" * (DEFINITION_MAX_BYTES - 40) + '"\n',
        'name = "big"\nextra_args = [' + '"a",' * 200_000 + "]\n",
        "# " + "\u00e9" * (DEFINITION_MAX_BYTES // 2) + "\n",
        'name = "big"\n' + "".join(f"k{n} = {n}\n" for n in range(60_000)),
        "[[disks]]\n" * 50_000,
        "\x00" * 1000,
        "\ufeff\ufeffname = 'x'\n",
    ],
    ids=[
        "huge-name",
        "huge-arg",
        "huge-path",
        "many-args",
        "wide-comment",
        "many-keys",
        "many-tables",
        "nuls",
        "double-bom",
    ],
)
def test_huge_and_degenerate_inputs_are_refused_or_accepted(text: str) -> None:
    accepted_or_refused(text)


def test_a_definition_that_grows_past_the_limit_when_written_out_is_refused() -> None:
    """Stored definitions are canonical (defaults spelled out): one that would not fit once
    written would be stored, then refused at the next reload or daemon start."""
    text = 'name = "big"\nqemu = "/' + "q" * (DEFINITION_MAX_BYTES - 40) + '"\n'
    assert len(text.encode()) <= DEFINITION_MAX_BYTES
    with pytest.raises(InvalidDefinition, match="too large once written out"):
        parse_definition(text, "big.toml")


def test_a_lone_surrogate_is_refused_without_echoing_the_string() -> None:
    with pytest.raises(InvalidDefinition, match="lone surrogate") as refusal:
        parse_definition('name = "x"\nqemu = "/\udc80' + "p" * 5000 + '"\n', "x.toml")
    assert str(refusal.value).startswith("x.toml: ") and len(str(refusal.value)) < 200
