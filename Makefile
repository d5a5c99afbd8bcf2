# casemine: `make run` sets up the environment if needed and runs the nightly flow on the sample;
# `make test` runs the tests. Everything installs from pyproject.toml pinned by constraints.txt.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CASEMINE := $(VENV)/bin/casemine
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv run sample test test-fast lint bench bench-scale notebook lock clean

venv: $(STAMP)

# torch first, by exact version: it is the local CPU wheel; anything looser pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: venv
	$(CASEMINE) run

sample: venv
	$(CASEMINE) sample --out data/sample --labels-out tests/fixtures/sample_labels.jsonl

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

# Style, types and the architecture: no package imports a later stage ([tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check pipeline
	$(VENV)/bin/ruff format --check pipeline
	$(VENV)/bin/mypy pipeline
	$(VENV)/bin/lint-imports

bench: venv
	$(PY) -m bench

# The big sizes (hours here): whole runs of 10k and 100k transcripts with peak RSS, index builds at
# 100k, query latency and HNSW recall at 100k and 1M cases (the query indexes are built once into
# bench/results/query-index-<N>/, the 1M one taking a quarter of an hour or more, then reused).
bench-scale: venv
	$(PY) -m bench --scale

# JupyterLab on the analysts' notebook (reads exports/LATEST under $$CASEMINE_OUT, default data).
notebook: venv
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,analyst]'
	$(VENV)/bin/jupyter lab notebooks/analyst.ipynb

# Rebuild the lock from a clean venv (needs the package registry).
lock:
	rm -rf /tmp/casemine-lock && $(PYTHON) -m venv /tmp/casemine-lock
	/tmp/casemine-lock/bin/pip install --quiet torch==2.13.0 && /tmp/casemine-lock/bin/pip install --quiet -e '.[dev,analyst]'
	{ sed -n '1,/^# Regenerate/p' constraints.txt; /tmp/casemine-lock/bin/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
