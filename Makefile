# mongofeed development targets. Re-runs skip finished work via file targets and stamps.

PYTHON_SYS ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.installed
FERRETDB_BIN := .cache/ferretdb/bin/ferretdb
FERRETDB_NAME ?= default
FERRETDB_PORT ?= 27017
PYTEST_ARGS ?=

.PHONY: install ferretdb server-start server-stop test demo bench lint clean-server

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): setup.cfg pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYS) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

ferretdb: $(FERRETDB_BIN)

$(FERRETDB_BIN):
	bin/ferretdb build

server-start: $(FERRETDB_BIN)
	bin/ferretdb start --name $(FERRETDB_NAME) --port $(FERRETDB_PORT)

server-stop:
	bin/ferretdb stop --name $(FERRETDB_NAME)

test: $(INSTALL_STAMP) $(FERRETDB_BIN)
	bin/run-tests $(PYTEST_ARGS)

demo: $(INSTALL_STAMP) $(FERRETDB_BIN)
	bin/demo

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_NAME ?= bench
BENCH_ARGS ?=

$(BENCH_STAMP): $(INSTALL_STAMP) setup.cfg
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[bench]'
	touch $@

# A private FerretDB for the run, stopped whatever happens; BENCH_ARGS=--quick for a smoke run.
bench: $(BENCH_STAMP) $(FERRETDB_BIN)
	@uri=$$(bin/ferretdb start --name $(BENCH_NAME) --port 0) || exit 1; \
	trap 'bin/ferretdb stop --name $(BENCH_NAME); rm -rf .cache/ferretdb/run/$(BENCH_NAME)' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	metrics=$$(bin/ferretdb metrics-url --name $(BENCH_NAME)) || exit 1; \
	$(VENV)/bin/mongofeed bench --uri "$$uri" --metrics-url "$$metrics" $(BENCH_ARGS)

lint: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .

clean-server:
	rm -rf .cache/ferretdb/run
