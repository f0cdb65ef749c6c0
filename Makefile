# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing, install attnlab with its
# dev extra, make sure Fashion-MNIST is present, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attnlab-installed
PYTEST_WORKERS ?= 2

.PHONY: demo test docs setup data lint bench claims clean

setup: $(STAMP)
	@$(PY) scripts/fetch_timm_tests.py  # timm's own model tests, for tests/test_timm_conformance.py

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,captum,detection,cluster,docs]"
	@touch $(STAMP)

data: setup
	@PY=$(PY) sh scripts/ensure-fashion-mnist.sh

demo: data
	$(PY) -m attnlab compare --preset quick --out runs/demo --resume --jobs 2

test: data  # the 20 slowest tests are listed at the end: the suite should stay under ~10 min on 2 cores
	$(PY) -m ruff check attnlab tests benchmarks studies
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q --durations=20

docs: $(STAMP)  # the site, rebuilt whole (-E) with warnings as errors; open docs/_build/html/index.html
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

claims: data  # every claim preset at its cpu budget, resumable; small files kept under studies/results/claims/
	$(PY) studies/claims.py --budget cpu --compile
	$(PY) studies/digest.py

bench: data
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .timm-tests
