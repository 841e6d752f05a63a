"""Pure parts of the reviewer fixes: which names have a file, error wording."""

from __future__ import annotations

import errno
from pathlib import Path

from supervisord_vm.launch import exec_problem as _exec_problem
from supervisord_vm.launch import os_error as _os_error
from supervisord_vm.launch import path_problem as _path_problem
from supervisord_vm.store import DefinitionStore
from supervisord_vm.supervisor import _note_kept


def test_names_on_disk_counts_broken_files(tmp_path: Path) -> None:
    tmp_path.joinpath("good.toml").write_text('name = "good"\n')
    tmp_path.joinpath("bad.toml").write_text('name = "bad"\nmemroy = 1\n')
    tmp_path.joinpath(".hidden.toml").write_text("")
    tmp_path.joinpath("-x.toml").write_text("")  # not a VM name
    store = DefinitionStore(tmp_path)
    definitions, errors = store.load_all()
    assert set(definitions) == {"good"}
    assert store.names_on_disk() == {"good", "bad"}
    assert len(errors) == 2
    assert DefinitionStore(tmp_path / "missing").names_on_disk() == set()


def test_note_kept_annotates_the_files_error() -> None:
    path = Path("/d/r1.toml")
    errors = ["/d/r1.toml: unknown key 'memroy'", "/d/x.toml: bad"]
    assert _note_kept(errors, path, "r1") == [
        "/d/r1.toml: unknown key 'memroy' (VM r1 keeps its last good definition)",
        "/d/x.toml: bad",
    ]
    assert _note_kept([], path, "r1") == [
        "/d/r1.toml: cannot be loaded (VM r1 keeps its last good definition)"
    ]


def test_exec_problems_read_well() -> None:
    def exec_error(code: int) -> OSError:
        return OSError(code, "cannot execute /q: whatever")

    assert _exec_problem("/etc/hostname", exec_error(errno.ENOEXEC)) == (
        "QEMU binary /etc/hostname is not an executable program (Exec format error)"
    )
    assert _exec_problem("/q", exec_error(errno.EACCES)) == (
        "QEMU binary /q cannot be executed (permission denied)"
    )
    assert _exec_problem("/q", exec_error(errno.EIO)) == (
        "QEMU binary /q cannot be executed (Input/output error)"
    )
    for code in (errno.ENOENT, errno.EISDIR, errno.ETXTBSY, errno.E2BIG):
        assert "Errno" not in _exec_problem("/q", exec_error(code))


def test_os_errors_read_well() -> None:
    err = PermissionError(errno.EACCES, "Permission denied", "/var/log/x.log")
    assert _os_error(err) == "/var/log/x.log: Permission denied"
    assert _path_problem("/a", FileNotFoundError(errno.ENOENT, "x")) == "/a does not exist"
    assert "permission denied" in _path_problem("/a", PermissionError(errno.EACCES, "x"))
    assert "not a directory" in _path_problem("/a/b", NotADirectoryError(errno.ENOTDIR, "x"))
