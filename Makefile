# mongofeed development targets. Re-runs skip finished work via file targets and stamps.

PYTHON_SYS ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.installed
FERRETDB_BIN := .cache/ferretdb/bin/ferretdb
FERRETDB_NAME ?= default
FERRETDB_PORT ?= 27017
PYTEST_ARGS ?=

.PHONY: install ferretdb server-start server-stop test demo lint clean-server

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

lint: $(INSTALL_STAMP)
	$(VENV)/bin/ruff check .

clean-server:
	rm -rf .cache/ferretdb/run
