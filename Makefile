# pyvmm: `make run` boots the default guest, `make test` runs the test suite.
# Everything a fresh Debian/Ubuntu machine needs is installed on the way (apt, pip).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT    := tools/apt-install.sh
# Arguments for `make run`, e.g. make run ARGS="--memory 1G --cpus 2"
ARGS   ?=

.PHONY: all deps guest run test unit bench clean help

all: help

help:
	@echo "make run     build what is missing and boot the default guest (Ctrl-A X quits)"
	@echo "make test    run the whole test suite (unit + real-guest integration)"
	@echo "make unit    only the fast unit tests"
	@echo "make guest   build the default guest kernel and initramfs (cached in ~/.cache/pyvmm)"
	@echo "make bench   benchmarks against QEMU; writes docs/benchmarks.md"

$(VENV)/.installed: pyproject.toml
	@$(APT) python3-venv python3-dev gcc
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

deps: $(VENV)/.installed

guest: deps
	$(PY) -m guest_images.build

run: guest
	$(VENV)/bin/pyvmm run $(ARGS)

unit: deps
	$(PY) -m pytest -q tests/unit

test: guest
	@$(APT) acpica-tools
	$(PY) -m pytest -q -ra tests

bench: guest
	@$(APT) qemu-system-x86 qemu-system-data gcc
	$(PY) tools/bench/run.py --output docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
