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

.PHONY: help test chaos test-all check lint typecheck imports bench bench-load demo system-deps venv constraints clean

help:
	@echo "make test       set everything up, then run the test suite (what CI runs)"
	@echo "make demo       set everything up, then run the end-to-end demo"
	@echo "make check      ruff, mypy, import contracts and the fast tests"
	@echo "make test-all   every test, slow ones included"
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

test-all: system-deps $(STAMP)
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

# --- demo ----------------------------------------------------------------------
demo: system-deps $(STAMP)
	$(VENV)/bin/edgeherd demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
