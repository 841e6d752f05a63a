"""On-disk stores: atomic writes, tolerant loading, nothing left behind (tmp_path, no root)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from supervisord_vm import lifecycle
from supervisord_vm.definition import Definition, Disk, definition_to_toml
from supervisord_vm.errors import InvalidDefinition
from supervisord_vm.model import DestroyMode, ExitInfo, Reason
from supervisord_vm.store import (
    DefinitionStore,
    Paths,
    RuntimeRecord,
    RuntimeStore,
    StateStore,
    atomic_write,
    log_path,
    remove_temp_files,
)


def names_in(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- atomic_write ----------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write(target, b"two" * 100000, mode=0o600)
    assert target.read_bytes() == b"two" * 100000
    assert mode_of(target) == 0o600
    assert names_in(tmp_path) == ["f.txt"]


def test_atomic_write_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "f", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "f") == 0o644


def test_atomic_write_failing_rename_leaves_no_temp_and_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        atomic_write(target, b"data")
    assert names_in(tmp_path) == ["target"]
    assert (target / "inside").read_text() == "keep"


def test_atomic_write_failing_write_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(target, b"new")
    assert names_in(tmp_path) == ["f"]
    assert target.read_bytes() == b"old"


def test_atomic_write_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")


# --- DefinitionStore -------------------------------------------------------------------------


def test_definition_store_save_load_remove(tmp_path: Path) -> None:
    directory = tmp_path / "etc" / "vms"
    store = DefinitionStore(directory)
    assert store.load_all() == ({}, [])
    assert not directory.exists(), "loading must create nothing"

    web = Definition(name="web1", memory=64, disks=(Disk("/img/w.qcow2", "qcow2"),))
    db = Definition(name="acc-a", extra_args=("-S", 'q"\n'))
    store.save(web)
    store.save(db)
    assert mode_of(directory) & 0o777 == 0o755 & ~_umask()
    assert store.path_for("web1") == directory / "web1.toml"
    assert mode_of(store.path_for("web1")) == 0o644
    assert store.path_for("web1").read_text() == definition_to_toml(web)
    assert store.load_all() == ({"web1": web, "acc-a": db}, [])

    assert store.remove("web1") is True
    assert store.remove("web1") is False
    assert store.load_all() == ({"acc-a": db}, [])


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_definition_store_save_overwrites(tmp_path: Path) -> None:
    store = DefinitionStore(tmp_path)
    store.save(Definition(name="a", memory=64))
    store.save(Definition(name="a", memory=128))
    assert store.load_all() == ({"a": Definition(name="a", memory=128)}, [])
    assert names_in(tmp_path) == ["a.toml"]


def test_definition_store_path_for_rejects_bad_names(tmp_path: Path) -> None:
    store = DefinitionStore(tmp_path)
    for name in ["../x", "a/b", "", ".hidden"]:
        with pytest.raises(InvalidDefinition):
            store.path_for(name)


def test_definition_store_reports_bad_files_and_loads_the_rest(tmp_path: Path) -> None:
    store = DefinitionStore(tmp_path)
    good = Definition(name="good")
    store.save(good)
    (tmp_path / "badtoml.toml").write_text('name = "badtoml"\nmemory = \n')
    (tmp_path / "badfield.toml").write_text('name = "badfield"\nmemory = "abc"\n')
    (tmp_path / "typo.toml").write_text('name = "typo"\nmemroy = 64\n')
    (tmp_path / "other.toml").write_text('name = "mismatch"\n')
    (tmp_path / "torn.toml").write_text('name = "torn"\nmemory = 5')  # half written
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "dir.toml").mkdir()
    # Ignored without a message: temp files, dotfiles, other suffixes.
    (tmp_path / ".good.toml.0123456789abcdef.tmp").write_text("half")
    (tmp_path / ".hidden.toml").write_text('name = "hidden"\n')
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "good.toml~").write_text("backup")
    (tmp_path / ".toml").write_text("")

    definitions, errors = store.load_all()
    assert definitions == {"good": good}
    joined = "\n".join(errors)
    assert len(errors) == 7, joined
    assert f"{tmp_path / 'badtoml.toml'}: not valid TOML" in joined
    assert "line 2" in joined
    assert f"{tmp_path / 'badfield.toml'}: field 'memory'" in joined
    assert "unknown key 'memroy' (did you mean 'memory'?)" in joined
    assert "'mismatch'" in joined
    assert "mismatch.toml" in joined
    assert f"{tmp_path / 'torn.toml'}: field 'memory'" in joined
    assert f"{tmp_path / 'binary.toml'}: not valid UTF-8" in joined
    assert f"{tmp_path / 'dir.toml'}: not a regular file" in joined


def test_definition_store_unreadable_file_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: tests may run as root, which reads files whatever their mode.
    store = DefinitionStore(tmp_path)
    (tmp_path / "locked.toml").write_text('name = "locked"\n')
    store.save(Definition(name="ok"))
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "locked.toml":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    definitions, errors = store.load_all()
    assert list(definitions) == ["ok"]
    assert errors == [f"{tmp_path / 'locked.toml'}: cannot read: Permission denied"]


def test_definition_store_failed_save_leaves_no_temp(tmp_path: Path) -> None:
    store = DefinitionStore(tmp_path)
    store.path_for("web1").mkdir()  # rename over a directory fails
    with pytest.raises(OSError):
        store.save(Definition(name="web1"))
    assert names_in(tmp_path) == ["web1.toml"]
    assert store.path_for("web1").is_dir()


# --- RuntimeStore ----------------------------------------------------------------------------


def record(name: str, pid: int = 1234) -> RuntimeRecord:
    defn = Definition(name=name, memory=16, accel=("tcg",))
    return RuntimeRecord(
        name=name,
        pid=pid,
        unit=f"svm-{name}.scope",
        transient=False,
        definition_toml=definition_to_toml(defn),
        started_at=1700000000.25,
    )


def test_runtime_store_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    store = RuntimeStore(directory)
    assert store.load_all() == ({}, [])
    assert not directory.exists()

    store.save(record("a"))
    store.save(record("b", pid=99))
    assert mode_of(directory) == 0o700 & ~_umask()
    assert mode_of(directory / "a.json") == 0o600
    assert store.load_all() == ({"a": record("a"), "b": record("b", pid=99)}, [])
    assert store.qmp_socket("a") == directory / "a.qmp"


def test_runtime_store_remove_is_idempotent_and_removes_socket(tmp_path: Path) -> None:
    store = RuntimeStore(tmp_path)
    store.save(record("a"))
    store.qmp_socket("a").write_text("")  # stands in for the socket
    store.remove("a")
    assert names_in(tmp_path) == []
    store.remove("a")
    store.remove("never-there")


def test_runtime_store_tolerates_torn_and_corrupt_records(tmp_path: Path) -> None:
    store = RuntimeStore(tmp_path)
    store.save(record("good"))
    full = (tmp_path / "good.json").read_text()
    (tmp_path / "torn.json").write_text(full.replace("good", "torn")[: len(full) // 2])
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe")
    wrong_type = json.loads(full.replace("good", "wrongtype"))
    wrong_type["pid"] = "1234"
    (tmp_path / "wrongtype.json").write_text(json.dumps(wrong_type))
    bool_pid = json.loads(full.replace("good", "boolpid"))
    bool_pid["pid"] = True
    (tmp_path / "boolpid.json").write_text(json.dumps(bool_pid))
    missing = json.loads(full.replace("good", "missing"))
    del missing["unit"]
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    (tmp_path / "renamed.json").write_text(full)  # says it is "good"
    (tmp_path / ".good.json.0123.tmp").write_text("{")
    (tmp_path / "good.qmp").write_text("")

    records, errors = store.load_all()
    assert records == {"good": record("good")}
    assert len(errors) == 8, errors
    assert all("unusable runtime record" in error for error in errors)
    assert any("'pid'" in error and "wrongtype" in error for error in errors)
    assert any("'unit' is missing" in error for error in errors)


def test_runtime_store_pending_operation_round_trip(tmp_path: Path) -> None:
    store = RuntimeStore(tmp_path)
    cases = [
        lifecycle.destroy(DestroyMode.GRACEFUL, 1700000001.5),
        lifecycle.shutdown(1.0),
        dataclasses.replace(lifecycle.reboot(2.0), guest_off=True),
        lifecycle.NO_PENDING.with_kill(10, 3.0),
        lifecycle.shutdown(4.0).with_kill(9, 5.0),
    ]
    for pending in cases:
        record_with = dataclasses.replace(record("a"), pending=pending)
        store.save(record_with)
        assert store.load_all() == ({"a": record_with}, [])


def test_runtime_store_reads_older_records(tmp_path: Path) -> None:
    """Records without a pending operation, or with an earlier version's stop intent, load."""
    store = RuntimeStore(tmp_path)
    store.save(record("a"))
    old = json.loads((tmp_path / "a.json").read_text())
    del old["pending"]
    (tmp_path / "a.json").write_text(json.dumps(old))
    assert store.load_all() == ({"a": record("a")}, [])
    (tmp_path / "a.json").write_text(
        json.dumps({**old, "stop": "destroy-graceful", "stop_at": 5.0})
    )
    pending = lifecycle.destroy(DestroyMode.GRACEFUL, 5.0)
    assert store.load_all() == ({"a": dataclasses.replace(record("a"), pending=pending)}, [])
    for stop, stop_at in (("reboot", 1.0), (1, 1.0), ("destroy", "soon"), ("destroy", True)):
        bad = {**old, "stop": stop, "stop_at": stop_at}
        (tmp_path / "a.json").write_text(json.dumps(bad))
        records, errors = store.load_all()
        assert records == {}
        assert len(errors) == 1 and "'stop" in errors[0], errors


@pytest.mark.parametrize(
    "pending",
    [
        "destroy",
        {"op": "explode"},
        {"op": "destroy", "mode": ""},
        {"op": "shutdown", "mode": "force"},
        {"op": "kill", "signal": "TERM"},
        {"op": "kill", "signal": 999},
        {"op": "reboot", "since": "now"},
        {"op": "reboot", "guest_off": 1},
    ],
)
def test_runtime_store_refuses_a_bad_pending_operation(tmp_path: Path, pending: object) -> None:
    store = RuntimeStore(tmp_path)
    store.save(record("a"))
    data = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({**data, "pending": pending}))
    records, errors = store.load_all()
    assert records == {}
    assert len(errors) == 1 and "'pending" in errors[0], errors


def test_runtime_store_failed_save_leaves_no_temp(tmp_path: Path) -> None:
    store = RuntimeStore(tmp_path)
    (tmp_path / "a.json").mkdir()
    with pytest.raises(OSError):
        store.save(record("a"))
    assert names_in(tmp_path) == ["a.json"]


# --- StateStore ------------------------------------------------------------------------------


def test_state_store_exits_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load_exits() == {}
    assert not (tmp_path / "state").exists()

    crashed = ExitInfo(result="signal", exit_signal=9, time=1700000000.5)
    shutdown = ExitInfo(result="success", exit_status=0, time=1700000001.0)
    store.save_exit("a", Reason.CRASHED, crashed)
    store.save_exit("b", Reason.SHUTDOWN, shutdown)
    store.save_exit("b", Reason.LOST, ExitInfo())
    assert store.load_exits() == {
        "a": (Reason.CRASHED, crashed),
        "b": (Reason.LOST, ExitInfo()),
    }
    on_disk = json.loads((tmp_path / "state" / "exits" / "a.json").read_text())
    assert on_disk == {
        "reason": "crashed",
        "result": "signal",
        "exit_status": None,
        "exit_signal": 9,
        "time": 1700000000.5,
    }

    store.remove_exit("a")
    store.remove_exit("a")
    assert list(store.load_exits()) == ["b"]


def test_state_store_skips_corrupt_exit_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    store.save_exit("good", Reason.DESTROYED, ExitInfo(result="success"))
    exits = tmp_path / "exits"
    (exits / "torn.json").write_text('{"reason": "crash')
    (exits / "badreason.json").write_text('{"reason": "exploded"}')
    (exits / "noreason.json").write_text('{"result": "success"}')
    (exits / "badsignal.json").write_text('{"reason": "crashed", "exit_signal": "KILL"}')
    (exits / "boolstatus.json").write_text('{"reason": "crashed", "exit_status": true}')
    (exits / "badtime.json").write_text('{"reason": "crashed", "time": "now"}')
    (exits / "bad name.json").write_text('{"reason": "crashed"}')
    (exits / ".good.json.abcd.tmp").write_text("{")
    with caplog.at_level(logging.WARNING, logger="supervisord_vm.store"):
        loaded = store.load_exits()
    assert loaded == {"good": (Reason.DESTROYED, ExitInfo(result="success"))}
    assert len(caplog.records) == 7


def test_state_store_integer_time_is_accepted(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / "exits").mkdir()
    (tmp_path / "exits" / "a.json").write_text('{"reason": "shutdown", "time": 5}')
    assert store.load_exits() == {"a": (Reason.SHUTDOWN, ExitInfo(time=5.0))}


def test_state_store_failed_exit_save_leaves_no_temp(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / "exits" / "a.json").mkdir(parents=True)
    with pytest.raises(OSError):
        store.save_exit("a", Reason.CRASHED, ExitInfo())
    assert names_in(tmp_path / "exits") == ["a.json"]


def test_state_store_autostart_boot_id(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.autostart_boot_id() is None
    store.set_autostart_boot_id("0123456789abcdef0123456789abcdef")
    assert store.autostart_boot_id() == "0123456789abcdef0123456789abcdef"
    assert (tmp_path / "state" / "autostart-boot-id").read_text() == (
        "0123456789abcdef0123456789abcdef\n"
    )
    store.set_autostart_boot_id("fedcba")
    assert StateStore(tmp_path / "state").autostart_boot_id() == "fedcba"
    assert names_in(tmp_path / "state") == ["autostart-boot-id"]


def test_state_store_empty_boot_id_means_none(tmp_path: Path) -> None:
    (tmp_path / "autostart-boot-id").write_text("\n")
    assert StateStore(tmp_path).autostart_boot_id() is None


def test_state_store_rejects_bad_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidDefinition):
        StateStore(tmp_path).save_exit("../x", Reason.CRASHED, ExitInfo())
    assert names_in(tmp_path) == []


# --- Paths -----------------------------------------------------------------------------------


def test_paths_defaults_and_log_path(tmp_path: Path) -> None:
    paths = Paths()
    assert paths.definitions_dir == Path("/etc/supervisord-vm/vms")
    assert paths.state_dir == Path("/var/lib/supervisord-vm")
    assert paths.runtime_dir == Path("/run/supervisord-vm")
    assert log_path(paths, "web1") == Path("/var/log/supervisord-vm/web1.log")
    custom = Paths(log_dir=tmp_path)
    assert log_path(custom, "acc-a") == tmp_path / "acc-a.log"
    with pytest.raises(InvalidDefinition):
        log_path(paths, "../etc/passwd")


def test_remove_temp_files_takes_only_what_a_cut_off_atomic_write_left(tmp_path: Path) -> None:
    keep = ["web1.toml", ".hidden", ".web1.toml.tmp", ".web1.toml.XYZ0123456789abc.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    stale = tmp_path / ".web1.toml.0123456789abcdef.tmp"  # what SIGKILL mid-write leaves
    stale.write_text("half")
    (tmp_path / ".dir.0123456789abcdef.tmp").mkdir()
    assert remove_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*keep, ".dir.0123456789abcdef.tmp"]
    )
    assert remove_temp_files(tmp_path / "missing") == []
