# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   install into .venv and run the main job (writes out/)
#   make test   install into .venv and run lint + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install-test install-demo install-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install-demo: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[demo]"

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"

install-bench: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[bench]"

demo: install-demo
	$(BIN)/python examples/demo_logistic_prior.py --out out

test: install-test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install-test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

bench: install-bench
	$(BIN)/python benchmarks/run.py --out out/bench

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
