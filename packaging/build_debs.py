"""Build supervisord-vm's Debian packages and a local apt repository from them (`make deb`).

Hosts install supervisord-vm with apt, offline from PyPI: this builds
  - supervisord-vm (Architecture: all) from the checkout, with debian/;
  - the Python libraries it needs that bookworm lacks (packaging/deps/*: qemu.qmp, and sdbus,
    which bookworm has only in backports), each from its PyPI source distribution (downloaded
    here, sha256 checked) with the debian/ directory kept in packaging/deps/NAME/;
and writes DIST (default dist/) with the .debs, a Packages index and a Release file, usable as
`deb [trusted=yes] file:/path/to/dist ./`. The rest (python3-pystemd, python3-sdnotify,
python3-pyroute2, QEMU, ...) comes from Debian's own archive.

Every tool runs with a clean environment: pyenv's or a venv's python first on PATH would make
pybuild build for the wrong interpreter. Lintian checks every package (errors fail the build).

    /usr/bin/python3 packaging/build_debs.py [--dist DIR] [--workdir DIR] [--version V]
                                             [--only-main] [--no-lintian]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
DEPS_DIR = CHECKOUT / "packaging" / "deps"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Never copied into the source tree the package is built from.
SOURCE_EXCLUDES = {".git", ".venv", "dist", "build", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
REQUIRED_TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "dpkg-scanpackages", "apt-ftparchive")
# Part of every dependency's cache key: bump it when the way they are built changes.
RECIPE_FORMAT = b"2: source and binary packages"
MAINTAINER = "supervisord-vm maintainers <maintainers@users.noreply.r-seed-0ed6a537.example>"


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


@dataclass(frozen=True)
class Sdist:
    """A PyPI source distribution a dependency package is built from (packaging/deps/*/sdist)."""

    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}.tar.gz"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every build tool gets: system PATH, no Python or pyenv overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "PYENV", "PIP_", "VIRTUAL_ENV", "DEB_", "DH_"))
        and key not in {"PATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONDA_PREFIX"}
    }
    env |= {
        "PATH": CLEAN_PATH,
        "LC_ALL": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        # a -dbgsym package of python3-sdbus is of no use in a local repository
        "DEB_BUILD_OPTIONS": "noautodbgsym",
    }
    return env | (extra or {})


def run(argv: Sequence[str], *, cwd: Path | None = None, log: Path | None = None) -> str:
    """Run a build tool; its output goes to `log` (shown if it fails) or is returned."""
    result = subprocess.run(
        argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        where = f" (full log: {log})" if log else ""
        raise BuildError(f"{' '.join(argv)} failed with {result.returncode}{where}:\n{tail}")
    return output


def check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=CLEAN_PATH) is None]
    if missing:
        raise BuildError(
            f"missing build tools: {', '.join(missing)} (run `make deb-deps` to install them)"
        )


def source_files(checkout: Path) -> list[Path]:
    """The checkout's files as a clean clone would have them (plus uncommitted work)."""
    if (checkout / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=checkout,
            env=clean_env(),
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [name for name in listed.split("\0") if name]
    else:
        names = [str(path.relative_to(checkout)) for path in checkout.rglob("*")]
    files = []
    for name in names:
        path = Path(name)
        if path.parts[0] in SOURCE_EXCLUDES or "__pycache__" in path.parts:
            continue
        full = checkout / path
        if full.is_symlink() or full.is_file():
            files.append(path)
    return files


def copy_tree(checkout: Path, files: Iterable[Path], target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    for path in files:
        destination = target / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = checkout / path
        if source.is_symlink():
            destination.symlink_to(source.readlink())
        else:
            shutil.copy2(source, destination)


def set_version(source_tree: Path, version: str) -> None:
    """Put a changelog entry for `version` on top (an upgrade build for the tests)."""
    changelog = source_tree / "debian" / "changelog"
    package = changelog.read_text().split(" ", 1)[0]
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    entry = (
        f"{package} ({version}) bookworm; urgency=medium\n\n"
        f"  * Rebuilt as {version}.\n\n -- {MAINTAINER}  {date}\n\n"
    )
    changelog.write_text(entry + changelog.read_text())


def changelog_head(source_tree: Path) -> tuple[str, str]:
    """(source package, version) of the newest debian/changelog entry."""
    first = (source_tree / "debian" / "changelog").read_text().split("\n", 1)[0]
    match = re.match(r"(\S+) \(([^)]+)\)", first)
    if match is None:
        raise BuildError(f"{source_tree / 'debian' / 'changelog'}: cannot read {first!r}")
    return match.group(1), match.group(2)


def upstream_version(version: str) -> str:
    """`1:0.1.0-1+x` -> `0.1.0`: no epoch, no Debian revision."""
    without_epoch = version.split(":", 1)[-1]
    return without_epoch.rsplit("-", 1)[0] if "-" in without_epoch else without_epoch


def build_package(source_tree: Path, out: Path, logs: Path, orig: Path | None = None) -> list[Path]:
    """dpkg-buildpackage (source and binaries, so lintian sees both) in `source_tree`.

    The upstream tarball is `orig` (a PyPI sdist) or, for supervisord-vm, the tree itself with
    debian/ left out. Everything it writes is moved into `out`; returns the .deb files.
    """
    parent = source_tree.parent
    for leftover in parent.iterdir():  # of an interrupted earlier build
        if leftover.is_file():
            leftover.unlink()
    source, version = changelog_head(source_tree)
    orig_tarball = parent / f"{source}_{upstream_version(version)}.orig.tar.gz"
    if orig is None:
        run(
            [
                "tar",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--exclude",
                f"{source_tree.name}/debian",
                "-C",
                str(parent),
                "-czf",
                str(orig_tarball),
                source_tree.name,
            ]
        )
    else:
        shutil.copy2(orig, orig_tarball)
    log = logs / f"{source_tree.name}.build.log"
    run(["dpkg-buildpackage", "-us", "-uc", "--no-sign"], cwd=source_tree, log=log)
    debs = []
    for record in sorted(parent.iterdir()):
        if record.is_file():
            shutil.move(record, out / record.name)
            if record.suffix == ".deb":
                debs.append(out / record.name)
    if not debs:
        raise BuildError(f"{source_tree.name}: dpkg-buildpackage wrote no .deb")
    return debs


def unit_file_destination(name: str) -> str | None:
    """Where the package must have put units/NAME (None: a kind of file debian/rules ignores)."""
    if name.startswith("org.") and name.endswith(".conf"):
        return f"usr/share/dbus-1/system.d/{name}"
    if name.startswith("org.") and name.endswith(".service"):
        return f"usr/share/dbus-1/system-services/{name}"
    if name.endswith((".service", ".socket", ".timer", ".path")):
        return f"lib/systemd/system/{name}"
    stem, _, kind = name.rpartition(".")
    return {
        "sysusers": f"usr/lib/sysusers.d/{stem}.conf",
        "tmpfiles": f"usr/lib/tmpfiles.d/{stem}.conf",
        "default": f"etc/default/{stem}",
    }.get(kind)


def check_units_shipped(units: Path, deb: Path) -> None:
    """Every file in units/ is in the package: a new kind of file must not be left out silently."""
    contents = {
        line.split()[-1].removeprefix("./")
        for line in run(["dpkg-deb", "--contents", str(deb)]).splitlines()
    }
    missing = []
    for unit in sorted(units.iterdir()):
        destination = unit_file_destination(unit.name)
        if destination is None or destination not in contents:
            missing.append(f"units/{unit.name} -> {destination or '(no rule)'}")
    if missing:
        raise BuildError(
            f"{deb.name} lacks files of units/ (add them to debian/rules): {', '.join(missing)}"
        )


def read_sdist(dep_dir: Path) -> Sdist:
    for line in (dep_dir / "sdist").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version, sha256 = line.split()
            return Sdist(name, version, sha256)
    raise BuildError(f"{dep_dir / 'sdist'}: no 'NAME VERSION SHA256' line")


def fetch_sdist(sdist: Sdist, cache: Path) -> Path:
    """The source distribution from PyPI (kept in `cache`), checked against its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / sdist.filename
    if not path.exists():
        run(
            [
                "/usr/bin/python3",
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary=:all:",
                "--dest",
                str(cache),
                f"{sdist.name}=={sdist.version}",
            ]
        )
    if not path.exists():
        raise BuildError(f"pip download did not write {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sdist.sha256:
        path.unlink()
        raise BuildError(f"{path.name}: sha256 {digest}, expected {sdist.sha256}")
    return path


def recipe_key(dep_dir: Path) -> str:
    """A digest of everything a dependency's build reads from the checkout (sdist line, debian/)."""
    digest = hashlib.sha256(RECIPE_FORMAT)
    for path in sorted(dep_dir.rglob("*")):
        if path.is_file() or path.is_symlink():
            digest.update(str(path.relative_to(dep_dir)).encode() + b"\0")
            digest.update(
                path.readlink().as_posix().encode() if path.is_symlink() else path.read_bytes()
            )
    return digest.hexdigest()[:16]


def build_dependency(dep_dir: Path, work: Path, out: Path, logs: Path) -> list[Path]:
    """Build one dependency, or reuse its last build if its recipe has not changed since.

    The libraries change far less often than supervisord-vm: a rebuild of the package (and the
    upgrade build of the tests) then takes seconds, not the minute sdbus's C build takes.
    """
    cache = work / "cache" / f"{dep_dir.name}-{recipe_key(dep_dir)}"
    if not any(cache.glob("*.deb")):
        sdist = read_sdist(dep_dir)
        tarball = fetch_sdist(sdist, work / "sdists")
        source_root = work / "src" / dep_dir.name
        if source_root.exists():
            shutil.rmtree(source_root)
        source_root.mkdir(parents=True)
        shutil.unpack_archive(tarball, source_root)
        (unpacked,) = [path for path in source_root.iterdir() if path.is_dir()]
        shutil.copytree(dep_dir / "debian", unpacked / "debian", symlinks=True)
        for stale in cache.parent.glob(f"{dep_dir.name}-*"):
            shutil.rmtree(stale)
        cache.mkdir(parents=True)
        build_package(unpacked, cache, logs, orig=tarball)
    debs = []
    for built in cache.iterdir():
        shutil.copy2(built, out / built.name)
        if built.suffix == ".deb":
            debs.append(out / built.name)
    return debs


def lintian(changes: Sequence[Path], report: Path) -> str:
    """Lintian on every package built; errors and warnings fail (each accepted one carries an
    override with its reason in debian/), the whole report is kept in `report`."""
    result = subprocess.run(
        [
            "lintian",
            "--fail-on",
            "error,warning",
            "--display-info",
            "--tag-display-limit",
            "0",
            *map(str, changes),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    report.write_text(output)
    if result.returncode != 0:
        raise BuildError(f"lintian found errors (report: {report}):\n{output}")
    return output


def write_repository(dist: Path) -> None:
    """Packages and Release for a flat repository (`deb [trusted=yes] file:DIST ./`)."""
    packages = run(["apt-ftparchive", "packages", "."], cwd=dist)
    (dist / "Packages").write_text(packages)
    run(["gzip", "-9nkf", "Packages"], cwd=dist)
    release = run(["apt-ftparchive", "release", "."], cwd=dist)
    (dist / "Release").write_text(release)


def installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.endswith(" installed")


def debian_subset(dist: Path, target: Path) -> list[str]:
    """Download the bookworm packages that dist's packages need and this host lacks.

    The offline install test points apt at dist/ and at this directory only: it stands in for
    the host's Debian mirror (python3-pystemd, python3-sdnotify, ... come from there on a real
    host). The test's sandbox boots this host's own root, so "lacks" is judged here.
    """
    own = {deb.name.split("_", 1)[0] for deb in dist.glob("*.deb")}
    wanted: set[str] = set()
    for deb in dist.glob("*.deb"):
        depends = run(["dpkg-deb", "--field", str(deb), "Depends"]).strip()
        for group in filter(None, (part.strip() for part in depends.split(","))):
            names = [alt.split()[0].split(":")[0] for alt in group.split("|")]
            if not any(name in own or installed(name) for name in names):
                wanted.add(names[0])
    if target.exists():
        shutil.rmtree(target)
    (target / "partial").mkdir(parents=True)
    if wanted:
        run(
            [
                "apt-get",
                "install",
                "--download-only",
                "--yes",
                "--no-install-recommends",
                "-o",
                f"Dir::Cache::archives={target}",
                *sorted(wanted),
            ]
        )
    (target / "partial").rmdir()
    for lock in target.glob("lock"):
        lock.unlink()
    write_repository(target)
    return sorted(deb.name for deb in target.glob("*.deb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build supervisord-vm's .debs and apt repository.")
    parser.add_argument("--dist", type=Path, default=CHECKOUT / "dist", help="the apt repository")
    parser.add_argument("--workdir", type=Path, default=CHECKOUT / "build" / "deb")
    parser.add_argument(
        "--version", help="Debian version of supervisord-vm (default: debian/changelog)"
    )
    parser.add_argument("--only-main", action="store_true", help="build supervisord-vm only")
    parser.add_argument("--no-lintian", action="store_true")
    parser.add_argument(
        "--debian-subset",
        type=Path,
        help="also download the bookworm packages this host lacks into this directory "
        "(an offline stand-in for the Debian mirror, for tests)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        check_tools()
        work: Path = args.workdir.resolve()
        dist: Path = args.dist.resolve()
        out = work / "out"
        logs = work / "logs"
        for directory in (out, logs):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        debs: list[Path] = []
        if not args.only_main:
            for dep_dir in sorted(path for path in DEPS_DIR.iterdir() if path.is_dir()):
                debs += build_dependency(dep_dir, work, out, logs)
                print(
                    f"build-debs: {dep_dir.name} at {time.monotonic() - started:.0f} s", flush=True
                )
        source_tree = work / "src" / "supervisord-vm"
        copy_tree(CHECKOUT, source_files(CHECKOUT), source_tree)
        if args.version:
            set_version(source_tree, args.version)
        main_debs = build_package(source_tree, out, logs)
        check_units_shipped(source_tree / "units", main_debs[0])
        debs += main_debs
        print(f"build-debs: supervisord-vm at {time.monotonic() - started:.0f} s", flush=True)
        if not args.no_lintian:
            report = lintian(sorted(out.glob("*.changes")), work / "lintian.txt")
            print(report.strip() or "lintian: no tags", flush=True)
        dist.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            for old in dist.glob(deb.name.split("_", 1)[0] + "_*.deb"):
                old.unlink()  # an earlier build of the same package
            shutil.copy2(deb, dist / deb.name)
        write_repository(dist)
        if args.debian_subset is not None:
            fetched = debian_subset(dist, args.debian_subset.resolve())
            print(f"build-debs: from bookworm for the offline test: {' '.join(fetched) or '-'}")
    except BuildError as error:
        print(f"build-debs: {error}", file=sys.stderr)
        return 1
    for deb in sorted(dist.glob("*.deb")):
        print(f"{deb.stat().st_size:>9} {deb}")
    print(f"build-debs: {dist} ready in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
