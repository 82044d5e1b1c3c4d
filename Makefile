# The two entry points of the README: `make demo` and `make test`.
# `make demo-model` retrains the shipped demo model (examples/demo/; about an hour on 2 CPUs).
# Both create the virtual environment at .venv and install baton into it (editable).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.baton-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
# Python run from the repository root would put the root first on sys.path, where kernels/,
# operator/, workers/ and proto/ shadow top-level packages (transformers imports Hugging Face's
# `kernels`). PYTHONSAFEPATH (Python >= 3.11) keeps the current directory off sys.path for
# every Python these targets start, the tests' subprocesses included.
export PYTHONSAFEPATH := 1
# The versions the tests compare against are bounded (pyproject's test extra); `make
# test-oldest` runs the suite with the oldest versions the bounds allow (constraints-oldest.txt).
VENV_OLDEST := .venv-oldest

.PHONY: demo demo-model test test-fast test-oldest install tools lint protos

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU wheels first: a looser torch requirement would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0 triton==3.8.0 numpy
	$(PIP) -e '.[kernels,operator,simulate,test,agents]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/baton up examples/demo.yaml

demo-model: install
	$(PY) tools/train_demo.py --out examples/demo --threads 2 --plot benchmarks/results/2026-12-02-demo-model-loss.png

# Binaries the tests use for real (a Prometheus server, helm); installed, never assumed.
tools:
	bash scripts/install-test-tools.sh

lint: install
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected nothing; that is not a failure of the suite.
test: install tools lint
	$(VENV)/bin/pytest -q -ra --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The unit tests only (no worker, operator or Prometheus processes, no e2e, no benchmarks:
# tests/conftest.py's SLOW_PATHS), for inner loops; `make test` is the whole suite.
test-fast: install
	$(VENV)/bin/pytest -q -ra -m "not slow" --durations=10; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The same suite in a second environment with the oldest versions of the compared-against
# packages (the lower bounds): a bound that is too low fails here, not at a user's.
test-oldest: install tools
	test -x $(VENV_OLDEST)/bin/python || python3 -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.8.0 numpy
	$(VENV_OLDEST)/bin/python -m pip install -q --disable-pip-version-check -c constraints-oldest.txt -e '.[kernels,operator,simulate,test]'
	$(VENV_OLDEST)/bin/pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

protos: install
	$(PY) proto/generate.py
