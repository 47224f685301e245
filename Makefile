# The two commands: `make test` and `make demo`. Both create their virtual
# environments if needed and install the pinned dependencies plus this package
# (editable) first. `make lint` runs ruff (configured in pyproject.toml); CI
# (.ci/run) runs it before the tests. CONTRIBUTING.md lists the targets and
# how long each suite takes.
#
# Two environments:
#   .venv        TensorFlow 2.21 (CPU), JAX 0.10.2 and PyTorch 2.13 (CPU): requirements/ci.txt,
#                pinned by requirements/constraints.txt
#   .venv-tf219  TensorFlow 2.19.1 (CPU), the last TensorFlow with TPU
#                support: requirements/tf219.txt, pinned by
#                requirements/constraints-tf219.txt

PYTHON ?= python3
VENV ?= .venv
VENV_TF219 ?= .venv-tf219
PY := $(VENV)/bin/python
PY_TF219 := $(VENV_TF219)/bin/python
STAMP := $(VENV)/.tf_gradmix-installed
STAMP_TF219 := $(VENV_TF219)/.tf_gradmix-installed
TESTS ?= tests
# TensorFlow 2.19.1 runs the library and the upstream sentinels (the scripts'
# tests do not depend on the TensorFlow version); `make test-tf219
# TESTS_TF219=tests` runs everything there.
TESTS_TF219 ?= $(if $(filter tests,$(TESTS)),tests/library tests/upstream,$(TESTS))
PYTEST_ARGS ?=
BACKEND ?= tensorflow
DEMO_ARGS ?=
BACKENDS := tensorflow jax torch

.PHONY: venv venv-tf219 lint test test-tf test-tf-library test-tf-rest test-jax test-torch test-tf219 test-fast cpu-time mutations demo clean distclean

venv: $(STAMP)
venv-tf219: $(STAMP_TF219)

# $(call install,VENV,REQUIREMENTS,CONSTRAINTS): create VENV if needed and
# install the pinned requirements and the package; the stamp file makes this
# re-run only when a requirements file or the package metadata changes.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --upgrade pip
	$(1)/bin/python -m pip install -r $(2) -c $(3)
	$(1)/bin/python -m pip install --no-deps --no-build-isolation -e .
	touch $(1)/.tf_gradmix-installed
endef

$(STAMP): requirements/ci.txt requirements/constraints.txt setup.py pyproject.toml
	$(call install,$(VENV),requirements/ci.txt,requirements/constraints.txt)

$(STAMP_TF219): requirements/tf219.txt requirements/constraints-tf219.txt setup.py pyproject.toml
	$(call install,$(VENV_TF219),requirements/tf219.txt,requirements/constraints-tf219.txt)

lint: venv
	$(PY) -m ruff check .

# $(call pytest,NAME,ENVIRONMENT,PYTHON,ARGS): one pytest process, timed.
# pytest's exit code 5 (no test collected) is a failure here.
define pytest
	@echo "== $(1) ($(3))"
	@start=$$(date +%s); \
	$(2) $(3) -m pytest -q -p no:cacheprovider $(4); \
	status=$$?; \
	echo "== $(1): pytest exit $$status after $$(( $$(date +%s) - start )) s; CPU time (user, system) of this shell, then of pytest and its subprocesses:"; times; \
	if [ $$status -eq 5 ]; then echo "make: the $(1) suite collected no tests" >&2; exit 1; fi; \
	exit $$status
endef

# The whole suite on each backend and TensorFlow version, each in its own
# pytest process (KERAS_BACKEND is fixed per process), two processes at a time
# for the two cores CI has. `make -j2` is the queue: each core takes the next
# suite in SUITES when it finishes one, so SUITES is ordered by CPU time, the
# longest first (CONTRIBUTING.md, "Suite times"), and the TensorFlow
# 2.21 suite runs as two processes (the library with the upstream sentinels,
# and the rest) so that the two cores finish together. Each suite's output is
# printed whole when it ends (--output-sync); all of them run (-k) and the
# target fails if any fails or collects no test. Narrow every run with e.g.
# `make test TESTS=tests/library/test_noise.py PYTEST_ARGS=-x` (TensorFlow 2.21
# then runs as one process), or run one suite: `make test-tf`, `make test-jax`,
# `make test-torch`, `make test-tf219`. A new backend's suite is one more
# target in SUITES, placed by its CPU time.
TF_PARTS := $(if $(filter tests,$(TESTS)),test-tf-library test-tf-rest,test-tf)
SUITES ?= $(filter test-tf-library,$(TF_PARTS)) test-tf219 $(filter-out test-tf-library,$(TF_PARTS)) test-jax test-torch
SUITE_JOBS ?= 2
test: venv venv-tf219
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory -k -j$(SUITE_JOBS) --output-sync=target $(SUITES); \
	status=$$?; \
	echo "make test: $(SUITES): $$( [ $$status -eq 0 ] && echo passed || echo FAILED) after $$(( $$(date +%s) - start )) s"; \
	exit $$status

test-tf: venv
	$(call pytest,TensorFlow 2.21,KERAS_BACKEND=tensorflow,$(PY),$(PYTEST_ARGS) $(TESTS))

# The TensorFlow 2.21 suite in two processes, as `make test` runs it.
TF_LIBRARY_TESTS := tests/library tests/upstream
test-tf-library: venv
	$(call pytest,TensorFlow 2.21 library,KERAS_BACKEND=tensorflow,$(PY),$(PYTEST_ARGS) $(TF_LIBRARY_TESTS))

test-tf-rest: venv
	$(call pytest,TensorFlow 2.21 scripts and docs,KERAS_BACKEND=tensorflow,$(PY),$(PYTEST_ARGS) $(addprefix --ignore=,$(TF_LIBRARY_TESTS)) tests)

# The tests marked backend_independent (static checks of the files, the
# scripts' pure-Python logic) run in the TensorFlow 2.21 suite only.
ONCE := --skip-backend-independent

test-jax: venv
	$(call pytest,JAX,KERAS_BACKEND=jax,$(PY),$(ONCE) $(PYTEST_ARGS) $(TESTS))

test-torch: venv
	$(call pytest,PyTorch,KERAS_BACKEND=torch,$(PY),$(ONCE) $(PYTEST_ARGS) $(TESTS))

test-tf219: venv-tf219
	$(call pytest,TensorFlow 2.19,KERAS_BACKEND=tensorflow,$(PY_TF219),$(ONCE) $(PYTEST_ARGS) $(TESTS_TF219))

# The edit-test loop, in two processes (pytest-xdist, a test file per
# process: XDIST): the TensorFlow suite without the tests marked `slow` (worker
# clusters, real training runs) and without those whose CPU time recorded in
# tests/cpu_time.json exceeds FAST_MAX_CPU_SECONDS (strategies, XLA compiles,
# Keras applications); `make test` runs them all.
FAST_MAX_CPU_SECONDS ?= 1.5
XDIST ?= -n 2 --dist loadfile
test-fast: venv
	$(call pytest,TensorFlow 2.21 without slow tests,KERAS_BACKEND=tensorflow,$(PY),-m "not slow" --max-cpu-time $(FAST_MAX_CPU_SECONDS) $(XDIST) $(PYTEST_ARGS) $(TESTS))

# Re-records each test's CPU time (tests/cpu_time.py) on TensorFlow 2.21, the
# backend `make test-fast` runs; commit tests/cpu_time.json.
cpu-time: venv
	$(call pytest,TensorFlow 2.21 recording CPU time,KERAS_BACKEND=tensorflow,$(PY),--record-cpu-time $(XDIST) $(PYTEST_ARGS) $(TESTS))

# The mutation table of CONTRIBUTING.md: one-line bugs in the library, each
# run against its module's tests on a temporary copy (`MUTATIONS=name ...` for some).
MUTATIONS ?=
mutations: venv
	$(PY) tests/mutations.py $(MUTATIONS)

# `make demo BACKEND=jax` (or torch) runs the demo on Keras's JAX (PyTorch) backend. The data: $TF_GRADMIX_DATA, else
# this machine's copy beside the repository, else keras.datasets downloads it.
DEMO_DATA := $(or $(TF_GRADMIX_DATA),$(wildcard $(abspath ../shared/data)))
demo: venv
	@case " $(BACKENDS) " in *" $(BACKEND) "*) ;; \
	  *) echo "make demo: BACKEND=$(BACKEND) is not one of: $(BACKENDS)" >&2; exit 2;; esac
	KERAS_BACKEND=$(BACKEND) TF_GRADMIX_DATA=$(DEMO_DATA) $(PY) -m examples.demo $(DEMO_ARGS)

clean:
	rm -rf runs build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -path ./$(VENV_TF219) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtual environments.
distclean: clean
	rm -rf $(VENV) $(VENV_TF219)
