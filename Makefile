# tracer: set-up, demo, tests and install. Every target installs what it
# needs first, so each works on a fresh Debian 12 machine as root.
PYTHON ?= python3
VENV ?= .venv
PREFIX ?= /opt/tracer
BINDIR ?= /usr/local/bin
OBJ := build/tracer.bpf.o
STAMP := $(VENV)/.installed

.PHONY: all deps bpf venv demo lint test test-vm bench install uninstall clean

all: bpf venv

deps:
	scripts/install-deps.sh

$(OBJ): bpf/tracer.bpf.c bpf/tracer.h bpf/Makefile
	$(MAKE) -C bpf OUT=$(CURDIR)/build

bpf: deps $(OBJ)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(STAMP)

# The README's first command: a lab with broken firewalls, and what tracer sees.
demo: bpf venv
	$(VENV)/bin/tracer demo

# Lint and type checks (configured in pyproject.toml); `test` runs them first,
# so a new violation fails CI in seconds, before any BPF is loaded.
lint: venv
	$(VENV)/bin/ruff check tracer tests
	$(VENV)/bin/mypy

# The README's second command (and CI's): lint, then the whole test suite.
test: lint bpf venv
	CI=$${CI:-} $(VENV)/bin/python -m pytest tests -m "not vm" $(PYTEST_ARGS)
	$(MAKE) test-vm

# fentry/kprobe paths, inside a VM with Debian's stock kernel.
test-vm: bpf venv
	scripts/install-deps.sh vm
	tests/vm/run-vm-tests.sh

# Benchmarks (not tests): ratios measured side by side, ~9 min; tests/bench/README.md.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--phases flood,flows,accepted".
bench: bpf venv
	scripts/install-deps.sh bench
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)

# System-wide: a self-contained virtualenv under $(PREFIX), the command in $(BINDIR).
install: bpf
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --upgrade pip
	$(PREFIX)/bin/pip install -q .
	install -D -m 0644 $(OBJ) $$($(PREFIX)/bin/python -c 'import tracer, os; print(os.path.dirname(tracer.__file__))')/data/tracer.bpf.o
	ln -sf $(PREFIX)/bin/tracer $(BINDIR)/tracer
	@echo "installed: $(BINDIR)/tracer -> $(PREFIX)"

uninstall:
	rm -f $(BINDIR)/tracer
	rm -rf $(PREFIX)

clean:
	rm -rf build $(VENV) *.egg-info
