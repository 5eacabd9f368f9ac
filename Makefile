# mongofeed development targets. Re-runs skip finished work via file targets and stamps.
# The work itself is done by `python3 -m mongofeed.dev ...` (standard library only), which
# also runs without make or bash, e.g. on Windows: see README.md, Development.

PYTHON_SYS ?= python3
DEV := $(PYTHON_SYS) -m mongofeed.dev
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
	$(DEV) server build

server-start: $(FERRETDB_BIN)
	$(DEV) server start --name $(FERRETDB_NAME) --port $(FERRETDB_PORT)

server-stop:
	$(DEV) server stop --name $(FERRETDB_NAME)

# A private FerretDB for the run, stopped whatever happens (or MONGOFEED_TEST_URI). Without
# test paths in PYTEST_ARGS: the whole suite over ipc, then the internal-socket tests again
# over loopback tcp, the transport of Windows (mongofeed/dev/run.py, TCP_PASS).
test: $(INSTALL_STAMP) $(FERRETDB_BIN)
	$(DEV) test $(PYTEST_ARGS)

demo: $(INSTALL_STAMP) $(FERRETDB_BIN)
	$(DEV) demo

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(INSTALL_STAMP) setup.cfg
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[bench]'
	touch $@

# A private FerretDB for the run, stopped whatever happens; BENCH_ARGS=--quick for a smoke run.
bench: $(BENCH_STAMP) $(FERRETDB_BIN)
	$(DEV) bench $(BENCH_ARGS)

lint: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .

clean-server:
	rm -rf .cache/ferretdb/run
