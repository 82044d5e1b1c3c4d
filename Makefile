# The two entry points of the README: `make demo` and `make test`.
# `make demo-model` retrains the shipped demo model (examples/demo/; about an hour on 2 CPUs).
# Both create the virtual environment at .venv and install baton into it (editable).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.baton-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo demo-model test install tools lint protos

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU wheels first: a looser torch requirement would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0 triton==3.8.0 numpy
	$(PIP) -e '.[kernels,operator,simulate,test]'
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
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

protos: install
	$(PY) proto/generate.py
