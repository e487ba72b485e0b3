# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c 'import hashlib,sys;print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest()[:12])')
PYTEST_ARGS ?=
# Two pytest workers, each taking whole files (module fixtures run once): the suite mostly waits
# on subprocesses and sockets, so two halve it even on two cores. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2

.PHONY: demo test bench lint lint-style lint-layers lint-types clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/backupd demo

test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# ruff, the import-layer contract (.importlinter) and mypy. One target each, so that
# `make -k lint` (what .ci/run runs before the tests) reports all three even when one fails.
lint: lint-style lint-layers lint-types

lint-style: $(STAMP)
	$(VENV)/bin/ruff check backupd tests bench tools

lint-layers: $(STAMP)
	$(VENV)/bin/lint-imports

lint-types: $(STAMP)
	$(VENV)/bin/mypy backupd

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .backupd .pytest_cache .hypothesis
