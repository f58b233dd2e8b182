# Two commands for people: `make demo` and `make test`. Both set up .venv first (idempotent).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# PIP_CONSTRAINT overrides the machine's pip config so the CPU torch build on disk is used.
export PIP_CONSTRAINT := $(CURDIR)/constraints/cpu.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast clean data lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: setup
	$(VPY) scripts/build_corpus.py
	$(VPY) scripts/build_chat.py

demo: setup data
	$(VENV)/bin/raclora train configs/quickstart.yaml
	$(VENV)/bin/raclora export runs/quickstart --format peft
	$(VENV)/bin/raclora export runs/quickstart --format merged

# PYTEST_ARGS: extra pytest options (.ci/run asks for a JUnit report and the slowest tests)
test: setup data lint
	$(VPY) -m pytest tests -q $(PYTEST_ARGS)

lint: setup
	$(VPY) -m ruff check raclora_dist tests benchmarks scripts
	$(VPY) -m mypy

test-fast: setup data lint
	$(VPY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
