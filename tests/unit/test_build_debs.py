"""The pure parts of the Debian build driver (packaging/build_debs.py): `make deb` runs the rest."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    # By path: the directory's name is also the name of a PyPI library.
    spec = importlib.util.spec_from_file_location(f"svm_{name}", CHECKOUT / "packaging" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


build_debs = load("build_debs.py")


@pytest.mark.parametrize(
    ("version", "upstream"),
    [("0.1.0-1", "0.1.0"), ("0.1.0-1+upgrade1", "0.1.0"), ("1:2.0-3", "2.0"), ("0.0.6", "0.0.6")],
)
def test_upstream_version_drops_epoch_and_revision(version: str, upstream: str) -> None:
    assert build_debs.upstream_version(version) == upstream


def test_sdist_file_name_is_the_normalized_pypi_one() -> None:
    assert build_debs.Sdist("qemu.qmp", "0.0.6", "x").filename == "qemu_qmp-0.0.6.tar.gz"
    assert build_debs.Sdist("sdbus", "0.14.3", "x").filename == "sdbus-0.14.3.tar.gz"


def test_every_dependency_recipe_names_a_pinned_sdist() -> None:
    recipes = sorted(path for path in (CHECKOUT / "packaging" / "deps").iterdir() if path.is_dir())
    assert recipes
    for recipe in recipes:
        sdist = build_debs.read_sdist(recipe)
        assert len(sdist.sha256) == 64, recipe
        source, version = build_debs.changelog_head(recipe)
        assert source == recipe.name
        assert build_debs.upstream_version(version) == sdist.version, recipe


def test_build_tools_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyenv's or a venv's python first on PATH made pybuild build for the wrong interpreter."""
    monkeypatch.setenv("PATH", "/root/.pyenv/shims:/usr/bin")
    monkeypatch.setenv("PYENV_VERSION", "3.11.7")
    monkeypatch.setenv("VIRTUAL_ENV", "/work/main/.venv")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = build_debs.clean_env()
    assert env["PATH"] == build_debs.CLEAN_PATH
    assert not {"PYENV_VERSION", "VIRTUAL_ENV", "PYTHONPATH"} & set(env)


def test_changelog_entry_for_an_upgrade_build_goes_on_top(tmp_path: Path) -> None:
    (tmp_path / "debian").mkdir()
    original = (CHECKOUT / "debian" / "changelog").read_text()
    (tmp_path / "debian" / "changelog").write_text(original)
    build_debs.set_version(tmp_path, "0.1.0-1+upgrade1")
    assert build_debs.changelog_head(tmp_path) == ("supervisord-vm", "0.1.0-1+upgrade1")
    assert (tmp_path / "debian" / "changelog").read_text().endswith(original)


def test_every_runtime_dependency_maps_to_a_debian_package() -> None:
    """dh_python3 guesses a name for an unmapped requirement, which then no apt source has."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    overrides = {
        line.split()[0]
        for line in (CHECKOUT / "debian" / "py3dist-overrides").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        assert name in overrides, f"{name}: add it to debian/py3dist-overrides"


@pytest.mark.parametrize(
    ("unit", "destination"),
    [
        ("supervisord-vm.service", "lib/systemd/system/supervisord-vm.service"),
        (
            "org.supervisordvm1.service",
            "usr/share/dbus-1/system-services/org.supervisordvm1.service",
        ),
        ("org.supervisordvm1.conf", "usr/share/dbus-1/system.d/org.supervisordvm1.conf"),
        ("supervisord-vm.sysusers", "usr/lib/sysusers.d/supervisord-vm.conf"),
        ("supervisord-vm.tmpfiles", "usr/lib/tmpfiles.d/supervisord-vm.conf"),
        ("supervisord-vm.default", "etc/default/supervisord-vm"),
        ("supervisord-vm.apparmor", None),
    ],
)
def test_unit_files_have_a_place_in_the_package(unit: str, destination: str | None) -> None:
    assert build_debs.unit_file_destination(unit) == destination
