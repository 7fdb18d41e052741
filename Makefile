# colofs: `make demo` runs the demo, `make test` the test suite, `make bench` the comparison with QEMU.
# Each installs what it needs on first use (Debian packages, then a venv) and is quick afterwards.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc make python3-venv python3-dev qemu-utils qemu-system-common qemu-system-x86 libnbd-bin fio attr
STAMP := $(VENV)/.installed

BENCH_APT := fuse3 qemu-utils qemu-system-common fio libnbd-bin

.PHONY: all demo test lint bench bench-quick bench-qemu10 bench-core bench-deps deps apt venv clean constraints

all: test

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# pyfuse3 is built from its sdist with patches/pyfuse3/ applied (a faster session loop); if that
# fails, build.sh says so and installs stock pyfuse3, which works too (COLOFS_STOCK_PYFUSE3=1 asks for it).
$(STAMP): pyproject.toml constraints.txt patches/pyfuse3/build.sh patches/pyfuse3/nonblocking-session-loop.patch
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	patches/pyfuse3/build.sh $(PY) constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

deps: apt
	@$(MAKE) --no-print-directory venv

demo: deps
	$(PY) examples/demo.py

lint: deps
	$(VENV)/bin/ruff check colofs mountctl tests bench examples

test: deps
	$(VENV)/bin/ruff check colofs mountctl tests bench examples
	$(VENV)/bin/pytest -q

bench-deps: deps
	@missing=""; for p in $(BENCH_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the comparison:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# QEMU 10.0.2 (bookworm-backports) unpacked beside the system's QEMU: the QEMU the comparison anchors on
QEMU10_DIR ?= /var/tmp/colofs-qemu-10.0.2
QEMU10_ARG = $$([ -x $(QEMU10_DIR)/usr/bin/qemu-storage-daemon ] && echo --qemu-bin $(QEMU10_DIR)/usr/bin)

bench-qemu10:
	@sh bench/get_qemu10.sh $(QEMU10_DIR)

# colofs (FUSE and NBD) beside the pyfuse3 floor, QEMU 10.0.2 and a raw file: table + bench/results/latest.json
bench: bench-deps bench-qemu10
	$(PY) -m bench.compare $(QEMU10_ARG) $(BENCH_ARGS)

bench-quick: bench-deps bench-qemu10
	$(PY) -m bench.compare --quick $(QEMU10_ARG) $(BENCH_ARGS)

# the core alone beside raw file I/O
bench-core: deps
	$(PY) bench/core_bench.py

# Refresh constraints.txt with the newest versions pyproject.toml allows (then run make test before committing it)
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip setuptools
	.venv-constraints/bin/pip install -q '.[test]' Cython  # Cython: what patches/pyfuse3/build.sh compiles pyfuse3 with
	{ sed -n '1,2p' constraints.txt; .venv-constraints/bin/pip freeze --all --exclude-editable | grep -v -i -e '^colofs' -e '^wheel=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-constraints

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
