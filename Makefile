# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check detrkit tests benchmarks
	$(BIN)/ruff format --check detrkit tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/detrkit demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check detrkit tests benchmarks
	$(BIN)/ruff format --check detrkit tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
