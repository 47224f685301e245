# The two commands: `make test` and `make demo`. Both create .venv if needed
# and install the pinned dependencies plus this package (editable) first.
# `make lint` runs ruff (configured in pyproject.toml); CI runs it before the tests.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tf_gradmix-installed
TESTS ?= tests
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv lint test demo clean distclean

venv: $(STAMP)

# Re-installs only when a requirements file or the package metadata changes.
$(STAMP): requirements/ci.txt requirements/constraints.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements/ci.txt -c requirements/constraints.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

lint: venv
	$(PY) -m ruff check .

# pytest exit code 5 means no test was collected: that is a failure here.
# Narrow a run with e.g. `make test TESTS=tests/test_examples.py PYTEST_ARGS=-x`.
test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(TESTS); \
	status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

demo: venv
	$(PY) -m examples.demo $(DEMO_ARGS)

clean:
	rm -rf runs build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtual environment.
distclean: clean
	rm -rf $(VENV)
