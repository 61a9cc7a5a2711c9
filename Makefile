# qlr developer entry points. `make demo` and `make test` set up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast quality bench-quick clean

$(VENV)/.setup-stamp: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(VENV)/.setup-stamp

demo: setup  ## compress SmolLM2 with ODLRI at ~2.5 bits/weight and print FP vs RTN vs ODLRI
	$(VENV)/bin/qlr demo

test: setup  ## unit tests + the marked SmolLM2 integration tests
	$(PY) -m pytest -q

test-fast: setup  ## unit tests only
	$(PY) -m pytest -q -m "not integration"

quality: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench-quick: setup
	$(PY) benchmarks/synthetic.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
