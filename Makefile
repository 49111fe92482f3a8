# edgeherd — set-up and checks. `make test` and `make demo` work on a fresh
# Debian/Ubuntu machine: they install what is missing, then run.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgeherd-installed
TORCH := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help test chaos test-all arm64-deps check lint typecheck imports bench bench-load demo system-deps venv constraints clean

help:
	@echo "make test       set everything up, then run the test suite (what CI runs)"
	@echo "make demo       set everything up, then run the end-to-end demo"
	@echo "make check      ruff, mypy, import contracts and the fast tests"
	@echo "make test-all   every test, slow ones included (with arm64-deps: the Raspberry Pi agent under qemu)"
	@echo "make chaos      the chaos suite: faults injected into a running fleet, with its fault table"
	@echo "make bench      every performance suite; writes benchmarks/REPORT.md (ratios against in-run baselines)"
	@echo "make bench-load server load: 1,000-device ingest and artifact fan-out (several minutes)"
	@echo "make constraints  re-pin constraints.txt from the current .venv"

# --- system packages -----------------------------------------------------------
# Mosquitto is needed by the tests (they start their own broker) and the demo;
# systemd-analyze (Debian package systemd) by the tests that verify the units `edgeherd flash` writes;
# chromium by the test that drives the web TUI in a headless browser.
SYSTEM_TOOLS := mosquitto:mosquitto mosquitto_pub:mosquitto-clients mosquitto_sub:mosquitto-clients \
	systemd-analyze:systemd ssh:openssh-client scp:openssh-client ssh-keygen:openssh-client sshd:openssh-server \
	chromium:chromium
# Shared libraries, as library:package: LightGBM's wheel (the gradient-boosting tests) links OpenMP's runtime.
SYSTEM_LIBS := libgomp.so.1:libgomp1

system-deps:
	@missing=""; packages=""; \
	for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  PATH="$$PATH:/usr/sbin:/usr/local/sbin" command -v $$tool >/dev/null 2>&1 && continue; \
	  missing="$$missing $$tool"; \
	  case " $$packages " in *" $$pkg "*) ;; *) packages="$$packages $$pkg" ;; esac; \
	done; \
	for pair in $(SYSTEM_LIBS); do \
	  lib=$${pair%%:*}; pkg=$${pair#*:}; \
	  PATH="$$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null | grep -q "$$lib " && continue; \
	  missing="$$missing $$lib"; packages="$$packages $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> missing:$$missing; installing$$packages with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else \
	    echo "error:$$missing missing and this user cannot run apt-get (not root, no sudo)."; \
	    echo "       Install it yourself:  apt-get install$$packages"; exit 1; fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "error:$$missing missing and apt-get is not available on this system."; \
	    echo "       Install Mosquitto 2.x (broker and clients), systemd-analyze, OpenSSH (client and server), Chromium and libgomp1 with your package manager, then rerun."; \
	    exit 1; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$packages >/dev/null || { \
	    echo "error: apt-get could not install$$packages (see above)."; \
	    echo "       Fix the package sources or install them by hand, then rerun."; exit 1; }; \
	fi

# The arm64 device under emulation (tests/test_arm64_qemu.py, in test-all): qemu-user-static runs Debian's arm64
# programs, debootstrap makes the arm64 root filesystem, and the kernel's binfmt_misc hands arm64 executables to
# qemu (flag F, so they run inside a chroot too). Not needed on an arm64 machine. Where a piece cannot be had
# (not root, no apt-get, binfmt_misc not mountable) it says so and the test skips with the reason.
arm64-deps:
	@if [ "$$(uname -m)" = aarch64 ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else \
	  echo "note: not root and no sudo: the arm64 test needs root (chroot) and skips"; exit 0; fi; \
	packages=""; \
	command -v qemu-aarch64-static >/dev/null 2>&1 || packages="$$packages qemu-user-static"; \
	PATH="$$PATH:/usr/sbin" command -v debootstrap >/dev/null 2>&1 || packages="$$packages debootstrap"; \
	if [ -n "$$packages" ]; then \
	  echo "==> installing$$packages with apt-get (the arm64 device under qemu)"; \
	  { $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$packages >/dev/null; } \
	    || echo "warning: apt-get could not install$$packages; the arm64 test will skip"; fi; \
	b=/proc/sys/fs/binfmt_misc; \
	[ -e $$b/register ] || $$sudo mount -t binfmt_misc binfmt_misc $$b 2>/dev/null || true; \
	if [ -e $$b/register ] && [ ! -e $$b/qemu-aarch64 ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then \
	  $$sudo sh -c "cat /usr/lib/binfmt.d/qemu-aarch64.conf > $$b/register" \
	    && echo "==> registered qemu-aarch64 with binfmt_misc" \
	    || echo "warning: could not register qemu-aarch64 with binfmt_misc; the arm64 test will skip"; fi

# --- Python environment --------------------------------------------------------
# torch goes in first, from the CPU wheel, so nothing else can pull a CUDA build;
# then the project with every extra, held to constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c constraints.txt -e '.[all,dev]'
	@touch $(STAMP)

venv: $(STAMP)

constraints: $(STAMP)
	@{ grep '^#' constraints.txt; \
	   $(PIP) freeze --exclude-editable | grep -v '^edgeherd' | sed 's/^torch==.*/$(TORCH)/' | sort -f; } > constraints.new
	@mv constraints.new constraints.txt && echo "constraints.txt re-pinned"

# --- tests and checks ----------------------------------------------------------
test: system-deps $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

chaos: system-deps $(STAMP)
	$(PY) -m pytest -m chaos -s $(PYTEST_ARGS)

test-all: system-deps arm64-deps $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports --config pyproject.toml

check: system-deps lint typecheck imports
	$(PY) -m pytest -m "not slow and not integration" -q $(PYTEST_ARGS)

bench: system-deps $(STAMP)
	$(PY) -m benchmarks.report

bench-load: system-deps $(STAMP)
	$(PY) -m benchmarks.ingest
	$(PY) -m benchmarks.artifact_fanout
	$(PY) -m benchmarks.fleet_connections --devices 1000 10000

# --- demo ----------------------------------------------------------------------
demo: system-deps $(STAMP)
	$(VENV)/bin/edgeherd demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
