"""Definitions, runtime records and exit records on disk, written atomically.

A file is either its old or its new content, never half of each (atomic_write). Loading never
lets one bad file hide the good ones: problems are reported next to the results, and loading
creates nothing. Write failures raise OSError; the caller decides what they mean.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisord_vm.confinement import remove_qemu_runtime_dir
from supervisord_vm.definition import (
    Definition,
    definition_to_toml,
    parse_definition,
    validate_name,
)
from supervisord_vm.errors import InvalidDefinition
from supervisord_vm.lifecycle import NO_PENDING, Pending
from supervisord_vm.model import ExitInfo, Reason
from supervisord_vm.unitname import scope_name

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_PID_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT: no process ID reaches it
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX))


@dataclass(frozen=True)
class Paths:
    definitions_dir: Path = Path("/etc/supervisord-vm/vms")
    state_dir: Path = Path("/var/lib/supervisord-vm")
    runtime_dir: Path = Path("/run/supervisord-vm")
    log_dir: Path = Path("/var/log/supervisord-vm")


def log_path(paths: Paths, name: str) -> Path:
    """Where QEMU's own stdout/stderr for VM ``name`` go."""
    return paths.log_dir / f"{validate_name(name)}.log"


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix.

    The temporary file is a dotfile ending in .tmp in the same directory (so the rename
    cannot cross file systems, and loaders skip it); it is removed if anything fails.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        temp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            # os.write/fsync name no file: say which one could not be written (ENOSPC, EDQUOT).
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_directory(path.parent)


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files of writes cut off by a crash (atomic_write's dotfiles).

    Loaders skip them, but each crash mid-write would leave one more behind. Only for a
    directory no other process writes to at the same time (the daemon's start-up).
    """
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    if removed:
        _fsync_directory(directory)
    return removed


def _remove(path: Path) -> bool:
    """Unlink ``path`` durably; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_directory(path.parent)
    return True


def _candidates(directory: Path, suffix: str) -> list[Path]:
    """Files a loader should look at: NAME.suffix, not dotfiles (temp files are dotfiles)."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    return [
        entry
        for entry in entries
        if not entry.name.startswith(".") and entry.name.endswith(suffix) and entry.name != suffix
    ]


class DefinitionStore:
    """NAME.toml files, one per defined VM (the daemon's persistent configuration)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.toml"

    def load_all(self) -> tuple[dict[str, Definition], list[str]]:
        """All valid definitions by name, and one message per file that could not be used."""
        definitions: dict[str, Definition] = {}
        errors: list[str] = []
        for path in _candidates(self.directory, ".toml"):
            try:
                text = path.read_bytes().decode("utf-8")
                defn = parse_definition(text, source=str(path))
            except IsADirectoryError:
                errors.append(f"{path}: not a regular file")
                continue
            except UnicodeDecodeError as exc:
                errors.append(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            except OSError as exc:
                errors.append(f"{path}: cannot read: {exc.strerror or exc}")
                continue
            except InvalidDefinition as exc:
                errors.append(str(exc))
                continue
            expected = path.name.removesuffix(".toml")
            if defn.name != expected:
                errors.append(
                    f"{path}: field 'name' is {defn.name!r} but the file must then be "
                    f"named {defn.name}.toml"
                )
                continue
            definitions[defn.name] = defn
        return definitions, errors

    def names_on_disk(self) -> set[str]:
        """The VM names that have a NAME.toml here, usable or not.

        A file that exists but fails to load is a hand edit gone wrong, not an undefine: the
        caller keeps the last good definition of that VM in effect (as libvirt does).
        """
        names: set[str] = set()
        for path in _candidates(self.directory, ".toml"):
            name = path.name.removesuffix(".toml")
            with contextlib.suppress(InvalidDefinition):
                names.add(validate_name(name))
        return names

    def save(self, defn: Definition) -> None:
        path = self.path_for(defn.name)
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(path, definition_to_toml(defn).encode("utf-8"), 0o644)

    def remove(self, name: str) -> bool:
        """Delete the definition file; False if there was none."""
        return _remove(self.path_for(name))


@dataclass(frozen=True)
class RuntimeRecord:
    """Written when a VM is running; lets a new daemon reattach to it."""

    name: str
    pid: int
    unit: str
    transient: bool
    definition_toml: str  # what it was started with, which may differ from the file now
    started_at: float  # seconds since the epoch
    # The operation in progress (shutdown, destroy and its mode, reboot, kill), written before
    # the daemon acts on it: a daemon killed meanwhile lets the next one finish or settle it.
    pending: Pending = NO_PENDING


def _read_json(path: Path) -> object:
    """Parse a record; ValueError (never RecursionError) for whatever corruption left there.

    Start-up reads every record before it answers: one that raised anything else would stop
    the daemon for good (systemd restarting it into the same file until its start limit).
    """
    data = path.read_bytes()
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply to be a record") from None


def _seconds(key: str, value: object) -> float:
    """A time field as a float; ValueError for the wrong type or a number no float holds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field '{key}' has the wrong type")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"field '{key}' is out of range") from None


def _record_from_json(data: object) -> RuntimeRecord:
    """Check every field's type; raise ValueError naming the first bad one."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")

    def get(key: str, kind: type | tuple[type, ...]) -> object:
        if key not in data:
            raise ValueError(f"field '{key}' is missing")
        value = data[key]
        if isinstance(value, bool) and kind is not bool:
            raise ValueError(f"field '{key}' has the wrong type")
        if not isinstance(value, kind):
            raise ValueError(f"field '{key}' has the wrong type")
        return value

    name, pid, unit = get("name", str), get("pid", int), get("unit", str)
    transient, toml = get("transient", bool), get("definition_toml", str)
    started_at = _seconds("started_at", get("started_at", (int, float)))
    assert isinstance(name, str) and isinstance(pid, int) and isinstance(unit, str)
    assert isinstance(transient, bool) and isinstance(toml, str)
    if not 0 <= pid < _PID_LIMIT:  # 0: the start was cut off before QEMU's PID was known
        raise ValueError("field 'pid' is out of range")
    # Reattach looks the scope up by this field: another name would leave the VM's own scope
    # to the orphan path while the record's run is settled as ended (two exits, VM stopped).
    if unit != scope_name(name):
        raise ValueError(f"field 'unit' is not the scope of VM {name!r}")
    # Optional: records of earlier versions carry a stop intent string, or nothing.
    if "pending" in data:
        try:
            pending = Pending.from_json(data["pending"])
        except OverflowError:  # float() of an integer too large for one
            raise ValueError("field 'pending' holds a number out of range") from None
    else:
        stop = data.get("stop", "")
        stop_at = _seconds("stop_at", data.get("stop_at", 0.0))
        if not isinstance(stop, str):
            raise ValueError("field 'stop' is not a known stop intent")
        pending = Pending.from_stop_intent(stop, stop_at)
    return RuntimeRecord(name, pid, unit, transient, toml, started_at, pending)


def _record_to_json(record: RuntimeRecord) -> bytes:
    data = asdict(record)
    data["pending"] = record.pending.to_json()
    return json.dumps(data, indent=1).encode("utf-8")


class RuntimeStore:
    """NAME.json (a RuntimeRecord) and NAME.qmp (QEMU's monitor socket) per running VM.

    The directory is created 0700 because the QMP socket gives full control over the VM.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def qmp_socket(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.qmp"

    def _record_path(self, name: str) -> Path:
        return self.directory / f"{validate_name(name)}.json"

    def save(self, record: RuntimeRecord) -> None:
        path = self._record_path(record.name)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, _record_to_json(record), 0o600)

    def load_all(self) -> tuple[dict[str, RuntimeRecord], list[str]]:
        """All readable records by name, and one message per torn or corrupt file."""
        records: dict[str, RuntimeRecord] = {}
        errors: list[str] = []
        for path in _candidates(self.directory, ".json"):
            try:
                record = _record_from_json(_read_json(path))
            except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError too
                errors.append(f"{path}: unusable runtime record: {exc}")
                continue
            if record.name != path.name.removesuffix(".json"):
                errors.append(f"{path}: unusable runtime record: names VM {record.name!r}")
                continue
            records[record.name] = record
        return records, errors

    def remove(self, name: str) -> None:
        """Forget a VM's runtime files; fine if they are already gone."""
        _remove(self._record_path(name))
        self.qmp_socket(name).unlink(missing_ok=True)
        remove_qemu_runtime_dir(self.directory, name)


def _exit_from_json(data: object) -> tuple[Reason, ExitInfo]:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    reason_text = data.get("reason")
    if not isinstance(reason_text, str):
        raise ValueError("field 'reason' is missing or not a string")
    reason = Reason(reason_text)  # ValueError for a reason this version does not know
    result = data.get("result", "")
    status = data.get("exit_status")
    signal = data.get("exit_signal")
    time = _seconds("time", data.get("time", 0.0))
    if not isinstance(result, str):
        raise ValueError("field 'result' has the wrong type")
    # A process's exit status is 0-255 and a signal below 128: anything else is corruption
    # (and would not even fit the D-Bus properties' int32).
    for key, value, top in (("exit_status", status, 255), ("exit_signal", signal, 127)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"field '{key}' has the wrong type")
        if value is not None and not 0 <= value <= top:
            raise ValueError(f"field '{key}' is out of range")
    assert status is None or isinstance(status, int)
    assert signal is None or isinstance(signal, int)
    return reason, ExitInfo(result, status, signal, time)


class StateStore:
    """Facts that must survive daemon and host restarts: how each VM last ended, and the boot
    in which autostart already ran (so a daemon restart does not autostart again)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._exits = directory / "exits"
        self._boot_id = directory / "autostart-boot-id"

    def _exit_path(self, name: str) -> Path:
        return self._exits / f"{validate_name(name)}.json"

    def load_exits(self) -> dict[str, tuple[Reason, ExitInfo]]:
        """Every readable exit record by VM name; unreadable ones are logged and skipped."""
        exits: dict[str, tuple[Reason, ExitInfo]] = {}
        for path in _candidates(self._exits, ".json"):
            name = path.name.removesuffix(".json")
            try:
                validate_name(name)
                exits[name] = _exit_from_json(_read_json(path))
            except (OSError, ValueError, InvalidDefinition) as exc:
                log.warning("%s: ignoring unusable exit record: %s", path, exc)
        return exits

    def save_exit(self, name: str, reason: Reason, exit: ExitInfo) -> None:
        path = self._exit_path(name)
        self._exits.mkdir(mode=0o755, parents=True, exist_ok=True)
        data = {"reason": str(reason), **asdict(exit)}
        atomic_write(path, json.dumps(data, indent=1).encode("utf-8"), 0o644)

    def remove_exit(self, name: str) -> None:
        _remove(self._exit_path(name))

    def autostart_boot_id(self) -> str | None:
        """The boot ID in which autostart last ran, or None if never (or unreadable)."""
        try:
            text = self._boot_id.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s: ignoring unreadable boot id: %s", self._boot_id, exc)
            return None
        return text or None

    def set_autostart_boot_id(self, boot_id: str) -> None:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(self._boot_id, f"{boot_id}\n".encode(), 0o644)
