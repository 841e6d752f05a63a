# supervisord-vm — developer and install targets. Everything here runs as root.
#   make test     install what is missing, then run the whole test suite (unit + integration)
#   make check    formatting, lint and strict typing
#   make reliability  the reliability proofs with their full counts (RELIABILITY.md)
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
APT_PACKAGES := qemu-system-x86 systemd-container libsystemd-dev pkg-config gcc gdb \
	python3-venv python3-dev dbus util-linux qemu-utils iproute2 ovmf

.PHONY: deps venv test test-host test-sandbox check reliability

# Debian packages the build and the tests need; installs only what is missing.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv is made from Debian's own python3, as on the target host (PEP 668: no system pip).
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

check: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict supervisord_vm tests $(wildcard bench)

# Host-side: the sandbox's own teardown guarantees (boots throwaway containers).
test-host: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/host

# Everything else runs inside one sandbox with real systemd, D-Bus and QEMU.
test-sandbox: venv
	$(VENV)/bin/python -m tests.sandbox -- -q -p no:cacheprovider tests/unit tests/integration

test: test-host test-sandbox

# The reliability proofs with their full counts (RELIABILITY.md; `make test` runs reduced ones).
RELIABILITY_COUNTS := SVM_CHAOS_ITERATIONS=60 SVM_LOAD_SECONDS=60 SVM_FUZZ_CALLS=10000 \
	SVM_FUZZ_EXAMPLES=2000 SVM_INFRA_REPEAT=10
reliability: venv
	$(RELIABILITY_COUNTS) $(VENV)/bin/python -m tests.sandbox -- -q -p no:cacheprovider \
		tests/unit/test_definition_fuzz.py tests/integration/test_crash_consistency.py \
		tests/integration/test_chaos.py tests/integration/test_load.py \
		tests/integration/test_infra_faults.py tests/integration/test_hostile_input.py \
		tests/integration/test_pending_operations.py tests/integration/test_pending_operation_races.py

# --- benchmarks (issue 8; bench/RESULTS.md) -------------------------------------------------------
# make bench [BENCH_ARGS="--runs 30 --counts 100,250,500"]   figures into bench/RESULTS.md (minutes)
# make bench-smoke   the same code with 3 VMs and 3 runs: fails on errors, never on numbers
# libvirt, the baseline, is installed on the host (the sandbox boots the host's root) and, when
# this installs it, disabled there again, so that other sandboxes do not boot it; the bench
# starts it itself. matplotlib (the plot) and py-spy come from the `bench` extra.
BENCH_APT_PACKAGES := libvirt-daemon-system libvirt-clients
LIBVIRT_UNITS := libvirtd.service libvirt-guests.service libvirtd.socket libvirtd-ro.socket \
	libvirtd-admin.socket virtlogd.socket virtlogd-admin.socket virtlockd.socket virtlockd-admin.socket
BENCH_RUN = $(VENV)/bin/python -m tests.sandbox --exec $(CURDIR)/$(VENV)/bin/python -m bench.run

.PHONY: bench bench-smoke bench-deps

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

bench-deps: venv $(VENV)/.bench-installed
	@if ! dpkg-query -W -f='$${Status}\n' libvirt-daemon-system 2>/dev/null | grep -q '^install ok installed'; then \
		$(MAKE) --no-print-directory deps APT_PACKAGES="$(BENCH_APT_PACKAGES)" && \
		systemctl disable --quiet $(LIBVIRT_UNITS); \
	fi

bench: bench-deps
	SVM_BENCH_OTHER_SANDBOXES=$$(pgrep -c -x systemd-nspawn) $(BENCH_RUN) $(BENCH_ARGS)

bench-smoke: bench-deps
	$(BENCH_RUN) --smoke

# --- install / uninstall (issue 4) ------------------------------------------------------------
# make install [DESTDIR=/staging] [PREFIX=/usr/local] [WHEELHOUSE=dir-of-wheels]
# The service runs on Debian's /usr/bin/python3 in its own venv (PEP 668): $(LIBDIR)/venv holds
# the package and its dependencies; the two commands are symlinked into $(BINDIR). D-Bus only
# reads its policy and activation files from /usr/share, whatever the PREFIX.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/supervisord-vm
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR ?= $(PREFIX)/share/doc/supervisord-vm
DBUSPOLICYDIR ?= /usr/share/dbus-1/system.d
DBUSSERVICEDIR ?= /usr/share/dbus-1/system-services
DEFAULTDIR ?= /etc/default
WHEELHOUSE ?=
PIP_SOURCE = $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE),)
SYSTEMD_RUNNING = test -d /run/systemd/system
INSTALLED_VENV = $(DESTDIR)$(LIBDIR)/venv

.PHONY: install uninstall demo demo-inside

install:
	test -x $(PYTHON) || { echo "install: $(PYTHON) is missing (apt-get install python3-venv)"; exit 1; }
	rm -rf $(INSTALLED_VENV)
	$(PYTHON) -m venv $(INSTALLED_VENV)
	$(INSTALLED_VENV)/bin/pip install -q --disable-pip-version-check $(PIP_SOURCE) .
	@# A venv built under DESTDIR must name its final location in its scripts.
	if [ -n "$(DESTDIR)" ]; then \
		grep -rlI -- '$(DESTDIR)' $(INSTALLED_VENV)/bin | xargs -r sed -i 's|$(DESTDIR)||g'; \
	fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(TMPFILESDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DBUSPOLICYDIR) $(DESTDIR)$(DBUSSERVICEDIR) \
		$(DESTDIR)$(DEFAULTDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)/etc/supervisord-vm/vms
	ln -sfn $(LIBDIR)/venv/bin/svmctl $(DESTDIR)$(BINDIR)/svmctl
	ln -sfn $(LIBDIR)/venv/bin/supervisord-vm $(DESTDIR)$(BINDIR)/supervisord-vm
	for unit in supervisord-vm.service supervisord-vm-guests.service; do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
			units/$$unit > $(DESTDIR)$(UNITDIR)/$$unit; \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	done
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -m 0644 units/supervisord-vm.tmpfiles $(DESTDIR)$(TMPFILESDIR)/supervisord-vm.conf
	install -m 0644 units/supervisord-vm.sysusers $(DESTDIR)$(SYSUSERSDIR)/supervisord-vm.conf
	install -m 0644 units/org.supervisordvm1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.supervisordvm1.conf
	install -m 0644 units/org.supervisordvm1.service $(DESTDIR)$(DBUSSERVICEDIR)/org.supervisordvm1.service
	test -e $(DESTDIR)$(DEFAULTDIR)/supervisord-vm || \
		install -m 0644 units/supervisord-vm.default $(DESTDIR)$(DEFAULTDIR)/supervisord-vm
	@# On the live system: group, directories, and make systemd and D-Bus see the new files.
	if [ -z "$(DESTDIR)" ] && $(SYSTEMD_RUNNING); then \
		systemd-sysusers $(SYSUSERSDIR)/supervisord-vm.conf && \
		systemd-tmpfiles --create $(TMPFILESDIR)/supervisord-vm.conf && \
		systemctl daemon-reload && \
		busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig; \
	fi
	@echo "installed; start with: systemctl enable --now supervisord-vm.service supervisord-vm-guests.service"

# Stops the daemon (VMs keep running in their scopes) and removes what install put in place;
# definitions (/etc/supervisord-vm), state and logs stay, like `apt remove` without purge.
# The guests unit is stopped without its ExecStop (a runtime drop-in empties it): that would
# shut the VMs down, and stopped after its svmctl was removed it would end `failed`.
GUESTS_DROPIN_DIR := /run/systemd/system/supervisord-vm-guests.service.d
uninstall:
	if [ -z "$(DESTDIR)" ] && $(SYSTEMD_RUNNING); then \
		systemctl disable --quiet supervisord-vm-guests.service supervisord-vm.service 2>/dev/null; \
		mkdir -p $(GUESTS_DROPIN_DIR) && printf '[Service]\nExecStop=\n' > $(GUESTS_DROPIN_DIR)/uninstall.conf && \
		systemctl daemon-reload && \
		systemctl stop supervisord-vm-guests.service supervisord-vm.service 2>/dev/null; \
		rm -rf $(GUESTS_DROPIN_DIR); \
		true; \
	fi
	rm -f $(DESTDIR)$(BINDIR)/svmctl $(DESTDIR)$(BINDIR)/supervisord-vm \
		$(DESTDIR)$(UNITDIR)/supervisord-vm.service $(DESTDIR)$(UNITDIR)/supervisord-vm-guests.service \
		$(DESTDIR)$(TMPFILESDIR)/supervisord-vm.conf $(DESTDIR)$(SYSUSERSDIR)/supervisord-vm.conf \
		$(DESTDIR)$(DBUSPOLICYDIR)/org.supervisordvm1.conf \
		$(DESTDIR)$(DBUSSERVICEDIR)/org.supervisordvm1.service
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	if [ -z "$(DESTDIR)" ] && $(SYSTEMD_RUNNING); then \
		systemctl daemon-reload; \
		busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig; \
	fi
	@echo "uninstalled; kept /etc/supervisord-vm, /etc/default/supervisord-vm, /var/lib/supervisord-vm, /var/log/supervisord-vm"

# Quick start. With systemd as PID 1: install, start the service, run a demo VM. Without it
# (containers, CI machines): the same inside a throwaway systemd-nspawn sandbox that stays up.
demo: venv
	@if [ "$$(cat /proc/1/comm)" = systemd ]; then \
		$(MAKE) --no-print-directory demo-inside; \
	else \
		$(VENV)/bin/python -m tests.sandbox --keep --exec $(MAKE) -C $(CURDIR) --no-print-directory demo-inside; \
	fi

demo-inside: install
	systemctl enable --now supervisord-vm.service supervisord-vm-guests.service
	$(CURDIR)/$(VENV)/bin/python -c 'import sys; from pathlib import Path; \
		from tests.guests import write_acpi_guest; write_acpi_guest(Path(sys.argv[1]))' \
		/var/lib/supervisord-vm/images/demo.img
	$(BINDIR)/svmctl define examples/demo.toml
	$(BINDIR)/svmctl start demo
	$(BINDIR)/svmctl list --all
	$(BINDIR)/svmctl status demo
	systemctl --no-pager status svm-demo.scope | head -n 8

# --- Debian packages (issue 10) ---------------------------------------------------------------
# make deb        supervisord-vm and the Python libraries bookworm lacks (qemu.qmp, sdbus: from
#                 their PyPI sdists) as .debs in $(DIST)/ with an apt index, lintian-checked:
#                 `deb [trusted=yes] file:$(CURDIR)/$(DIST) ./` then `apt install supervisord-vm`.
#                 Also fetches the few bookworm packages this host lacks into build/deb/
#                 bookworm-subset (the offline install test's stand-in for the Debian mirror).
# make deb-deps   the Debian packages the build needs
# The build runs with a clean environment and Debian's python3 (pyenv's first on PATH breaks
# pybuild).
DIST ?= dist
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-all-dev \
	python3-setuptools python3-setuptools-scm python3-wheel python3-pip libsystemd-dev pkg-config \
	dpkg-dev apt-utils lintian git

.PHONY: deb deb-deps

deb-deps:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(DEB_BUILD_PACKAGES)"

deb: deb-deps
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$$HOME" /usr/bin/python3 \
		packaging/build_debs.py --dist $(DIST) --debian-subset build/deb/bookworm-subset
