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
	tests/vm/run-systemd-tests.sh

# Benchmarks (not tests): ratios measured side by side, ~9 min; tests/bench/README.md.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--phases flood,flows,accepted".
bench: bpf venv
	scripts/install-deps.sh bench
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)

# System-wide: a self-contained virtualenv under $(PREFIX), the command in $(BINDIR),
# and the service (install-service). DESTDIR stages it all for a package: files
# go under $(DESTDIR), while links, scripts and the unit name the final paths.
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
CONFDIR ?= /etc/tracer
LOGROTATE_DIR ?= /etc/logrotate.d
# systemd is running as PID 1 (sd_booted(3)): only then is there a manager to reload.
SYSTEMD_BOOTED = $(if $(DESTDIR),,$(wildcard /run/systemd/system))

install: bpf
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/pip install -q .
	install -D -m 0644 $(OBJ) $$($(DESTDIR)$(PREFIX)/bin/python -I -c 'import tracer, os; print(os.path.dirname(tracer.__file__))')/data/tracer.bpf.o
	$(if $(DESTDIR),grep -rlI -- '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin | xargs -r sed -i 's#$(DESTDIR)$(PREFIX)#$(PREFIX)#g')
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(PREFIX)/bin/tracer $(DESTDIR)$(BINDIR)/tracer
	@echo "installed: $(BINDIR)/tracer -> $(PREFIX)"
	$(MAKE) --no-print-directory install-service

# The unit, the example config (never over an operator's: installed only where
# none is), the logrotate snippet. A Python under /root or /home (pyenv), or a
# venv or editable checkout under /tmp, would be hidden by the unit's
# ProtectHome=yes and PrivateTmp=yes: a drop-in then shows the service those
# directories, read-only.
.PHONY: install-service uninstall-service
install-service:
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's#/usr/local/bin/tracer#$(BINDIR)/tracer#g' systemd/tracer.service > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service
	install -D -m 0644 systemd/tracer.logrotate $(DESTDIR)$(LOGROTATE_DIR)/tracer
	install -D -m 0644 systemd/tracer.toml $(DESTDIR)$(PREFIX)/share/tracer/tracer.toml.example
	install -d -m 0750 $(DESTDIR)$(CONFDIR)
	@if [ -e $(DESTDIR)$(CONFDIR)/tracer.toml ]; then \
	  echo "kept $(CONFDIR)/tracer.toml (the new example: $(PREFIX)/share/tracer/tracer.toml.example)"; \
	else install -m 0640 systemd/tracer.toml $(DESTDIR)$(CONFDIR)/tracer.toml; echo "installed $(CONFDIR)/tracer.toml"; fi
	@py=$(DESTDIR)$(PREFIX)/bin/python; [ -x $$py ] || py=$(PREFIX)/bin/python; \
	base=$$($$py -I -c 'import sys; print(sys.base_prefix)' 2>/dev/null); \
	pkg=$$($$py -I -c 'import os, tracer; print(os.path.dirname(os.path.dirname(tracer.__file__)))' 2>/dev/null); \
	dropin=$(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service.d/10-python-home.conf; \
	home=; binds=; \
	for d in $$base $(PREFIX) $$pkg; do case "$$d" in \
	  /root/*|/home/*) home=yes; binds="$$binds $$d";; \
	  /tmp/*|/var/tmp/*) binds="$$binds $$d";; \
	esac; done; \
	if [ -n "$$binds" ]; then install -d $$(dirname $$dropin); \
	  { echo '# made by make install: the Python, the venv or the code of $(PREFIX) lies where'; \
	    echo '# the unit hides (ProtectHome=, PrivateTmp=): those directories are shown read-only'; \
	    echo '[Service]'; [ -z "$$home" ] || echo 'ProtectHome=tmpfs'; echo "BindReadOnlyPaths=$${binds# }"; } > $$dropin; \
	  echo "$$dropin: visible read-only:$$binds"; \
	else rm -f $$dropin; fi
	$(if $(SYSTEMD_BOOTED),systemctl daemon-reload)
	@echo "service: systemctl enable --now tracer (config: $(CONFDIR)/tracer.toml)"

uninstall: uninstall-service
	rm -f $(DESTDIR)$(BINDIR)/tracer
	rm -rf $(DESTDIR)$(PREFIX)

# Symmetric to install-service; the config ($(CONFDIR)), the spool (/var/lib/tracer)
# and the event files (/var/log/tracer) stay: they are the operator's.
uninstall-service:
	$(if $(SYSTEMD_BOOTED),-systemctl disable --now tracer.service)
	rm -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service.d/10-python-home.conf
	-rmdir $(DESTDIR)$(SYSTEMD_UNIT_DIR)/tracer.service.d 2>/dev/null
	rm -f $(DESTDIR)$(LOGROTATE_DIR)/tracer $(DESTDIR)$(PREFIX)/share/tracer/tracer.toml.example
	-rmdir $(DESTDIR)$(PREFIX)/share/tracer 2>/dev/null
	$(if $(SYSTEMD_BOOTED),systemctl daemon-reload)

clean:
	rm -rf build $(VENV) *.egg-info
