# supervisord-vm — developer and install targets. Everything here runs as root.
#   make test     install what is missing, then run the whole test suite (unit + integration)
#   make check    formatting, lint and strict typing
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
APT_PACKAGES := qemu-system-x86 systemd-container libsystemd-dev pkg-config gcc gdb \
	python3-venv python3-dev dbus util-linux

.PHONY: deps venv test test-host test-sandbox check

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
