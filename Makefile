# Set-up and the two everyday commands. `make demo` and `make test` create the venv on first use.
# Installs are pinned by constraints.txt (exact versions, CI included); `make test-latest` tries the newest releases.
VENV ?= .venv
PY := $(VENV)/bin/python
PIN := -c constraints.txt
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test demo test test-latest lint clean

setup: $(STAMP)
setup-test: $(TEST_STAMP)

# The runtime only (what `dsv3-tools` needs). torch first, pinned: an unpinned torch in a fresh venv would pull a
# multi-GB CUDA build (torch==2.13.0 is a local CPU wheel on the project's machines).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) --upgrade pip
	$(PY) -m pip install -q $(PIN) torch
	$(PY) -m pip install -q $(PIN) -e .
	touch $(STAMP)

# The test tools on top (pytest, ruff, transformers as an independent reference, hypothesis ...).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q $(PIN) -e '.[test]'
	touch $(TEST_STAMP)

demo: setup
	$(VENV)/bin/dsv3-tools demo

test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not gpu"

# Drift on purpose: a separate venv with the newest releases the pyproject ranges allow (torch stays the CPU wheel).
# A failure here is news about a dependency, not a broken main; pin the fix, then refresh constraints.txt.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q torch==2.13.0
	.venv-latest/bin/python -m pip install -q --upgrade -e '.[test]'
	.venv-latest/bin/python -m pytest -q -m "not gpu"

lint: setup-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .venv-latest demo-out build dist *.egg-info
