"""Definition parsing, validation and canonical TOML output (pure, no disk)."""

from __future__ import annotations

import random
import tomllib

import pytest

from supervisord_vm.definition import (
    ACCELERATORS,
    Definition,
    Disk,
    definition_to_toml,
    parse_definition,
    toml_string,
    validate_name,
)
from supervisord_vm.definition_devices import Nic, Resources
from supervisord_vm.errors import InvalidDefinition


def error_of(text: str, source: str = "web1.toml") -> str:
    with pytest.raises(InvalidDefinition) as info:
        parse_definition(text, source)
    return str(info.value)


# --- names -----------------------------------------------------------------------------------

BAD_NAMES = [
    ("../x", "'/'"),
    ("a/b", "'/'"),
    ("a" * 65, "at most 64"),
    ("", "must not be empty"),
    ("with space", "spaces"),
    ("a\nb", "control characters"),
    ("a\tb", "control characters"),
    ("a\x7fb", "control characters"),
    ("-lead", "start with a letter or digit"),
    ("_lead", "start with a letter or digit"),
    (".hidden", "start with a letter or digit"),
    ("x.service", "'.service'"),
    ("x.scope", "'.scope'"),
    ("machine.slice", "'.slice'"),
    ("a.device", "'.device'"),
    ("a@b", "only letters, digits"),
    ("a:b", "only letters, digits"),
    ("caf\u00e9", "only letters, digits"),
    ("\u00e9t\u00e9", "start with a letter or digit"),
]

GOOD_NAMES = ["a", "0", "a" * 64, "acc-a", "web_1.prod", "Web1", "x.services", "1.2.3", "a-"]


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
def test_validate_name_rejects(name: str, reason: str) -> None:
    with pytest.raises(InvalidDefinition, match="invalid VM name") as info:
        validate_name(name)
    assert reason in str(info.value)


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
def test_parse_rejects_bad_name_naming_the_field(name: str, reason: str) -> None:
    message = error_of(f"name = {toml_string(name)}\n")
    assert message.startswith("web1.toml: field 'name': ")
    assert reason in message


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name
    assert parse_definition(f'name = "{name}"').name == name


def test_validate_name_rejects_non_string() -> None:
    with pytest.raises(InvalidDefinition, match="must be a string"):
        validate_name(5)  # type: ignore[arg-type]


# --- fields ----------------------------------------------------------------------------------


def test_minimal_definition_gets_defaults() -> None:
    assert parse_definition('name = "web1"') == Definition(name="web1")
    defn = Definition(name="web1")
    assert defn.memory == 512
    assert defn.accel == ("kvm", "tcg")
    assert defn.restart == "no"


def test_full_definition() -> None:
    text = """
name = "web1"
memory = 2048
cpus = 4
machine = "q35"
accel = "tcg"
stop_timeout = 60
restart = "on-crash"
autostart = true
qemu = "/opt/qemu/bin/qemu-system-x86_64"
extra_args = ["-device", "virtio-rng-pci"]

[[disks]]
path = "/var/lib/supervisord-vm/images/web1.qcow2"
format = "qcow2"

[[disks]]
path = "/srv/seed.img"
readonly = true
snapshot = true
"""
    assert parse_definition(text) == Definition(
        name="web1",
        memory=2048,
        cpus=4,
        machine="q35",
        accel=("tcg",),
        stop_timeout=60,
        restart="on-crash",
        autostart=True,
        qemu="/opt/qemu/bin/qemu-system-x86_64",
        extra_args=("-device", "virtio-rng-pci"),
        disks=(
            Disk("/var/lib/supervisord-vm/images/web1.qcow2", "qcow2"),
            Disk("/srv/seed.img", "raw", readonly=True, snapshot=True),
        ),
    )


def test_memory_error_message_is_exact() -> None:
    assert error_of('name = "web1"\nmemory = "abc"') == (
        "web1.toml: field 'memory': must be an integer from 16 to 1048576 (MiB), got 'abc'"
    )


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ("memory = true", "memory", "got true (a boolean)"),
        ("memory = 15", "memory", "from 16 to 1048576"),
        ("memory = 1048577", "memory", "got 1048577"),
        ("memory = 512.0", "memory", "got 512.0"),
        ("cpus = 0", "cpus", "from 1 to 255"),
        ("cpus = 256", "cpus", "from 1 to 255"),
        ("cpus = false", "cpus", "boolean"),
        ("stop_timeout = 0", "stop_timeout", "from 1 to 3600"),
        ("stop_timeout = 3601", "stop_timeout", "from 1 to 3600"),
        ("stop_timeout = 1.5", "stop_timeout", "from 1 to 3600"),
        ("machine = ''", "machine", "non-empty"),
        ("machine = 'pc,accel=kvm'", "machine", "letters, digits"),
        ("machine = 5", "machine", "must be a string"),
        ("accel = ''", "accel", "an empty entry"),
        ("accel = 'kvm:'", "accel", "an empty entry"),
        ("accel = 'kvm:qux'", "accel", "unknown accelerator 'qux'"),
        ("accel = 'tcg:kvm:tcg'", "accel", "'tcg' twice"),
        ("accel = ['kvm']", "accel", "got an array"),
        ("restart = 'sometimes'", "restart", "one of no, on-crash, always"),
        ("restart = false", "restart", "one of no, on-crash, always"),
        ("autostart = 1", "autostart", "true or false"),
        ("autostart = 'yes'", "autostart", "true or false"),
        ("qemu = 'qemu-system-x86_64'", "qemu", "absolute path"),
        ("qemu = ''", "qemu", "absolute path"),
        ('qemu = "/usr/bin/q\\u0000"', "qemu", "NUL"),
        ("extra_args = '-S'", "extra_args", "array of strings"),
        ("extra_args = ['-S', 5]", "extra_args[1]", "must be a string"),
        ('extra_args = ["a\\u0000b"]', "extra_args[0]", "NUL"),
        ("disks = 'x'", "disks", "array of tables"),
        ("disks = ['x']", "disks[0]", "must be a table"),
    ],
)
def test_field_errors_name_field_and_reason(line: str, field: str, reason: str) -> None:
    message = error_of(f'name = "web1"\n{line}\n')
    assert f"web1.toml: field '{field}': " in message
    assert reason in message


def test_name_is_required() -> None:
    assert error_of("memory = 64") == "web1.toml: field 'name': is required"


def test_all_accelerators_accepted_in_order() -> None:
    accel = ":".join(reversed(ACCELERATORS))
    assert parse_definition(f'name = "a"\naccel = "{accel}"').accel == tuple(reversed(ACCELERATORS))
    assert parse_definition('name = "a"\naccel = "kvm:tcg"').accel == ("kvm", "tcg")


def test_bounds_accepted() -> None:
    defn = parse_definition('name = "a"\nmemory = 16\ncpus = 255\nstop_timeout = 3600')
    assert (defn.memory, defn.cpus, defn.stop_timeout) == (16, 255, 3600)
    defn = parse_definition('name = "a"\nmemory = 1048576\ncpus = 1\nstop_timeout = 1')
    assert (defn.memory, defn.cpus, defn.stop_timeout) == (1048576, 1, 1)


def test_unknown_key_with_suggestion() -> None:
    assert error_of('name = "web1"\nmemroy = 64') == (
        "web1.toml: unknown key 'memroy' (did you mean 'memory'?)"
    )


def test_unknown_key_without_suggestion() -> None:
    message = error_of('name = "web1"\ncolour = "blue"')
    assert message == "web1.toml: unknown key 'colour'"


def test_unknown_table_is_rejected_by_name() -> None:
    assert "unknown key 'network'" in error_of('name = "web1"\n[network]\nmode = "user"')


def test_all_problems_are_reported_together() -> None:
    message = error_of('name = "web1"\nmemroy = 1\ncpus = 0\nrestart = "x"')
    assert "unknown key 'memroy'" in message
    assert "field 'cpus'" in message
    assert "field 'restart'" in message


def test_default_source_is_used() -> None:
    with pytest.raises(InvalidDefinition, match=r"^definition: field 'cpus'"):
        parse_definition('name = "a"\ncpus = 0')


# --- disks -----------------------------------------------------------------------------------


def test_relative_disk_path_names_the_index() -> None:
    message = error_of('name = "web1"\n[[disks]]\npath = "images/web1.img"')
    assert message == (
        "web1.toml: field 'disks[0].path': must be an absolute path, got 'images/web1.img'"
    )


def test_disk_path_required() -> None:
    assert "field 'disks[0].path': is required" in error_of(
        'name = "web1"\n[[disks]]\nformat = "raw"'
    )


def test_unknown_disk_key_names_index_and_suggests() -> None:
    text = 'name = "web1"\n[[disks]]\npath = "/a"\n[[disks]]\npath = "/b"\nformt = "raw"'
    assert error_of(text) == (
        "web1.toml: unknown key 'disks[1].formt' (did you mean 'disks[1].format'?)"
    )


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ("format = 'vmdk'", "disks[0].format", "one of raw, qcow2"),
        ("format = 1", "disks[0].format", "one of raw, qcow2"),
        ("readonly = 'no'", "disks[0].readonly", "true or false"),
        ("snapshot = 0", "disks[0].snapshot", "true or false"),
        ("path = 5", "disks[0].path", "absolute path"),
        ('path = "/a\\u0000b"', "disks[0].path", "NUL"),
    ],
)
def test_disk_field_errors(line: str, field: str, reason: str) -> None:
    text = f'name = "web1"\n[[disks]]\npath = "/img"\n{line}\n'
    if line.startswith("path"):
        text = f'name = "web1"\n[[disks]]\n{line}\n'
    message = error_of(text)
    assert f"field '{field}': " in message
    assert reason in message


def test_missing_disk_files_are_not_checked_at_parse_time() -> None:
    defn = parse_definition('name = "a"\n[[disks]]\npath = "/nonexistent/disk.img"')
    assert defn.disks == (Disk("/nonexistent/disk.img"),)


# --- TOML syntax -----------------------------------------------------------------------------


def test_toml_syntax_error_has_source_and_line() -> None:
    message = error_of('name = "web1"\n\nmemory = \n', source="web1.toml")
    assert message.startswith("web1.toml: not valid TOML: ")
    assert "line 3" in message


def test_duplicate_key_is_a_toml_error() -> None:
    assert "not valid TOML" in error_of('name = "a"\nname = "b"')


# --- writing ---------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    '"',
    "\\",
    '\\"',
    "'",
    "'''",
    '"""',
    "\n",
    "\r\n",
    "\t",
    "\b\f",
    "\x01\x1b[31m",
    "\x7f",
    "\u0085",
    "\u2028\u2029",
    "\ufeff",
    "\u200b",
    "caf\u00e9",
    "\U0001f600",
    "# not a comment",
    "key = value",
    "[[disks]]",
    "a,b,,c",
    "file=/x,format=raw",
    "$(rm -rf /)",
    "\\u0041",
]


def test_toml_string_round_trips_nasty_strings() -> None:
    for text in NASTY:
        assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


def test_toml_string_escapes_controls_readably() -> None:
    assert toml_string('a"b\\c\n\x00\x7f') == '"a\\"b\\\\c\\n\\u0000\\u007F"'
    assert toml_string("\U000e0001") == '"\\U000E0001"'
    assert toml_string("caf\u00e9") == '"caf\u00e9"'


def test_toml_string_rejects_lone_surrogate() -> None:
    with pytest.raises(InvalidDefinition, match="surrogate"):
        toml_string("a\udcffb")


def test_nasty_strings_round_trip_in_extra_args_and_disk_paths() -> None:
    defn = Definition(
        name="nasty",
        extra_args=tuple(NASTY),
        disks=tuple(Disk("/images/" + text) for text in NASTY),
        qemu='/opt/q\u00e9mu "x"/bin\\qemu\n',
    )
    assert parse_definition(definition_to_toml(defn)) == defn


def _random_string(rng: random.Random) -> str:
    alphabet = [*NASTY, "a", "b", "-", "/", "=", "\x02", "\u00ff", "\U0010fffd"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))


def _random_definition(rng: random.Random) -> Definition:
    name_chars = "abcXYZ019._-"
    name = rng.choice("abz09") + "".join(
        rng.choice(name_chars) for _ in range(rng.randrange(0, 63))
    )
    if name.endswith((".scope", ".path", ".mount", ".swap", ".timer")):
        name += "x"
    accel = list(ACCELERATORS)
    rng.shuffle(accel)
    display = rng.choice(["none", "vnc"])
    return Definition(
        name=name,
        memory=rng.choice([16, 17, 512, 4096, 1048576]),
        cpus=rng.randrange(1, 256),
        machine=rng.choice(["pc", "q35", "pc-q35-8.2", "virt", "microvm"]),
        accel=tuple(accel[: rng.randrange(1, len(accel) + 1)]),
        stop_timeout=rng.randrange(1, 3601),
        restart=rng.choice(["no", "on-crash", "always"]),
        autostart=rng.random() < 0.5,
        qemu="/" + _random_string(rng),
        extra_args=tuple(_random_string(rng) for _ in range(rng.randrange(0, 5))),
        disks=tuple(
            Disk(
                path="/" + _random_string(rng),
                format=rng.choice(["raw", "qcow2"]),
                readonly=rng.random() < 0.5,
                snapshot=rng.random() < 0.5,
            )
            for _ in range(rng.randrange(0, 4))
        )
        + tuple(
            Disk(path="/" + _random_string(rng), readonly=True, media="cdrom")
            for _ in range(rng.randrange(0, 2))
        ),
        cpu=rng.choice([None, "host", "max", "Haswell,-hle,+vmx"]),
        firmware=rng.choice(["bios", "uefi"]),
        display=display,
        vnc_listen=rng.choice([None, "127.0.0.1", "::1"]) if display == "vnc" else None,
        boot=tuple(rng.sample(["disk", "cdrom", "network"], rng.randrange(0, 4))),
        nics=tuple(
            rng.sample(
                [
                    Nic("user", forward=("tcp:127.0.0.1:2222-:22",)),
                    Nic("bridge", bridge="br0", model="e1000"),
                    Nic("tap", tap="tap0", mac="52:54:00:aa:bb:cc"),
                ],
                rng.randrange(0, 4),
            )
        ),
        resources=rng.choice(
            [
                Resources(),
                Resources(cpu_weight=200, memory_max=1 << 30, slice="tenant-a.slice"),
                Resources(cpu_quota=150, allowed_cpus="0-1", tasks_max=64, io_weight=50),
            ]
        ),
        autostart_after=tuple(rng.sample(["db", "cache", "dns"], rng.randrange(0, 3))),
        autostart_delay=rng.randrange(0, 3601),
    )


def test_round_trip_many_definitions() -> None:
    rng = random.Random(20240601)
    for _ in range(500):
        defn = _random_definition(rng)
        text = definition_to_toml(defn)
        assert parse_definition(text) == defn, text
        assert definition_to_toml(parse_definition(text)) == text


def test_round_trip_defaults_and_layout() -> None:
    defn = Definition(name="web1", disks=(Disk("/img/web1.qcow2", "qcow2"),))
    assert definition_to_toml(defn) == (
        'name = "web1"\n'
        "memory = 512\n"
        "cpus = 1\n"
        'machine = "pc"\n'
        'accel = "kvm:tcg"\n'
        "stop_timeout = 10\n"
        'restart = "no"\n'
        "autostart = false\n"
        'qemu = "/usr/bin/qemu-system-x86_64"\n'
        "extra_args = []\n"
        'firmware = "bios"\n'
        'display = "none"\n'
        "boot = []\n"
        "autostart_after = []\n"
        "autostart_delay = 0\n"
        "\n"
        "[[disks]]\n"
        'path = "/img/web1.qcow2"\n'
        'format = "qcow2"\n'
        "readonly = false\n"
        "snapshot = false\n"
        'media = "disk"\n'
    )
    assert parse_definition(definition_to_toml(defn)) == defn


def test_name_whose_scope_unit_name_is_too_long_for_systemd() -> None:
    with pytest.raises(InvalidDefinition, match="over systemd's limit of 255"):
        validate_name("9" + "-" * 63)
    assert validate_name("9" + "-" * 40) == "9" + "-" * 40
