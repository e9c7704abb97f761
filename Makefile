# Quick start: `make run` (set-up + the whole pipeline on the bundled corpus), `make test`
# (every tier: unit, distributed, e2e), `make test-fast` (the unit tier), `make test-docs`
# (every command and Python block of README.md and docs/ run as written), `make check-images`
# (the step images' environments as their Dockerfiles build them, running their steps).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local

.PHONY: run test test-fast test-docs check-images install compile bench clean lint

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mtnlg run --output $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "not docs" tests

# README.md and docs/ run as a reader runs them, in one workspace (tests/test_docs_run.py):
# a few minutes, so CI runs it as a step of its own
test-docs: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m docs tests

# the unit tier only (no subprocesses, no torchrun, no kfp.local): under a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit tests

# each step image's Python environment assembled as its Dockerfile does, running the steps that
# name it (images/check.py; .ci/run runs it after the tests)
check-images: $(STAMP)
	$(BIN)/python images/check.py

compile: $(STAMP)
	$(BIN)/mtnlg compile -o $(RUN_DIR)/pipeline.yaml

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs build dist *.egg-info
